"""A Thinking checkpoint behind the other dialects (Anthropic Messages, Ollama, OpenAI Responses),
each through its official client: the thought in the dialect's own place, never in the answer.

The server runs the tiny Thinking checkpoint with `--reasoning-budget 64`; with random weights its
thoughts never close on their own, so every thought here is ended by a budget. Greedy answers are
compared with /v1/chat/completions', whose usage counts the thought's tokens."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

from tests.server.conftest import png_b64

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def chat(thinking_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0)


def _reference(chat: openai.OpenAI, budget: int, max_tokens: int) -> tuple[str, str, int, int]:
    """The greedy thought, answer, reasoning and completion tokens /v1/chat/completions gives for QUESTION
    and the image."""
    r = chat.chat.completions.create(model="m", max_tokens=max_tokens, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
                                     {"type": "text", "text": QUESTION}]}], extra_body={"reasoning_budget": budget})
    return ((r.choices[0].message.model_extra or {}).get("reasoning_content"), r.choices[0].message.content,
            r.usage.completion_tokens_details.reasoning_tokens, r.usage.completion_tokens)


# ---- Anthropic Messages --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def claude(thinking_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=120)


def _claude_messages() -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64()}},
        {"type": "text", "text": QUESTION}]}]


def test_anthropic_thinking_block_before_the_text(claude, chat):
    thought, answer, n_thought, n_out = _reference(chat, 7, 20)
    assert n_thought == 7
    kw = dict(model="m", max_tokens=20, messages=_claude_messages(), thinking={"type": "enabled", "budget_tokens": 7},
              extra_body={"temperature": 0})
    r = claude.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == thought and r.content[0].signature == ""
    assert r.content[1].text == answer and "think>" not in r.content[1].text
    assert r.usage.output_tokens == n_out and r.stop_reason == "max_tokens"
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.to_dict() for b in final.content] == [b.to_dict() for b in r.content]
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert kinds == ["thinking_delta"] * kinds.count("thinking_delta") + ["signature_delta"] \
        + ["text_delta"] * kinds.count("text_delta")
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == thought


def test_anthropic_without_thinking_the_model_does_not_think(claude, chat):
    thought, answer, n_thought, n_out = _reference(chat, 0, 8)
    assert n_thought == 0 and not thought
    for thinking in ({}, {"thinking": {"type": "disabled"}}):
        r = claude.messages.create(model="m", max_tokens=8, messages=_claude_messages(),
                                   extra_body={"temperature": 0}, **thinking)
        assert [b.type for b in r.content] == ["text"] and r.content[0].text == answer
        assert r.usage.output_tokens == n_out


def test_anthropic_adaptive_thinks_for_the_server_budget(claude):
    r = claude.messages.create(model="m", max_tokens=80, messages=_claude_messages(), thinking={"type": "adaptive"},
                               extra_body={"temperature": 0})
    assert r.content[0].type == "thinking" and r.content[0].thinking.strip()
    assert r.content[1].type == "text" and r.content[1].text.strip()


@pytest.mark.parametrize("thinking, max_tokens, says", [
    ({"type": "enabled", "budget_tokens": 65}, 100, "at most 64"),
    ({"type": "enabled", "budget_tokens": 20}, 20, "less than max_tokens"),
    ({"type": "enabled"}, 20, "budget_tokens"),
])
def test_anthropic_budgets_the_server_cannot_keep_are_refused(claude, thinking, max_tokens, says):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="m", max_tokens=max_tokens, messages=_claude_messages(), thinking=thinking)
    assert e.value.body["error"]["type"] == "invalid_request_error" and says in e.value.body["error"]["message"]


def test_anthropic_thinking_given_back_reaches_the_template(claude):
    """A thought in an assistant turn after the last question (a tool loop) is in the prompt."""
    tools = [{"name": "zoom", "input_schema": {"type": "object", "properties": {}}}]

    def count(thought: str) -> int:
        return claude.messages.count_tokens(model="m", tools=tools, messages=[
            {"role": "user", "content": "Zoom in."},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": thought, "signature": ""},
                                              {"type": "tool_use", "id": "toolu_1", "name": "zoom", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}]}],
            thinking={"type": "enabled", "budget_tokens": 8}).input_tokens

    assert count("I should zoom in on the car first.") > count("Zoom.")


# ---- Ollama --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(thinking_server) -> ollama.Client:
    return ollama.Client(host=thinking_server.url, timeout=120)


def _ollama_turn() -> list[dict]:
    return [{"role": "user", "content": QUESTION, "images": [png_b64()]}]


def test_ollama_think_puts_the_thought_in_thinking(llama, chat):
    thought, answer, n_thought, n_out = _reference(chat, 64, 80)  # the server's budget: Ollama sends none
    assert n_thought == 64
    kw = dict(model="m", options={"temperature": 0, "num_predict": 80})
    for think in (True, None):  # a Thinking checkpoint thinks unless told not to, as Ollama's do
        r = llama.chat(messages=_ollama_turn(), think=think, **kw)
        assert r.message.thinking == thought and r.message.content == answer and "think>" not in answer
        assert r.eval_count == n_out and r.done_reason == "length"
    parts = list(llama.chat(messages=_ollama_turn(), think=True, stream=True, **kw))
    kinds = ["t" if p.message.thinking else "c" for p in parts if p.message.thinking or p.message.content]
    assert kinds == sorted(kinds, reverse=True) and "t" in kinds and "c" in kinds  # thought, then answer
    assert "".join(p.message.thinking or "" for p in parts) == thought
    assert "".join(p.message.content for p in parts) == answer
    g = llama.generate(prompt=QUESTION, images=[png_b64()], think=True, **kw)
    assert g.thinking == thought and g.response == answer
    pieces = list(llama.generate(prompt=QUESTION, images=[png_b64()], think=True, stream=True, **kw))
    assert "".join(p.thinking or "" for p in pieces) == thought and "".join(p.response for p in pieces) == answer


def test_ollama_think_false_does_not_think(llama, chat):
    thought, answer, n_thought, n_out = _reference(chat, 0, 8)
    r = llama.chat(model="m", messages=_ollama_turn(), think=False, options={"temperature": 0, "num_predict": 8})
    assert not r.message.thinking and r.message.content == answer and r.eval_count == n_out
    g = llama.generate(model="m", prompt=QUESTION, images=[png_b64()], think=False,
                       options={"temperature": 0, "num_predict": 8})
    assert not g.thinking and g.response == answer


def test_ollama_shows_thinking_and_refuses_levels(llama):
    assert "thinking" in llama.show("m").capabilities
    with pytest.raises(ollama.ResponseError) as e:
        llama.chat(model="m", messages=_ollama_turn(), think="high")
    assert e.value.status_code == 400 and "think" in e.value.error


# ---- OpenAI Responses ----------------------------------------------------------------------------
def _responses_input() -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64," + png_b64()},
                                         {"type": "input_text", "text": QUESTION}]}]


def test_responses_reasoning_item_before_the_message(chat):
    thought, answer, n_thought, n_out = _reference(chat, 9, 24)
    kw = dict(model="m", input=_responses_input(), max_output_tokens=24, temperature=0,
              extra_body={"reasoning_budget": 9})
    r = chat.responses.create(**kw)
    assert [it.type for it in r.output] == ["reasoning", "message"]
    item = r.output[0]
    assert item.summary == [] and [(c.type, c.text) for c in item.content] == [("reasoning_text", thought)]
    assert r.output_text == answer and "think>" not in r.output_text
    assert r.usage.output_tokens_details.reasoning_tokens == n_thought == 9 and r.usage.output_tokens == n_out
    events = list(chat.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    first_text = types.index("response.output_text.delta")
    assert types.index("response.reasoning_text.done") < first_text
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert next(e.text for e in events if e.type == "response.reasoning_text.done") == thought
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer
    last = events[-1].response
    assert last.output[0].content[0].text == thought and last.usage.output_tokens_details.reasoning_tokens == 9
    with chat.responses.stream(**kw) as stream:  # the SDK's accumulating helper (cut by max_output_tokens)
        final = [e for e in stream if e.type == "response.incomplete"][-1].response
    assert final.output[0].content[0].text == thought and final.output_text == answer


def test_responses_effort_none_does_not_think_and_levels_are_refused(chat):
    thought, answer, _, n_out = _reference(chat, 0, 8)
    r = chat.responses.create(model="m", input=_responses_input(), max_output_tokens=8, temperature=0,
                              reasoning={"effort": "none"})
    assert [it.type for it in r.output] == ["message"] and r.output_text == answer
    assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.usage.output_tokens == n_out
    with pytest.raises(openai.BadRequestError) as e:
        chat.responses.create(model="m", input="Hi", max_output_tokens=8, reasoning={"effort": "high"})
    assert "reasoning" in str(e.value)


def test_responses_reasoning_given_back_reaches_the_template(chat, thinking_server):
    r = chat.responses.create(model="m", input="Zoom in.", max_output_tokens=12, extra_body={"reasoning_budget": 4})
    assert r.output[0].type == "reasoning"
    again = chat.responses.create(model="m", previous_response_id=r.id, input="And then?", max_output_tokens=4)
    assert again.status == "incomplete"

    def prompt_tokens(thought: str) -> int:  # a thought after the last user message is shown by the template
        items = [{"role": "user", "content": "Zoom in."},
                 {"type": "reasoning", "id": "rs_1", "summary": [],
                  "content": [{"type": "reasoning_text", "text": thought}]},
                 {"type": "function_call", "call_id": "c1", "name": "zoom", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c1", "output": "done"}]
        return chat.responses.create(model="m", input=items, max_output_tokens=1,
                                     extra_body={"reasoning_budget": 0}).usage.input_tokens

    assert prompt_tokens("I should zoom in on the car first.") > prompt_tokens("Zoom.")


def test_ollama_logprobs_cover_the_thought_too(llama):
    r = llama.chat(model="m", messages=_ollama_turn(), think=True, logprobs=True,
                   options={"temperature": 0, "num_predict": 70})
    assert r.message.thinking and len(r.logprobs) == r.eval_count == 70
    parts = list(llama.chat(model="m", messages=_ollama_turn(), think=True, logprobs=True, stream=True,
                            options={"temperature": 0, "num_predict": 70}))
    assert all(p.message.thinking is None or p.message.thinking for p in parts)  # no empty thought pieces
    assert sum(len(p.logprobs or []) for p in parts) == 70


def test_anthropic_tool_use_after_the_thought(claude):
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}}]
    kw = dict(model="m", max_tokens=80, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": "Weather in Paris?"}],
              thinking={"type": "enabled", "budget_tokens": 6}, extra_body={"temperature": 0})
    r = claude.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[0].thinking.strip() and isinstance(r.content[1].input["city"], str)
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [b.to_dict() for b in final.content][0] == r.content[0].to_dict()
    assert final.content[1].input == r.content[1].input

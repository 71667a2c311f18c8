"""A Thinking checkpoint behind the APIs: the thought beside the answer, never in it, over real HTTP.

The server runs the tiny Thinking checkpoint with `--reasoning-budget 64`; with random weights its
thoughts never close on their own, so every thought here is ended by a budget.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import png_b64


@pytest.fixture(scope="module")
def client(thinking_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0)


def _messages() -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
        {"type": "text", "text": "What is in this picture?"}]}]


def test_reasoning_content_beside_content(client):
    r = client.chat.completions.create(model="m", messages=_messages(), max_tokens=24, seed=1,
                                       extra_body={"reasoning_budget": 8})
    msg = r.choices[0].message
    thought = msg.model_extra["reasoning_content"]
    assert thought.strip() and msg.content.strip() and "think>" not in thought + msg.content
    assert r.usage.completion_tokens_details.reasoning_tokens == 8
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"


def test_streamed_thought_comes_first_and_equals_the_whole_answer(client):
    kw = dict(model="m", messages=_messages(), max_tokens=24, seed=5, temperature=0.9,
              extra_body={"reasoning_budget": 10})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = [getattr(d, "reasoning_content", None) for d in deltas]
    kinds = ["r" if t else "c" for d, t in zip(deltas, thought) if t or d.content]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # thought, then answer
    assert "".join(t for t in thought if t) == whole.choices[0].message.model_extra["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 10
    with client.chat.completions.stream(**kw) as stream:  # the SDK's accumulating helper takes the extra field
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        snapshot = stream.current_completion_snapshot.choices[0].message
    assert text == snapshot.content == whole.choices[0].message.content
    assert getattr(snapshot, "reasoning_content", None) == whole.choices[0].message.model_extra["reasoning_content"]


def test_the_server_budget_applies_and_a_request_may_not_exceed_it(client, thinking_server):
    r = client.chat.completions.create(model="m", messages=_messages(), max_tokens=80)
    assert r.usage.completion_tokens_details.reasoning_tokens == 64 and r.choices[0].message.content.strip()
    r = client.chat.completions.create(model="m", messages=_messages(), max_tokens=16,
                                       extra_body={"thinking_token_budget": 3})  # vLLM's name
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=_messages(), max_tokens=16,
                                       extra_body={"reasoning_budget": 65})
    assert "reasoning_budget" in str(e.value) and "64" in str(e.value)
    with thinking_server.client() as c:
        health = c.get("/api/health").json()
    assert health["thinking"] is True and health["reasoning_budget"] == 64


def test_the_answer_with_its_thought_goes_back_into_the_conversation(client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=12, extra_body={"reasoning_budget": 4})
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    assert "reasoning_content" in messages[-1]
    messages.append({"role": "user", "content": "And then?"})
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    assert again.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", max_tokens=4, messages=[
            {"role": "user", "content": "Hi", "reasoning_content": "mine"}])
    assert "reasoning_content" in str(e.value)


def test_a_tool_call_after_the_thought_still_parses(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}]
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
              tool_choice="required", max_tokens=80, temperature=0, extra_body={"reasoning_budget": 6})
    r = client.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert r.choices[0].message.model_extra["reasoning_content"].strip()
    assert r.usage.completion_tokens_details.reasoning_tokens == 6
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert "".join(d.function.arguments or "" for d in streamed) == call.function.arguments


def test_edge_api_returns_the_thought_as_reasoning(thinking_server):
    body = {"image": png_b64(), "prompt": "Describe it.", "max_tokens": 20, "reasoning_budget": 5, "seed": 2}
    with thinking_server.client() as c:
        whole = c.post("/api/predict", json=body).json()
        with c.stream("POST", "/api/predict", json={**body, "stream": True}) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x]
    assert whole["reasoning"].strip() and whole["answer"].strip() and "think>" not in whole["answer"]
    assert whole["usage"]["reasoning_tokens"] == 5
    thought = [x["reasoning"] for x in lines if "reasoning" in x]
    assert "".join(thought) == whole["reasoning"]
    assert "".join(x["token"] for x in lines if "token" in x) == whole["answer"]
    assert lines.index(next(x for x in lines if x.get("token"))) > lines.index(next(x for x in lines
                                                                                      if "reasoning" in x))
    assert lines[-1]["done"] is True and lines[-1]["usage"]["reasoning_tokens"] == 5


def test_instruct_answers_carry_no_thought(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                  extra_body={"reasoning_budget": 0})
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            stream=True))
    assert not any("reasoning_content" in (ch.choices[0].delta.model_extra or {}) for ch in chunks if ch.choices)
    answer = server.edge("/api/predict", {"prompt": "Hi", "max_tokens": 4})
    assert "reasoning" not in answer and answer["usage"]["reasoning_tokens"] == 0


def test_ocr_and_detect_keep_the_thought_apart(thinking_server):
    img = png_b64()
    ocr = thinking_server.edge("/api/ocr", {"image": img, "max_tokens": 12, "reasoning_budget": 3})
    assert ocr["reasoning"].strip() and ocr["usage"]["reasoning_tokens"] == 3 and "think>" not in ocr["text"]
    found = thinking_server.edge("/api/detect", {"image": img, "query": "every car", "max_tokens": 256,
                                                 "reasoning_budget": 4})
    assert found["reasoning"].strip() and found["usage"]["reasoning_tokens"] == 4
    assert json.loads(found["text"]) is not None and found["finish_reason"] == "stop"  # the boxes' JSON, whole

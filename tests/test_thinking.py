"""Thinking checkpoints: Qwen3-VL-*-Thinking's template, the thought split from the answer, the budget.

With random weights the tiny model never writes `</think>` itself, which is what makes the budget
testable: every thought runs until the budget (or max_tokens) ends it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevl.types import FinishEvent, GenerationRequest, ImagePart, Message, SamplingParams, TextPart, TokenEvent
from tests.conftest import make_image


def _run(engine, messages: list[Message], **params) -> tuple[list[TokenEvent], FinishEvent]:
    events = list(engine.generate(GenerationRequest(messages, SamplingParams(**params))))
    return [e for e in events if isinstance(e, TokenEvent)], events[-1]


def _question(text: str = "Why is the sky blue?") -> list[Message]:
    return [Message("user", [TextPart(text)])]


# ---- the template ------------------------------------------------------------------------------
def _hf(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


TURNS = {
    "one question": [{"role": "user", "content": "What is this?"}],
    "with a system prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    # a thought of a turn before the last question is dropped; within a tool loop it is shown again
    "a second question": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
                          {"role": "user", "content": "And now?"}],
    "a tool loop": [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": "", "reasoning_content": "I should call the tool.",
                     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                      "arguments": "{\"city\": \"Paris\"}"}}]},
                    {"role": "tool", "content": "18 C"}],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _ours(engine, turns: list[dict], tools: list[dict] | None) -> list[int]:
    from edgevl.types import ToolCall

    msgs = [Message(t["role"], [TextPart(t["content"])],
                    [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in t.get("tool_calls", [])],
                    t.get("reasoning_content", "")) for t in turns]
    return engine.prompts.build(GenerationRequest(msgs, tools=tools), with_positions=False).ids.tolist()


@pytest.mark.parametrize("case", list(TURNS))
def test_thinking_prompt_ids_match_apply_chat_template(thinking_engine, thinking_checkpoint, case):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(thinking_checkpoint))
    tools = TOOLS if case == "a tool loop" else None
    theirs = tok.apply_chat_template(_hf(TURNS[case]), tools=tools, add_generation_prompt=True, tokenize=False)
    assert theirs.endswith("<|im_start|>assistant\n<think>\n")
    if case == "a tool loop":
        assert "<think>\nI should call the tool.\n</think>\n\n<tool_call>" in theirs
    if case == "a second question":
        assert "Greet back." not in theirs
    assert _ours(thinking_engine, TURNS[case], tools) == tok(theirs, add_special_tokens=False).input_ids


def test_thinking_prompt_with_an_image_matches_the_reference_processor(thinking_engine, thinking_checkpoint):
    pytest.importorskip("transformers")
    from edgevl.runtime.reference import ReferenceProcessor

    msgs = [Message("user", [ImagePart(make_image(200, 120)), TextPart("Describe it.")])]
    ours = thinking_engine.prompts.build(GenerationRequest(msgs)).ids
    np.testing.assert_array_equal(ours, ReferenceProcessor(thinking_checkpoint)(msgs)["input_ids"][0].numpy())


def test_make_model_writes_the_thinking_template_and_think_tokens(thinking_checkpoint, tiny_checkpoint):
    cfg = json.loads((thinking_checkpoint / "tokenizer_config.json").read_text())
    added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    assert added["<think>"] == 151667 and added["</think>"] == 151668  # Qwen's ids
    assert cfg["chat_template"].rstrip().endswith("{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}")
    assert json.loads((thinking_checkpoint / "generation_config.json").read_text())["top_p"] == 0.95
    instruct = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    assert "<think>" not in instruct


# ---- the thought and its budget -----------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 6])
def test_the_budget_ends_the_thought_at_n_tokens_and_the_answer_follows(thinking_engine, budget):
    think = thinking_engine.think
    toks, fin = _run(thinking_engine, _question(), max_new_tokens=budget + 12, reasoning_budget=budget, logprobs=0)
    ids = [t.token_id for t in toks if t.token_id >= 0]
    # N thought tokens (the last a forced "\n"), then </think> and "\n\n", then the answer
    assert ids[budget - 1] == think.before_close[0] and ids[budget] == think.close_id
    assert ids[budget + 1:budget + 1 + len(think.after_close)] == list(think.after_close)
    assert [t.reasoning for t in toks[:budget + 1]] == [True] * (budget + 1)
    assert not any(t.reasoning for t in toks[budget + 1:])
    assert all(t.logprob == 0.0 for t in toks[budget - 1:budget + 1 + len(think.after_close)])  # forced
    assert fin.usage.reasoning_tokens == budget and fin.usage.completion_tokens == len(ids)
    assert fin.reasoning == "".join(t.text for t in toks if t.reasoning)
    assert fin.text == "".join(t.text for t in toks if not t.reasoning) and fin.text.strip()
    assert "</think>" not in fin.text + fin.reasoning and not fin.text.startswith("\n")
    assert not fin.reasoning.endswith("\n")
    assert fin.finish_reason == "length"


def test_budget_zero_means_no_thought(thinking_engine):
    toks, fin = _run(thinking_engine, _question(), max_new_tokens=8, reasoning_budget=0)
    assert toks[0].token_id == thinking_engine.think.close_id
    assert fin.reasoning == "" and fin.usage.reasoning_tokens == 0 and fin.text.strip()


def test_without_a_budget_the_thought_runs_to_max_tokens(thinking_engine):
    toks, fin = _run(thinking_engine, _question(), max_new_tokens=10)
    assert all(t.reasoning for t in toks) and fin.text == "" and fin.finish_reason == "length"
    assert fin.usage.reasoning_tokens == 10 and fin.reasoning.strip()


def test_the_engine_default_budget_applies_when_the_request_names_none(thinking_checkpoint):
    from edgevl.runtime.loader import load_engine
    from edgevl.types import EngineOptions

    eng = load_engine(thinking_checkpoint, EngineOptions(reasoning_budget=3, max_batch=1), warmup=False)
    try:
        _, fin = _run(eng, _question(), max_new_tokens=12)
        assert fin.usage.reasoning_tokens == 3 and fin.text.strip()
        _, fin = _run(eng, _question(), max_new_tokens=12, reasoning_budget=1)
        assert fin.usage.reasoning_tokens == 1
    finally:
        eng.close()


def test_stop_strings_and_constraints_apply_to_the_answer_only(thinking_engine):
    toks, _ = _run(thinking_engine, _question(), max_new_tokens=8)
    word = toks[2].text.strip()  # a word the thought writes, greedy
    _, fin = _run(thinking_engine, _question(), max_new_tokens=30, reasoning_budget=6, stop=[word])
    assert word in fin.reasoning and fin.usage.reasoning_tokens == 6
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    req = GenerationRequest(_question(), SamplingParams(max_new_tokens=40, reasoning_budget=5),
                            constraint=thinking_engine.json_constraint(schema, 30))
    fin = list(thinking_engine.generate(req))[-1]
    assert fin.usage.reasoning_tokens == 5 and isinstance(json.loads(fin.text)["n"], int)


def test_the_transformers_reference_closes_the_thought_the_same_way(thinking_engine, thinking_checkpoint):
    pytest.importorskip("torch")
    from edgevl.runtime.reference import TransformersEngine

    ref = TransformersEngine(thinking_checkpoint)
    msgs = [Message("user", [ImagePart(make_image(160, 96)), TextPart("What is here?")])]
    ours, fin = _run(thinking_engine, msgs, max_new_tokens=14, reasoning_budget=4)
    theirs, ref_fin = _run(ref, msgs, max_new_tokens=14, reasoning_budget=4)
    assert [t.token_id for t in ours] == [t.token_id for t in theirs]
    assert [t.reasoning for t in ours] == [t.reasoning for t in theirs]
    assert (ref_fin.reasoning, ref_fin.text, ref_fin.usage.reasoning_tokens) == (fin.reasoning, fin.text, 4)
    assert ref.info().thinking


def test_instruct_checkpoints_never_think(engine):
    # `<think>` typed in a question is a token too, but it does not open the answer's thought
    toks, fin = _run(engine, _question("<think> what is this?"), max_new_tokens=6, reasoning_budget=0)
    assert not engine.info().thinking and not any(t.reasoning for t in toks)
    assert fin.reasoning == "" and fin.usage.reasoning_tokens == 0 and fin.text


def test_the_batch_loop_closes_each_thought_at_its_own_budget(thinking_engine):
    """Answers decoded together keep their own budgets and the tokens they would have alone."""
    import concurrent.futures

    budgets = [2, 7, 0, 4]
    alone = [_run(thinking_engine, _question(f"Question {b}"), max_new_tokens=12, reasoning_budget=b)
             for b in budgets]
    with concurrent.futures.ThreadPoolExecutor(len(budgets)) as pool:
        together = list(pool.map(lambda b: _run(thinking_engine, _question(f"Question {b}"), max_new_tokens=12,
                                                reasoning_budget=b), budgets))
    for b, (toks, fin), (toks2, fin2) in zip(budgets, alone, together):
        assert fin.usage.reasoning_tokens == fin2.usage.reasoning_tokens == b
        assert [t.token_id for t in toks] == [t.token_id for t in toks2]
        assert (fin.reasoning, fin.text) == (fin2.reasoning, fin2.text)
    assert max(thinking_engine.loop.batch_sizes) > 1  # they did share decoder runs

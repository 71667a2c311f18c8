"""Jump-forward: tokens a constraint forces run as one draft, checked position by position, and the
answer is the one the step-by-step loop gives — for JSON schemas, forced tool calls and boxes, at fp32
and at int8 with per-row activation scales."""

from __future__ import annotations

import threading

import pytest

from edgevl.grounding import BOXES_SCHEMA
from edgevl.runtime.engine import OrtEngine
from edgevl.runtime.loader import ensure_exported
from edgevl.server.tools import call_schema
from edgevl.types import EngineOptions, FinishEvent, GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.conftest import make_image

RECEIPT = {"type": "object", "additionalProperties": False, "required": ["vendor", "date", "total", "items"],
           "properties": {"vendor": {"type": "string", "maxLength": 16}, "date": {"type": "string", "maxLength": 10},
                          "total": {"type": "number"},
                          "items": {"type": "array", "maxItems": 3, "items": {
                              "type": "object", "additionalProperties": False, "required": ["name", "price"],
                              "properties": {"name": {"type": "string", "maxLength": 12},
                                             "price": {"type": "number"}}}}}}
TOOLS = [{"type": "function", "function": {"name": "file_receipt", "parameters": {
    "type": "object", "required": ["vendor", "amount"],
    "properties": {"vendor": {"type": "string", "maxLength": 16}, "amount": {"type": "integer"}}}}}]


@pytest.fixture(scope="module", params=["fp32", "int8-rowwise"])
def engines(request, tiny_checkpoint, tiny_onnx):
    """fp32, and int8 with a scale per activation row: a draft's rows and the rows beside it are
    quantized each on its own, so int8 answers too are the step-by-step loop's (plain int8 quantizes
    a whole run with one scale, and its answers may differ: docs/quantization.md)."""
    folder = tiny_onnx if request.param == "fp32" else ensure_exported(tiny_checkpoint,
                                                                         EngineOptions(precision=request.param))
    on = OrtEngine(folder, EngineOptions(prefix_cache=False, jump_forward=True))
    off = OrtEngine(folder, EngineOptions(prefix_cache=False, jump_forward=False))
    yield on, off
    on.close()
    off.close()


def _constraint(engine, kind: str, budget: int):
    if kind == "schema":
        return engine.json_constraint(RECEIPT, budget)
    if kind == "boxes":
        return engine.json_constraint(BOXES_SCHEMA, budget)
    return engine.tool_call_constraint(call_schema(TOOLS), False, budget)


def _answer(engine, kind: str, i: int, max_tokens: int = 96, **params) -> FinishEvent:
    msgs = [Message("user", [ImagePart(make_image(96 + 16 * i, 64)), TextPart(f"Read receipt number {i}.")])]
    req = GenerationRequest(msgs, SamplingParams(max_new_tokens=max_tokens, **params),
                            tools=TOOLS if kind == "tool" else None)
    req.constraint = _constraint(engine, kind, max_tokens)
    return [ev for ev in engine.generate(req) if isinstance(ev, FinishEvent)][0]


@pytest.mark.parametrize("kind", ["schema", "tool", "boxes"])
def test_greedy_answers_are_the_same_with_and_without_jump_forward(engines, kind):
    on, off = engines
    forced = 0
    for i in range(3):
        a, b = _answer(on, kind, i), _answer(off, kind, i)
        assert a.text == b.text and a.usage.completion_tokens == b.usage.completion_tokens, (kind, i)
        assert a.finish_reason == b.finish_reason and b.timings.forced_tokens == 0
        forced += a.timings.forced_tokens
    assert forced > 0  # drafts were run and kept: the test compares something
    assert on.stats["forced_tokens"] >= forced


def test_seeded_sampling_is_the_same_too(engines):
    on, off = engines
    a = _answer(on, "schema", 5, temperature=0.9, seed=7)
    b = _answer(off, "schema", 5, temperature=0.9, seed=7)
    assert a.text == b.text and a.timings.forced_tokens > 0


def test_drafts_run_beside_batched_decoding(engines):
    """Two constrained answers and a free one at once: each equals what it gives alone."""
    on, off = engines
    alone = [_answer(off, "schema", 0).text, _answer(off, "tool", 1).text]
    free = GenerationRequest([Message("user", [TextPart("Tell me a long story.")])],
                             SamplingParams(max_new_tokens=48, ignore_eos=True))
    free_alone = [ev for ev in off.generate(free) if isinstance(ev, FinishEvent)][0].text
    got: dict[int, str] = {}

    def run(k: int) -> None:
        if k == 2:
            got[k] = [ev for ev in on.generate(GenerationRequest(free.messages, free.params))
                      if isinstance(ev, FinishEvent)][0].text
        else:
            got[k] = _answer(on, ("schema", "tool")[k], k).text

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[0], got[1], got[2]] == [*alone, free_alone]


def test_no_drafts_when_logprobs_are_asked_for(engines):
    on, _ = engines
    assert _answer(on, "schema", 0, logprobs=2).timings.forced_tokens == 0

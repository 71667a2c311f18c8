"""Engine side of issue 14: log-probabilities, OpenAI penalties, per-image pixel budgets, tool turns
through the chat template, and schemas with no finite instance."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.runtime.constrain import has_finite_instance
from edgevl.runtime.generate import Sampler, token_logprobs
from edgevl.types import (
    FinishEvent,
    GenerationRequest,
    ImagePart,
    InputError,
    Message,
    SamplingParams,
    TextPart,
    TokenEvent,
    ToolCall,
)
from tests.conftest import make_image


def test_token_logprobs_are_a_log_softmax():
    logits = np.array([2.0, 1.0, -np.inf, 0.5], np.float32)
    lp, top = token_logprobs(logits, 1, 2)
    ref = logits[np.isfinite(logits)] - np.log(np.exp(logits[np.isfinite(logits)]).sum())
    assert lp == pytest.approx(ref[1]) and [t for t, _ in top] == [0, 1]
    assert top[0][1] == pytest.approx(ref[0])
    assert len(token_logprobs(logits, 0, 10)[1]) == 3  # a masked token is never an alternative


def test_engine_reports_logprobs_of_what_it_sampled(engine):
    req = GenerationRequest([Message("user", [TextPart("hello")])],
                            SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=3))
    toks = [e for e in engine.generate(req) if isinstance(e, TokenEvent) and e.token_id >= 0]
    assert toks and all(len(t.top_logprobs) == 3 for t in toks)
    assert all(t.token_id == t.top_logprobs[0][0] and t.logprob == t.top_logprobs[0][1] for t in toks)
    plain = GenerationRequest([Message("user", [TextPart("hello")])], SamplingParams(max_new_tokens=2))
    assert all(e.logprob is None for e in engine.generate(plain) if isinstance(e, TokenEvent))


def test_presence_and_frequency_penalties_push_away_from_chosen_tokens():
    logits = np.array([3.0, 2.9, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.0))
    assert [s(logits, []) for _ in range(3)] == [0, 1, 0]  # 3.0-0.5 < 2.9, then 2.9-0.5 < 2.5


def test_an_image_may_have_its_own_pixel_budget(engine):
    img = make_image(800, 600)
    big = engine.count_prompt_tokens(GenerationRequest([Message("user", [ImagePart(img), TextPart("x")])]))
    low = engine.count_prompt_tokens(GenerationRequest([Message("user", [ImagePart(img, 256 * 256), TextPart("x")])]))
    assert low < big


def test_tools_and_tool_turns_reach_the_prompt(engine):
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    msgs = [Message("user", [TextPart("zoom in")]), Message("assistant", [], [ToolCall("zoom", '{"factor": 2}')]),
            Message("tool", [TextPart("done")])]
    text = engine.prompts.chat.render(msgs, tools=tools)
    assert '"name": "zoom"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>' in text
    assert "<tool_response>\ndone\n</tool_response>" in text


@pytest.mark.parametrize("schema,finite", [
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, False),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, True),  # "a" may be left out
    ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
      "$ref": "#/$defs/n"}, False),
    ({"$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                                   "required": ["next"]}]}}, "$ref": "#/$defs/n"}, True),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, False),
    ({"type": "array", "items": {"$ref": "#"}}, True),
])
def test_schemas_without_a_finite_instance_are_found(schema, finite):
    assert has_finite_instance(schema) is finite


def test_recursive_required_schema_is_an_input_error(engine):
    with pytest.raises(InputError) as e:
        engine.json_constraint({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]})
    assert e.value.code == "invalid_schema" and "<state>" not in str(e.value)


def test_a_forced_tool_call_always_validates(engine):
    import json

    import jsonschema

    from edgevl.server.tools import call_schema

    params = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "pick", "parameters": params}}]
    for seed in range(3):
        c = engine.tool_call_constraint(call_schema(tools), False, 40)
        req = GenerationRequest([Message("user", [TextPart("pick")])], SamplingParams(
            max_new_tokens=43, temperature=1.0, seed=seed), constraint=c, tools=tools)
        fin = [e for e in engine.generate(req) if isinstance(e, FinishEvent)][0]
        body = fin.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        call = json.loads(body)
        assert call["name"] == "pick"
        jsonschema.validate(call["arguments"], params)

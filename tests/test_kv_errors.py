"""A request the KV cache can never hold is refused with its real cause: the prompt, or the answer length."""

from __future__ import annotations

import pytest

from edgevl.runtime.engine import OrtEngine
from edgevl.types import EngineOptions, GenerationRequest, InputError, Message, SamplingParams, TextPart


@pytest.fixture(scope="module")
def small_kv(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(kv_cache_mb=1, max_batch=1))
    yield e
    e.close()


def ask(engine: OrtEngine, words: int, max_tokens: int) -> InputError:
    req = GenerationRequest([Message("user", [TextPart(" ".join(["word"] * words))])],
                            SamplingParams(max_new_tokens=max_tokens))
    with pytest.raises(InputError) as err:
        list(engine.generate(req))
    assert err.value.code == "kv_cache_exceeded"
    return err.value


def test_a_prompt_that_alone_is_too_long_says_so(small_kv):
    budget = small_kv.pool.budget_tokens
    err = ask(small_kv, budget + 10, 4)
    assert "the prompt alone" in str(err) and "max_tokens" not in str(err) and err.param is None


def test_too_many_answer_tokens_says_how_many_fit(small_kv):
    prompt = small_kv.count_prompt_tokens(GenerationRequest([Message("user", [TextPart("word")])]))
    fits = min(small_kv.pool.budget_tokens, small_kv.pool.max_len) - prompt
    err = ask(small_kv, 1, fits + 50)
    assert err.param == "max_tokens" and f"at most {fits} max_tokens" in str(err)

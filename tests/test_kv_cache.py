"""An int8 KV cache (export --kv-cache int8): a quarter of the memory per token, answers close to the
float cache's, and the same numbers however a prompt is cut or batched (fixed scales)."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.export import export_model
from edgevl.export.manifest import Manifest
from edgevl.runtime.constrain import Recorder
from edgevl.runtime.engine import OrtEngine
from edgevl.types import EngineOptions, GenerationRequest, ImagePart, Message, SamplingParams, TextPart, TokenEvent
from tests.conftest import make_image

PROMPT = "Tell me a long story about a lighthouse keeper, the sea and the ships that pass at night. " * 4


def _request(rec: Recorder, n: int = 24, image: bool = True) -> GenerationRequest:
    parts = [ImagePart(make_image(96, 64, seed=3))] if image else []
    return GenerationRequest([Message("user", [*parts, TextPart(PROMPT)])],
                             SamplingParams(max_new_tokens=n, ignore_eos=True), constraint=rec)


def _run(engine: OrtEngine, rec: Recorder, **kw) -> list[int]:
    return [e.token_id for e in engine.generate(_request(rec, **kw)) if isinstance(e, TokenEvent) and e.token_id >= 0]


@pytest.fixture(scope="module")
def kv8(tiny_onnx_kv8):
    e = OrtEngine(tiny_onnx_kv8, EngineOptions(prefix_cache=False))
    yield e
    e.close()


def test_the_export_says_int8_and_the_pool_holds_a_quarter_of_the_bytes(kv8, engine, tiny_onnx_kv8):
    assert Manifest.read(tiny_onnx_kv8).kv_cache == "int8"
    assert kv8.pool.keys[0].dtype == np.int8 and engine.pool.keys[0].dtype == np.float32
    assert kv8.pool.bytes_per_token * 4 == engine.pool.bytes_per_token
    assert kv8.info().kv_cache == "int8" and engine.info().kv_cache == "fp32"


def test_logits_stay_close_to_the_float_cache(kv8, engine):
    ref = Recorder()
    tokens = _run(engine, ref)
    forced = Recorder(tokens=tokens)  # teacher-forced along the float cache's answer
    _run(kv8, forced)
    a, b = np.stack(ref.logits), np.stack(forced.logits)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999, cos.min()
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.9


def test_a_prompt_cut_into_chunks_gives_the_whole_prompts_numbers(tiny_onnx_kv8, kv8):
    whole = Recorder()
    tokens = _run(kv8, whole)
    chunked_engine = OrtEngine(tiny_onnx_kv8, EngineOptions(prefix_cache=False, prefill_chunk=16))
    try:
        chunked = Recorder()
        assert _run(chunked_engine, chunked) == tokens
    finally:
        chunked_engine.close()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(whole.logits, chunked.logits))
    assert diff < 1e-4, diff


def test_calibrated_scales_use_the_int8_range_without_saturating(tiny_onnx_kv8):
    e = OrtEngine(tiny_onnx_kv8, EngineOptions())  # the prefix cache keeps the finished turn's KV to look at
    try:
        _run(e, Recorder(), n=8, image=False)
        row = int(np.argmax([r.content.size for r in e.pool.rows]))
        n = e.pool.rows[row].content.size
        assert n > 50
        for arr in (*e.pool.keys, *e.pool.values):
            q = np.abs(arr[row, :, :n].astype(np.int16))
            assert q.max() >= 64, "scales far wider than the values: most of int8's levels unused"
            assert np.mean(q >= 127) < 0.01, "values beyond the calibrated range are common"
    finally:
        e.close()


def test_an_unknown_kv_cache_type_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="kv_cache"):
        export_model(tiny_checkpoint, tmp_path / "x", kv_cache="int4")


def test_the_memory_estimate_counts_the_int8_cache(tiny_onnx, tiny_onnx_kv8):
    from edgevl.ops.memory import estimate_bytes

    opts = EngineOptions(max_context=1024, max_batch=2)  # below --kv-cache-mb: rows × context counts
    assert estimate_bytes(tiny_onnx_kv8, opts)["kv_cache"] * 4 == estimate_bytes(tiny_onnx, opts)["kv_cache"]

"""Every exported graph against the PyTorch reference (transformers' Qwen3VLForConditionalGeneration)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgevl.preprocess import positions as P
from edgevl.runtime.constrain import Recorder
from edgevl.runtime.engine import OrtEngine
from edgevl.runtime.vision_cache import ImageFeatures
from edgevl.types import GenerationRequest, ImagePart, InputError, Message, SamplingParams, TextPart, TokenEvent
from tests.conftest import make_image

torch = pytest.importorskip("torch")

CASES = {
    "text only": [],
    "one square image": [(224, 224)],
    "one wide image": [(300, 120)],
    "two images": [(160, 96), (96, 200)],
}


def _messages(sizes: list[tuple[int, int]]) -> list[Message]:
    parts = [ImagePart(make_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    return [Message("system", [TextPart("You are a helpful assistant.")]),
            Message("user", [*parts, TextPart("Describe what you see, then explain the trend.")])]


def _prefill_logits(engine, messages: list[Message], drop_deepstack: bool = False) -> np.ndarray:
    """The prompt's last-position logits, through the serving path of a cold engine (no KV or vision
    cache); with `drop_deepstack`, the images' DeepStack features are zeroed in its vision cache first."""
    cold = OrtEngine(engine.folder, replace(engine.options, prefix_cache=False))
    try:
        rec = Recorder()
        req = GenerationRequest(messages, SamplingParams(max_new_tokens=1), constraint=rec)
        if drop_deepstack:
            p = cold.prompts.build(req)
            for patches, fp in zip(p.patches, p.fingerprints):
                f = cold.model.encode_image(patches)
                cold.vision_cache.put(fp, ImageFeatures(f.embeds, np.zeros_like(f.deepstack)))
        list(cold.generate(req))
        return rec.logits[0]
    finally:
        cold.close()


@pytest.mark.parametrize("case", list(CASES))
def test_input_ids_match_transformers_processor(engine, reference, case):
    msgs = _messages(CASES[case])
    ours = engine.prompts.build(GenerationRequest(msgs))
    ref = reference.processor(msgs)
    np.testing.assert_array_equal(ours.ids, ref["input_ids"][0].numpy())
    if CASES[case]:
        theirs = ref["pixel_values"].numpy()
        mine = np.concatenate([p.pixel_values for p in ours.patches])
        np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_mrope_positions_match_get_rope_index(engine, reference, case):
    msgs = _messages(CASES[case])
    ours = engine.prompts.build(GenerationRequest(msgs))
    ref = reference.processor(msgs)
    theirs, _ = reference.model.model.get_rope_index(
        ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"], image_grid_thw=ref.get("image_grid_thw"))
    mine, _ = P.mrope_positions(ours.ids.size, ours.spans, [p.grid_thw for p in ours.patches],
                                engine.config.vision.spatial_merge_size)
    np.testing.assert_array_equal(mine, theirs[:, 0].numpy())


def test_vision_graph_matches_reference(engine, reference):
    img = make_image(200, 136, seed=3)
    ours = engine.prompts.build(GenerationRequest([Message("user", [ImagePart(img), TextPart("x")])]))
    feats = engine.model.encode_image(ours.patches[0])
    ref = reference.processor([Message("user", [ImagePart(img), TextPart("x")])])
    with torch.no_grad():
        out = reference.model.model.visual(ref["pixel_values"], grid_thw=ref["image_grid_thw"])
    np.testing.assert_allclose(feats.embeds, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    assert len(out.deepstack_features) == feats.deepstack.shape[0] > 0
    for i, d in enumerate(out.deepstack_features):
        np.testing.assert_allclose(feats.deepstack[i], d.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match(engine, reference, case):
    msgs = _messages(CASES[case])
    ours = _prefill_logits(engine, msgs)
    theirs = reference.prefill_logits(msgs)
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_deepstack_is_honoured(engine, reference):
    """Dropping DeepStack moves the logits far beyond the parity tolerance: we keep it, and match."""
    msgs = _messages([(224, 160)])
    with_ds = _prefill_logits(engine, msgs)
    without = _prefill_logits(engine, msgs, drop_deepstack=True)
    theirs = reference.prefill_logits(msgs)
    assert np.abs(with_ds - theirs).max() < 1e-4
    assert np.abs(without - theirs).max() > 1e-2


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("case", list(CASES))
def test_32_greedy_tokens_identical(engine, reference, case, penalty):
    """Plain greedy, and greedy with a repetition penalty (random weights like to repeat one
    token; the penalty makes the 32 tokens varied, and checks our penalty is transformers')."""
    msgs = _messages(CASES[case])
    params = SamplingParams(max_new_tokens=32, ignore_eos=True, repetition_penalty=penalty)
    events = list(engine.generate(GenerationRequest(msgs, params)))
    ours = [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]
    inputs = reference.processor(msgs)
    with torch.no_grad():
        out = reference.model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                       repetition_penalty=penalty)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours == theirs
    if penalty > 1:
        assert len(set(theirs)) > 16


def test_reference_engine_streams_the_same_tokens(engine, reference):
    """The benchmark's transformers backend (its own KV-cache loop) agrees with ONNX Runtime."""
    msgs = _messages([(200, 120)])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    ours = [e.token_id for e in engine.generate(GenerationRequest(msgs, params))
            if isinstance(e, TokenEvent) and e.token_id >= 0]
    events = list(reference.generate(GenerationRequest(msgs, params)))
    theirs = [e.token_id for e in events if isinstance(e, TokenEvent)]
    assert ours == theirs
    assert events[-1].usage.completion_tokens == 12 and events[-1].timings.ttft_ms > 0


def test_both_engines_prepare_the_same_request_alike(engine, reference):
    """prepare: the same counts from both backends, a prepared request runs as it is, and a prompt
    over the context window is refused before anything runs."""
    msgs = _messages([(200, 120)])
    ours, theirs = (e.prepare(GenerationRequest(msgs, SamplingParams(max_new_tokens=5, ignore_eos=True)))
                    for e in (engine, reference))
    assert (ours.prompt_tokens, ours.image_tokens, ours.max_new_tokens) == (
        theirs.prompt_tokens, theirs.image_tokens, theirs.max_new_tokens)
    assert ours.image_tokens > 0
    fin = list(reference.generate(theirs))[-1]
    assert fin.usage.prompt_tokens == theirs.prompt_tokens and fin.usage.completion_tokens == 5
    too_long = GenerationRequest([Message("user", [TextPart("word " * 2000)])], max_context=256)
    for e in (engine, reference):
        with pytest.raises(InputError) as err:
            e.prepare(too_long)
        assert err.value.code == "context_length_exceeded"

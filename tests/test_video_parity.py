"""Clips through the ONNX engine against transformers' Qwen3-VL (the reference built from parts)."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.preprocess import positions as P
from edgevl.preprocess.video import VideoConfig, VideoLimits, decode_video
from edgevl.runtime.model import OnnxModel
from edgevl.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart, TokenEvent
from tests import clips
from tests.conftest import make_image
from tests.test_parity import _prefill_logits

torch = pytest.importorskip("torch")


def _clip(n: int = 30, w: int = 160, h: int = 96):
    return decode_video(clips.mp4(n=n, w=w, h=h), VideoConfig(), VideoLimits())


def _cases() -> dict[str, list[Message]]:
    clip = _clip()
    return {
        "clip alone": [Message("user", [clip, TextPart("What moves, and when?")])],
        "clip and image": [Message("system", [TextPart("You watch cameras.")]),
                           Message("user", [ImagePart(make_image(120, 90, seed=4)), clip,
                                            TextPart("Is the picture in the clip?")])],
        "clip in second turn": [Message("user", [ImagePart(make_image(96, 96, seed=5)), TextPart("What is it?")]),
                                Message("assistant", [TextPart("A gradient.")]),
                                Message("user", [_clip(n=17, w=64, h=128), TextPart("And this clip?")])],
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_pixels_grid_ids_and_positions_match_transformers(engine, reference, case):
    msgs = CASES[case]
    ours = engine.prompts.build(GenerationRequest(msgs))
    ref = reference.processor(msgs)
    np.testing.assert_array_equal(ours.ids, ref["input_ids"][0].numpy())
    videos = [p for p in ours.patches if hasattr(p, "timestamps")]
    np.testing.assert_array_equal(np.concatenate([v.pixel_values for v in videos]),
                                  ref["pixel_values_videos"].numpy())
    assert [list(v.grid_thw) for v in videos] == ref["video_grid_thw"].tolist()
    theirs, _ = reference.model.model.get_rope_index(
        ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"], image_grid_thw=ref.get("image_grid_thw"),
        video_grid_thw=ref["video_grid_thw"])
    grids = [ours.patches[k].groups()[0].grid_thw for k in ours.span_items]
    mine, _ = P.mrope_positions(ours.ids.size, ours.spans, grids, engine.config.vision.spatial_merge_size)
    np.testing.assert_array_equal(mine, theirs[:, 0].numpy())


@pytest.mark.parametrize("together, cap", [(True, 10**9), (True, 1), (False, 10**9)],
                         ids=["groups as one batch", "batches capped at one group", "a run per group"])
def test_vision_per_frame_group_matches_the_video_tower(engine, reference, together, cap):
    """The clip's frame groups in one batched run (as exported now), in batches capped in rows, or
    one run per group (how graphs exported before ran) give what transformers' tower gives for the
    whole clip (grid_t > 1)."""
    msgs = CASES["clip alone"]
    ours = engine.prompts.build(GenerationRequest(msgs))
    assert engine.model.groups_together
    m = engine.model
    feats = OnnxModel(m.config, m.vision, m.embed, m.decoder, groups_together=together,
                      max_run_rows=cap).encode_image(ours.patches[0])
    ref = reference.processor(msgs)
    assert ref["video_grid_thw"][0, 0] > 1
    with torch.no_grad():
        out = reference.model.model.visual(ref["pixel_values_videos"], grid_thw=ref["video_grid_thw"])
    np.testing.assert_allclose(feats.embeds, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    for i, d in enumerate(out.deepstack_features):
        np.testing.assert_allclose(feats.deepstack[i], d.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match(engine, reference, case):
    msgs = CASES[case]
    ours = _prefill_logits(engine, msgs)
    theirs = reference.prefill_logits(msgs)
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


@pytest.mark.parametrize("case", list(CASES))
def test_32_greedy_tokens_identical(engine, reference, case):
    msgs = CASES[case]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True, repetition_penalty=1.3)
    events = list(engine.generate(GenerationRequest(msgs, params)))
    ours = [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]
    inputs = reference.processor(msgs)
    with torch.no_grad():
        out = reference.model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                       repetition_penalty=1.3)
    assert ours == out[0, inputs["input_ids"].shape[1]:].tolist()
    usage = events[-1].usage
    assert usage.video_tokens == int((inputs["input_ids"] == 151656).sum()) > 0
    assert usage.image_tokens == int((inputs["input_ids"] == 151655).sum())


def test_a_repeated_clip_skips_the_vision_tower(engine):
    clip = _clip(n=20, w=96, h=64)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    first = list(engine.generate(GenerationRequest([Message("user", [clip, TextPart("one")])], params)))[-1]
    # a system prompt first, so the KV prefix cannot cover the clip: the vision cache must
    again = list(engine.generate(GenerationRequest([Message("system", [TextPart("Be brief.")]),
                                                    Message("user", [clip, TextPart("two")])], params)))[-1]
    assert first.timings.vision_cache_hits == 0 and again.timings.vision_cache_hits == 1
    assert again.timings.vision_ms == 0

"""Video preprocessing: decoding, sampling and the resize against transformers' and PyTorch's
own code, and every kind of bad clip refused with a typed error."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.preprocess.resample import resize_bicubic_aa
from edgevl.preprocess.video import VideoConfig, VideoError, VideoLimits, decode_video, video_from_frames
from tests import clips

CFG, LIMITS = VideoConfig(), VideoLimits()


def test_mp4_frames_and_sampling_match_transformers_pyav_loader(tmp_path):
    """transformers' read_video_pyav with Qwen3VLVideoProcessor.sample_frames (unbound: the class
    needs torchvision to be built) picks the same frames, with the same metadata, as we do."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import read_video_pyav

    data = clips.mp4(n=47, fps=12, w=112, h=80)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    stand_in = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    frames, meta = read_video_pyav(str(path), functools.partial(Qwen3VLVideoProcessor.sample_frames, stand_in))
    ours = decode_video(data, CFG, LIMITS)
    np.testing.assert_array_equal(ours.frames, frames)
    assert ours.times == [i / meta.fps for i in meta.frames_indices]
    assert len(ours.times) == 7  # int(47 / 12 * 2)


def test_the_frame_limit_caps_sampling():
    clip = clips.mp4(n=60, fps=10)  # 6 s: 12 frames at 2 fps
    assert len(decode_video(clip, CFG, VideoLimits(max_frames=8)).times) == 8
    assert len(decode_video(clip, CFG, VideoLimits(max_frames=8), max_frames=100).times) == 8


@pytest.mark.parametrize("fps,max_frames,expected", [(2, None, 7), (4, None, 15), (0.5, None, 4), (2, 5, 5)])
def test_request_fps_and_max_frames(fps, max_frames, expected):
    ours = decode_video(clips.mp4(n=47, fps=12), CFG, LIMITS, fps=fps, max_frames=max_frames)
    assert len(ours.times) == expected


@pytest.mark.parametrize("name,make", [
    ("webm vp9", lambda: clips.webm()), ("webm vp8", lambda: clips.webm(codec="libvpx")),
    ("mov", lambda: clips.encode("libx264", "mov")), ("gif", clips.gif), ("webp", clips.webp)])
def test_other_containers_decode(name, make):
    v = decode_video(make(), CFG, LIMITS)
    assert v.frames.ndim == 4 and v.frames.shape[0] == len(v.times) >= 4 and v.frames.dtype == np.uint8
    assert v.times == sorted(v.times) and v.times[0] == 0.0
    assert len({f.tobytes() for f in v.frames}) == len(v.times)  # different frames, not one repeated


@pytest.mark.parametrize("seed", [*range(6), "1080p"])
def test_resize_is_bit_exact_with_torch(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7 if seed == "1080p" else seed)
    h, w = (1080, 1920) if seed == "1080p" else (int(v) for v in rng.integers(8, 300, 2))  # 1080p: many blocks
    th, tw = (448, 800) if seed == "1080p" else (int(v) for v in rng.integers(16, 300, 2))
    frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ref = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size=[th, tw],
                                          mode="bicubic", align_corners=False, antialias=True)
    np.testing.assert_array_equal(resize_bicubic_aa(frames, th, tw), ref.permute(0, 2, 3, 1).numpy())


def _truncated() -> bytes:
    import av

    data = clips.encode("libx264" if "libx264" in av.codecs_available else "mpeg4", "mp4", n=40, w=96, h=64)
    return data[: len(data) // 2]


BAD = {
    "empty": (lambda: b"", "invalid_video"),
    "corrupt": (lambda: b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8, "invalid_video"),
    "truncated": (_truncated, "invalid_video"),
    "audio only": (lambda: clips.encode("", "mp4", video=False, audio=True), "no_video_track"),
    "zero frames": (lambda: clips.encode("libvpx", "webm", n=0, audio=True), "too_few_frames"),
    "one frame": (lambda: clips.mp4(n=1), "too_few_frames"),
    "absurd fps": (lambda: clips.mp4(n=30, fps=1000), "invalid_video"),
    "too long": (lambda: clips.mp4(n=70, fps=1, w=32, h=32), "video_too_long"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_clips_are_refused_with_a_reason(case):
    make, code = BAD[case]
    with pytest.raises(VideoError) as e:
        decode_video(make(), CFG, LIMITS)
    assert e.value.code == code or (case == "truncated" and e.value.code == "truncated_video"), e.value.code


def test_huge_frames_are_refused_before_decoding():
    """A decompression bomb: a few KB declaring frames far over the pixel limit."""
    data = clips.encode("libx264", "mp4", n=2, w=3000, h=3000, solid=True)
    assert len(data) < 20_000
    with pytest.raises(VideoError) as e:
        decode_video(data, CFG, VideoLimits(max_input_pixels=1_000_000))
    assert e.value.code == "video_too_large"


def test_frame_lists_need_two_frames_of_one_size():
    from PIL import Image

    a, b = Image.new("RGB", (64, 48)), Image.new("RGB", (48, 64))
    assert video_from_frames([a, a, a], 2.0, LIMITS).times == [0.0, 0.5, 1.0]
    for frames, code in (([a], "too_few_frames"), ([a, b], "invalid_video"), ([a] * 65, "too_many_frames")):
        with pytest.raises(VideoError) as e:
            video_from_frames(frames, 2.0, LIMITS)
        assert e.value.code == code


_CLIP = clips.mp4(n=12, w=64, h=48)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=64))
def test_corrupted_clips_decode_or_raise_video_error(pos, junk):
    """Bytes flipped anywhere in a real clip: frames, or a VideoError (never another exception)."""
    data = bytearray(_CLIP)
    pos = pos % len(data)
    data[pos:pos + len(junk)] = junk
    try:
        v = decode_video(bytes(data), CFG, LIMITS)
    except VideoError:
        return
    assert v.frames.dtype == np.uint8 and len(v.times) == v.frames.shape[0] >= 2

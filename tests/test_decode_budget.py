"""Decoding a clip costs bounded memory and CPU: large frames are decoded straight to a bounded size
(frames within it exactly as before), GIF frames are counted before any is decoded and capped, and
a CPU budget and a cancel flag stop a decode between two frames."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from edgevl.preprocess.video import (
    DECODE_HEADROOM,
    MAX_ANIMATION_FRAMES,
    DecodeBudget,
    DecodeCancelled,
    VideoConfig,
    VideoError,
    VideoLimits,
    decode_video,
    frame_bound,
)
from tests import clips

CFG = VideoConfig()


def _full_frames(data: bytes, indices: list[int]) -> np.ndarray:
    """The sampled frames as PyAV decodes them at full size, the way decoding always worked."""
    import av

    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    return np.stack([frames[i] for i in indices])


def test_frames_within_the_bound_are_decoded_bit_exact():
    data = clips.mp4(n=20, fps=10, w=320, h=240)
    v = decode_video(data, CFG, VideoLimits())
    assert v.frames.shape[1:] == (240, 320, 3)
    indices = [round(t * 10) for t in v.times]
    assert np.array_equal(v.frames, _full_frames(data, indices))


def test_large_frames_are_decoded_straight_to_the_bound_with_the_aspect_kept():
    data = clips.mp4(n=8, fps=2, w=640, h=480)
    limits = VideoLimits(max_video_pixels=32768)
    v = decode_video(data, CFG, limits)
    n, h, w, _ = v.frames.shape
    assert n == 8 and h * w <= frame_bound(8, limits) == DECODE_HEADROOM * 32768 // 8
    assert abs(w / h - 640 / 480) < 0.02
    # the same picture, smaller: close to the full frame shrunk by Pillow
    full = Image.fromarray(_full_frames(data, [0])[0]).resize((w, h), Image.Resampling.BOX)
    assert np.abs(v.frames[0].astype(int) - np.asarray(full).astype(int)).mean() < 4


def test_animation_frames_within_the_bound_are_unchanged_and_large_ones_shrunk():
    data = clips.gif(n=12, w=80, h=48)
    small = decode_video(data, CFG, VideoLimits())
    img = Image.open(io.BytesIO(data))
    img.seek(0)
    assert np.array_equal(small.frames[0], np.asarray(img.convert("RGBA").convert("RGB")))
    shrunk = decode_video(data, CFG, VideoLimits(max_video_pixels=4096))
    assert shrunk.frames.shape[1] * shrunk.frames.shape[2] <= frame_bound(len(shrunk.times), VideoLimits(
        max_video_pixels=4096))


@pytest.mark.parametrize("duration_ms, expected_s", [(10, 0.01), (0, 0.1), (70, 0.07), (100, 0.1)])
def test_gif_frame_times_come_from_the_frames_durations(duration_ms, expected_s):
    """Read from the container without decoding, as Pillow reads them: 0 is 100 ms, else 10 ms steps."""
    v = decode_video(clips.gif(n=12, duration_ms=duration_ms), CFG, VideoLimits())
    assert v.times[0] == 0.0 and v.times[-1] == pytest.approx(11 * expected_s)


def test_a_gif_with_too_many_frames_is_refused_before_decoding_them():
    data = clips.gif_flicker(3000, 400, 400)
    budget = DecodeBudget()
    with pytest.raises(VideoError, match=f"over {MAX_ANIMATION_FRAMES} frames") as e:
        decode_video(data, CFG, VideoLimits(), budget=budget)
    assert e.value.code == "video_too_long"
    # counted from the frames' headers: decoding even the cap's worth of 400² frames costs far more
    assert budget.used_s < 0.5


def test_the_cpu_budget_stops_a_long_decode():
    data = clips.gif_flicker(900, 1000, 1000)  # about 5 s of CPU to decode whole
    budget = DecodeBudget(cpu_s=0.3)
    with pytest.raises(VideoError, match="max_decode_cpu_s") as e:
        decode_video(data, CFG, VideoLimits(), budget=budget)
    assert e.value.code == "video_too_costly"
    assert budget.used_s < 2.0  # stopped between two frames, not at the end


def test_a_cancel_flag_stops_a_decode_between_frames():
    data = clips.gif_flicker(900, 1000, 1000)  # about 5 s of CPU to decode whole
    budget = DecodeBudget()
    timer = threading.Timer(0.2, budget.cancel.set)  # set by another thread, as the server's watcher does
    timer.start()
    with pytest.raises(DecodeCancelled):
        decode_video(data, CFG, VideoLimits(), budget=budget)
    timer.join()
    assert budget.used_s < 2.0


def test_a_clip_whose_request_is_gone_is_not_decoded():
    budget = DecodeBudget()
    budget.cancel.set()
    with pytest.raises(DecodeCancelled):
        decode_video(clips.mp4(n=20), CFG, VideoLimits(), budget=budget)

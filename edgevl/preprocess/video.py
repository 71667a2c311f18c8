"""Video bytes → the frames Qwen3-VL reads, sampled by time, with limits checked before decoding.

Containers and codecs are PyAV's (its wheels bundle FFmpeg): MP4/MOV (H.264, MPEG-4), WebM/MKV
(VP8, VP9, AV1); animated GIF and WebP go through Pillow. Everything stays in memory (BytesIO).

Sampling is transformers' Qwen3VLVideoProcessor.sample_frames: `int(frames / fps * target_fps)`
frames, clamped to [min_frames, max_frames] and to the clip, spread evenly over the clip
(`linspace(0, frames - 1, n).round()`); a frame's time is its index over the clip's frame rate.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgevl.preprocess.image import ImageError, to_rgb
from edgevl.types import VideoPart

DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_FRAMES = 64
MAX_SOURCE_FPS = 240.0  # above it a "frame rate" is a malformed header or a bomb, not a camera
MAX_SOURCE_FRAMES = 20_000  # frames demuxed at most (60 s at 240 fps is 14 400)


class VideoError(ImageError):
    """The bytes are not a clip we can use; always the caller's fault (4xx)."""

    def __init__(self, message: str, code: str = "invalid_video", param: str | None = None):
        super().__init__(message, code=code, param=param)


@dataclass(frozen=True)
class VideoConfig:
    """The checkpoint's video processor settings (video_preprocessor_config.json)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch_size: int = 2

    @classmethod
    def from_folder(cls, folder: str | Path) -> VideoConfig:
        path = Path(folder) / "video_preprocessor_config.json"
        d = json.loads(path.read_text()) if path.is_file() else {}
        return cls(fps=float(d.get("fps", 2.0)), min_frames=int(d.get("min_frames", 4)),
                   max_frames=int(d.get("max_frames", 768)),
                   temporal_patch_size=int(d.get("temporal_patch_size", 2)))


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_frames: int = DEFAULT_MAX_FRAMES  # frames sampled at most
    max_input_pixels: int = 40_000_000  # per decoded frame, as for images


def sample_indices(total: int, video_fps: float, cfg: VideoConfig, fps: float | None = None,
                   max_frames: int | None = None) -> np.ndarray:
    """Which frames of a `total`-frame clip are read (transformers' sample_frames)."""
    top = min(cfg.max_frames, max_frames) if max_frames else cfg.max_frames  # max_frames: the caller's cap
    n = int(total / video_fps * (fps or cfg.fps))
    n = min(max(n, cfg.min_frames), top, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def decode_video(data: bytes, cfg: VideoConfig, limits: VideoLimits, fps: float | None = None,
                 max_frames: int | None = None) -> VideoPart:
    """Decode and sample a clip; every problem with the bytes is a VideoError (4xx).
    `fps`, `max_frames`: the request's (default: the checkpoint's fps, `limits.max_frames`)."""
    max_frames = min(max_frames or limits.max_frames, limits.max_frames)
    if not data:
        raise VideoError("the video is empty")
    try:
        if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return _decode_animation(data, cfg, limits, fps, max_frames)
        return _decode_av(data, cfg, limits, fps, max_frames)
    except VideoError:
        raise
    except Exception as e:  # a decoder's own surprise on hostile bytes is still the bytes' fault
        raise VideoError(f"cannot decode the video ({type(e).__name__})") from e


def _check(n_frames: int, rate: float, width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_input_pixels:
        raise VideoError(f"video frames are {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.max_input_pixels}", code="video_too_large")
    if width < 1 or height < 1:
        raise VideoError("the video's frames have no pixels")
    if not (0 < rate <= MAX_SOURCE_FPS):
        raise VideoError(f"the video's frame rate ({rate:g} fps) is not between 0 and {MAX_SOURCE_FPS:g}")
    if n_frames / rate > limits.max_seconds:
        raise VideoError(f"the clip is {n_frames / rate:.1f} s long; the limit is {limits.max_seconds:g} s",
                         code="video_too_long")
    if n_frames < 2:
        raise VideoError(f"the clip has {n_frames} frame(s); a video needs at least 2 (send one frame as an image)",
                         code="too_few_frames")


def _decode_av(data: bytes, cfg: VideoConfig, limits: VideoLimits, fps: float | None,
               max_frames: int | None) -> VideoPart:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"cannot read the video: {e}") from e
    try:
        if not container.streams.video:
            raise VideoError("the file has no video track", code="no_video_track")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = stream.codec_context.width, stream.codec_context.height
        _check(2, rate, width, height, limits)  # before touching any packet
        # count frames by demuxing (no decoding): the header's count may be missing or lie
        declared = int(stream.frames or 0)
        _check(max(declared, 2), rate, width, height, limits)
        counted = 0
        for packet in container.demux(stream):
            if packet.size:
                counted += 1
                if counted > MAX_SOURCE_FRAMES:
                    raise VideoError(f"the clip has over {MAX_SOURCE_FRAMES} frames", code="video_too_long")
                if counted / rate > limits.max_seconds:
                    _check(counted, rate, width, height, limits)
        if declared and counted < declared:
            raise VideoError(f"the video is truncated: {counted} of its {declared} frames are present",
                             code="truncated_video")
        total = counted
        _check(total, rate, width, height, limits)
        indices = sample_indices(total, rate, cfg, fps, max_frames)
        frames = _frames_at(container, stream, indices, limits)
    except VideoError:
        raise
    except (av.FFmpegError, ValueError, OSError, MemoryError) as e:
        raise VideoError(f"cannot decode the video: {e}") from e
    finally:
        container.close()
    if len(frames) < len(indices):
        raise VideoError(f"the video is truncated or corrupt: {len(frames)} of {len(indices)} sampled frames decode",
                         code="truncated_video")
    return VideoPart(np.stack(frames), [float(i) / rate for i in indices])


def _frames_at(container, stream, indices: np.ndarray, limits: VideoLimits) -> list[np.ndarray]:
    """RGB frames at `indices`, decoding from the start (inter frames need their references)."""
    container.seek(0)
    wanted = {int(i): k for k, i in enumerate(indices)}
    out: list[np.ndarray | None] = [None] * len(indices)
    last = int(indices[-1])
    for i, frame in enumerate(container.decode(stream)):
        if i > last:
            break
        if frame.width * frame.height > limits.max_input_pixels:  # a stream may change size mid-way
            raise VideoError(f"a frame is {frame.width}x{frame.height}, over the limit of "
                             f"{limits.max_input_pixels} pixels", code="video_too_large")
        if i in wanted:
            rgb = frame.to_ndarray(format="rgb24")
            for k in [k for j, k in wanted.items() if j == i]:
                out[k] = rgb
    frames = [f for f in out if f is not None]
    if frames and any(f.shape != frames[0].shape for f in frames):
        raise VideoError("the video's frames change size; re-encode it at one size", code="invalid_video")
    return frames


def _decode_animation(data: bytes, cfg: VideoConfig, limits: VideoLimits, fps: float | None,
                      max_frames: int | None) -> VideoPart:
    """Animated GIF / WebP: Pillow knows their frame durations; the frame rate is their mean."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        _check(2, 1.0, width, height, limits)
        total = int(getattr(img, "n_frames", 1))
        if total > MAX_SOURCE_FRAMES:
            raise VideoError(f"the animation has {total} frames; at most {MAX_SOURCE_FRAMES} are read",
                             code="video_too_long")
        durations = []
        for i in range(total):
            img.seek(i)
            durations.append(max(int(img.info.get("duration", 100) or 100), 10))  # browsers' 10 ms floor
        rate = total / (sum(durations) / 1000)
        _check(total, rate, width, height, limits)
        indices = sample_indices(total, rate, cfg, fps, max_frames)
        frames = []
        for i in indices:
            img.seek(int(i))
            frames.append(np.asarray(to_rgb(img.convert("RGBA") if img.mode == "P" else img)))
    except VideoError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoError(f"cannot decode the animation: {e}") from e
    return VideoPart(np.stack(frames), [float(i) / rate for i in indices])


def video_from_frames(images: list[Image.Image], fps: float, limits: VideoLimits) -> VideoPart:
    """Frames a client sampled itself, `fps` apart; all must have the same size."""
    if len(images) < 2:
        raise VideoError(f"a video needs at least 2 frames, got {len(images)}", code="too_few_frames")
    if len(images) > limits.max_frames:
        raise VideoError(f"{len(images)} frames; the limit is {limits.max_frames}", code="too_many_frames")
    if any(im.size != images[0].size for im in images):
        raise VideoError("the video's frames differ in size", code="invalid_video")
    if not (0 < fps <= MAX_SOURCE_FPS):
        raise VideoError(f"fps must be between 0 and {MAX_SOURCE_FPS:g}", code="invalid_video")
    return VideoPart(np.stack([np.asarray(im.convert("RGB")) for im in images]),
                     [i / fps for i in range(len(images))])

"""Video bytes → the frames Qwen3-VL reads, sampled by time, with limits checked before decoding.

Containers and codecs are PyAV's (its wheels bundle FFmpeg): MP4/MOV (H.264, MPEG-4), WebM/MKV
(VP8, VP9, AV1); animated GIF and WebP go through Pillow. Everything stays in memory (BytesIO).

Sampling is transformers' Qwen3VLVideoProcessor.sample_frames: `int(frames / fps * target_fps)`
frames, clamped to [min_frames, max_frames] and to the clip, spread evenly over the clip
(`linspace(0, frames - 1, n).round()`); a frame's time is its index over the clip's frame rate.

Decoding costs bounded memory and CPU, whatever the bytes claim (`DecodeBudget`, `frame_bound`):
- a sampled frame is converted to RGB straight at a size of at most `DECODE_HEADROOM` times the
  pixels the model could use from it (the clip's pixel budget over its sampled frames), so a full-
  size RGB frame is never held; frames within that bound are decoded at full size, exactly as
  before, because the model's own resize (video_patches.py) must see the same pixels as
  transformers'. Above it the decoder's area filter shrinks them first: the model still resizes
  from at least twice its size in each direction, but the pixels differ slightly from a resize of
  the full frame (and, as the aspect ratio is rounded, the model's grid may rarely differ by one
  patch row or column);
- animated GIF frames are counted from the container (PyAV's demuxer, no pixels decoded) and
  refused over `MAX_ANIMATION_FRAMES`, then Pillow decodes only up to the last sampled frame;
- the decoding thread checks a cancel flag and its CPU time (`time.thread_time`) between frames;
  FFmpeg decodes on that one thread, so its CPU time is what the budget measures.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
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
MAX_ANIMATION_FRAMES = 1_000  # GIF/WebP frames: each is composited on the whole canvas, so all are decoded
DECODE_HEADROOM = 4  # a sampled frame is decoded at most this many times the pixels the model can use from it


class VideoError(ImageError):
    """The bytes are not a clip we can use; always the caller's fault (4xx)."""

    def __init__(self, message: str, code: str = "invalid_video", param: str | None = None):
        super().__init__(message, code=code, param=param)


class DecodeCancelled(VideoError):
    """The request that wanted the clip is gone; decoding stopped between two frames."""

    def __init__(self) -> None:
        super().__init__("the request was cancelled while its video was decoded", code="cancelled")


class DecodeBudget:
    """What one request's decoding may still spend: CPU seconds of the thread that decodes (0: no
    limit), and a flag that stops it. `check` is called between frames, in that thread."""

    def __init__(self, cpu_s: float = 0.0, cancel: threading.Event | None = None):
        self.cpu_s = cpu_s
        self.cancel = cancel or threading.Event()
        self.spent_s = 0.0  # set by `stop`, for other threads to read
        self._t0: float | None = None

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def start(self) -> None:
        self._t0 = time.thread_time()

    def stop(self) -> None:
        self.spent_s = self.used_s

    @property
    def used_s(self) -> float:
        return time.thread_time() - self._t0 if self._t0 is not None else 0.0

    def check(self) -> None:
        if self.cancel.is_set():
            raise DecodeCancelled()
        if self.cpu_s and self.used_s > self.cpu_s:
            raise VideoError(f"decoding the video took over {self.cpu_s:g} CPU seconds, the server's budget per "
                             "request (max_decode_cpu_s); send a shorter or smaller clip", code="video_too_costly")


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
    max_video_pixels: int = 2 * 1024 * 1024  # the clip's pixel budget for the vision encoder (EngineOptions')


def frame_bound(n_frames: int, limits: VideoLimits) -> int:
    """Most pixels a sampled frame is decoded at: DECODE_HEADROOM times the most the model's resize
    can keep of it (the clip's budget covers all its frames: video_patches.video_target_size)."""
    return max(1, DECODE_HEADROOM * limits.max_video_pixels // max(1, n_frames))


def decoded_size(width: int, height: int, bound: int) -> tuple[int, int]:
    """(width, height) unchanged within `bound` pixels, else shrunk to it with the aspect ratio kept."""
    if width * height <= bound:
        return width, height
    scale = math.sqrt(bound / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def sample_indices(total: int, video_fps: float, cfg: VideoConfig, fps: float | None = None,
                   max_frames: int | None = None) -> np.ndarray:
    """Which frames of a `total`-frame clip are read (transformers' sample_frames)."""
    top = min(cfg.max_frames, max_frames) if max_frames else cfg.max_frames  # max_frames: the caller's cap
    n = int(total / video_fps * (fps or cfg.fps))
    n = min(max(n, cfg.min_frames), top, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def decode_video(data: bytes, cfg: VideoConfig, limits: VideoLimits, fps: float | None = None,
                 max_frames: int | None = None, budget: DecodeBudget | None = None) -> VideoPart:
    """Decode and sample a clip; every problem with the bytes is a VideoError (4xx).
    `fps`, `max_frames`: the request's (default: the checkpoint's fps, `limits.max_frames`);
    `budget`: CPU time and cancel flag, checked between frames (started here unless already)."""
    max_frames = min(max_frames or limits.max_frames, limits.max_frames)
    budget = budget or DecodeBudget()
    if not budget.started:
        budget.start()
    if not data:
        raise VideoError("the video is empty")
    try:
        if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return _decode_animation(data, cfg, limits, fps, max_frames, budget)
        return _decode_av(data, cfg, limits, fps, max_frames, budget)
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
               max_frames: int | None, budget: DecodeBudget) -> VideoPart:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"cannot read the video: {e}") from e
    try:
        if not container.streams.video:
            raise VideoError("the file has no video track", code="no_video_track")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # FFmpeg's own threads would escape the CPU budget's clock
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
                if counted % 256 == 0:
                    budget.check()
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
        frames = _frames_at(container, stream, indices, limits, budget)
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


def _frames_at(container, stream, indices: np.ndarray, limits: VideoLimits,
               budget: DecodeBudget) -> list[np.ndarray]:
    """RGB frames at `indices`, decoding from the start (inter frames need their references),
    each converted straight to at most `frame_bound` pixels."""
    container.seek(0)
    wanted = {int(i): k for k, i in enumerate(indices)}
    out: list[np.ndarray | None] = [None] * len(indices)
    last = int(indices[-1])
    bound = frame_bound(len(indices), limits)
    for i, frame in enumerate(container.decode(stream)):
        budget.check()
        if i > last:
            break
        if frame.width * frame.height > limits.max_input_pixels:  # a stream may change size mid-way
            raise VideoError(f"a frame is {frame.width}x{frame.height}, over the limit of "
                             f"{limits.max_input_pixels} pixels", code="video_too_large")
        if i in wanted:
            w, h = decoded_size(frame.width, frame.height, bound)
            if (w, h) == (frame.width, frame.height):
                rgb = frame.to_ndarray(format="rgb24")
            else:  # scaled in the same pass as the colour conversion: no full-size RGB frame exists
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
            for k in [k for j, k in wanted.items() if j == i]:
                out[k] = rgb
    frames = [f for f in out if f is not None]
    if frames and any(f.shape != frames[0].shape for f in frames):
        raise VideoError("the video's frames change size; re-encode it at one size", code="invalid_video")
    return frames


def _decode_animation(data: bytes, cfg: VideoConfig, limits: VideoLimits, fps: float | None,
                      max_frames: int | None, budget: DecodeBudget) -> VideoPart:
    """Animated GIF / WebP: their frame durations give the frame rate (the mean). Frames are counted
    before any is decoded: a GIF's by demuxing it, a WebP's from its header."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        _check(2, 1.0, width, height, limits)
        gif_durations = _gif_durations(data, budget) if img.format == "GIF" else None
        total = len(gif_durations) if gif_durations is not None else int(getattr(img, "n_frames", 1))
        if total > MAX_ANIMATION_FRAMES:
            raise VideoError(f"the animation has over {MAX_ANIMATION_FRAMES} frames, the most this server reads",
                             code="video_too_long")
        if gif_durations is not None:
            durations = gif_durations
        else:
            durations = []
            for i in range(total):  # a WebP's seek decodes nothing
                img.seek(i)
                durations.append(max(int(img.info.get("duration", 100) or 100), 10))  # browsers' 10 ms floor
        rate = total / (sum(durations) / 1000)
        _check(total, rate, width, height, limits)
        indices = sample_indices(total, rate, cfg, fps, max_frames)
        bound = frame_bound(len(indices), limits)
        frames = []
        img.seek(0)
        for i in indices:
            for j in range(img.tell() + 1, int(i) + 1):  # one frame at a time: each is composited on the last
                budget.check()
                img.seek(j)
            frames.append(np.asarray(shrink_frame(to_rgb(img.convert("RGBA") if img.mode == "P" else img), bound)))
    except VideoError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoError(f"cannot decode the animation: {e}") from e
    return VideoPart(np.stack(frames), [float(i) / rate for i in indices])


def _gif_durations(data: bytes, budget: DecodeBudget) -> list[int]:
    """Each GIF frame's duration (ms) from FFmpeg's demuxer, which reads the frames' headers and
    skips their pixels. `min_delay=1` gives Pillow's reading: 0 → 100 ms, else 10 ms steps."""
    import av

    durations: list[int] = []
    with av.open(io.BytesIO(data), mode="r", format="gif", options={"min_delay": "1"}) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if not packet.size:
                continue
            durations.append(max(round(float((packet.duration or 0) * packet.time_base) * 1000), 10))
            if len(durations) > MAX_ANIMATION_FRAMES:
                break  # refused by the caller: the count needs no more
            if len(durations) % 64 == 0:
                budget.check()
    return durations


def shrink_frame(img: Image.Image, bound: int) -> Image.Image:
    """A client's frame within `bound` pixels (`frame_bound`); unchanged when it already is."""
    size = decoded_size(*img.size, bound)
    return img if size == img.size else img.resize(size, Image.Resampling.BOX)


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

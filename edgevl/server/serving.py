"""What both APIs share: images from base64, running a job, metrics at the end, disconnects."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from PIL import Image

from edgevl.preprocess.image import decode_image
from edgevl.preprocess.video import VideoConfig, VideoError, VideoLimits, decode_video, video_from_frames
from edgevl.server.errors import ApiError
from edgevl.server.metrics import Metrics
from edgevl.server.scheduler import Job, Scheduler
from edgevl.server.settings import Settings
from edgevl.types import FinishEvent, GenerationRequest, TokenEvent, VideoPart

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[\w=-]+)*;base64,", re.I)


def image_from_base64(value: str, settings: Settings, param: str = "image") -> Image.Image:
    """A base64 string or data URL → decoded RGB picture, or a 4xx ApiError saying why."""
    return image_and_bytes(value, settings, param)[0]


def image_and_bytes(value: str, settings: Settings, param: str = "image") -> tuple[Image.Image, bytes]:
    data = _payload(value, "image", param)
    img = decode_image(data, settings.max_input_pixels)  # ImageError → 4xx by type
    return img, data


def _payload(value: str, what: str, param: str) -> bytes:
    """The bytes of a base64 string or data URL; remote URLs are refused."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(f"the {what} is empty", f"invalid_{what}", param)
    if value.startswith(("http://", "https://")):
        raise ApiError(f"{what} URLs are not fetched by this server; send the {what} as base64 or a data URL",
                       f"remote_{what}_refused", param)
    m = _DATA_URL.match(value)
    payload = value[m.end():] if m else value
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(f"the {what} is not valid base64: {e}", "invalid_base64", param) from e


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_input_pixels)


async def video_from_base64(value: str, state, param: str, fps: float | None = None,
                            max_frames: int | None = None) -> VideoPart:
    """A clip → sampled frames, decoded off the event loop (a clip takes tens of milliseconds or more).
    `max_frames` was checked against the server's limit by the caller, who knows its field's name."""
    data = _payload(value, "video", param)
    cfg: VideoConfig = state.video_config
    try:
        return await asyncio.to_thread(decode_video, data, cfg, video_limits(state.settings), fps, max_frames)
    except VideoError as e:  # 4xx by type; the param says which part of the request
        e.param = e.param or param
        raise


def check_max_frames(max_frames: int | None, settings: Settings, param: str) -> None:
    if max_frames is not None and max_frames > settings.max_video_frames:
        raise ApiError(f"max_frames must be at most {settings.max_video_frames} (the server's max_video_frames)",
                       "invalid_parameter", param)


def video_from_frames_base64(values: list[str], state, param: str, fps: float | None) -> VideoPart:
    s = state.settings
    if len(values) > s.max_video_frames:
        raise ApiError(f"{len(values)} frames; the limit is {s.max_video_frames}", "too_many_frames", param)
    images = [image_from_base64(v, s, f"{param}.{i}") for i, v in enumerate(values)]
    try:
        return video_from_frames(images, fps or state.video_config.fps, video_limits(s))
    except VideoError as e:
        e.param = e.param or param
        raise


async def constraint_for(state, schema: dict | None, budget: int):
    """A JSON-schema constraint from the engine (compiled off the event loop: the first costs ~1 s)."""
    import asyncio

    return await asyncio.to_thread(state.engine.json_constraint, schema, budget)


@dataclass
class Outcome:
    text: str
    finish: FinishEvent
    queue_ms: float


class Runner:
    """Submits to the scheduler and keeps the metrics honest however the request ends."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics):
        self.scheduler = scheduler
        self.metrics = metrics

    def start(self, req: GenerationRequest) -> tuple[Job, float]:
        return self.scheduler.submit(req), time.perf_counter()

    def record(self, endpoint: str, fin: FinishEvent) -> None:
        m = self.metrics
        m.finish.labels(fin.finish_reason).inc()
        m.prompt_tokens.inc(fin.usage.prompt_tokens)
        m.generated_tokens.inc(fin.usage.completion_tokens)
        m.vision_cache_hits.inc(fin.timings.vision_cache_hits)
        m.prefix_reused.inc(fin.timings.prefix_reused_tokens)
        if fin.usage.completion_tokens:
            m.ttft.labels(endpoint).observe(fin.timings.ttft_ms / 1000)
        m.latency.labels(endpoint).observe(fin.timings.total_ms / 1000)

    async def events(self, endpoint: str, job: Job, http: Request) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The job's events; the job is abandoned if the client disconnects or the stream is closed."""
        watcher = asyncio.create_task(_watch_disconnect(http, self.scheduler, job))
        try:
            async for ev in job.stream():
                if isinstance(ev, FinishEvent):
                    self.record(endpoint, ev)
                yield ev
        finally:
            watcher.cancel()
            self.scheduler.abandon(job)

    async def collect(self, endpoint: str, req: GenerationRequest, http: Request) -> Outcome:
        job, t0 = self.start(req)
        parts: list[str] = []
        fin: FinishEvent | None = None
        async for ev in self.events(endpoint, job, http):
            if isinstance(ev, FinishEvent):
                fin = ev
            else:
                parts.append(ev.text)
        if fin is None:
            raise ApiError("the request was cancelled", "cancelled")
        queue_ms = max(0.0, (time.perf_counter() - t0) * 1000 - fin.timings.total_ms)
        return Outcome("".join(parts), fin, queue_ms)


async def _watch_disconnect(http: Request, scheduler: Scheduler, job: Job) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not job.finished:
            if await http.is_disconnected():
                scheduler.abandon(job)
                return
            await asyncio.sleep(0.1)


def usage_dict(fin: FinishEvent) -> dict:
    u = fin.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "image_tokens": u.image_tokens, "video_tokens": u.video_tokens}


def timings_dict(fin: FinishEvent, queue_ms: float = 0.0) -> dict:
    t = fin.timings
    return {"ttft_ms": round(t.ttft_ms, 2), "total_ms": round(t.total_ms, 2), "tokens_per_s": round(t.tokens_per_s, 2),
            "preprocess_ms": round(t.preprocess_ms, 2), "vision_ms": round(t.vision_ms, 2),
            "prefill_ms": round(t.prefill_ms, 2), "queue_ms": round(queue_ms + t.queue_ms, 2),
            "vision_cache_hits": t.vision_cache_hits, "prefix_reused_tokens": t.prefix_reused_tokens}

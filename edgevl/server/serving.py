"""What the APIs share: images in, constraints, running a job, and the end of a run as all report it.

Running a job (`Runner`, `Job`):

    check_room ─► prepare (a thread of asyncio's pool) ─► engine.submit(prepared, sink) ─► Handle
        refusals (QueueFull, Paused, ShuttingDown) ─► 429 / 503 with Retry-After, before any response
    the engine's thread ─► sink: loop.call_soon_threadsafe(queue.put_nowait, event) ─► Job.stream()

No thread waits on a request: the engine delivers its events to the event loop, and the request's
deadline, its client's disconnect and an early end of its stream all cancel it through the Handle.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from PIL import Image

from edgevl.preprocess.image import ImageError, decode_image
from edgevl.preprocess.video import (
    DecodeBudget,
    VideoError,
    VideoLimits,
    decode_video,
    frame_bound,
    shrink_frame,
    video_from_frames,
)
from edgevl.server.errors import ApiError, QueueFull, Timeout, Unavailable
from edgevl.server.metrics import Metrics
from edgevl.server.protocol import Timings, Usage
from edgevl.server.remote import fetch_image
from edgevl.server.settings import Settings
from edgevl.server.state import server_state
from edgevl.server.tools import TAIL_TOKENS, ToolCallSplitter, call_grammar, check_parameters
from edgevl.types import (
    Engine,
    Event,
    FinishEvent,
    GenerationRequest,
    Paused,
    PreparedRequest,
    Refused,
    SamplingParams,
    ShuttingDown,
    TokenEvent,
    VideoPart,
)
from edgevl.types import QueueFull as EngineQueueFull

CLOSING_TOKENS = 4  # what a reasoning budget forces after the thought ("\n</think>\n\n"), with a token to spare
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[\w=-]+)*;base64,", re.I)


def _nonempty(value: str, what: str, param: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(f"the {what} is empty", f"invalid_{what}", param)


def _base64_bytes(value: str, what: str, param: str) -> bytes:
    """The bytes of a base64 string or data URL."""
    m = _DATA_URL.match(value)
    payload = value[m.end():] if m else value
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(f"the {what} is not valid base64: {e}", "invalid_base64", param) from e


async def load_image(value: str, settings: Settings, param: str = "image") -> tuple[Image.Image, bytes]:
    """A base64 string, data URL or (with --allow-remote-images) http(s) URL → decoded RGB picture
    and its bytes, or a 4xx ApiError saying why."""
    data = await image_bytes(value, settings, param)
    return decode_image(data, settings.max_input_pixels), data  # ImageError → 4xx by type


async def image_bytes(value: str, settings: Settings, param: str = "image") -> bytes:
    """The bytes of an image field (base64, data URL, or a fetched http(s) URL), not yet decoded."""
    _nonempty(value, "image", param)
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", value, re.I)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise ApiError(f"{scheme.group(1)}:// image URLs are not supported; send base64, a data URL or http(s)",
                       "remote_image_refused", param)
    if scheme:
        if not settings.allow_remote_images:
            raise ApiError("image URLs are not fetched by this server (start it with --allow-remote-images); "
                           "send the image as base64 or a data URL", "remote_image_refused", param)
        return await fetch_image(value, settings, param)
    return _base64_bytes(value, "image", param)


def _video_bytes(value: str, param: str) -> bytes:
    """The bytes of a base64 clip or data URL; clip URLs are not fetched."""
    _nonempty(value, "video", param)
    if value.startswith(("http://", "https://")):
        raise ApiError("video URLs are not fetched by this server; send the video as base64 or a data URL",
                       "remote_video_refused", param)
    return _base64_bytes(value, "video", param)


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_input_pixels,
                       settings.max_video_pixels)


async def video_from_base64(value: str, http: Request, param: str, fps: float | None = None,
                            max_frames: int | None = None) -> VideoPart:
    """A clip → sampled frames, decoded on the server's decode pool (bounded, cancellable, with a
    CPU budget: server/decoding.py). `max_frames` was checked against the server's limit by the
    caller, who knows its field's name."""
    data = _video_bytes(value, param)
    state = server_state(http)
    cfg, limits = state.video_config, video_limits(state.settings)
    try:
        return await state.decoders.run(http, lambda budget: decode_video(data, cfg, limits, fps, max_frames, budget))
    except VideoError as e:  # 4xx by type; the param says which part of the request
        e.param = e.param or param
        raise


def check_max_frames(max_frames: int | None, settings: Settings, param: str) -> None:
    if max_frames is not None and max_frames > settings.max_video_frames:
        raise ApiError(f"max_frames must be at most {settings.max_video_frames} (the server's max_video_frames)",
                       "invalid_parameter", param)


async def video_from_frames_base64(values: list[str], http: Request, param: str, fps: float | None) -> VideoPart:
    """A client's own frames (images) → a clip; decoded on the decode pool like a clip, each frame
    shrunk to `frame_bound` as soon as it is decoded, so one full-size picture is held at a time."""
    state = server_state(http)
    s = state.settings
    if len(values) > s.max_video_frames:
        raise ApiError(f"{len(values)} frames; the limit is {s.max_video_frames}", "too_many_frames", param)
    datas = [await image_bytes(v, s, f"{param}.{i}") for i, v in enumerate(values)]
    limits = video_limits(s)

    def decode(budget: DecodeBudget) -> VideoPart:
        bound = frame_bound(len(datas), limits)
        images: list[Image.Image] = []
        first: tuple[int, int] | None = None
        for i, data in enumerate(datas):
            budget.check()
            try:
                img = decode_image(data, s.max_input_pixels)
            except ImageError as e:
                e.param = f"{param}.{i}"
                raise
            if first is not None and img.size != first:
                raise VideoError("the video's frames differ in size", code="invalid_video")
            first = img.size
            images.append(shrink_frame(img, bound))
        return video_from_frames(images, fps or state.video_config.fps, limits)

    try:
        return await state.decoders.run(http, decode)
    except VideoError as e:
        e.param = e.param or param
        raise


def answer_room(state, params: SamplingParams) -> int:
    """Tokens a constrained answer can count on: a thinking model's thought comes first, and takes at
    most its budget and the closing markup (an unbounded thought may leave less, and the answer ends
    at max_tokens with finish_reason "length")."""
    n = params.max_new_tokens
    budget = params.reasoning_budget if params.reasoning_budget is not None else state.settings.reasoning_budget
    if not state.info.thinking or budget < 0:
        return n
    return max(1, n - budget - CLOSING_TOKENS)


async def constraint_for(state, schema: dict | None, params: SamplingParams):
    """A JSON-schema constraint from the engine (compiled off the event loop: the first costs ~1 s)."""
    return await asyncio.to_thread(state.engine.json_constraint, schema, answer_room(state, params))


class ToolRequest(Protocol):
    """What a dialect's request says about tools (the chat request's Tooling, the Responses request)."""

    parallel_tool_calls: bool | None

    def tool_mode(self) -> str: ...  # none | auto | required | the one function's name

    def forces_tool_call(self) -> bool: ...

    def tool_dicts(self) -> list[dict] | None: ...  # in the chat shape: {"type": "function", "function": {...}}


async def prepare_tools(state, req: GenerationRequest, body: ToolRequest) -> ToolCallSplitter | None:
    """Lists the tools for the model (even with tool_choice none, as OpenAI does); a forced call
    (required, or a named function) constrains decoding to tool calls and nothing else.
    → what finds the calls in the answer (None when none are wanted)."""
    mode, parallel = body.tool_mode(), body.parallel_tool_calls is not False
    req.tools = body.tool_dicts()
    if req.tools:  # whatever the tool_choice, as documented; bounded, and still not for the event loop
        await asyncio.to_thread(check_parameters, req.tools)
    if mode == "none":
        return None
    if body.forces_tool_call():
        markers = []
        for text in ("<tool_call>", "</tool_call>"):
            tid = state.engine.special_token_id(text)
            markers.append(f"<[{tid}]>" if tid is not None else json.dumps(text))
        grammar = await asyncio.to_thread(call_grammar, req.tools, None if mode == "required" else mode, parallel,
                                          *markers)
        budget = max(1, answer_room(state, req.params) - TAIL_TOKENS)
        req.constraint = await asyncio.to_thread(state.engine.grammar_constraint, grammar, budget)
    # only a grammar guarantees a block is a call, so only then may its arguments stream before it closes
    return ToolCallSplitter({t["function"]["name"] for t in req.tools}, 64 if parallel else 1,
                            stream_arguments=body.forces_tool_call())


@dataclass
class Done:
    """How a run ended, with the figures every API reports."""

    finish: FinishEvent
    usage: Usage
    timings: Timings


class Job:
    """One submitted request: the engine's Handle, and its events as they reach this event loop."""

    def __init__(self, engine: Engine, prepared: PreparedRequest, deadline: float):
        self.deadline = deadline
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.finished = False  # its end (a FinishEvent or an error) is on its way here
        loop = asyncio.get_running_loop()

        def sink(item: Event | BaseException) -> None:  # on the engine's thread
            if isinstance(item, FinishEvent | BaseException):
                self.finished = True
            loop.call_soon_threadsafe(self.events.put_nowait, item)

        self.handle = engine.submit(prepared, sink)  # refusals raise here

    def cancel(self) -> None:
        if not self.finished:
            self.handle.cancel()

    async def stream(self) -> AsyncIterator[Event]:
        """The events up to the FinishEvent; Timeout at the deadline, the engine's exception on failure."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.cancel()
                raise Timeout("the request took longer than the server's request timeout", "timeout")
            try:
                item = await asyncio.wait_for(self.events.get(), remaining)
            except asyncio.TimeoutError:
                continue  # the check above raises
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, FinishEvent):
                return


def refusal(e: Refused) -> ApiError:
    """The engine's refusal as the API's error: 429 for a full queue, 503 when paused or closing."""
    headers = {"Retry-After": str(e.retry_after_s)}
    if isinstance(e, EngineQueueFull):
        return QueueFull(f"the server is busy: {e.running} running, {e.waiting} waiting (queue size {e.queue_size})",
                         "queue_full", headers=headers)
    if isinstance(e, Paused):  # only the thermal governor pauses admission
        return Unavailable("the CPU is too hot; no new work until it cools down", "thermal_limit", headers=headers)
    if isinstance(e, ShuttingDown):
        return Unavailable("the server is shutting down", "shutting_down", headers=headers)
    return Unavailable(str(e), "unavailable", headers=headers)


class Runner:
    """Submits to the engine and keeps the metrics honest however the request ends."""

    def __init__(self, engine: Engine, metrics: Metrics, timeout_s: float):
        self.engine = engine
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def start(self, req: GenerationRequest) -> Job:
        """Prepares (off the event loop) and submits the request: 429/503, and a 400 for a prompt over
        the context window or the KV budget, are raised here, before any response starts."""
        try:
            self.engine.check_room()  # a busy server refuses before spending a prompt's preprocessing
            prepared = await asyncio.to_thread(self.engine.prepare, req)
            return Job(self.engine, prepared, time.monotonic() + self.timeout_s)
        except Refused as e:
            raise refusal(e) from None

    def record(self, endpoint: str, fin: FinishEvent) -> None:
        m = self.metrics
        m.finish.labels(fin.finish_reason).inc()
        m.prompt_tokens.inc(fin.usage.prompt_tokens)
        m.generated_tokens.inc(fin.usage.completion_tokens)
        m.vision_cache_hits.inc(fin.timings.vision_cache_hits)
        m.prefix_reused.inc(fin.timings.prefix_reused_tokens)
        m.queue_wait.observe(fin.timings.queue_ms / 1000)
        if fin.usage.completion_tokens:
            m.ttft.labels(endpoint).observe(fin.timings.ttft_ms / 1000)
        m.latency.labels(endpoint).observe(fin.timings.total_ms / 1000)

    async def events(self, endpoint: str, job: Job, http: Request) -> AsyncIterator[TokenEvent | Done]:
        """The job's events, the last one a Done; the job is cancelled if the client disconnects or
        the stream is closed early."""
        watcher = asyncio.create_task(_watch_disconnect(http, job))
        try:
            async for ev in job.stream():
                if isinstance(ev, FinishEvent):
                    self.record(endpoint, ev)
                    yield Done(ev, usage_of(ev), timings_of(ev))
                    return
                yield ev
            raise ApiError("the request was cancelled", "cancelled")
        finally:
            watcher.cancel()
            job.cancel()


async def _watch_disconnect(http: Request, job: Job) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not job.finished:
            if await http.is_disconnected():
                job.cancel()  # waiting: it leaves the queue; running: it stops at the engine's next step
                return
            await asyncio.sleep(0.1)


def usage_of(fin: FinishEvent) -> Usage:
    u = fin.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 total_tokens=u.total_tokens, image_tokens=u.image_tokens, video_tokens=u.video_tokens,
                 reasoning_tokens=u.reasoning_tokens)


def timings_of(fin: FinishEvent) -> Timings:
    t = fin.timings
    return Timings(ttft_ms=round(t.ttft_ms, 2), total_ms=round(t.total_ms, 2), tokens_per_s=round(t.tokens_per_s, 2),
                   preprocess_ms=round(t.preprocess_ms, 2), vision_ms=round(t.vision_ms, 2),
                   prefill_ms=round(t.prefill_ms, 2), queue_ms=round(t.queue_ms, 2),
                   vision_cache_hits=t.vision_cache_hits, prefix_reused_tokens=t.prefix_reused_tokens,
                   energy_j=round(t.energy_j, 4) if t.energy_j is not None else None,
                   forced_tokens=t.forced_tokens)


def logprob_entries(engine, ev: TokenEvent) -> tuple[dict, list[dict]]:
    """The sampled token's and its likeliest rivals' {"token", "logprob", "bytes"}: the entries OpenAI's
    chat, its Responses API and Ollama all write (each in its own model)."""

    def entry(token_id: int, logprob: float) -> dict:
        raw = engine.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return entry(ev.token_id, ev.logprob), [entry(t, lp) for t, lp in ev.top_logprobs or []]

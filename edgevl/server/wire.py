"""The wire formats. Each endpoint turns engine events into frames (pydantic models) once;
SSE and NDJSON send the frames as they come, and the JSON answer is folded from the same frames.
The engine's figures (usage, timings, logprobs) become the wire's here, once for every API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from edgevl.server.errors import Shape, as_api_error, error_body
from edgevl.server.protocol import Timings, Usage
from edgevl.types import FinishEvent, TokenEvent

log = logging.getLogger("edgevl.server")
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(exc: Exception, shape: Shape | None = None) -> dict:
    err = as_api_error(exc)
    if err.status >= 500:
        log.error("stream failed", exc_info=exc)
    if shape is not None:
        return shape(err.message, err.type, err.code, err.param, err.status)
    return error_body(err.message, err.type, err.code, err.param)


def sse(frames: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Server-sent events ending `data: [DONE]`; an error after the status line is the last event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for frame in frames:
                yield b"data: " + frame.model_dump_json().encode() + b"\n\n"
        except Exception as e:  # the status line is gone: the error travels in the stream's format

            yield f"data: {json.dumps(_error(e))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=_HEADERS)


def ndjson(frames: AsyncIterator[BaseModel], shape: Shape | None = None) -> StreamingResponse:
    """One JSON object per line; an error after the status line is the last line, with done: true
    (in `shape`, the API's own error shape, when given)."""

    async def body() -> AsyncIterator[bytes]:

        try:
            async for frame in frames:
                yield frame.model_dump_json().encode() + b"\n"
        except Exception as e:
            yield (json.dumps({**_error(e, shape), "done": True}, ensure_ascii=False) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson", headers=_HEADERS)


def sse_events(frames: AsyncIterator[BaseModel], shape: Shape | None = None, ping: BaseModel | None = None,
               ping_every_s: float = 10.0) -> StreamingResponse:
    """Server-sent events named by each frame's `type` (`event: message_start` + `data: {...}`), as
    Anthropic's and OpenAI's Responses streams are; no `[DONE]`. An error after the status line is an
    `event: error` in the API's `shape` (OpenAI's when None). With `ping`, a ping is sent whenever no
    frame came for `ping_every_s`, so that proxies keep the connection open while a long prompt is read."""

    def event(name: str, data: str) -> bytes:
        return f"event: {name}\ndata: {data}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        it = aiter(frames)
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(it))
                while ping is not None and not (await asyncio.wait({step}, timeout=ping_every_s))[0]:
                    yield event(ping.type, ping.model_dump_json())  # type: ignore[attr-defined]
                try:
                    frame = await step
                except StopAsyncIteration:
                    return
                yield event(frame.type, frame.model_dump_json())  # type: ignore[attr-defined]
        except Exception as e:  # the status line is gone: the error travels in the stream's format
            yield event("error", json.dumps(_error(e, shape), ensure_ascii=False))
        finally:  # the client left while a frame was awaited: stop the run behind it
            if step is not None and not step.done():
                step.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_HEADERS)


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

"""The three wire formats. Each endpoint turns engine events into frames (pydantic models) once;
SSE and NDJSON send the frames as they come, and the JSON answer is folded from the same frames."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from edgevl.server.errors import Shape, as_api_error, error_body

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


def named_sse(frames: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Server-sent events named by each frame's `type` (`event: TYPE` before its data), as OpenAI's
    Responses API sends them: no `[DONE]`, and the frames carry their own errors."""

    async def body() -> AsyncIterator[bytes]:
        async for frame in frames:
            yield f"event: {frame.type}\ndata: ".encode() + frame.model_dump_json().encode() + b"\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=_HEADERS)

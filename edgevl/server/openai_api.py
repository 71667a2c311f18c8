"""OpenAI-compatible /v1/chat/completions (JSON or server-sent events) and /v1/models."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edgevl.server.errors import ApiError, as_api_error, error_body
from edgevl.server.protocol import ChatCompletionRequest, ChatMessage, completion_id, now
from edgevl.server.serving import (
    check_max_frames,
    constraint_for,
    image_from_base64,
    timings_dict,
    video_from_base64,
    video_from_frames_base64,
)
from edgevl.types import FinishEvent, GenerationRequest, ImagePart, Message, TextPart

router = APIRouter(prefix="/v1", tags=["openai"])
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "timeout": "length", "error": "stop"}


async def _messages(msgs: list[ChatMessage], state) -> list[Message]:
    out: list[Message] = []
    n_images = n_videos = 0
    for i, m in enumerate(msgs):
        role = "system" if m.role == "developer" else m.role
        parts: list = []
        if isinstance(m.content, str):
            parts.append(TextPart(m.content))
        for j, p in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"messages.{i}.content.{j}"
            if p.fps is not None and p.type != "video":
                raise ApiError("fps belongs to a 'video' frame list (or inside video_url)", "invalid_parameter",
                               f"{where}.fps")
            if p.type in ("video_url", "video"):
                if role != "user":
                    raise ApiError("videos are only accepted in user messages", "invalid_video_position", where)
                n_videos += 1
                if n_videos > state.settings.max_videos:
                    raise ApiError(f"more than {state.settings.max_videos} videos", "too_many_videos", "messages")
                if p.type == "video":
                    parts.append(video_from_frames_base64(p.video or [], state, where, p.fps))
                elif isinstance(p.video_url, str):
                    parts.append(await video_from_base64(p.video_url, state, where))
                else:
                    v = p.video_url
                    check_max_frames(v.max_frames, state.settings, f"{where}.video_url.max_frames")
                    parts.append(await video_from_base64(v.url, state, where, v.fps, v.max_frames))
            elif p.type == "image_url":
                if role != "user":
                    raise ApiError("images are only accepted in user messages", "invalid_image_position",
                                   f"messages.{i}.content.{j}")
                url = p.image_url.url if not isinstance(p.image_url, str) else p.image_url
                n_images += 1
                if n_images > state.settings.max_images:
                    raise ApiError(f"more than {state.settings.max_images} images", "too_many_images", "messages")
                parts.append(ImagePart(image_from_base64(url, state.settings, f"messages.{i}.content.{j}")))
            else:
                parts.append(TextPart(p.text or ""))
        out.append(Message(role, parts))
    return out


@router.get("/models")
async def models(http: Request) -> dict:
    info = http.app.state.info
    return {"object": "list", "data": [{"id": info.model_name, "object": "model", "created": now(),
                                        "owned_by": "edgevl"}]}


@router.post("/chat/completions", responses={400: {}, 413: {}, 429: {}, 503: {}})
async def chat_completions(body: ChatCompletionRequest, http: Request):
    state = http.app.state
    msgs = await _messages(body.messages, state)
    params = body.sampling_params(state.sampling_defaults, state.settings.default_max_tokens, body.stop_list())
    req = GenerationRequest(msgs, params, max_pixels=body.max_pixels)
    fmt = body.response_format or {}
    kind = fmt.get("type", "text")
    if kind == "json_object":
        req.constraint = await constraint_for(state, None, params.max_new_tokens)
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError("response_format.json_schema.schema must be a JSON schema object", "invalid_schema",
                           "response_format")
        req.constraint = await constraint_for(state, spec["schema"], params.max_new_tokens)
    elif kind != "text":
        raise ApiError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "unsupported_response_format", "response_format")
    model = state.info.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(state, req, http, model, include_usage)
    out = await state.runner.collect("chat", req, http)
    fin = out.finish
    return {
        "id": completion_id(), "object": "chat.completion", "created": now(), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "logprobs": None, "finish_reason": _FINISH[fin.finish_reason]}],
        "usage": _usage(fin),
        "timings": timings_dict(fin, out.queue_ms),  # edgevl extension
    }


def _sse(state, req: GenerationRequest, http: Request, model: str, include_usage: bool) -> StreamingResponse:
    job, t0 = state.runner.start(req)
    cid, created = completion_id(), now()

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for ev in state.runner.events("chat", job, http):
                if isinstance(ev, FinishEvent):
                    queue_ms = max(0.0, (time.perf_counter() - t0) * 1000 - ev.timings.total_ms)
                    yield chunk({}, _FINISH[ev.finish_reason], timings=timings_dict(ev, queue_ms))
                    if include_usage:
                        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": _usage(ev)}
                        yield f"data: {json.dumps(obj)}\n\n".encode()
                elif ev.text:
                    yield chunk({"content": ev.text})
        except Exception as e:
            err = as_api_error(e)
            yield f"data: {json.dumps(error_body(err.message, err.type, err.code, err.param))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(fin: FinishEvent) -> dict:
    """OpenAI's usage, with the visual share of the prompt in prompt_tokens_details (an edgevl extension)."""
    u = fin.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"image_tokens": u.image_tokens, "video_tokens": u.video_tokens}}

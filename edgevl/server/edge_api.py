"""The edge API: /api/predict, /api/ocr (JSON or NDJSON streams) and /api/health."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgevl import __version__
from edgevl.server.errors import ApiError, as_api_error, error_body
from edgevl.server.protocol import OcrRequest, OcrResponse, PredictRequest, PredictResponse
from edgevl.server.serving import (
    check_max_frames,
    constraint_for,
    image_from_base64,
    timings_dict,
    usage_dict,
    video_from_base64,
)
from edgevl.types import FinishEvent, GenerationRequest, ImagePart, Message, TextPart

router = APIRouter(prefix="/api", tags=["edge"])


def _request(state, messages: list[Message], body: PredictRequest | OcrRequest) -> GenerationRequest:
    s = state.settings
    params = body.sampling_params(state.sampling_defaults, s.default_max_tokens)
    return GenerationRequest(messages, params, max_pixels=body.max_pixels)


@router.post("/predict", response_model=PredictResponse, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def predict(body: PredictRequest, http: Request):
    """Answer a question about images, a video clip, both or neither."""
    state = http.app.state
    sources = body.all_images()
    if len(sources) > state.settings.max_images:
        raise ApiError(f"{len(sources)} images; the limit is {state.settings.max_images}", "too_many_images", "images")
    if body.video is None and (body.fps is not None or body.max_frames is not None):
        raise ApiError("fps and max_frames apply to a video; this request has none", "invalid_parameter",
                       "fps" if body.fps is not None else "max_frames")
    if body.video is not None and state.settings.max_videos < 1:
        raise ApiError("this server accepts no video (max_videos is 0)", "too_many_videos", "video")
    parts: list = [ImagePart(image_from_base64(v, state.settings, "image" if i == 0 and body.image else "images"))
                   for i, v in enumerate(sources)]
    if body.video is not None:
        check_max_frames(body.max_frames, state.settings, "max_frames")
        parts.append(await video_from_base64(body.video, state, "video", body.fps, body.max_frames))
    messages = ([Message("system", [TextPart(body.system)])] if body.system else []) + [
        Message("user", [*parts, TextPart(body.prompt)])]
    req = _request(state, messages, body)
    if body.schema_ is not None:
        req.constraint = await constraint_for(state, body.schema_, req.params.max_new_tokens)
    if body.stream:
        return _ndjson(state, "predict", req, http)
    out = await state.runner.collect("predict", req, http)
    return {"answer": out.text, "finish_reason": out.finish.finish_reason, "model": state.info.model_name,
            "usage": usage_dict(out.finish), "timings": timings_dict(out.finish, out.queue_ms)}


@router.post("/ocr", response_model=OcrResponse, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def ocr(body: OcrRequest, http: Request):
    """Read all the text in an image."""
    state = http.app.state
    img = image_from_base64(body.image, state.settings)
    req = _request(state, [Message("user", [ImagePart(img), TextPart(body.instruction())])], body)
    if body.temperature is None:
        req.params.temperature = 0.0  # transcription wants the likeliest reading, not variety
    if body.stream:
        return _ndjson(state, "ocr", req, http)
    out = await state.runner.collect("ocr", req, http)
    return {"text": out.text, "finish_reason": out.finish.finish_reason, "model": state.info.model_name,
            "usage": usage_dict(out.finish), "timings": timings_dict(out.finish, out.queue_ms)}


def _ndjson(state, endpoint: str, req: GenerationRequest, http: Request) -> StreamingResponse:
    job, t0 = state.runner.start(req)  # 429/503 are raised here, before the stream starts

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for ev in state.runner.events(endpoint, job, http):
                if isinstance(ev, FinishEvent):
                    queue_ms = max(0.0, (time.perf_counter() - t0) * 1000 - ev.timings.total_ms)
                    yield _line({"token": "", "done": True, "finish_reason": ev.finish_reason,
                                 "model": state.info.model_name, "usage": usage_dict(ev),
                                 "timings": timings_dict(ev, queue_ms)})
                elif ev.text:
                    yield _line({"token": ev.text, "done": False})
        except Exception as e:  # the status line is gone: errors travel in the stream's own format
            err = as_api_error(e)
            yield _line({**error_body(err.message, err.type, err.code, err.param), "done": True})

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


@router.get("/health")
async def health(http: Request) -> JSONResponse:
    """Liveness and readiness: 200 once the model is loaded and warmed, 503 before and while draining."""
    state = http.app.state
    ready = getattr(state, "ready", False)
    body: dict = {"status": "ok" if ready else "loading", "version": __version__,
                  "uptime_s": round(time.monotonic() - state.started, 1)}
    if getattr(state, "draining", False):
        body["status"] = "draining"
    if ready:
        info, sched, s = state.info, state.scheduler, state.settings
        body.update({
            "model": info.model_name, "backend": info.backend, "precision": info.precision,
            "random_weights": info.random_weights, "threads": info.intra_op_threads,
            "max_batch": s.max_batch, "queue_size": s.queue_size, "queue_depth": sched.queue_depth,
            "in_flight": sched.running, "max_context": info.max_context, "max_pixels": s.max_pixels,
            "max_tokens": s.max_tokens, "max_images": s.max_images, "max_videos": s.max_videos,
            "max_video_frames": s.max_video_frames, "max_video_pixels": s.max_video_pixels,
            "max_video_seconds": s.max_video_seconds, "caches": state.engine.cache_stats(),
            "thermal": state.governor.snapshot() if state.governor else {"level": "disabled"},
            "replica": state.replica,
        })
    return JSONResponse(body, 200 if body["status"] == "ok" else 503)

"""The edge API: /api/predict, /api/ocr (JSON or NDJSON streams) and /api/health."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from edgevl import __version__
from edgevl.server.constraints import constraint_for, prepare_tools
from edgevl.server.errors import ApiError, Unavailable
from edgevl.server.inputs import check_max_frames, load_image, video_from_base64
from edgevl.server.protocol import (
    DoneLine,
    FunctionCall,
    OcrRequest,
    OcrResponse,
    PredictRequest,
    PredictResponse,
    ReasoningLine,
    TokenLine,
    ToolCallOut,
    call_id,
)
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.tools import ToolCallSplitter
from edgevl.server.wire import ndjson
from edgevl.types import GenerationRequest, ImagePart, Message, TextPart, TokenEvent

router = APIRouter(prefix="/api", tags=["edge"], route_class=SafeRoute)
Extra = Callable[[str, Done], dict]  # the endpoint's own fields on the last line, from the answer's text


def _request(state, messages: list[Message], body: PredictRequest | OcrRequest) -> GenerationRequest:
    s = state.settings
    params = body.sampling_params(state.sampling_defaults, s.default_max_tokens)
    return GenerationRequest(messages, params, max_pixels=body.max_pixels)


async def lines(state, events: AsyncIterator, extra: Extra, splitter: ToolCallSplitter | None = None
                ) -> AsyncIterator[TokenLine | ReasoningLine | DoneLine]:
    """Engine events → NDJSON lines: a thinking model's thought piece by piece, the text piece by piece,
    then one line with everything else."""
    parts: list[str] = []
    async for ev in events:
        if isinstance(ev, TokenEvent) and ev.reasoning:  # never part of the answer, nor seen by the splitter
            if ev.text:
                yield ReasoningLine(reasoning=ev.text)
            continue
        if isinstance(ev, TokenEvent):
            # this API's calls go whole on the last line (splitter.calls), never piece by piece
            text = splitter.feed(ev.text)[0] if splitter else ev.text
        elif isinstance(ev, Done):
            text = splitter.flush()[0] if splitter else ""
        if text:
            parts.append(text)
            yield TokenLine(token=text)
        if isinstance(ev, Done):
            yield DoneLine(**{"finish_reason": ev.finish.finish_reason, "model": state.info.model_name,
                              "usage": ev.usage, "timings": ev.timings, **extra("".join(parts), ev)})


async def answer(frames: AsyncIterator[TokenLine | ReasoningLine | DoneLine], text_key: str | None) -> dict:
    """The JSON answer: the last line's fields, with the text the token lines carried under `text_key`
    (and a thought, if the model thought, under "reasoning")."""
    parts: list[str] = []
    thought: list[str] = []
    last: DoneLine | None = None
    async for frame in frames:
        if isinstance(frame, TokenLine):
            parts.append(frame.token)
        elif isinstance(frame, ReasoningLine):
            thought.append(frame.reasoning)
        else:
            last = frame
    out = last.model_dump(exclude={"token", "done"})
    if text_key:
        out[text_key] = "".join(parts)
    if thought:
        out["reasoning"] = "".join(thought)
    return out


async def _respond(state, endpoint: str, req: GenerationRequest, http: Request, stream: bool, text_key: str,
                   extra: Extra = lambda text, done: {}, splitter: ToolCallSplitter | None = None):
    frames = lines(state, state.runner.events(endpoint, await state.runner.start(req), http), extra, splitter)
    return ndjson(frames) if stream else await answer(frames, text_key)


@router.post("/predict", response_model=PredictResponse, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def predict(body: PredictRequest, http: Request):
    """Answer a question about images, a video clip, both or neither; with `tools`, the model may call them."""
    state = server_state(http)
    sources = body.all_images()
    if len(sources) > state.settings.max_images:
        raise ApiError(f"{len(sources)} images; the limit is {state.settings.max_images}", "too_many_images", "images")
    if body.video is None and (body.fps is not None or body.max_frames is not None):
        raise ApiError("fps and max_frames apply to a video; this request has none", "invalid_parameter",
                       "fps" if body.fps is not None else "max_frames")
    if body.video is not None and state.settings.max_videos < 1:
        raise ApiError("this server accepts no video (max_videos is 0)", "too_many_videos", "video")
    parts: list = [ImagePart((await load_image(v, state.settings, "image" if i == 0 and body.image else "images"))[0])
                   for i, v in enumerate(sources)]
    if body.video is not None:
        check_max_frames(body.max_frames, state.settings, "max_frames")
        parts.append(await video_from_base64(body.video, http, "video", body.fps, body.max_frames))
    messages = ([Message("system", [TextPart(body.system)])] if body.system else []) + [
        Message("user", [*parts, TextPart(body.prompt)])]
    req = _request(state, messages, body)
    if body.forces_tool_call() and body.schema_ is not None:
        raise ApiError("schema cannot be combined with a forced tool call", "invalid_request", "schema")
    splitter = await prepare_tools(state, req, body)
    if body.schema_ is not None:
        req.constraint = await constraint_for(state, body.schema_, req.params)

    def calls(text: str, done: Done) -> dict:
        if splitter is None:
            return {}
        out = [ToolCallOut(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
               for c in splitter.calls]
        fin = "tool_calls" if out and done.finish.finish_reason == "stop" else done.finish.finish_reason
        return {"tool_calls": out, "finish_reason": fin}

    return await _respond(state, "predict", req, http, body.stream, "answer", calls, splitter)


@router.post("/ocr", response_model=OcrResponse, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def ocr(body: OcrRequest, http: Request):
    """Read all the text in an image."""
    state = server_state(http)
    img, _ = await load_image(body.image, state.settings)
    req = _request(state, [Message("user", [ImagePart(img), TextPart(body.instruction())])], body)
    if body.temperature is None:
        req.params.temperature = 0.0  # transcription wants the likeliest reading, not variety
    return await _respond(state, "ocr", req, http, body.stream, "text")


@router.get("/health")
async def health(http: Request) -> JSONResponse:
    """Liveness and readiness: 200 once the model is loaded and warmed, 503 before and while draining."""
    try:
        state = server_state(http)
    except Unavailable:
        return JSONResponse({"status": "loading", "version": __version__}, 503)
    body: dict = {"status": "draining" if state.draining else "ok", "version": __version__,
                  "uptime_s": round(time.monotonic() - state.started, 1)}
    if not state.draining:
        info, s, requests = state.info, state.settings, state.requests()
        body.update({
            "model": info.model_name, "backend": info.backend, "precision": info.precision,
            "kv_cache": info.kv_cache,
            "random_weights": info.random_weights, "thinking": info.thinking,
            "reasoning_budget": s.reasoning_budget, "threads": info.intra_op_threads,
            "max_batch": s.max_batch, "queue_size": s.queue_size, "queue_depth": requests["waiting"],
            "in_flight": state.in_flight(requests), "requests": requests,
            "max_context": info.max_context, "max_pixels": s.max_pixels,
            "max_tokens": s.max_tokens, "max_images": s.max_images, "max_videos": s.max_videos,
            "max_video_frames": s.max_video_frames, "max_video_pixels": s.max_video_pixels,
            "max_video_seconds": s.max_video_seconds, "caches": state.engine.cache_stats(),
            "thermal": state.governor.snapshot(),
            "energy": state.energy.status,
            "replica": state.replica,
        })
    return JSONResponse(body, 200 if body["status"] == "ok" else 503)

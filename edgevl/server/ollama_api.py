"""Ollama's API: /api/chat and /api/generate (NDJSON by default, one object with "stream": false),
/api/tags, /api/show, /api/ps, /api/version, and a clear refusal for the model-management routes.

Engine events become Ollama's objects in one place (`frames`); the stream sends them, and the
"stream": false answer is the same objects folded (`fold`). Errors here look like Ollama's:
{"error": "message"}."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from functools import lru_cache

from fastapi import APIRouter, Request, Response

from edgevl.server import errors
from edgevl.server.constraints import constraint_for, prepare_tools
from edgevl.server.errors import ApiError
from edgevl.server.inputs import load_image
from edgevl.server.ollama_protocol import (
    ChatFrame,
    ChatRequest,
    Common,
    Frame,
    GenerateFrame,
    GenerateRequest,
    ListedModel,
    Logprob,
    ModelDetails,
    OutMessage,
    Running,
    RunningModel,
    Shown,
    ShowRequest,
    Tags,
    ToolCall,
    ToolCallFunction,
    TopLogprob,
    Version,
)
from edgevl.server.protocol import Tooling, call_id
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.tools import CallPiece, ToolCallSplitter
from edgevl.server.wire import logprob_entries, ndjson
from edgevl.types import GenerationRequest, ImagePart, Message, TextPart, TokenEvent
from edgevl.types import ToolCall as EngineToolCall

# the Ollama release whose /api this mirrors (logprobs, its newest field served here, came in 0.12.11)
OLLAMA_VERSION = "0.12.11"
FAMILY = "qwen3vl"  # edgevl serves Qwen3-VL checkpoints only
_DONE_REASON = {"stop": "stop", "length": "length", "cancelled": "stop"}
_REFUSED = {
    "pull": "edgevl serves the one model it was started with and pulls none: download the checkpoint "
            "(e.g. Qwen/Qwen3-VL-2B-Instruct) and restart with `edgevl serve --model DIR`",
    "push": "edgevl does not push models: it serves the one checkpoint it was started with",
    "create": "edgevl builds no models from Modelfiles: restart with `edgevl serve --model DIR` on a Qwen3-VL "
              "checkpoint or exported folder (sampling defaults come from its generation_config.json)",
    "copy": "edgevl serves one model, under its own name; any model name is accepted in requests, so no copy "
            "is needed",
    "delete": "edgevl does not delete models: stop the server and remove the folder given to --model",
    "embed": "edgevl has no embedding model: it answers with text (use /api/chat or /api/generate)",
    "embeddings": "edgevl has no embedding model: it answers with text (use /api/chat or /api/generate)",
    "blobs": "edgevl takes no model blobs: restart with `edgevl serve --model DIR`",
}
PATHS = ("/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version",
         *(f"/api/{name}" for name in _REFUSED))



class OllamaRoute(SafeRoute):
    """Ollama reads every body as JSON, whatever its Content-Type: the curl examples of its API
    reference send none (so curl says form-urlencoded), and they should work here as written."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def as_json(request: Request) -> Response:
            if "json" not in request.headers.get("content-type", ""):
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
                request = Request(scope, request.receive)
            return await handler(request)

        return as_json


router = APIRouter(prefix="/api", tags=["ollama"], route_class=OllamaRoute)


def shape(message: str, type_: str, code: str, param: str | None, status: int) -> dict:
    """Ollama's error is one string: it names the field itself when the message does not."""
    return {"error": message if param is None or param in message else f"{param}: {message}"}


for _path in PATHS:
    errors.register_shape(_path, shape)

Make = Callable[..., Frame]  # (text, calls, logprobs, thinking=, **final fields) → the endpoint's object


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _thinking(state, body: Common) -> int | None:
    """The reasoning budget `think` asks for. A Thinking checkpoint thinks unless think is false (budget
    0), as Ollama's thinking models do, for at most the server's budget (None); its thought comes in
    `thinking`, never in the answer. Other models refuse think: true as Ollama does. Levels ("high", …)
    are gpt-oss's: this model has one kind of thought, so they are refused rather than ignored."""
    if isinstance(body.think, str):
        raise ApiError(f'think "{body.think}": thinking levels are not supported (true or false)',
                       "invalid_parameter", "think")
    if not state.info.thinking:
        if body.think:
            raise ApiError(f'"{body.model or state.info.model_name}" does not support thinking',
                           "thinking_unsupported", "think")
        return None
    return 0 if body.think is False else None


def _count_images(n: int, state, param: str) -> None:
    if n > state.settings.max_images:
        raise ApiError(f"{n} images; the limit is {state.settings.max_images}", "too_many_images", param)


async def _images(values: list[str], state, param: str) -> list[ImagePart]:
    return [ImagePart((await load_image(v, state.settings, f"{param}.{i}"))[0]) for i, v in enumerate(values)]


async def _prepare(state, body: Common, messages: list[Message], tools: Tooling | None
                   ) -> tuple[GenerationRequest, ToolCallSplitter | None]:
    s = state.settings
    budget = _thinking(state, body)
    opts = body.opts()
    if opts.num_ctx is not None and opts.num_ctx > state.info.max_context:
        raise ApiError(f"options.num_ctx: must be at most {state.info.max_context} (the server's max_context)",
                       "invalid_parameter", "options.num_ctx")
    params = opts.sampling(state.sampling_defaults, s.default_max_tokens, s.max_tokens)
    params.logprobs = body.top_k_logprobs()
    params.reasoning_budget = budget
    req = GenerationRequest(messages, params, max_context=opts.num_ctx)
    splitter = await prepare_tools(state, req, tools) if tools is not None else None
    if body.format == "json":
        req.constraint = await constraint_for(state, None, params)
    elif isinstance(body.format, dict):
        req.constraint = await constraint_for(state, body.format, params)
    return req, splitter


def _loaded(make: Make) -> Frame:
    """An empty request only loads the model, in Ollama; here it always is."""
    return make("", done=True, done_reason="load")


async def _respond(state, endpoint: str, http: Request, body: Common, req: GenerationRequest, make: Make,
                   splitter: ToolCallSplitter | None, t0: float):
    run = await state.runner.start(req)
    out = frames(state, state.runner.events(endpoint, run, http), make, splitter, t0)
    return ndjson(out, shape) if body.stream else await fold(out)


@router.post("/chat", response_model=ChatFrame, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def chat(body: ChatRequest, http: Request):
    """Ollama's chat: the next assistant message, streamed as NDJSON unless "stream": false."""
    t0 = time.perf_counter()  # Ollama's total_duration: the whole request, images decoded included
    state = server_state(http)
    name = state.info.model_name

    def make(text: str, calls: list[ToolCall] | None = None, logprobs: list[Logprob] | None = None,
             thinking: str | None = None, **final) -> ChatFrame:
        return ChatFrame(model=name, created_at=_now(), logprobs=logprobs, **final,
                         message=OutMessage(content=text, thinking=thinking, tool_calls=calls))

    _thinking(state, body)
    if not body.messages:
        return _loaded(make)
    _count_images(sum(len(m.images or []) for m in body.messages), state, "messages")
    messages = []
    for i, m in enumerate(body.messages):
        parts: list = await _images(m.images or [], state, f"messages.{i}.images")
        if m.content or not parts:
            parts.append(TextPart(m.content))
        calls = [EngineToolCall(c.function.name, json.dumps(c.function.arguments, ensure_ascii=False))
                 for c in m.tool_calls or []]
        messages.append(Message(m.role, parts, calls, m.thinking or ""))
    tools = Tooling(tools=body.tools) if body.tools else None
    req, splitter = await _prepare(state, body, messages, tools)
    return await _respond(state, "ollama_chat", http, body, req, make, splitter, t0)


@router.post("/generate", response_model=GenerateFrame, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def generate(body: GenerateRequest, http: Request):
    """Ollama's completion: an answer to `prompt` (and `images`, e.g. a camera's snapshot), through the
    checkpoint's chat template."""
    t0 = time.perf_counter()  # Ollama's total_duration: the whole request, images decoded included
    state = server_state(http)
    name = state.info.model_name

    def make(text: str, calls: list[ToolCall] | None = None, logprobs: list[Logprob] | None = None,
             thinking: str | None = None, **final) -> GenerateFrame:
        return GenerateFrame(model=name, created_at=_now(), response=text, thinking=thinking, logprobs=logprobs,
                             **final)

    _thinking(state, body)
    if not body.prompt.strip() and not body.images:
        return _loaded(make)
    _count_images(len(body.images or []), state, "images")
    parts: list = await _images(body.images or [], state, "images")
    if body.prompt:
        parts.append(TextPart(body.prompt))
    messages = ([Message("system", [TextPart(body.system)])] if body.system else []) + [Message("user", parts)]
    req, _ = await _prepare(state, body, messages, None)
    return await _respond(state, "ollama_generate", http, body, req, make, None, t0)


async def frames(state, events: AsyncIterator, make: Make, splitter: ToolCallSplitter | None, t0: float
                 ) -> AsyncIterator[Frame]:
    """Engine events → Ollama's objects: a thinking model's thought (in `thinking`), then text (and whole
    tool calls) as they come, then the last object with done: true, why it ended and the figures."""
    held: list[Logprob] = []

    def piece(text: str, pieces: list[CallPiece]) -> Frame | None:
        calls = [_call(p) for p in pieces if p.name is not None] or None
        if not (text or calls or held):
            return None
        frame = make(text, calls, list(held) or None)
        held.clear()
        return frame

    async for ev in events:
        if isinstance(ev, TokenEvent):
            if ev.logprob is not None:
                held.append(_logprob(state.engine, ev))
            if ev.reasoning:  # never part of the answer, nor seen by the splitter
                frame = make("", None, list(held) or None, thinking=ev.text or None) if ev.text or held else None
                held.clear()
            else:
                frame = piece(*(splitter.feed(ev.text) if splitter else (ev.text, [])))
        elif isinstance(ev, Done):
            frame = piece(*(splitter.flush() if splitter else ("", [])))
        else:
            continue
        if frame is not None:
            yield frame
        if isinstance(ev, Done):
            yield make("", done=True, **_figures(ev, t0))


def _call(p: CallPiece) -> ToolCall:
    """Without tool_choice a call is never forced, so it arrives whole: its arguments parse."""
    return ToolCall(id=call_id(), type="function",
                    function=ToolCallFunction(name=p.name, arguments=json.loads(p.arguments), index=p.index))


def _figures(done: Done, t0: float) -> dict:
    t, u = done.timings, done.usage
    ns = 1_000_000
    return {"done_reason": _DONE_REASON[done.finish.finish_reason],
            "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": u.prompt_tokens,
            "prompt_eval_duration": int((t.preprocess_ms + t.vision_ms + t.prefill_ms) * ns),
            "eval_count": u.completion_tokens, "eval_duration": int(done.finish.timings.decode_ms * ns)}


def _logprob(engine, ev: TokenEvent) -> Logprob:
    first, rivals = logprob_entries(engine, ev)
    return Logprob(**first, top_logprobs=[TopLogprob(**r) for r in rivals])


async def fold(frames: AsyncIterator[Frame]) -> Frame:
    """The "stream": false answer: the last object, with the text, calls and log-probabilities that
    all the objects carried."""
    text: list[str] = []
    thought: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[Logprob] = []
    last: Frame | None = None
    async for f in frames:
        last = f
        text.append(f.message.content if isinstance(f, ChatFrame) else f.response)
        thought.append((f.message.thinking if isinstance(f, ChatFrame) else f.thinking) or "")
        calls += (f.message.tool_calls or []) if isinstance(f, ChatFrame) else []
        logprobs += f.logprobs or []
    if isinstance(last, ChatFrame):
        last.message = OutMessage(content="".join(text), thinking="".join(thought) or None, tool_calls=calls or None)
    else:
        last.response, last.thinking = "".join(text), "".join(thought) or None
    last.logprobs = logprobs or None
    return last


# ---- the model: one, loaded at start ------------------------------------------------------------
def _started(state) -> str:
    wall = time.time() - (time.monotonic() - state.started)
    return datetime.fromtimestamp(wall, timezone.utc).isoformat().replace("+00:00", "Z")


@lru_cache(maxsize=4)
def _folder_bytes(folder: str) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    except OSError:
        return 0


def _listed(state) -> dict:
    info = state.info
    digest = hashlib.sha256(f"{info.model_name}:{info.precision}:{info.backend}".encode()).hexdigest()
    details = ModelDetails(family=FAMILY, families=[FAMILY], quantization_level=info.precision.upper())
    return {"name": info.model_name, "model": info.model_name, "modified_at": _started(state),
            "size": _folder_bytes(info.model_dir), "digest": digest, "details": details}


@router.get("/tags")
async def tags(http: Request) -> Tags:
    """The models there are: the one edgevl serves."""
    return Tags(models=[ListedModel(**_listed(server_state(http)))])


@router.get("/ps")
async def ps(http: Request) -> Running:
    """The models loaded: the one edgevl serves, for as long as it runs."""
    state = server_state(http)
    return Running(models=[RunningModel(**_listed(state), expires_at="9999-12-31T23:59:59Z",
                                        context_length=state.info.max_context)])


@router.post("/show")
async def show(body: ShowRequest, http: Request) -> Shown:
    """The served model, whatever name is asked for: its details, sampling defaults and capabilities."""
    state = server_state(http)
    info, s = state.info, state.settings
    params = {**state.sampling_defaults, "num_ctx": info.max_context, "num_predict": s.default_max_tokens}
    lines = [f"{'repeat_penalty' if k == 'repetition_penalty' else k} {v}" for k, v in params.items()]
    listed = _listed(state)
    modelfile = "\n".join([f"# served by edgevl; any model name answers with {info.model_name}",
                           f"FROM {info.model_name}", *(f"PARAMETER {line}" for line in lines)]) + "\n"
    capabilities = ["completion", "vision", "tools"] + (["thinking"] if info.thinking else [])
    return Shown(modelfile=modelfile, parameters="\n".join(lines), details=listed["details"],
                 model_info={"general.architecture": FAMILY, "general.basename": info.model_name,
                             f"{FAMILY}.context_length": info.max_context},
                 capabilities=capabilities, modified_at=listed["modified_at"])


@router.get("/version")
async def version() -> Version:
    return Version(version=OLLAMA_VERSION)


def _refuse(name: str):
    async def refused() -> Response:
        raise ApiError(_REFUSED[name], "unsupported_endpoint")

    refused.__name__ = f"ollama_{name}"
    refused.__doc__ = f"Refused, with what to do instead: {_REFUSED[name]}"
    return refused


for _name in ("pull", "push", "create", "copy", "embed", "embeddings"):
    router.add_api_route(f"/{_name}", _refuse(_name), methods=["POST"], responses={400: {}})
router.add_api_route("/delete", _refuse("delete"), methods=["DELETE"], responses={400: {}})
router.add_api_route("/blobs/{digest}", _refuse("blobs"), methods=["POST"], responses={400: {}})

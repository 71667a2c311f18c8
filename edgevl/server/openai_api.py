"""OpenAI-compatible /v1/chat/completions (JSON or server-sent events) and /v1/models.

Engine events become ChatCompletionChunk frames in one place (`_chunks`); the stream sends them,
and the JSON answer is those same chunks folded (`_fold`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from edgevl.server.constraints import constraint_for, prepare_tools
from edgevl.server.errors import ApiError
from edgevl.server.inputs import check_max_frames, load_image, video_from_base64, video_from_frames_base64
from edgevl.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    FunctionCall,
    FunctionDelta,
    ModelCard,
    ModelList,
    OpenAIUsage,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    call_id,
    completion_id,
    now,
)
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.tools import CallPiece, ToolCallSplitter
from edgevl.server.wire import logprob_entries, sse
from edgevl.types import GenerationRequest, ImagePart, Message, TextPart, TokenEvent, ToolCall

router = APIRouter(prefix="/v1", tags=["openai"], route_class=SafeRoute)
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


async def _messages(msgs: list[ChatMessage], state, http: Request) -> list[Message]:
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
                    parts.append(await video_from_frames_base64(p.video or [], http, where, p.fps))
                elif isinstance(p.video_url, str):
                    parts.append(await video_from_base64(p.video_url, http, where))
                else:
                    v = p.video_url
                    check_max_frames(v.max_frames, state.settings, f"{where}.video_url.max_frames")
                    parts.append(await video_from_base64(v.url, http, where, v.fps, v.max_frames))
            elif p.type == "image_url":
                if role not in ("user", "tool"):
                    raise ApiError("images are only accepted in user and tool messages", "invalid_image_position",
                                   f"messages.{i}.content.{j}")
                n_images += 1
                if n_images > state.settings.max_images:
                    raise ApiError(f"more than {state.settings.max_images} images", "too_many_images", "messages")
                image = p.image()
                img, _ = await load_image(image.url, state.settings, f"messages.{i}.content.{j}")
                parts.append(ImagePart(img, image.max_pixels()))
            else:
                parts.append(TextPart(p.text or ""))
        calls = [ToolCall(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        out.append(Message(role, parts, calls, m.reasoning_content or ""))
    return out


@router.get("/models")
async def models(http: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=server_state(http).info.model_name, created=now())])


@router.get("/models/{model_id:path}", responses={404: {}})
async def model(model_id: str, http: Request) -> ModelCard:
    """The loaded model's card. Chat requests take any model name (there is one model), but a model
    looked up by id is either this one or, as OpenAI answers, not found."""
    name = server_state(http).info.model_name
    if model_id != name:
        err = ApiError(f"The model {model_id!r} does not exist; this server serves {name!r}", "model_not_found",
                       "model")
        err.status = 404
        raise err
    return ModelCard(id=name, created=now())


@router.post("/chat/completions", response_model=ChatCompletion, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def chat_completions(body: ChatCompletionRequest, http: Request):
    state = server_state(http)
    params = body.openai_sampling(state.sampling_defaults, state.settings.default_max_tokens)
    req = GenerationRequest(await _messages(body.messages, state, http), params, max_pixels=body.max_pixels)
    fmt = body.response_format or {}
    kind = fmt.get("type", "text")
    text_constraint = None
    if kind == "json_object":  # llama.cpp's, Together's and Fireworks' form may carry a schema
        schema = fmt.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise ApiError("response_format.schema must be a JSON schema object", "invalid_schema",
                           "response_format.schema")
        text_constraint = await constraint_for(state, schema, params)
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError("response_format.json_schema.schema must be a JSON schema object", "invalid_schema",
                           "response_format")
        text_constraint = await constraint_for(state, spec["schema"], params)
    elif kind != "text":
        raise ApiError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "unsupported_response_format", "response_format")
    splitter = await prepare_tools(state, req, body)  # a forced call brings its own constraint
    if not body.forces_tool_call():
        # response_format shapes a text answer; a forced call has none, so there the call's grammar
        # rules (as at OpenAI: agent SDKs send an output schema with tool_choice "required")
        req.constraint = text_constraint
    run = await state.runner.start(req)  # a 400 for an over-long prompt comes here, before the stream
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = _chunks(state, state.runner.events("chat", run, http), splitter, body.logprobs or False,
                     include_usage or not body.stream)
    return sse(chunks) if body.stream else await _fold(chunks)


async def _chunks(state, events: AsyncIterator, splitter: ToolCallSplitter | None, logprobs: bool,
                  include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    cid, created, model = completion_id(), now(), state.info.model_name
    held: list[TokenLogprob] = []

    def chunk(delta: Delta, finish: str | None = None, **extra) -> ChatCompletionChunk:
        lp = ChoiceLogprobs(content=list(held)) if logprobs else None
        held.clear()
        return ChatCompletionChunk(id=cid, created=created, model=model, **extra,
                                   choices=[ChunkChoice(delta=delta, logprobs=lp, finish_reason=finish)])

    yield chunk(Delta(role="assistant", content=""))
    async for ev in events:
        if isinstance(ev, TokenEvent):
            if ev.logprob is not None:
                held.append(_logprob(state.engine, ev))
            if ev.reasoning:  # a thought goes beside the answer, never into it (nor into the tool splitter)
                if ev.text or held:
                    yield chunk(Delta(reasoning_content=ev.text or None))
                continue
            text, pieces = splitter.feed(ev.text) if splitter else (ev.text, [])
            if text or pieces or held:
                yield chunk(Delta(content=text or None, tool_calls=_calls_delta(pieces)))
        elif isinstance(ev, Done):
            tail, pieces = splitter.flush() if splitter else ("", [])
            reason = _FINISH[ev.finish.finish_reason]
            if splitter and splitter.calls and reason == "stop":
                reason = "tool_calls"
            yield chunk(Delta(content=tail or None, tool_calls=_calls_delta(pieces)), reason, timings=ev.timings)
            if include_usage:
                u = ev.usage
                yield ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=OpenAIUsage(
                    prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                    prompt_tokens_details=PromptTokensDetails(image_tokens=u.image_tokens,
                                                              video_tokens=u.video_tokens),
                    completion_tokens_details=CompletionTokensDetails(reasoning_tokens=u.reasoning_tokens)))


def _calls_delta(pieces: list[CallPiece]) -> list[ToolCallDelta] | None:
    """A call's header carries its id (the only time it is sent); a fragment only its index."""
    return [ToolCallDelta(index=p.index, id=call_id(), type="function",
                          function=FunctionDelta(name=p.name, arguments=p.arguments)) if p.name is not None
            else ToolCallDelta(index=p.index, function=FunctionDelta(arguments=p.arguments))
            for p in pieces] or None


def _logprob(engine, ev: TokenEvent) -> TokenLogprob:
    first, rivals = logprob_entries(engine, ev)
    return TokenLogprob(**first, top_logprobs=[TopLogprob(**r) for r in rivals])


async def _fold(chunks: AsyncIterator[ChatCompletionChunk]) -> ChatCompletion:
    """The whole answer, from the chunks the stream would have sent."""
    text: list[str] = []
    thought: list[str] | None = None
    calls: dict[int, ToolCallOut] = {}
    logprobs: list[TokenLogprob] | None = None
    first = last = usage = None
    finish = "stop"
    async for c in chunks:
        first = first or c
        usage = c.usage or usage
        for ch in c.choices:
            last = c
            text.append(ch.delta.content or "")
            if ch.delta.reasoning_content is not None:
                thought = (thought or []) + [ch.delta.reasoning_content]
            for d in ch.delta.tool_calls or []:
                _merge(calls, d)
            if ch.logprobs is not None:
                logprobs = (logprobs or []) + (ch.logprobs.content or [])
            finish = ch.finish_reason or finish
    content = "".join(text)
    message = AssistantMessage(content=None if calls and not content.strip() else content,
                               reasoning_content="".join(thought) if thought is not None else None,
                               tool_calls=[calls[i] for i in sorted(calls)] or None)
    return ChatCompletion(id=first.id, created=first.created, model=first.model, usage=usage, timings=last.timings,
                          choices=[Choice(message=message, finish_reason=finish,
                                          logprobs=ChoiceLogprobs(content=logprobs) if logprobs is not None else None)])


def _merge(calls: dict[int, ToolCallOut], d: ToolCallDelta) -> None:
    """One streamed call delta into the calls so far, as a client does: by index, the id and name from
    the call's first delta, its arguments the concatenation of all."""
    call = calls.get(d.index)
    if call is None:
        calls[d.index] = ToolCallOut(id=d.id or call_id(), function=FunctionCall(
            name=d.function.name or "", arguments=d.function.arguments or ""))
    else:
        call.function.arguments += d.function.arguments or ""

"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

The request becomes the same GenerationRequest as a chat completion (messages, tools through the
chat template, constraints for forced calls and formats) and runs through the same engine queue. Engine
events become Responses stream events in one place (`_Builder`), which keeps the Response as it
grows; the stream sends the events, and the JSON answer is the Response the last event carries.
`previous_response_id` prepends the stored conversation and its answer, so the prompt starts with
the tokens the last turn left in the KV cache and only the new input is read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request

from edgevl.preprocess.image import ImageError
from edgevl.server.constraints import constraint_for, prepare_tools
from edgevl.server.errors import ApiError, NotFound, as_api_error
from edgevl.server.inputs import load_image
from edgevl.server.response_store import ResponseStore, StoredResponse
from edgevl.server.responses_protocol import (
    ArgumentsDelta,
    ArgumentsDone,
    ContentPartEvent,
    DeletedResponse,
    DeltaLogprob,
    ErrorEvent,
    FunctionCallItem,
    FunctionCallOut,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputImage,
    InputItem,
    InputTokensDetails,
    Logprob,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextPart,
    OutputTokensDetails,
    ReasoningDelta,
    ReasoningDone,
    ReasoningItem,
    ReasoningOut,
    ReasoningTextParam,
    ReasoningTextPart,
    Response,
    ResponseError,
    ResponseLifecycle,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextDelta,
    TextDone,
    ToolChoiceFunction,
    TopLogprob,
    item_id,
    now,
    response_id,
)
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.tools import CallPiece, ToolCallSplitter
from edgevl.server.wire import logprob_entries, sse_events
from edgevl.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart, TokenEvent, ToolCall

router = APIRouter(prefix="/v1", tags=["openai"], route_class=SafeRoute)
log = logging.getLogger("edgevl.server")
# finish reason → (the response's status, the stream's last event)
_END = {"stop": ("completed", "response.completed"), "length": ("incomplete", "response.incomplete"),
        "timeout": ("incomplete", "response.incomplete"), "cancelled": ("cancelled", "response.incomplete"),
        "error": ("failed", "response.failed")}


@router.post("/responses", response_model=Response, responses={400: {}, 404: {}, 413: {}, 429: {}, 503: {}})
async def create_response(body: ResponsesRequest, http: Request):
    state = server_state(http)
    store: ResponseStore = state.response_store
    history: list[InputItem] = []
    if body.previous_response_id is not None:
        prev = store.get(body.previous_response_id)
        if prev is None:
            raise NotFound(f"no stored response {body.previous_response_id!r}: never stored (store: false), deleted, "
                           "or dropped from the server's --responses-store", "previous_response_not_found",
                           "previous_response_id")
        history = prev.history + _as_input(prev.response.output)
    new = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)
    params = body.sampling_params(state.sampling_defaults, state.settings.default_max_tokens)
    if body.reasoning is not None and body.reasoning.effort == "none":
        if body.reasoning_budget:
            raise ApiError("reasoning.effort 'none' turns the thought off; it cannot come with a reasoning_budget",
                           "invalid_parameter", "reasoning_budget")
        params.reasoning_budget = 0  # a Thinking checkpoint closes its thought at once; others have none
    if body.wants_logprobs():
        params.logprobs = body.top_logprobs or 0
    messages = await _messages(body.instructions, history, new, state)
    req = GenerationRequest(messages, params, max_pixels=body.max_pixels)
    fmt = body.format()
    splitter = await prepare_tools(state, req, body)  # a forced call brings its own constraint
    # with a call forced, this turn's answer is that call and holds no text for a format to shape: agents send
    # both (the format is for the final answer, turns later), so the format is kept and has nothing to constrain
    if fmt.type != "text" and not body.forces_tool_call():
        req.constraint = await constraint_for(state, fmt.schema_, params)
    run = await state.runner.start(req)  # a 400 for a prompt that can never run comes here, before the stream
    response = _skeleton(body, state.info.model_name, params, stored=body.store is not False and store.capacity > 0)
    conversation = history + new

    def keep(final: Response) -> None:
        if final.store:
            store.put(StoredResponse(final, conversation))

    builder = _Builder(response, splitter, state.engine if body.wants_logprobs() else None)
    events = builder.run(state.runner.events("responses", run, http), keep)
    if body.stream:
        return sse_events(_guarded(builder, events))
    final = None
    async for ev in events:
        final = ev
    return final.response


@router.get("/responses/{response_id}", response_model=Response, responses={404: {}})
async def get_response(response_id: str, http: Request, stream: bool = False) -> Response:
    if stream:
        raise ApiError("a stored response is not streamed again; GET it without stream", "invalid_parameter",
                       "stream")
    entry = server_state(http).response_store.get(response_id)
    if entry is None:
        raise _not_stored(response_id)
    return entry.response


@router.delete("/responses/{response_id}", response_model=DeletedResponse, responses={404: {}})
async def delete_response(response_id: str, http: Request) -> DeletedResponse:
    if not server_state(http).response_store.delete(response_id):
        raise _not_stored(response_id)
    return DeletedResponse(id=response_id)


def _not_stored(response_id: str) -> NotFound:
    return NotFound(f"no stored response {response_id!r}", "not_found", "response_id")


def _skeleton(body: ResponsesRequest, model: str, params: SamplingParams, stored: bool) -> Response:
    """The Response as created: the request's settings echoed, no output yet."""
    fmt = body.format().model_dump(by_alias=True, exclude_none=True)
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, ToolChoiceFunction) else body.tool_choice
    return Response(id=response_id(), created_at=now(), model=model, instructions=body.instructions,
                    max_output_tokens=body.max_output_tokens, metadata=body.metadata or {},
                    parallel_tool_calls=body.parallel_tool_calls is not False,
                    previous_response_id=body.previous_response_id, store=stored, temperature=params.temperature,
                    top_p=params.top_p, text={"format": fmt}, tool_choice=choice or "auto",
                    tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
                    top_logprobs=body.top_logprobs, user=body.user, service_tier=body.service_tier or "default")


def _as_input(output: list[OutputItem]) -> list[InputItem]:
    """A stored answer as the items a client would give back."""
    items: list[InputItem] = []
    for it in output:
        if isinstance(it, ReasoningOut):
            items.append(ReasoningItem(type="reasoning", id=it.id, content=[
                ReasoningTextParam(type="reasoning_text", text=p.text) for p in it.content]))
        elif isinstance(it, OutputMessage):
            items.append(MessageItem(role="assistant", content=[OutputText(type="output_text", text=p.text)
                                                                 for p in it.content]))
        elif isinstance(it, FunctionCallOut):
            items.append(FunctionCallItem(type="function_call", call_id=it.call_id, name=it.name,
                                          arguments=it.arguments))
    return items


async def _messages(instructions: str | None, history: list[InputItem], new: list[InputItem], state
                    ) -> list[Message]:
    """Items → the engine's messages: function calls join the assistant turn before them, their outputs
    become tool turns (the chat template shows both as the checkpoint expects); a reasoning item is the
    thought of the assistant turn after it."""
    s = state.settings
    out = [Message("system", [TextPart(instructions)])] if instructions else []
    calls: set[str] = set()
    thought = ""
    n_images = 0

    async def image(part: InputImage, where: str) -> ImagePart:
        nonlocal n_images
        n_images += 1
        if n_images > s.max_images:
            raise ApiError(f"more than {s.max_images} images in the conversation", "too_many_images", where)
        try:
            img, _ = await load_image(part.image_url or "", s, f"{where}.image_url")
        except ImageError as e:  # 4xx by type; the param says which part of the request
            e.param = e.param or f"{where}.image_url"
            raise
        return ImagePart(img, part.max_pixels())

    for where, item in [("previous_response_id", it) for it in history] + [
            (f"input.{i}", it) for i, it in enumerate(new)]:
        if isinstance(item, MessageItem):
            parts: list = []
            for j, p in enumerate([item.content] if isinstance(item.content, str) else item.content):
                if isinstance(p, InputImage):
                    parts.append(await image(p, f"{where}.content.{j}"))
                else:
                    parts.append(TextPart(p if isinstance(p, str) else p.refusal if p.type == "refusal" else p.text))
            if item.role == "assistant":
                out.append(Message("assistant", parts, reasoning=thought))
                thought = ""
            else:
                out.append(Message("system" if item.role == "developer" else item.role, parts))
        elif isinstance(item, ReasoningItem):
            thought += "".join(p.text for p in item.content or [])
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            call = ToolCall(item.name, item.arguments)
            if out and out[-1].role == "assistant" and not thought:
                out[-1].tool_calls.append(call)
            else:
                out.append(Message("assistant", [], [call], thought))
                thought = ""
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise ApiError(f"no function_call with call_id {item.call_id!r} comes before this output",
                               "invalid_request", f"{where}.call_id")
            outputs = [item.output] if isinstance(item.output, str) else item.output
            out.append(Message("tool", [await image(p, f"{where}.output.{j}") if isinstance(p, InputImage)
                                        else TextPart(p if isinstance(p, str) else p.text)
                                        for j, p in enumerate(outputs)]))
    if not any(m.role == "user" for m in out):
        raise ApiError("the conversation needs a user message", "invalid_request", "input")
    if len(out) > s.max_turns:
        raise ApiError(f"the conversation has {len(out)} messages (previous_response_id's included); the limit is "
                       f"{s.max_turns}", "too_many_turns", "input")
    return out


class _Builder:
    """Engine events → Responses stream events, in one place. Output items open as their first
    piece arrives (a message with one output_text part, or a function call) and close when the next
    one opens or the answer ends; the Response keeps every item, so the last event carries it whole.
    A Thinking checkpoint's thought is a `reasoning` item before them, with one reasoning_text part
    streamed as response.reasoning_text.delta events."""

    def __init__(self, response: Response, splitter: ToolCallSplitter | None, logprobs_from=None):
        self.response = response
        self.splitter = splitter
        self.engine = logprobs_from  # None: no logprobs asked for
        self.seq = 0
        self.open: OutputMessage | FunctionCallOut | ReasoningOut | None = None
        self.held: list[Logprob] = []  # logprobs of tokens whose text is not out yet

    def _ev(self, cls, **fields) -> StreamEvent:
        ev = cls(sequence_number=self.seq, **fields)
        self.seq += 1
        return ev

    def _lifecycle(self, kind: str) -> ResponseLifecycle:
        return self._ev(ResponseLifecycle, type=kind, response=self.response.model_copy(deep=True))

    async def run(self, events: AsyncIterator, on_done: Callable[[Response], None]) -> AsyncIterator[StreamEvent]:
        yield self._lifecycle("response.created")
        yield self._lifecycle("response.in_progress")
        async for ev in events:
            if isinstance(ev, TokenEvent) and ev.reasoning:  # never part of the answer, nor seen by the splitter
                for out in self._thought(ev.text):
                    yield out
            elif isinstance(ev, TokenEvent):
                if self.engine is not None and ev.logprob is not None:
                    self.held.append(_logprob(self.engine, ev))
                text, pieces = self.splitter.feed(ev.text) if self.splitter else (ev.text, [])
                for out in self._pieces(text, pieces):
                    yield out
            elif isinstance(ev, Done):
                text, pieces = self.splitter.flush() if self.splitter else ("", [])
                for out in self._pieces(text, pieces):
                    yield out
                status, last = _END[ev.finish.finish_reason]
                for out in self._close("incomplete" if status == "incomplete" else "completed"):
                    yield out
                self._finish(ev, status)
                on_done(self.response)
                yield self._ev(ResponseLifecycle, type=last, response=self.response)

    def fail(self, err: ApiError) -> list[StreamEvent]:
        """After the stream has begun: the error, then the response as failed."""
        r = self.response
        r.status, r.error = "failed", ResponseError(code=err.code, message=err.message)
        return [self._ev(ErrorEvent, code=err.code, message=err.message, param=err.param),
                self._ev(ResponseLifecycle, type="response.failed", response=r)]

    def _pieces(self, text: str, pieces: list[CallPiece]) -> list[StreamEvent]:
        out = self._text(text) if text else []
        for p in pieces:
            self.held.clear()  # the tokens of a call have no text part to go with
            out += self._call(p)
        return out

    def _text(self, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if not isinstance(self.open, OutputMessage):
            out += self._close("completed")
            self.open = msg = OutputMessage(id=item_id("msg"))
            part = OutputTextPart(logprobs=[] if self.engine is not None else None)
            out.append(self._added(msg))
            msg.content.append(part)
            out.append(self._ev(ContentPartEvent, type="response.content_part.added", item_id=msg.id,
                                output_index=self._index(), content_index=0, part=part.model_copy()))
        part = self.open.content[0]
        part.text += text
        held, self.held = self.held, []
        if part.logprobs is not None:
            part.logprobs += held
        out.append(self._ev(TextDelta, item_id=self.open.id, output_index=self._index(), content_index=0,
                            delta=text, logprobs=[_delta_logprob(lp) for lp in held]))
        return out

    def _thought(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        out: list[StreamEvent] = []
        if not isinstance(self.open, ReasoningOut):
            out += self._close("completed")
            self.open = item = ReasoningOut(id=item_id("rs"))
            part = ReasoningTextPart()
            out.append(self._added(item))
            item.content.append(part)
            out.append(self._ev(ContentPartEvent, type="response.content_part.added", item_id=item.id,
                                output_index=self._index(), content_index=0, part=part.model_copy()))
        self.open.content[0].text += text
        out.append(self._ev(ReasoningDelta, item_id=self.open.id, output_index=self._index(), content_index=0,
                            delta=text))
        return out

    def _call(self, piece: CallPiece) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if piece.name is not None:
            out += self._close("completed")
            self.open = FunctionCallOut(id=item_id("fc"), call_id=item_id("call"), name=piece.name)
            out.append(self._added(self.open))
        call = self.open
        if not isinstance(call, FunctionCallOut) or not piece.arguments:
            return out
        call.arguments += piece.arguments
        out.append(self._ev(ArgumentsDelta, item_id=call.id, output_index=self._index(), delta=piece.arguments))
        return out

    def _added(self, item: OutputMessage | FunctionCallOut | ReasoningOut) -> StreamEvent:
        self.response.output.append(item)
        return self._ev(OutputItemEvent, type="response.output_item.added", output_index=self._index(),
                        item=item.model_copy(deep=True))

    def _close(self, status: str) -> list[StreamEvent]:
        item, self.open = self.open, None
        if item is None:
            return []
        i, out = self._index(item), []
        if isinstance(item, ReasoningOut):
            part = item.content[0]
            out.append(self._ev(ReasoningDone, item_id=item.id, output_index=i, content_index=0, text=part.text))
            out.append(self._ev(ContentPartEvent, type="response.content_part.done", item_id=item.id, output_index=i,
                                content_index=0, part=part))
        elif isinstance(item, OutputMessage):
            part = item.content[0]
            out.append(self._ev(TextDone, item_id=item.id, output_index=i, content_index=0, text=part.text,
                                logprobs=[_delta_logprob(lp) for lp in part.logprobs or []]))
            out.append(self._ev(ContentPartEvent, type="response.content_part.done", item_id=item.id, output_index=i,
                                content_index=0, part=part))
        else:
            out.append(self._ev(ArgumentsDone, item_id=item.id, output_index=i, name=item.name,
                                arguments=item.arguments))
        item.status = status
        out.append(self._ev(OutputItemEvent, type="response.output_item.done", output_index=i, item=item))
        return out

    def _index(self, item: OutputMessage | FunctionCallOut | ReasoningOut | None = None) -> int:
        target = item or self.open
        return next(i for i, it in enumerate(self.response.output) if it is target)

    def _finish(self, done: Done, status: str) -> None:
        r, u = self.response, done.usage
        r.status = status
        if status == "incomplete":
            r.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        if status == "completed":
            r.completed_at = now()
        r.usage = ResponseUsage(
            input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=u.reasoning_tokens),
            input_tokens_details=InputTokensDetails(cached_tokens=done.timings.prefix_reused_tokens,
                                                    image_tokens=u.image_tokens, video_tokens=u.video_tokens))
        r.timings = done.timings


async def _guarded(builder: _Builder, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """The stream's events; a failure after the status line is sent travels as its last events."""
    try:
        async for ev in events:
            yield ev
    except Exception as e:
        err = as_api_error(e)
        if err.status >= 500:
            log.error("stream failed", exc_info=e)
        for ev in builder.fail(err):
            yield ev


def _logprob(engine, ev: TokenEvent) -> Logprob:
    first, rivals = logprob_entries(engine, ev)
    return Logprob(**first, top_logprobs=[TopLogprob(**r) for r in rivals])


def _delta_logprob(lp: Logprob) -> DeltaLogprob:
    return DeltaLogprob(token=lp.token, logprob=lp.logprob,
                        top_logprobs=[{"token": t.token, "logprob": t.logprob} for t in lp.top_logprobs])

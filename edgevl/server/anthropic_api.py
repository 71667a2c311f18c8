"""Anthropic's Messages API: /v1/messages (JSON or Anthropic's named server-sent events) and
/v1/messages/count_tokens, over the same request path as /v1/chat/completions.

Engine events become Anthropic's stream events in one place (`_events`); the stream sends them,
and the JSON answer is those same events folded (`_fold`). Errors under /v1/messages come in
Anthropic's shape (`anthropic_protocol.error_shape`, registered below)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from pydantic_core import from_json

from edgevl.preprocess.image import ImageError
from edgevl.server import errors
from edgevl.server.anthropic_protocol import (
    STATUSES,
    AnthropicMessage,
    AnthropicUsage,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    DeltaUsage,
    ImageBlockParam,
    InputJsonDelta,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    Ping,
    SignatureDelta,
    StopDelta,
    StopReason,
    StreamEvent,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ThinkingBlock,
    ThinkingBlockParam,
    ThinkingDelta,
    TokenCount,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    error_shape,
    looks_like_url,
    message_id,
    tool_use_id,
)
from edgevl.server.constraints import constraint_for, prepare_tools
from edgevl.server.errors import ApiError
from edgevl.server.inputs import load_image
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.tools import CallPiece, ToolCallSplitter
from edgevl.server.wire import sse_events
from edgevl.types import GenerationRequest, ImagePart, Message, SamplingParams, TextPart, TokenEvent, ToolCall

router = APIRouter(prefix="/v1", tags=["anthropic"], route_class=SafeRoute)
errors.register_shape("/v1/messages", error_shape, STATUSES)


def _thinking(body: CountTokensRequest, state, max_tokens: int | None = None) -> int | None:
    """The reasoning budget `thinking` asks for. On a Thinking checkpoint `enabled` thinks for at most
    budget_tokens (below max_tokens, as Anthropic requires; its 1024 minimum is not enforced, a small
    model's thought is short), `adaptive` for the server's budget (None), and `disabled` or no
    `thinking` not at all (0: Anthropic's models think only when asked). A model that does not think
    would change nothing if asked to: refused."""
    t = body.thinking
    if not state.info.thinking:
        if t is not None and t.type != "disabled":
            raise ApiError(f"thinking {t.type!r} is not supported: this model does not think "
                           "(only {'type': 'disabled'} is accepted)", "invalid_parameter", "thinking")
        return None
    if t is None or t.type == "disabled":
        return 0
    if t.type == "adaptive":
        return None
    if t.type != "enabled":
        raise ApiError(f"thinking {t.type!r} is not supported (enabled, adaptive or disabled)",
                       "invalid_parameter", "thinking.type")
    if t.budget_tokens is None:
        raise ApiError("thinking.budget_tokens: required when thinking is enabled", "invalid_parameter",
                       "thinking.budget_tokens")
    if max_tokens is not None and t.budget_tokens >= max_tokens:
        raise ApiError("thinking.budget_tokens: must be less than max_tokens", "invalid_parameter",
                       "thinking.budget_tokens")
    top = state.settings.reasoning_budget
    if 0 <= top < t.budget_tokens:
        raise ApiError(f"thinking.budget_tokens: must be at most {top} (the server's reasoning_budget)",
                       "invalid_parameter", "thinking.budget_tokens")
    return t.budget_tokens


async def _conversation(body: CountTokensRequest, state) -> list[Message]:
    """Anthropic's turns → the engine's messages: a user turn's tool_result blocks become tool messages
    (the chat template shows them as tool responses), its other blocks a user message; an assistant
    turn's tool_use blocks become its tool calls. Consecutive turns of one role are one turn, as in
    Anthropic's API."""
    out: list[Message] = [Message("system", [TextPart(t) for t in body.system_texts()])] if body.system_texts() \
        else []
    n_images = 0

    async def image(b: ImageBlockParam, where: str) -> ImagePart:
        nonlocal n_images
        n_images += 1
        if n_images > state.settings.max_images:
            raise ApiError(f"more than {state.settings.max_images} images", "too_many_images", "messages")
        src = b.source
        if src.type == "base64" and looks_like_url(src.data):
            raise ApiError("a base64 source holds the image's bytes; send a URL as {'type': 'url'}",
                           "invalid_base64", f"{where}.source.data")
        value = src.data if src.type == "base64" else src.url
        if src.type == "url" and not looks_like_url(value):
            raise ApiError("a url source needs an http(s) URL", "invalid_image", f"{where}.source.url")
        try:
            return ImagePart((await load_image(value, state.settings, f"{where}.source"))[0])
        except ImageError as e:  # decoding knows no field names: say which block it was
            e.param = e.param or f"{where}.source"
            raise

    def add(msg: Message) -> None:
        last = out[-1] if out else None
        if last is not None and last.role == msg.role and msg.role in ("user", "assistant"):
            last.content += msg.content
            last.tool_calls += msg.tool_calls
            last.reasoning += msg.reasoning
        elif msg.content or msg.tool_calls or msg.role == "assistant":
            out.append(msg)

    for i, m in enumerate(body.messages):
        parts: list = []
        calls: list[ToolCall] = []
        thought = ""
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(b, TextBlockParam):
                parts.append(TextPart(b.text))
            elif isinstance(b, ImageBlockParam):
                parts.append(await image(b, where))
            elif isinstance(b, ToolUseBlockParam):
                calls.append(ToolCall(b.name, json.dumps(b.input, ensure_ascii=False)))
            elif isinstance(b, ToolResultBlockParam):
                add(Message("user", parts))  # text before a result stays before it
                parts = []
                result: list = [TextPart("Error: ")] if b.is_error else []
                if isinstance(b.content, str):
                    result.append(TextPart(b.content))
                for k, c in enumerate(b.content if isinstance(b.content, list) else []):
                    result.append(TextPart(c.text) if isinstance(c, TextBlockParam)
                                  else await image(c, f"{where}.content.{k}"))
                out.append(Message("tool", result))
            elif isinstance(b, ThinkingBlockParam):
                thought += b.thinking
            # redacted_thinking: encrypted by Anthropic, nothing this model could read
        add(Message(m.role, parts, calls, thought))
    return out


@router.post("/messages", response_model=AnthropicMessage, responses={400: {}, 413: {}, 429: {}, 529: {}})
async def messages(body: MessagesRequest, http: Request):
    """Anthropic's Messages API: text and images in, text and tool_use blocks out."""
    state = server_state(http)
    budget = _thinking(body, state, body.max_tokens)
    req = GenerationRequest(await _conversation(body, state), body.sampling(state.sampling_defaults))
    req.params.reasoning_budget = budget
    tooling = body.tooling()
    fmt = body.output_config.format if body.output_config else None
    if fmt is not None and tooling.forces_tool_call():
        raise ApiError("output_config.format cannot be combined with a forced tool call (tool_choice any or tool)",
                       "invalid_request", "output_config.format")
    splitter = await prepare_tools(state, req, tooling)  # a forced call brings its own constraint
    if fmt is not None:
        req.constraint = await constraint_for(state, fmt.schema_, req.params)
    run = await state.runner.start(req)  # a 400 for a prompt that can never run comes here, before the stream
    events = _events(state, state.runner.events("messages", run, http), splitter)
    if body.stream:
        return sse_events(events, error_shape, Ping())
    return await _fold(events)


@router.post("/messages/count_tokens", response_model=TokenCount, responses={400: {}, 413: {}})
async def count_tokens(body: CountTokensRequest, http: Request) -> TokenCount:
    """The prompt's tokens, images and tools included: what /v1/messages reports as usage.input_tokens."""
    state = server_state(http)
    _thinking(body, state)  # refused as /v1/messages would; the budget leaves the prompt as it is
    tooling = body.tooling()
    req = GenerationRequest(await _conversation(body, state), SamplingParams(), tools=tooling.tool_dicts())
    return TokenCount(input_tokens=await asyncio.to_thread(state.engine.count_prompt_tokens, req))


class _Blocks:
    """The content blocks of one answer as they open and close: each piece of text or of a call
    → the events that carry it. Text that is only whitespace is held until something follows it, so
    that the whitespace a model writes around a tool call opens no block of its own."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # the type of the block being written
        self.blank = ""  # whitespace held before a text block opens
        self.answered = False  # a text or tool_use block has opened (a thought is not an answer)

    def thought(self, text: str) -> list[StreamEvent]:
        """A piece of the thought: it comes before any text or call, in a thinking block of its own."""
        if not text:
            return []
        start = self._start(ThinkingBlock(thinking="")) if self.open != "thinking" else []
        return start + [ContentBlockDelta(index=self.index, delta=ThinkingDelta(thinking=text))]

    def text(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        out: list[StreamEvent] = []
        if self.open != "text":
            if not (self.blank + text).strip():
                self.blank += text
                return []
            text, self.blank = self.blank + text, ""
            out += self._start(TextBlock(text=""))
        return out + [ContentBlockDelta(index=self.index, delta=TextDelta(text=text))]

    def calls(self, pieces: list[CallPiece]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for p in pieces:
            if p.name is not None:  # a call's header: a tool_use block opens, its input comes as JSON text
                self.blank = ""
                out += self._start(ToolUseBlock(id=tool_use_id(), name=p.name, input={}))
            if p.arguments:
                out.append(ContentBlockDelta(index=self.index, delta=InputJsonDelta(partial_json=p.arguments)))
        return out

    def close(self) -> list[StreamEvent]:
        """At the end: an answer that was only whitespace is that text; the last block stops."""
        out: list[StreamEvent] = []
        if not self.answered and self.blank:
            out = self._start(TextBlock(text="")) + [ContentBlockDelta(index=self.index,
                                                                       delta=TextDelta(text=self.blank))]
        return out + self._stop()

    def _start(self, block: TextBlock | ToolUseBlock | ThinkingBlock) -> list[StreamEvent]:
        out = self._stop()
        self.index += 1
        self.open = block.type
        self.answered = self.answered or block.type != "thinking"
        return out + [ContentBlockStart(index=self.index, content_block=block)]

    def _stop(self) -> list[StreamEvent]:
        if self.open is None:
            return []
        # Anthropic ends a thought with its signature; this one is unsigned (an empty signature)
        signed = [ContentBlockDelta(index=self.index, delta=SignatureDelta())] if self.open == "thinking" else []
        self.open = None
        return signed + [ContentBlockStop(index=self.index)]


def _stop_reason(done: Done, called: bool) -> StopReason:
    reason = done.finish.finish_reason
    if reason in ("length", "timeout"):
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if done.finish.stop_sequence is not None else "end_turn"


async def _events(state, events: AsyncIterator, splitter: ToolCallSplitter | None) -> AsyncIterator[StreamEvent]:
    """Engine events → Anthropic's stream: message_start, a ping, each block's start, deltas and stop,
    then message_delta (stop reason and usage) and message_stop."""
    yield MessageStart(message=AnthropicMessage(id=message_id(), content=[], model=state.info.model_name,
                                                usage=AnthropicUsage(input_tokens=0, output_tokens=0)))
    yield Ping()
    blocks = _Blocks()
    async for ev in events:
        if isinstance(ev, TokenEvent) and ev.reasoning:  # never part of the answer, nor seen by the splitter
            for frame in blocks.thought(ev.text):
                yield frame
            continue
        if isinstance(ev, TokenEvent):
            text, pieces = splitter.feed(ev.text) if splitter else (ev.text, [])
        elif isinstance(ev, Done):
            text, pieces = splitter.flush() if splitter else ("", [])
        for frame in blocks.text(text) + blocks.calls(pieces):
            yield frame
        if isinstance(ev, Done):
            for frame in blocks.close():
                yield frame
            reason = _stop_reason(ev, bool(splitter and splitter.calls))
            yield MessageDelta(delta=StopDelta(stop_reason=reason, stop_sequence=ev.finish.stop_sequence
                                               if reason == "stop_sequence" else None),
                               usage=DeltaUsage(input_tokens=ev.usage.prompt_tokens,
                                                output_tokens=ev.usage.completion_tokens), timings=ev.timings)
            yield MessageStop()


async def _fold(events: AsyncIterator[StreamEvent]) -> AnthropicMessage:
    """The whole answer, from the events the stream would have sent (a tool_use block's input is its
    JSON text parsed; cut short by max_tokens, its whole values, as the SDK reads a streamed one)."""
    message: AnthropicMessage | None = None
    inputs: dict[int, str] = {}
    async for ev in events:
        if isinstance(ev, MessageStart):
            message = ev.message
        elif isinstance(ev, ContentBlockStart):
            message.content.append(ev.content_block.model_copy())
        elif isinstance(ev, ContentBlockDelta):
            if isinstance(ev.delta, TextDelta):
                message.content[ev.index].text += ev.delta.text
            elif isinstance(ev.delta, ThinkingDelta):
                message.content[ev.index].thinking += ev.delta.thinking
            elif isinstance(ev.delta, InputJsonDelta):
                inputs[ev.index] = inputs.get(ev.index, "") + ev.delta.partial_json
        elif isinstance(ev, MessageDelta):
            message.stop_reason, message.stop_sequence = ev.delta.stop_reason, ev.delta.stop_sequence
            message.usage = AnthropicUsage(input_tokens=ev.usage.input_tokens, output_tokens=ev.usage.output_tokens)
            message.timings = ev.timings
    for index, text in inputs.items():
        try:
            value = from_json(text, allow_partial=True)
        except ValueError:
            value = {}
        message.content[index].input = value if isinstance(value, dict) else {}
    return message

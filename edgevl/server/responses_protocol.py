"""OpenAI's Responses API (/v1/responses): the request, the Response object and its stream events.

Every request field is served, accepted because it only describes the request (and is echoed), or
refused with a 400 that names it; unknown fields are refused too. Input items that a client gives
back from an earlier Response may carry the descriptive fields OpenAI puts on them (ids, status,
annotations), which are accepted and not used.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from edgevl.server.protocol import LOW_DETAIL_PIXELS, Sampling, Timings, _limit, check_max_turns


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- input -------------------------------------------------------------------------------------
class InputText(_Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = Field(None, description="accepted; prefix caching is automatic")


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="data URL, raw base64, or http(s) with --allow-remote-images")
    file_id: str | None = Field(None, description="refused: this server stores no files")
    detail: Literal["low", "high", "auto", "original"] | None = Field(
        None, description=f"low: at most {LOW_DETAIL_PIXELS} pixels; otherwise the server's budget")
    prompt_cache_breakpoint: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _source(self) -> InputImage:
        if self.file_id is not None:
            raise ValueError("file_id: this server stores no files; send image_url (a data URL, base64 or http(s))")
        if not self.image_url:
            raise ValueError("an input_image part needs image_url")
        return self

    def max_pixels(self) -> int | None:
        return LOW_DETAIL_PIXELS if self.detail == "low" else None


class OutputText(_Strict):
    """An assistant's text given back from an earlier Response."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _parts(self) -> MessageItem:
        for part in self.content if isinstance(self.content, list) else []:
            if isinstance(part, InputImage) and self.role != "user":
                raise ValueError("images are only accepted in user messages (and function_call_output)")
            if isinstance(part, OutputText | Refusal) and self.role != "assistant":
                raise ValueError(f"{part.type} parts belong to assistant messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, InputText | OutputText) else p.refusal if isinstance(p, Refusal)
                       else "" for p in self.content)


class FunctionCallItem(_Strict):
    """A call the model made in an earlier turn, given back."""

    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1)
    name: str
    arguments: str = Field(..., description="the arguments object as JSON text")
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1)
    output: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_type(v: Any) -> str:
    return (v.get("type") or "message") if isinstance(v, dict) else getattr(v, "type", "message")


class ReasoningTextParam(_Strict):
    type: Literal["reasoning_text"]
    text: str


class SummaryTextParam(_Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(_Strict):
    """A thought an earlier answer gave, given back: the next assistant turn's reasoning for the chat template
    (a Thinking checkpoint's shows it only in turns after the last user message). Summaries and encrypted
    content (none is made here) are accepted and not shown."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryTextParam] = Field(default_factory=list)
    content: list[ReasoningTextParam] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type, custom_error_type="invalid_item",
                  custom_error_message="an input item's type must be message, function_call, function_call_output "
                                       "or reasoning (other items, and item_reference, are not supported)")]


# ---- tools, formats ---------------------------------------------------------------------------
class FunctionTool(_Strict):
    """Responses' flat function tool (no nested `function` object)."""

    type: Literal["function"] = "function"
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object")
    strict: bool | None = Field(None, description="arguments always follow the schema when decoding is constrained")

    def chat_dict(self) -> dict:
        """The chat shape the template and the tool grammar read."""
        fn = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": fn}


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = Field(None, description="the answer always follows the schema here")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs name and schema")
        if self.type != "json_schema" and (self.name or self.schema_ is not None):
            raise ValueError(f"name and schema belong to a json_schema format, not {self.type}")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="refused: no verbosity setting")

    @field_validator("verbosity")
    @classmethod
    def _verbosity(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("this model has no verbosity setting")
        return v


class ReasoningConfig(_Strict):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None

    @model_validator(mode="after")
    def _effort(self) -> ReasoningConfig:
        # a Thinking checkpoint has one kind of thought, bounded by tokens (reasoning_budget), not levels; "none"
        # turns it off (`responses_api`); no summaries are written
        if self.effort not in (None, "none") or self.summary or self.generate_summary:
            raise ValueError("reasoning effort levels and summaries are not supported (effort 'none' turns a "
                             "Thinking checkpoint's thought off; reasoning_budget bounds it)")
        return self


class StreamOptions(_Strict):
    include_obfuscation: bool | None = Field(None, description="accepted; deltas are not padded")


# fields whose effect this server cannot give, and why (anything unknown is refused as well)
REFUSED = {
    "background": "background responses are not supported: stream, or wait for the answer",
    "conversation": "conversations are not stored; use previous_response_id",
    "prompt": "stored prompt templates are not supported",
    "context_management": "context compaction is not supported",
}
# what `include` may name: logprobs are served; a thought is never encrypted (encrypted_content stays null);
# a stored response's input keeps its image URLs as sent, so asking for them changes nothing
INCLUDABLE = {"message.output_text.logprobs", "reasoning.encrypted_content", "message.input_image.image_url"}
BUILTIN_TOOL = "only function tools are supported (no built-in tools such as web_search or file_search)"


class ResponsesRequest(Sampling):
    """POST /v1/responses. Extensions shared with the other endpoints: top_k, repetition_penalty, seed,
    stop, max_pixels, ignore_eos, reasoning_budget."""

    model_config = ConfigDict(extra="forbid")

    # fields in the OpenAI reference's order
    background: bool | None = Field(None, description="false only")
    conversation: Any = Field(None, description="refused: " + REFUSED["conversation"])
    context_management: Any = Field(None, description="refused: " + REFUSED["context_management"])
    include: list[str] | None = Field(None, description=f"any of {sorted(INCLUDABLE)}")
    input: str | list[InputItem] = Field(..., description="a user message, or items")
    instructions: str | None = Field(None, description="a system message, not carried over by previous_response_id")
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=1, description="accepted; there are no built-in tools to call")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="kept with the stored response")
    model: str | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(None, description="continue a stored response's conversation")
    prompt: Any = Field(None, description="refused: " + REFUSED["prompt"])
    prompt_cache_key: str | None = Field(None, max_length=256, description="accepted; prefix caching is automatic")
    prompt_cache_retention: str | None = Field(None, description="accepted; the KV cache keeps what fits")
    reasoning: ReasoningConfig | None = None
    safety_identifier: str | None = Field(None, max_length=256, description="accepted; nothing is monitored")
    service_tier: Literal["auto", "default"] | None = Field(None, description="there is one tier")
    store: bool | None = Field(True, description="keep the response for GET and previous_response_id (null: true)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=64)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["disabled"] | None = Field(None, description="disabled only: a prompt too long is a 400")
    user: str | None = Field(None, max_length=256, description="accepted; nothing is monitored")

    @model_validator(mode="wrap")
    @classmethod
    def _plain_locations(cls, data: Any, handler: Any) -> ResponsesRequest:
        try:
            return handler(data)
        except ValidationError as e:
            raise _plain(e) from None

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v is not False and v != {}:
            raise ValueError(REFUSED[info.field_name])
        return v

    @field_validator("max_tokens")
    @classmethod
    def _not_max_tokens(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("not a Responses field: use max_output_tokens")
        return v

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in INCLUDABLE:
                raise ValueError(f"{name!r} cannot be included here (only {', '.join(sorted(INCLUDABLE))})")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        for i, t in enumerate(v if isinstance(v, list) else []):
            if isinstance(t, dict) and t.get("type", "function") != "function":
                raise ValueError(f"item {i} is a {t.get('type')!r} tool: {BUILTIN_TOOL}")
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") != "function":
            raise ValueError(f"tool_choice {v.get('type')!r} is not supported: none, auto, required or "
                             '{"type": "function", "name": ...}')
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list, info: ValidationInfo) -> str | list:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one item")
        if isinstance(v, list):
            check_max_turns(v, info, "items per request")
        return v

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo) -> ResponsesRequest:
        if self.max_output_tokens is not None:
            top = _limit(info, "max_tokens", 4096)
            if self.max_output_tokens > top:
                raise ValueError(f"max_output_tokens must be at most {top} (the server's max_tokens)")
            self.max_tokens = self.max_output_tokens
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools")
        if self.top_logprobs and not self.wants_logprobs():
            raise ValueError('top_logprobs needs include: ["message.output_text.logprobs"]')
        return self

    # the interface constraints.prepare_tools reads (shared with the chat request)
    def tool_mode(self) -> str:
        """none | auto | required | the name of the one function to call."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return self.tool_choice.name
        return self.tool_choice or "auto"

    def forces_tool_call(self) -> bool:
        return self.tool_mode() not in ("none", "auto")

    def tool_dicts(self) -> list[dict] | None:
        return [t.chat_dict() for t in self.tools] if self.tools else None

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def format(self) -> TextFormat:
        return (self.text.format if self.text else None) or TextFormat(type="text")


_TAGS = {"str", "message", "function_call", "function_call_output", "input_text", "input_image", "output_text",
         "refusal"}


def _plain(e: ValidationError) -> ValidationError:
    """Errors located as a client reads its request (`input.0.content.1`), not by pydantic's union branches
    (`input.list[tagged-union[...]].0.message...`); a value that is a list is not also told it is no string."""
    errors = e.errors()
    chose_list = [x for x in errors if not any(seg == "str" for seg in x["loc"])]
    details: list[InitErrorDetails] = []
    for x in chose_list or errors:
        loc = tuple(seg for seg in x["loc"] if not (isinstance(seg, str) and (seg in _TAGS or "[" in seg)))
        msg = x["msg"].removeprefix("Value error, ")
        details.append({"type": PydanticCustomError(x["type"], msg), "loc": loc, "input": x.get("input")})
    return ValidationError.from_exception_data(e.title, details)


# ---- output ------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Logprob] | None = None


Status = Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputTextPart] = Field(default_factory=list)


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


class ReasoningTextPart(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class ReasoningOut(BaseModel):
    """A Thinking checkpoint's thought, before the message: its text whole, no summary, nothing encrypted."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningTextPart] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: ItemStatus = "in_progress"


OutputItem = Annotated[OutputMessage | FunctionCallOut | ReasoningOut, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens read from the KV prefix cache")
    image_tokens: int = Field(0, description="edgevl extension: the images' share of the input")
    video_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    service_tier: str = "default"
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None = None
    timings: Timings | None = Field(None, description="edgevl extension")


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True


# ---- stream events -----------------------------------------------------------------------------
class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycle(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: Response


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: Annotated[OutputTextPart | ReasoningTextPart, Field(discriminator="type")]


class DeltaLogprob(BaseModel):
    token: str
    logprob: float
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class TextDelta(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[DeltaLogprob] = Field(default_factory=list)


class TextDone(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[DeltaLogprob] = Field(default_factory=list)


class ReasoningDelta(_Event):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDone(_Event):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDelta(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


StreamEvent = (ResponseLifecycle | OutputItemEvent | ContentPartEvent | TextDelta | TextDone | ReasoningDelta
               | ReasoningDone | ArgumentsDelta | ArgumentsDone | ErrorEvent)


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

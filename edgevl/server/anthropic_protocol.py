"""Anthropic's Messages API, typed: the request (/v1/messages and /v1/messages/count_tokens), the
answer, and the stream's events. Every request field is served, accepted because it only describes
the request, or refused with a 400 that names it; the conversion into the OpenAI-shaped `Tooling`
that the tool machinery takes lives here too, so the router stays thin."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgevl.server.protocol import (
    FunctionSpec,
    Timings,
    Tooling,
    ToolSpec,
    _limit,
    check_max_turns,
)
from edgevl.types import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(_Strict):
    """Accepted wherever Anthropic allows it: the KV prefix cache is automatic here."""

    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] | None = None


# ---- request content blocks --------------------------------------------------------------------
class TextBlockParam(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = Field(None, description="accepted: describes an earlier answer")


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(..., description="the image bytes, base64")


class URLSource(_Strict):
    type: Literal["url"]
    url: str = Field(..., description="http(s); fetched only under --allow-remote-images")


class ImageBlockParam(_Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None


class ToolUseBlockParam(_Strict):
    """A call the assistant made earlier (assistant turns)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: dict[str, Any] | None = Field(None, description="accepted: describes who made the call")
    toolset_name: str | None = Field(None, description="accepted: describes the call")


ResultContent = Annotated[TextBlockParam | ImageBlockParam, Field(discriminator="type")]


class ToolResultBlockParam(_Strict):
    """What a call returned (user turns): text, or text and image blocks."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultContent] = ""
    is_error: bool | None = Field(None, description="true: the result is shown to the model as an error")
    cache_control: CacheControl | None = None


class ThinkingBlockParam(_Strict):
    """An earlier answer's reasoning, echoed back by clients: the turn's reasoning for the chat template
    (a Thinking checkpoint's shows it only in turns after the last user question, i.e. in a tool loop,
    as Anthropic keeps thinking only there). The signature is not checked: none is made here."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockParam(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlockParam | ImageBlockParam | ToolUseBlockParam | ToolResultBlockParam | ThinkingBlockParam
                  | RedactedThinkingBlockParam, Field(discriminator="type")]


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: list[Block] = Field(..., min_length=1, description="a string, or content blocks")

    @field_validator("content", mode="before")
    @classmethod
    def _string(cls, v: Any) -> Any:
        return [{"type": "text", "text": v}] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _blocks(self) -> MessageParam:
        allowed = {"user": ("text", "image", "tool_result"),
                   "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}[self.role]
        for j, b in enumerate(self.content):
            if b.type not in allowed:
                raise ValueError(f"content.{j}: a {self.role} message cannot hold a {b.type!r} block")
        return self


# ---- tools ------------------------------------------------------------------------------------
class ToolParam(_Strict):
    """A client tool. Anthropic's server tools (web search, bash, code execution, ...) are refused."""

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    input_schema: dict[str, Any] = Field(..., description="JSON schema of the input object")
    type: Literal["custom"] | None = None
    strict: bool | None = Field(None, description="the input always follows the schema when the call is forced "
                                "(tool_choice any or tool)")
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _server_tool(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") not in (None, "custom"):
            raise ValueError(f"server tool {v['type']!r} is not supported: only client tools "
                             "(name, description, input_schema)")
        return v

    @field_validator("input_schema")
    @classmethod
    def _object(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") != "object":
            raise ValueError("must be a JSON schema with type 'object'")
        return v


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingConfig(BaseModel):
    """Extended thinking: which types are served, and how budget_tokens bounds a thought, is decided in
    `anthropic_api._thinking` (it knows whether the checkpoint thinks and the server's budget)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0, description="enabled: thought tokens at most, then the "
                                      "thought is closed and the answer follows")


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(..., alias="schema", description="the answer is constrained to this schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None
    effort: Any = Field(None, description="refused: this model has no effort setting")

    @field_validator("effort")
    @classmethod
    def _effort(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("this model has no effort setting")
        return v


class Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256, description="accepted; nothing is stored")


# fields of Anthropic's request this server cannot serve, and why
REFUSED = {
    "container": "code-execution containers are not supported",
    "context_management": "context management is not supported",
    "mcp_servers": "MCP servers are not supported; call your tools as client tools",
    "diagnostics": "diagnostics are not supported",
}


class CountTokensRequest(_Strict):
    """What decides the prompt: the fields /v1/messages/count_tokens takes."""

    model: str = Field(..., min_length=1, description="any name: the loaded model answers")
    messages: list[MessageParam] = Field(..., min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = Field(None, max_length=64)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None
    speed: Literal["standard", "fast"] | None = Field(None, description="accepted; there is one speed")
    mcp_servers: Any = Field(None, description="refused: " + REFUSED["mcp_servers"])
    context_management: Any = Field(None, description="refused: " + REFUSED["context_management"])
    _tooling: Tooling = PrivateAttr()

    @field_validator("mcp_servers", "context_management")
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v != [] and v != {}:
            raise ValueError(REFUSED[info.field_name])
        return v

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[MessageParam], info: ValidationInfo) -> list[MessageParam]:
        check_max_turns(v, info)
        if v[-1].role != "user":
            raise ValueError("the last message must be a user message: prefill (continuing an assistant "
                             "message) is not supported")
        return v

    @model_validator(mode="after")
    def _tools(self) -> CountTokensRequest:
        try:
            self._tooling = Tooling(tools=[ToolSpec(function=FunctionSpec(
                name=t.name, description=t.description, parameters=t.input_schema, strict=t.strict))
                for t in self.tools or []] or None, tool_choice=_choice(self.tool_choice),
                parallel_tool_calls=False if getattr(self.tool_choice, "disable_parallel_tool_use", None) else None)
        except ValidationError as e:  # its checks (unique names, a chosen tool that exists) are this request's
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def tooling(self) -> Tooling:
        """The tools in the shape `constraints.prepare_tools` takes (validated with the request)."""
        return self._tooling

    def system_texts(self) -> list[str]:
        if isinstance(self.system, str):
            return [self.system] if self.system else []
        return [b.text for b in self.system or []]


def _choice(c: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone | None) -> Any:
    if c is None:
        return None
    if isinstance(c, ToolChoiceTool):  # as JSON: Tooling validates each JSON shape as its own branch
        return {"type": "function", "function": {"name": c.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[c.type]


class MessagesRequest(CountTokensRequest):
    """Anthropic's POST /v1/messages body."""

    max_tokens: int = Field(..., ge=1, description="required, as in Anthropic's API (server limit applies)")
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = Field(None, description="accepted; there is one tier")
    inference_geo: str | None = Field(None, max_length=64, description="accepted; the answer is computed here")
    stop_sequences: list[str] | None = Field(None, max_length=32)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="0 is greedy; default: the model's")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    container: Any = Field(None, description="refused: " + REFUSED["container"])
    diagnostics: Any = Field(None, description="refused: " + REFUSED["diagnostics"])

    @field_validator("container", "diagnostics")
    @classmethod
    def _refused_here(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v != {}:
            raise ValueError(REFUSED[info.field_name])
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int, info: ValidationInfo) -> int:
        top = _limit(info, "max_tokens", 4096)
        if v > top:
            raise ValueError(f"must be at most {top} (the server's max_tokens)")
        return v

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v and any(not s for s in v):
            raise ValueError("a stop sequence must not be empty")
        return v

    def sampling(self, defaults: dict) -> SamplingParams:
        d = dict(defaults)
        for k in ("temperature", "top_p", "top_k"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return SamplingParams(max_new_tokens=self.max_tokens, stop=list(self.stop_sequences or []), **d)


# ---- the answer, and the stream's events ---------------------------------------------------------
class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(BaseModel):
    """A Thinking checkpoint's thought. Nothing here is signed: `signature` is always empty, and a
    thinking block given back is taken as it is."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(BaseModel):
    input_tokens: int = Field(..., description="every prompt token (the prefix cache is automatic and not "
                              "reported as cache reads)")
    output_tokens: int
    service_tier: Literal["standard"] = "standard"


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage
    timings: Timings | None = Field(None, description="edgevl extension")


class TokenCount(BaseModel):
    input_tokens: int


class MessageStart(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: AnthropicMessage


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(BaseModel):
    """Ends a thinking block, as in Anthropic's stream (empty: see ThinkingBlock)."""

    type: Literal["signature_delta"] = "signature_delta"
    signature: str = ""


BlockDelta = Annotated[TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta, Field(discriminator="type")]


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: BlockDelta


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class DeltaUsage(BaseModel):
    """Totals at the end; input_tokens here too, as the prompt is counted only once it is read."""

    input_tokens: int
    output_tokens: int


class MessageDelta(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: DeltaUsage
    timings: Timings | None = Field(None, description="edgevl extension")


class MessageStop(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


StreamEvent = MessageStart | ContentBlockStart | ContentBlockDelta | ContentBlockStop | MessageDelta | MessageStop \
    | Ping

# Anthropic's error type for each status ("invalid_request_error" for any other 4xx)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
STATUSES = {503: 529}  # loading, draining or too hot: Anthropic's "overloaded", which its clients retry


def error_shape(message: str, type_: str, code: str, param: str | None, status: int) -> dict:
    """{"type": "error", "error": {"type", "message"}}; the message names the field (this shape has no param)."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def looks_like_url(value: str) -> bool:
    return bool(_SCHEME.match(value))

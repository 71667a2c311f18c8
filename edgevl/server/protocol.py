"""Typed requests and responses: the edge API (/api/predict, /api/ocr, /api/detect) and the
OpenAI-compatible API (/v1/*); Ollama's are in ollama_protocol.py.

Validation lives on the models (limits come from Settings through the validation context), and
so does the conversion into engine requests, so routers stay thin.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sized
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from edgevl.types import SamplingParams

LOW_DETAIL_PIXELS = 512 * 512  # image_url.detail "low": at most 256 image tokens, like OpenAI's 512 px

# The server's limits, set per request by the app (an ASGI middleware), read by the validators below.
LIMITS: ContextVar[dict | None] = ContextVar("edgevl_limits", default=None)


def _limit(info: ValidationInfo, name: str, default: int) -> int:
    ctx = info.context or LIMITS.get() or {}
    return int(ctx.get(name, default))


def check_max_turns(turns: Sized, info: ValidationInfo, what: str = "messages per conversation") -> None:
    """The server's max_turns, the same for every API's conversation (a Responses request's items)."""
    top = _limit(info, "max_turns", 64)
    if len(turns) > top:
        raise ValueError(f"at most {top} {what}")


def _by_shape(v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo,
              shapes: dict[type, TypeAdapter], expected: str) -> Any:
    """A union field validated as the one branch the value's JSON type selects: pydantic reports a
    failed union once per branch (`messages.0.content.str`), so an error would name the wrong
    branch instead of the value's own place (`messages.0.content.0.foo`)."""
    if v is None:
        return handler(v)
    for kind, adapter in shapes.items():
        if isinstance(v, kind):
            return adapter.validate_python(v, context=info.context)
    raise ValueError(f"must be {expected}")


class Sampling(BaseModel):
    """Fields shared by every generating endpoint."""

    max_tokens: int | None = Field(None, ge=1, description="answer tokens at most (server limit applies)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default: the model's")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | None = Field(None, max_length=8)
    max_pixels: int | None = Field(None, ge=1024, description="pixel budget per image for this request")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-answer token (fixed-length "
                             "answers for benchmarks; vLLM and llama.cpp accept the same field)")
    reasoning_budget: int | None = Field(
        None, ge=0, validation_alias=AliasChoices("reasoning_budget", "thinking_token_budget"),
        description="thinking models: thought tokens at most, then the thought is closed and the answer follows "
                    "(0: no thinking; vLLM's thinking_token_budget is the same field)")

    @field_validator("reasoning_budget")
    @classmethod
    def _reasoning_budget(cls, v: int | None, info: ValidationInfo) -> int | None:
        top = _limit(info, "reasoning_budget", -1)
        if v is not None and 0 <= top < v:
            raise ValueError(f"must be at most {top} (the server's reasoning_budget)")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        top = _limit(info, "max_tokens", 4096)
        if v is not None and v > top:
            raise ValueError(f"must be at most {top} (the server's max_tokens)")
        return v

    def sampling_params(self, defaults: dict, default_max_tokens: int, stop: list[str] | None = None
                        ) -> SamplingParams:
        d = dict(defaults)
        for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return SamplingParams(max_new_tokens=self.max_tokens or default_max_tokens, seed=self.seed,
                              ignore_eos=self.ignore_eos, reasoning_budget=self.reasoning_budget,
                              stop=list(stop if stop is not None else self.stop or []), **d)


# ---- tools (OpenAI's shape, on both APIs) ----------------------------------------------------
class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object")
    strict: bool | None = Field(None, description="arguments always follow the schema when decoding is constrained")


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
_TOOL_CHOICE = {str: TypeAdapter(Literal["none", "auto", "required"]), dict: TypeAdapter(NamedToolChoice)}


class Tooling(BaseModel):
    """`tools`, `tool_choice`, `parallel_tool_calls`, checked together."""

    tools: list[ToolSpec] | None = Field(None, max_length=64)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return _by_shape(v, handler, info, _TOOL_CHOICE, "'none', 'auto', 'required' or a named function")

    @model_validator(mode="after")
    def _tools(self) -> Tooling:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
        return self

    def tool_mode(self) -> str:
        """none | auto | required | the name of the one function to call."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def forces_tool_call(self) -> bool:
        return self.tool_mode() not in ("none", "auto")

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


# ---- edge API ------------------------------------------------------------------------------
class PredictRequest(Sampling, Tooling):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    image: str | None = Field(None, description="base64 or data URL (PNG, JPEG, WebP, GIF, BMP)")
    images: list[str] | None = Field(None, description="several images, in order")
    video: str | None = Field(None, description="a clip, base64 or data URL (MP4, WebM, MOV, animated GIF/WebP)")
    fps: float | None = Field(None, gt=0, le=30, description="frames read per second of video (default: the model's)")
    max_frames: int | None = Field(None, ge=2, description="frames read from the video at most (server limit applies)")
    prompt: str = Field(..., description="the question")
    system: str | None = Field(None, description="optional system prompt")
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="JSON schema the answer must follow (constrained decoding)")
    stream: bool = Field(False, description="newline-delimited JSON, one object per piece")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if len(v) > _limit(info, "max_prompt_chars", 100_000):
            raise ValueError("is longer than the server accepts")
        return v

    def all_images(self) -> list[str]:
        return ([self.image] if self.image else []) + list(self.images or [])


OCR_INSTRUCTION = ("Extract all the text in this image, keeping its reading order and line breaks. "
                   "Output only the text.")


class DetectRequest(Sampling):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 or data URL")
    query: str = Field(..., min_length=1, max_length=200, description="what to find, e.g. 'every fire hydrant'")
    stream: bool = False


class OcrRequest(Sampling):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="base64 or data URL")
    language: str | None = Field(None, max_length=64, description="hint, e.g. 'German'")
    stream: bool = False

    def instruction(self) -> str:
        return OCR_INSTRUCTION + (f" The text is in {self.language}." if self.language else "")


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str = Field(..., description="the arguments object as JSON text")


class ToolCallOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0
    reasoning_tokens: int = 0


class Timings(BaseModel):
    ttft_ms: float
    total_ms: float
    tokens_per_s: float
    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    queue_ms: float = 0.0
    vision_cache_hits: int = 0
    prefix_reused_tokens: int = 0
    energy_j: float | None = None  # apportioned CPU package energy; null where no counter can be read
    forced_tokens: int = 0  # answer tokens checked in a jump-forward draft (still the model's own choices)


class PredictResponse(BaseModel):
    answer: str
    reasoning: str | None = Field(None, description="a thinking model's thought, when it thought",
                                  exclude_if=lambda v: v is None)
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings
    tool_calls: list[ToolCallOut] | None = None


class Box(BaseModel):
    label: str
    box: list[float] = Field(..., description="[x1, y1, x2, y2] in pixels of the image as sent")
    box_upright: list[float] = Field(..., description="the same in the EXIF-rotated picture a browser shows")
    relative: list[float] = Field(..., description="the model's own 0-1000 coordinates")


class ImageInfo(BaseModel):
    width: int
    height: int
    exif_orientation: int


class DetectResponse(BaseModel):
    boxes: list[Box]
    dropped: int = Field(..., description="objects the model wrote that did not make a valid box")
    image: ImageInfo
    text: str
    reasoning: str | None = Field(None, description="a thinking model's thought, when it thought",
                                  exclude_if=lambda v: v is None)
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings


class TokenLine(BaseModel):
    """One NDJSON line of a streamed edge answer."""

    token: str
    done: Literal[False] = False


class ReasoningLine(BaseModel):
    """One NDJSON line of a thinking model's thought, streamed before its answer."""

    reasoning: str
    done: Literal[False] = False


class DoneLine(BaseModel):
    """The last NDJSON line; the endpoint's own fields ride along (extra)."""

    model_config = ConfigDict(extra="allow")

    token: str = ""
    done: Literal[True] = True
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings


class OcrResponse(BaseModel):
    text: str
    reasoning: str | None = Field(None, description="a thinking model's thought, when it thought",
                                  exclude_if=lambda v: v is None)
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings


# ---- OpenAI API: requests ----------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., description="data URL, raw base64, or http(s) with --allow-remote-images")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description=f"low: at most {LOW_DETAIL_PIXELS} pixels; high/auto: the server's budget")

    def max_pixels(self) -> int | None:
        return LOW_DETAIL_PIXELS if self.detail == "low" else None


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    fps: float | None = Field(None, gt=0, le=30, description="frames read per second (default: the model's)")
    max_frames: int | None = Field(None, ge=2, description="frames read at most (server limit applies)")


_STR = TypeAdapter(str)
_URLS = {"image_url": {str: _STR, dict: TypeAdapter(ImageURL)}, "video_url": {str: _STR, dict: TypeAdapter(VideoURL)}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url", "input_text", "video_url", "video"]
    text: str | None = None
    image_url: ImageURL | str | None = None
    video_url: VideoURL | str | None = None
    video: list[str] | None = Field(None, description="frames the client sampled, as image data URLs")
    fps: float | None = Field(None, gt=0, le=240, description="for 'video' frame lists: frames per second")
    cache_control: dict[str, Any] | None = Field(
        None, description="accepted, no effect: a prompt-caching hint (Anthropic's, sent on by litellm); "
        "the KV cache of a conversation's earlier turns is reused automatically")

    @field_validator("image_url", "video_url", mode="wrap")
    @classmethod
    def _url(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return _by_shape(v, handler, info, _URLS[info.field_name], "an object with 'url', or a URL string")

    @model_validator(mode="after")
    def _fields(self) -> ContentPart:
        if self.type in ("text", "input_text") and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        if self.type == "video_url" and self.video_url is None:
            raise ValueError("a video_url part needs 'video_url'")
        if self.type == "video" and not self.video:
            raise ValueError("a video part needs 'video': a list of frames")
        return self

    def image(self) -> ImageURL:
        return ImageURL(url=self.image_url) if isinstance(self.image_url, str) else self.image_url


_PARTS = TypeAdapter(list[ContentPart])
_STOP = {str: _STR, list: TypeAdapter(list[str])}


class FunctionCallIn(FunctionCall):
    """A call in the history as a client sends it back: the openai SDK's `parse()` adds its own
    reading of the arguments, which describes them and is dropped."""

    parsed_arguments: Any = Field(None, description="accepted, no effect: the client's parse of `arguments`")


class ToolCallIn(ToolCallOut):
    """A call in an assistant message of the history: our own reply's call, echoed back."""

    index: int | None = Field(None, description="accepted, no effect: the position a streamed delta gave it")
    function: FunctionCallIn


class ChatMessage(BaseModel):
    """One message. Fields that only describe a message and that clients echo back with our own replies
    (`name`, `refusal`, `annotations`, `audio: null`, `function_call: null`, `tool_calls[].index`) are
    accepted and dropped before the chat template, which shows none of them."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256, description="accepted, no effect: the chat template shows "
                             "no participant names")
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant turns: the calls it made")
    tool_call_id: str | None = Field(None, description="tool turns: the call this answers")
    reasoning_content: str | None = Field(None, description="assistant turns: the thought, as answered (a "
                                          "Thinking template shows it again within a tool loop)")
    refusal: str | None = Field(None, description="assistant turns: a refusal in place of content, read as its "
                                "text when there is no content")
    annotations: list[Any] | None = Field(None, description="accepted, no effect: citations of a reply")
    audio: Any = Field(None, description="null only: this server makes no audio replies to refer to")
    function_call: Any = Field(None, description="null only: the deprecated form of tool_calls")
    parsed: Any = Field(None, description="accepted, no effect: the openai SDK's parse of a reply's content")

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return _by_shape(v, handler, info, {str: _STR, list: _PARTS}, "a string or a list of content parts")

    @field_validator("audio", "function_call")
    @classmethod
    def _null_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            raise ValueError("audio replies are not supported (text only); send null" if info.field_name == "audio"
                             else "the deprecated function_call is not supported; use tool_calls")
        return v

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.reasoning_content and self.role != "assistant":
            raise ValueError("only assistant messages carry reasoning_content")
        if self.refusal is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry a refusal")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and self.refusal is not None:
            self.content = self.refusal
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None  # null: unset, as clients that send every optional key write it


# OpenAI request fields this server does not serve, and why; anything else unknown is refused too
REFUSED = {
    "audio": "audio output is not supported (text only)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated 'functions' is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
    "logit_bias": "logit_bias is not supported",
    "metadata": "metadata is only kept with stored completions, and this server stores none",
    "reasoning_effort": "this model has no reasoning-effort setting",
    "verbosity": "this model has no verbosity setting",
}


class ChatCompletionRequest(Sampling, Tooling):
    """OpenAI's chat request: every field is served or refused with a 400 that names it."""

    model_config = ConfigDict(extra="forbid")

    # fields in the OpenAI spec's order
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = Field(None, description="each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many likeliest alternatives")
    max_completion_tokens: int | None = Field(None, ge=1)
    modalities: list[Literal["text"]] | None = Field(None, description="only text")
    n: int | None = Field(None, ge=1, description="only 1")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    service_tier: Literal["auto", "default"] | None = Field(None, description="there is one tier")
    stop: str | list[str] | None = None  # type: ignore[assignment]  # OpenAI allows one string
    store: Literal[False] | None = Field(None, description="nothing is stored; true is refused")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted; nothing is stored or monitored")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted; nothing is monitored")
    prompt_cache_key: str | None = Field(None, max_length=256, description="accepted; prefix caching is automatic")
    audio: Any = Field(None, description="refused: " + REFUSED["audio"])
    prediction: Any = Field(None, description="refused: " + REFUSED["prediction"])
    web_search_options: Any = Field(None, description="refused: " + REFUSED["web_search_options"])
    functions: Any = Field(None, description="refused: " + REFUSED["functions"])
    function_call: Any = Field(None, description="refused: " + REFUSED["function_call"])
    logit_bias: Any = Field(None, description="refused: " + REFUSED["logit_bias"])
    metadata: Any = Field(None, description="refused: " + REFUSED["metadata"])
    reasoning_effort: Any = Field(None, description="refused: " + REFUSED["reasoning_effort"])
    verbosity: Any = Field(None, description="refused: " + REFUSED["verbosity"])

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v != {}:
            raise ValueError(REFUSED[info.field_name])
        return v

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return _by_shape(v, handler, info, _STOP, "a string or a list of strings")

    @field_validator("stream_options")
    @classmethod
    def _streamed(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):  # `stream` is declared first, so it is in data
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError("only n=1 is supported: send the request again for another answer")
        return v

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        check_max_turns(v, info)
        if not any(m.role in ("user",) for m in v):
            raise ValueError("needs at least one user message")
        return v

    @model_validator(mode="after")
    def _merge(self, info: ValidationInfo) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            top = _limit(info, "max_tokens", 4096)
            if self.max_completion_tokens > top:
                raise ValueError(f"max_completion_tokens must be at most {top}")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def openai_sampling(self, defaults: dict, default_max_tokens: int) -> SamplingParams:
        p = self.sampling_params(defaults, default_max_tokens, self.stop_list())
        p.presence_penalty = self.presence_penalty or 0.0
        p.frequency_penalty = self.frequency_penalty or 0.0
        p.logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return p


# ---- OpenAI API: responses (streamed chunks, and the whole answer folded from them) ----------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class _Sparse(BaseModel):
    """A delta: keys that are absent are left out, as OpenAI sends them (a null would read as a value,
    and the openai SDK's stream helper refuses a null `type` after the first delta)."""

    @model_serializer(mode="wrap")
    def _present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionDelta(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # thinking models only
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    """The visual share of the prompt (an edgevl extension in OpenAI's details object)."""

    image_tokens: int = 0
    video_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: OpenAIUsage | None = None
    timings: Timings | None = Field(None, description="edgevl extension, on the finishing chunk")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)  # thinking models only
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: OpenAIUsage
    timings: Timings = Field(..., description="edgevl extension")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgevl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

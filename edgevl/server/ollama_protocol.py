"""Ollama's API, typed: /api/chat and /api/generate requests and their NDJSON objects, and the
model-listing answers (/api/tags, /api/show, /api/ps, /api/version).

Field names follow Ollama's API reference and its official clients. Every request field is served,
accepted because it only describes (or only tunes how a model is loaded), or refused with a 400 that
names it; the option list is Ollama's whole `options` object, each entry decided below."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from edgevl.server.errors import ApiError
from edgevl.server.protocol import ToolSpec, _limit, check_max_turns
from edgevl.types import SamplingParams

# Ollama's options that change nothing here but tune how Ollama loads or runs a model (edgevl loaded
# its model at start, from its own settings), or that only act when Ollama shifts a full context
# (num_keep: edgevl never shifts, it refuses a prompt that does not fit).
LOAD_OPTIONS = ("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep")
# options whose only value served here is the one that turns them off, and why the others are refused
NEUTRAL = {
    "min_p": (0.0, "min-p sampling is not supported (only 0, off)"),
    "typical_p": (1.0, "typical sampling is not supported (only 1.0, off)"),
    "tfs_z": (1.0, "tail-free sampling is not supported (only 1.0, off)"),
    "mirostat": (0, "mirostat sampling is not supported (only 0, off)"),
}


class Options(BaseModel):
    """Ollama's `options`. Honoured: temperature, top_p, top_k, num_predict, seed, stop, repeat_penalty,
    presence_penalty, frequency_penalty, num_ctx, repeat_last_n (-1 or 0). The rest: see LOAD_OPTIONS
    and NEUTRAL; an unknown option is refused."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default: the model's")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000, description="0: no top-k cut")
    num_predict: int | None = Field(None, ge=-2, description="answer tokens at most; -1 or -2: the server's "
                                    "max_tokens; default: its default_max_tokens")
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1: random")
    stop: list[str] | None = Field(None, max_length=8)
    repeat_penalty: float | None = Field(None, gt=0.0, le=2.0, description="over the whole conversation so far")
    repeat_last_n: int | None = Field(None, ge=-1, description="-1: the whole conversation (edgevl's only "
                                      "window); 0: no repeat penalty; others are refused")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    penalize_newline: bool | None = Field(None, description="false is refused while a penalty applies")
    num_ctx: int | None = Field(None, ge=1, description="this request's context window (prompt + answer), at "
                                "most the server's max_context: the answer stops at it (done_reason length), "
                                "a prompt that does not fit is refused")
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = Field(None, description="accepted: mirostat's, and mirostat is off")
    mirostat_eta: float | None = Field(None, description="accepted: mirostat's, and mirostat is off")
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral(cls, v: float | None, info: ValidationInfo) -> float | None:
        off, why = NEUTRAL[info.field_name]
        if v is not None and v != off:
            raise ValueError(why)
        return v

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, v: int | None, info: ValidationInfo) -> int | None:
        top = _limit(info, "max_tokens", 4096)
        if v == 0:
            raise ValueError("must be at least 1 (or -1: as many as the server allows)")
        if v is not None and v > top:
            raise ValueError(f"must be at most {top} (the server's max_tokens)")
        return v

    def sampling(self, defaults: dict, default_max_tokens: int, max_tokens: int) -> SamplingParams:
        """The engine's sampling: the model's defaults, then what was set here."""
        d = dict(defaults)
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("repetition_penalty", "repeat_penalty")):
            if getattr(self, theirs) is not None:
                d[ours] = getattr(self, theirs)
        if self.repeat_last_n == 0:  # Ollama's "no window": no repeat penalty at all
            d["repetition_penalty"] = 1.0
        penalised = d.get("repetition_penalty", 1.0) != 1.0
        if self.repeat_last_n not in (None, -1, 0) and penalised:
            raise ApiError("options.repeat_last_n: the repeat penalty covers the whole conversation here; only -1 "
                           "(all of it) or 0 (no penalty) is served", "unsupported_option", "options.repeat_last_n")
        if self.penalize_newline is False and (penalised or self.presence_penalty or self.frequency_penalty):
            raise ApiError("options.penalize_newline: false is not supported: penalties apply to every token",
                           "unsupported_option", "options.penalize_newline")
        n = self.num_predict
        return SamplingParams(max_new_tokens=max_tokens if n is not None and n < 0 else n or default_max_tokens,
                              seed=None if self.seed is None or self.seed < 0 else self.seed,
                              stop=list(self.stop or []), presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0, **d)


class NullIsUnset(BaseModel):
    """A field sent as null is taken as not sent, as Ollama's Go server reads it (its Go client sends
    `"options": null` and `"messages": null` for fields it leaves empty)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict, description="the arguments object")
    index: int | None = None


class ToolCall(BaseModel):
    """A call, as Ollama writes it (arguments an object, not a string); `id` and `type` as newer
    Ollama releases add them."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunction


class ChatMessage(NullIsUnset):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = Field(None, description="base64 images (user and tool messages)")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant turns: the calls it made")
    thinking: str | None = Field(None, description="assistant turns: the thought, echoed back (a Thinking "
                                 "checkpoint's template shows it only in turns after the last user message)")
    tool_name: str | None = Field(None, description="tool turns: which tool answered (accepted)")
    tool_call_id: str | None = Field(None, description="tool turns: the call this answers (accepted)")

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # Ollama reads roles case-insensitively

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.images and self.role not in ("user", "tool"):
            raise ValueError("images are only accepted in user and tool messages")
        return self


Format = Literal["", "json"] | dict[str, Any]
Think = bool | Literal["high", "medium", "low"]


class Common(NullIsUnset):
    """What /api/chat and /api/generate share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="any name: the one model edgevl serves answers")
    format: Format | None = Field(None, description='"json" (any JSON object) or a JSON schema the answer follows')
    options: Options | None = None
    stream: bool = Field(True, description="NDJSON objects as the answer is written (Ollama's default)")
    keep_alive: float | str | None = Field(None, description="accepted: the model stays loaded while the server "
                                           "runs")
    think: Think | None = Field(None, description="Thinking checkpoints think unless false (the thought comes in "
                                "`thinking`); true is refused for other models")
    logprobs: bool | None = Field(None, description="each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and this many likeliest alternatives")

    @model_validator(mode="after")
    def _logprobs(self) -> Common:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def opts(self) -> Options:
        return self.options or Options()

    def top_k_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k likeliest rivals'."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatRequest(Common):
    messages: list[ChatMessage] = Field(default_factory=list, description="empty: only load the model")
    tools: list[ToolSpec] | None = Field(None, max_length=64, description="functions the model may call "
                                         "(Ollama has no tool_choice: the model decides)")

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        check_max_turns(v, info)
        if v and not any(m.role == "user" for m in v):
            raise ValueError("needs at least one user message")
        return v

    @field_validator("tools")
    @classmethod
    def _unique(cls, v: list[ToolSpec] | None) -> list[ToolSpec] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return v


class GenerateRequest(Common):
    prompt: str = Field("", description="empty (and no images): only load the model")
    images: list[str] | None = Field(None, description="base64 images, shown before the prompt")
    system: str = Field("", description="a system message before the prompt")
    suffix: str = Field("", description="refused unless empty: fill-in-the-middle is not supported")
    template: str = Field("", description="refused unless empty: the checkpoint's chat template is used")
    context: list[int] | None = Field(None, description="refused unless empty: send the conversation to "
                                      "/api/chat instead")
    raw: bool = Field(False, description="true is refused: the prompt always goes through the chat template")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str, info: ValidationInfo) -> str:
        if len(v) > _limit(info, "max_prompt_chars", 100_000):
            raise ValueError("is longer than the server accepts")
        return v

    @field_validator("suffix", "template")
    @classmethod
    def _empty(cls, v: str, info: ValidationInfo) -> str:
        if v:
            what = {"suffix": "fill-in-the-middle (suffix) is not supported by this model",
                    "template": "the checkpoint's own chat template is always used; send the prompt without it"}
            raise ValueError(what[info.field_name])
        return v

    @field_validator("context")
    @classmethod
    def _context(cls, v: list[int] | None) -> list[int] | None:
        if v:
            raise ValueError("context (Ollama's deprecated token memory) is not supported: send the conversation "
                             "as messages to /api/chat, whose earlier turns are read from the prefix cache")
        return v

    @field_validator("raw")
    @classmethod
    def _raw(cls, v: bool) -> bool:
        if v:
            raise ValueError("raw prompts are not supported: the prompt always goes through the checkpoint's "
                             "chat template")
        return v


# ---- answers -------------------------------------------------------------------------------------
class _Omit(BaseModel):
    """Unset fields are left out of the JSON, as Ollama leaves them out."""

    # no return annotation: one would stand in for the model's own schema in the API's description
    @model_serializer(mode="wrap")
    def _drop_none(self, nxt: SerializerFunctionWrapHandler):
        return {k: v for k, v in nxt(self).items() if v is not None}


class TopLogprob(_Omit):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob] | None = None


class OutMessage(_Omit):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class Frame(_Omit):
    """What every object of an answer carries; the last one (done: true) adds why it ended and the
    figures, durations in nanoseconds."""

    model: str
    created_at: str
    done: bool = False
    done_reason: str | None = Field(None, description="stop, length, or load (an empty request)")
    total_duration: int | None = Field(None, description="the whole request, ns")
    load_duration: int | None = Field(None, description="0: the model was loaded when the server started")
    prompt_eval_count: int | None = Field(None, description="prompt tokens, images included")
    prompt_eval_duration: int | None = Field(None, description="reading the prompt and its images, ns")
    eval_count: int | None = Field(None, description="answer tokens")
    eval_duration: int | None = Field(None, description="writing the answer after its first token, ns")
    logprobs: list[Logprob] | None = None


class ChatFrame(Frame):
    message: OutMessage


class GenerateFrame(Frame):
    response: str = ""
    thinking: str | None = None


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "onnx"
    family: str
    families: list[str]
    parameter_size: str = ""
    quantization_level: str


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int = Field(..., description="bytes of the model's files")
    digest: str
    details: ModelDetails


class Tags(BaseModel):
    models: list[ListedModel]


class RunningModel(ListedModel):
    expires_at: str = Field(..., description="never: the model stays loaded while the server runs")
    size_vram: int = 0
    context_length: int


class Running(BaseModel):
    models: list[RunningModel]


class ShowRequest(NullIsUnset):
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    name: str = Field("", description="Ollama's deprecated spelling of model")
    verbose: bool = False
    system: str = ""
    template: str = ""
    options: dict[str, Any] | None = None


class Shown(BaseModel):
    modelfile: str
    parameters: str
    template: str = ""
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(BaseModel):
    version: str

"""Typed requests and responses: the edge API (/api/*) and the OpenAI-compatible API (/v1/*).

Validation lives on the models (limits come from Settings through the validation context), and
so does the conversion into engine requests, so routers stay thin.
"""

from __future__ import annotations

import time
import uuid
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgevl.types import SamplingParams

# The server's limits, set per request by the app (an ASGI middleware), read by the validators below.
LIMITS: ContextVar[dict | None] = ContextVar("edgevl_limits", default=None)


def _limit(info: ValidationInfo, name: str, default: int) -> int:
    ctx = info.context or LIMITS.get() or {}
    return int(ctx.get(name, default))


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
                              ignore_eos=self.ignore_eos,
                              stop=list(stop if stop is not None else self.stop or []), **d)


# ---- edge API ------------------------------------------------------------------------------
class PredictRequest(Sampling):
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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0


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


class PredictResponse(BaseModel):
    answer: str
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings


class OcrResponse(BaseModel):
    text: str
    finish_reason: str
    model: str
    usage: Usage
    timings: Timings


# ---- OpenAI API -------------------------------------------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    fps: float | None = Field(None, gt=0, le=30, description="frames read per second (default: the model's)")
    max_frames: int | None = Field(None, ge=2, description="frames read at most (server limit applies)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url", "input_text", "video_url", "video"]
    text: str | None = None
    image_url: ImageURL | str | None = None
    video_url: VideoURL | str | None = None
    video: list[str] | None = Field(None, description="frames the client sampled, as image data URLs")
    fps: float | None = Field(None, gt=0, le=240, description="for 'video' frame lists: frames per second")

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    # fields in the OpenAI spec's order
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None  # type: ignore[assignment]  # OpenAI allows one string
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # edgevl extensions below

    model_config = ConfigDict(extra="ignore")

    @field_validator("messages")
    @classmethod
    def _turns(cls, v: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        top = _limit(info, "max_turns", 64)
        if len(v) > top:
            raise ValueError(f"at most {top} messages per conversation")
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
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())

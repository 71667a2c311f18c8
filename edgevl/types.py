"""The engine's small interface: what goes in, what comes out.

Every front end (CLI, edge API, OpenAI API, benchmark) speaks only these types; none of them
imports onnxruntime. Images arrive already decoded (``PIL.Image.Image``, RGB) and clips decoded
and sampled (``VideoPart``) because decoding and its limits belong to preprocessing, before the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from PIL import Image

Role = Literal["system", "user", "assistant", "tool"]
# weights of an export; int8-nbits (MatMulNBits, 8 bits) is there to measure int8 against it;
# int8-rowwise quantizes each activation row on its own (batch-invariant answers, docs/quantization.md)
Precision = Literal["fp32", "int8", "int4", "int8-nbits", "int8-rowwise"]
# the KV cache's elements: float32, or int8 with a fixed scale per head and channel (export/kv_scales.py)
KVCache = Literal["fp32", "int8"]
# what ends an answer in the engine; a timeout or a failure is an exception instead (a 504, an error frame)
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    image: Image.Image
    max_pixels: int | None = None  # this image's pixel budget (OpenAI's detail: low); None = the request's


@dataclass
class ToolCall:
    """A function call the assistant made earlier in the conversation, as the chat template shows it."""

    name: str
    arguments: str  # a JSON object, as text


@dataclass
class VideoPart:
    """A clip, already decoded and sampled: frames in time order and when each was shown."""

    frames: np.ndarray  # (n, H, W, 3) uint8 RGB
    times: list[float]  # seconds from the clip's start, one per frame


@dataclass
class Message:
    role: Role
    content: list[TextPart | ImagePart | VideoPart]
    tool_calls: list[ToolCall] = field(default_factory=list)  # assistant turns only
    reasoning: str = ""  # an assistant turn's thought, which a Thinking template may show again


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # the benchmark fixes output length this way
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the answer
    logprobs: int | None = None  # None: off; k: each token's log-probability and its k likeliest rivals
    reasoning_budget: int | None = None  # thinking models: thought tokens at most, then it is closed; None: the
    # engine's default (EngineOptions.reasoning_budget)


class Constraint(Protocol):
    """Restricts which tokens may come next (structured output). The engine calls, per step:
    `mask(logits)` before sampling (set forbidden logits to -inf in place), then `advance(token)`.
    `is_done()` ends generation once the structure is complete. `forced_tokens()`: the tokens the
    structure dictates next, whatever the model would say (a draft the engine checks in one run)."""

    def mask(self, logits: np.ndarray) -> None: ...

    def advance(self, token_id: int) -> None: ...

    def is_done(self) -> bool: ...

    def forced_tokens(self) -> list[int]: ...


@dataclass
class GenerationRequest:
    messages: list[Message]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_pixels: int | None = None  # per-request pixel budget; None = the engine's default
    cancel: threading.Event = field(default_factory=threading.Event)
    constraint: Constraint | None = None
    tools: list[dict] | None = None  # OpenAI-style tool specs, shown to the model by the chat template
    max_context: int | None = None  # this request's context window (prompt + answer); None = the engine's


@dataclass
class PreparedRequest:
    """A request made ready before it is queued (`Engine.prepare`): tokenised, its images and clips
    counted, and checked against the context window and the KV budget, so that a request that can
    never run is refused before any response starts. `generate` runs it as it is (nothing is built twice)."""

    request: GenerationRequest
    prompt_tokens: int
    max_new_tokens: int  # the answer limit, cut to what the context window leaves
    image_tokens: int = 0
    video_tokens: int = 0
    # the request's one clock: timings (queue_ms, ttft_ms, total_ms) run from the start of prepare
    t_start: float = field(default_factory=time.perf_counter)
    preprocess_ms: float = 0.0
    inputs: object = None  # the engine's own prepared inputs; front ends never look inside


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens: the thought's, before `</think>`

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0  # from prepared to admitted (a batch place and KV memory): the server's queue included
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # from the start of prepare (or of generate, unprepared) to the first token
    decode_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_s: float = 0.0  # decode speed: tokens after the first / decode time
    vision_cache_hits: int = 0
    prefix_reused_tokens: int = 0
    # the answer's share of the CPU package energy of each model run it took part in, by its share
    # of the run's tokens (an apportioning, not a meter per answer); None where no counter is read
    energy_j: float | None = None
    forced_tokens: int = 0  # answer tokens a jump-forward draft carried (each still the model's own choice)


@dataclass
class TokenEvent:
    """A piece of text; ``text`` may be empty while a multi-byte character is incomplete.

    ``reasoning``: the piece is part of a thinking model's thought, not of its answer. A front end
    sends it on its thinking channel (OpenAI's ``reasoning_content``, the edge API's ``reasoning``);
    the markup around a thought (``</think>`` and its newlines) never reaches either text."""

    text: str
    token_id: int
    logprob: float | None = None  # when SamplingParams.logprobs is set: log p(token) as sampled
    top_logprobs: list[tuple[int, float]] | None = None  # the likeliest tokens at this step, best first
    reasoning: bool = False


@dataclass
class FinishEvent:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    text: str = ""  # the whole answer, for non-streaming callers
    stop_sequence: str | None = None  # the stop string that ended the answer, when one did
    reasoning: str = ""  # the whole thought (thinking models), for non-streaming callers


Event = TokenEvent | FinishEvent

# where an engine delivers one request's events, on the engine's own thread: TokenEvents, then exactly
# one end — a FinishEvent, or the exception that failed the request. It must return at once (a
# server hands the item to its event loop; a blocking caller puts it in a queue.Queue).
Sink = Callable[[Event | BaseException], None]


class Handle(Protocol):
    """A submitted request, as its submitter holds it."""

    def cancel(self) -> None:
        """Stop it: a waiting request leaves the queue (its place is free at once), a running one stops
        at the engine's next step; either way its sink still gets its end (finish_reason "cancelled").
        A no-op once it has ended."""
        ...


@dataclass
class Histogram:
    """Observations counted into buckets, with their exact sum: the engine records, /metrics reads.
    One thread observes; a reader copies `counts` (a count is never half-written under the GIL)."""

    bounds: tuple[float, ...]  # bucket upper bounds, increasing
    counts: list[int] = field(default_factory=list)  # per bucket, and one more past the last bound
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.total += value

    def clear(self) -> None:
        self.counts, self.total = [0] * (len(self.bounds) + 1), 0.0


@dataclass
class EngineOptions:
    """How the engine runs. The server fills them from its settings (`Settings.engine_options`; a few
    names differ: --threads is intra_op_threads, --vision-cache vision_cache_entries); prepack_weights
    has no setting."""

    intra_op_threads: int = 0  # 0: ONNX Runtime's choice (one per physical core)
    inter_op_threads: int = 1
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    precision: Precision = "fp32"  # used when a checkpoint must be exported
    kv_cache: KVCache = "fp32"  # likewise; an exported folder's own cache type is what runs
    max_context: int = 4096  # prompt + answer tokens of one conversation
    max_pixels: int = 1024 * 1024  # default per-image budget; a request may ask for less
    max_images: int = 8  # per request
    max_video_pixels: int = 2 * 1024 * 1024  # per clip, all its sampled frames together
    vision_cache_entries: int = 16  # image embeddings kept for re-use (LRU)
    prepack_weights: bool = True  # MLAS packs fp32 weights at load: faster prompts, one more copy in RAM
    prefix_cache: bool = True  # re-use the KV cache of a previous turn that shares the prompt's start
    max_memory_mb: int = 0  # refuse to load a model whose predicted RSS is larger (0: no check)
    max_batch: int = 4  # sequences decoding together in one decoder run
    kv_cache_mb: int = 2048  # KV cache of all sequences, running and kept for prefix reuse
    prefill_chunk: int = 256  # prompt tokens of a chunk read on its own (no sequence decoding)
    # what one step carries while sequences decode (runtime/step_budget.py): their tokens and a newcomer's
    # prompt slice in the same run, or else slices of its picture through the vision tower, as many as
    # keep the step within step_stretch × a plain decode step's time (measured as the loop runs), and
    # at most step_tokens decoder tokens (0: a prompt chunk runs separately, prefill_chunk long)
    step_tokens: int = 64
    step_stretch: float = 1.2
    # while no answer streams, newcomers admitted together are all read (full speed) before any starts
    # its answer, instead of the first one's stream slowing the others' reading to the step budget
    start_together: bool = True
    reasoning_budget: int = -1  # thinking models: thought tokens at most before `</think>` is forced (-1: no limit)
    energy_counter: str | None = None  # CPU energy counter file (None: the powercap package counters)
    jump_forward: bool = True  # tokens a constraint forces are checked in one decoder run, not one step each
    queue_size: int = 16  # requests allowed to wait beyond the free batch places; then `submit` raises QueueFull


@dataclass
class EngineInfo:
    model_name: str
    model_dir: str
    backend: str  # "onnxruntime" or "transformers"
    precision: str  # a Precision
    random_weights: bool  # True for checkpoints made by `edgevl make-model`
    intra_op_threads: int
    max_context: int
    vision_cache_entries: int = 0
    thinking: bool = False  # the chat template opens every answer with a thought (Qwen3-VL-*-Thinking)
    kv_cache: str = "fp32"  # a KVCache


class Engine(Protocol):
    """Everything a front end (server, CLI, benchmark) calls on an engine; nothing else is probed."""

    stats: dict[str, int]  # counters since start: requests (accepted), finished, cancelled (while admitted),
    # cancelled_waiting (left the queue), errors, rejected_queue_full, rejected_paused, ...

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenise and check (context window, max_tokens, KV budget); raises InputError (a 4xx)."""
        ...

    def check_room(self) -> None:
        """Raises what `submit` would raise now (QueueFull, Paused, ShuttingDown), so a front end can
        refuse a request before spending its preprocessing."""
        ...

    def submit(self, prepared: PreparedRequest, sink: Sink) -> Handle:
        """Queues the request, or refuses it at once (QueueFull, Paused, ShuttingDown: nothing started).
        Its events go to `sink` from the engine's thread; the engine starts no thread per request."""
        ...

    def set_max_running(self, n: int) -> None:
        """The admission lever (the thermal governor's): at most n requests admitted at once (capped at
        max_batch; 0 pauses admission and `submit` raises Paused). Running requests finish either way."""
        ...

    def generate(self, request: GenerationRequest | PreparedRequest) -> Iterator[Event]:
        """The answer's events, in the caller's thread (`submit` with a blocking sink); a plain
        GenerationRequest is prepared first. Leaving the iterator early cancels the request."""
        ...

    def count_prompt_tokens(self, request: GenerationRequest) -> int: ...

    def json_constraint(self, schema: dict | None, budget: int = 0) -> Constraint: ...

    def tool_call_constraint(self, call_schema: dict, several: bool, budget: int = 0) -> Constraint:
        """Tool calls and nothing else, each valid for `call_schema` (one call's {"name", "arguments"});
        `several`: any number of calls, else exactly one."""
        ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def sampling_defaults(self) -> dict: ...

    def cache_stats(self) -> dict[str, int]: ...

    def request_states(self) -> dict[str, int]:
        """Requests inside the engine by state, each counted once: waiting (in the queue, for a batch place
        and KV memory), encoding
        (pictures in the vision tower), prefilling (reading the prompt), decoding."""
        ...

    def batch_histograms(self) -> dict[str, dict[int, int]]: ...

    def run_histograms(self) -> dict[str, dict[str, Histogram]]:
        """Histograms of the engine's graph runs, by name and then by kind ("" when it has none):
        step_seconds (decode, mixed, prefill, draft), step_tokens, vision_seconds."""
        ...

    def info(self) -> EngineInfo: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...


class EngineError(Exception):
    """The engine failed on one request; the engine itself stays usable."""


class Refused(Exception):
    """The engine took no new request (nothing of it started); worth trying again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Refused):
    """Every batch place and every place in the queue is taken."""

    def __init__(self, message: str, retry_after_s: int, running: int, waiting: int, queue_size: int):
        super().__init__(message, retry_after_s)
        self.running, self.waiting, self.queue_size = running, waiting, queue_size


class Paused(Refused):
    """Admission is paused: the allowed running count is 0 (`Engine.set_max_running`; the CPU is too hot)."""


class ShuttingDown(Refused):
    """The engine is closing."""


class InputError(ValueError):
    """The request cannot be served as given (too long, too many images, ...): a 4xx."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param

"""The ONNX Runtime engine: the Engine interface over the batch loop.

    prepare(request) ─► prompt (template, patches, MRoPE) and its checks, in the caller's thread
    submit(prepared, sink) ─► Work into the batch loop's queue (or QueueFull/Paused/ShuttingDown at once)
                              ─► events to the sink, on the loop's thread; a Handle to cancel it
    generate(prepared) ─► submit with a sink that is a queue.Queue, read in the caller's thread

The graphs run on the batch loop's thread (runtime/batch.py), the vision tower's slices between
decoder steps (runtime/vision_job.py); this class wires the parts together — graphs (model.py), KV pool
(kv_pool.py), vision cache (vision_cache.py), prompts (prompt.py) — and answers the front ends'
questions about them.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from edgevl.checkpoint import ModelConfig
from edgevl.export.manifest import Manifest
from edgevl.ops.energy import EnergyCounter
from edgevl.preprocess.image import ImageProcessorConfig
from edgevl.preprocess.video_patches import video_processor_config
from edgevl.runtime.batch import BatchLoop, Work
from edgevl.runtime.generate import token_bytes
from edgevl.runtime.kv_pool import KVPool
from edgevl.runtime.model import OnnxModel, open_session
from edgevl.runtime.prompt import PreparedPrompt, PromptBuilder, answer_limit
from edgevl.runtime.reasoning import ThinkMarkers
from edgevl.runtime.sequence import Sequence
from edgevl.runtime.vision_cache import VisionCache
from edgevl.runtime.vision_job import open_vision
from edgevl.types import (
    Constraint,
    EngineInfo,
    EngineOptions,
    Event,
    FinishEvent,
    GenerationRequest,
    Histogram,
    ImagePart,
    InputError,
    Message,
    PreparedRequest,
    SamplingParams,
    Sink,
    TextPart,
    Timings,
)

_STATS = ("requests", "finished", "cancelled", "errors", "vision_cache_hits", "vision_cache_misses", "vision_slices",
          "forced_tokens", "prefix_reused_tokens", "generated_tokens", "mixed_steps", "cancelled_waiting",
          "rejected_queue_full", "rejected_paused")


class OrtEngine:
    def __init__(self, folder: str | Path, options: EngineOptions | None = None):
        self.folder = Path(folder)
        self.options = options or EngineOptions()
        self.manifest = Manifest.read(self.folder)
        self.config = ModelConfig.read(self.folder)
        image_pre = json.loads((self.folder / "preprocessor_config.json").read_text())
        ipc = ImageProcessorConfig.from_dict(image_pre)
        gen = self.folder / "generation_config.json"
        self.generation_defaults = json.loads(gen.read_text()) if gen.is_file() else {}
        self.prompts = PromptBuilder(self.folder, self.config, ipc, video_processor_config(self.folder, image_pre),
                                     self.options)
        self.tokenizer = self.prompts.chat.tokenizer
        self.eos_ids = set(self.config.eos_token_ids)
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.think = ThinkMarkers.from_tokenizer(self.tokenizer)
        probe = GenerationRequest([Message("user", [TextPart("?")])])
        self.thinking = self.think is not None and self.think.opened_by(self.prompts.build(probe, False).ids.tolist())

        graphs = self.manifest.graphs
        # decoder first: prepacking a weight briefly holds it twice, and those transients should pass
        # while the process is small (an int8 vision tower is prepacked too; fp32's stays mapped)
        decoder = open_session(self.folder / graphs["decoder"], self.options)
        bf16 = "vision" in self.manifest.bf16_weight_graphs
        vision = open_vision(self.folder, self.manifest,
                             lambda path, sliced: open_session(path, self.options, bf16, slice_of_many=sliced))
        self.model = OnnxModel(self.config, vision, open_session(self.folder / graphs["embed"], self.options), decoder,
                               groups_together=self.manifest.vision_runs_frame_groups_together,
                               max_run_rows=self.options.max_pixels // self.config.vision.patch_size**2)
        t = self.config.text
        self.pool = KVPool(t.num_layers, t.num_kv_heads, t.head_dim, rows=2 * self.options.max_batch,
                           max_len=self.options.max_context, budget_bytes=self.options.kv_cache_mb * 2**20,
                           prefix_cache=self.options.prefix_cache, dtype=self.model.kv_dtype)
        self.vision_cache = VisionCache(self.options.vision_cache_entries)
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self._stats_lock = threading.Lock()
        self._grammar = None
        self.energy = EnergyCounter(self.options.energy_counter)
        self.loop = BatchLoop(self.model, self.pool, self.vision_cache, self.prompts, self.options.max_batch,
                              self.options.prefill_chunk, self.stats, self._stats_lock, self.options.jump_forward,
                              self.energy, self.options.step_tokens, self.options.step_stretch,
                              self.options.queue_size, self.options.start_together)

    # ---- the Engine interface ----------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.manifest.model_name,
            model_dir=str(self.folder),
            backend="onnxruntime",
            precision=self.manifest.precision,
            random_weights=self.manifest.random_weights,
            intra_op_threads=self.options.intra_op_threads or (os.cpu_count() or 1),
            max_context=self.options.max_context,
            vision_cache_entries=len(self.vision_cache),
            thinking=self.thinking,
            kv_cache=self.manifest.kv_cache,
        )

    def json_constraint(self, schema: dict | None, budget: int = 0) -> Constraint:
        """A Constraint for a JSON schema (None: any JSON object); invalid schemas raise InputError.
        `budget`: the request's max_new_tokens, so the answer is steered to close before it."""
        return self._grammars().json_schema(schema, budget)

    def tool_call_constraint(self, call_schema: dict, several: bool, budget: int = 0) -> Constraint:
        """A Constraint that admits tool calls and nothing else: one (or, `several`, any number) in the
        chat template's markup, each valid for `call_schema`; an invalid schema raises InputError."""
        from edgevl.runtime.constrain import TOOL_CALL_MARKERS, tool_call_grammar

        ids = [self.special_token_id(t) for t in TOOL_CALL_MARKERS]
        return self._grammars().lark(tool_call_grammar(call_schema, several, ids), budget)

    def _grammars(self):
        if self._grammar is None:
            from edgevl.runtime.constrain import GrammarCompiler

            self._grammar = GrammarCompiler(self.folder / "tokenizer.json", self.config.text.vocab_size,
                                            sorted(self.eos_ids))
        return self._grammar

    def token_bytes(self, token_id: int) -> bytes:
        return token_bytes(self.tokenizer, token_id)

    def special_token_id(self, text: str) -> int | None:
        """The id of a token the tokenizer keeps whole (e.g. `<tool_call>`), or None."""
        return self.prompts.chat.token_id(text)

    def cache_stats(self) -> dict[str, int]:
        """Sizes of the caches (for /metrics and /api/health)."""
        return {"vision_cache_entries": len(self.vision_cache), "vision_cache_bytes": self.vision_cache.nbytes,
                **self.pool.stats()}

    def request_states(self) -> dict[str, int]:
        """Requests in the engine by state (waiting, encoding, prefilling, decoding)."""
        return self.loop.load()

    def batch_histograms(self) -> dict[str, dict[int, int]]:
        """Decoder runs by batch size, and prefill chunks by token-count bucket, since start."""
        return {"batch_size": dict(self.loop.batch_sizes), "prefill_chunk_tokens": dict(self.loop.chunk_tokens)}

    def run_histograms(self) -> dict[str, dict[str, Histogram]]:
        loop = self.loop
        return {"step_seconds": dict(loop.step_seconds), "step_tokens": {"": loop.run_tokens},
                "vision_seconds": {"": loop.vision_seconds}}

    def sampling_defaults(self) -> dict:
        """The checkpoint's recommended sampling (generation_config.json), for callers that set none."""
        g = self.generation_defaults
        if not g.get("do_sample", False):
            return {"temperature": 0.0}
        return {k: g[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in g}

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return int(self.prompts.build(request, with_positions=False).ids.size)

    def warmup(self) -> None:
        img = Image.new("RGB", (64, 64), (120, 160, 200))
        req = GenerationRequest([Message("user", [ImagePart(img), TextPart("warm up")])],
                                SamplingParams(max_new_tokens=2, ignore_eos=True))
        for _ in self.generate(req):
            pass
        self.vision_cache.clear()
        with self._stats_lock:
            for k in self.stats:
                self.stats[k] = 0
        self.loop.clear_histograms()

    def close(self) -> None:
        self.loop.close()
        self.energy.close()
        self.vision_cache.clear()
        self.pool.close()

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """The prompt built and checked before the request is queued: over the context window, or needing
        more KV cache than the server has at all, is an InputError naming which part is too big."""
        t_start = time.perf_counter()
        prompt = self.prompts.build(request)
        n_prompt = int(prompt.ids.size)
        max_new = answer_limit(n_prompt, request, self.options.max_context)
        pool = self.pool
        if not pool.fits_ever(n_prompt + max_new):
            held = f"the server's KV cache holds {self.options.kv_cache_mb} MB (about {pool.budget_tokens} tokens)"
            if not pool.fits_ever(n_prompt + 1):
                mb = pool.bytes_per_token * (n_prompt + 1) / 2**20
                raise InputError(f"the prompt alone is {n_prompt} tokens and needs {mb:.0f} MB of KV cache; {held}: "
                                 "send a shorter prompt or fewer or smaller images", code="kv_cache_exceeded")
            mb = pool.bytes_per_token * (n_prompt + max_new) / 2**20
            most = min(pool.budget_tokens, pool.max_len) - n_prompt
            raise InputError(f"the prompt ({n_prompt} tokens) and max_tokens ({max_new}) need {mb:.0f} MB of KV cache; "
                             f"{held}: ask for at most {most} max_tokens", code="kv_cache_exceeded",
                             param="max_tokens")
        return PreparedRequest(request, n_prompt, max_new, prompt.visual_tokens(video=False),
                               prompt.visual_tokens(video=True), t_start,
                               (time.perf_counter() - t_start) * 1000, prompt)

    def check_room(self) -> None:
        self.loop.check()

    def set_max_running(self, n: int) -> None:
        self.loop.set_max_running(n)

    def submit(self, prepared: PreparedRequest, sink: Sink) -> _Handle:
        prompt: PreparedPrompt = prepared.inputs
        timings = Timings(preprocess_ms=prepared.preprocess_ms)
        seq = Sequence(prepared.request, prompt.ids.tolist(), prepared.max_new_tokens, self.eos_ids, self.tokenizer,
                       self.special_ids, prepared.t_start, timings, prepared.image_tokens, prepared.video_tokens,
                       self.think, self.options.reasoning_budget)
        work = Work(seq, prompt, prepared.prompt_tokens + prepared.max_new_tokens, sink,
                    t_submit=prepared.t_start + prepared.preprocess_ms / 1000)
        self.loop.submit(work)  # QueueFull, Paused, ShuttingDown: raised here, nothing started
        return _Handle(self.loop, work)

    def generate(self, request: GenerationRequest | PreparedRequest) -> Iterator[Event]:
        prep = request if isinstance(request, PreparedRequest) else self.prepare(request)
        events: queue.SimpleQueue = queue.SimpleQueue()
        handle = self.submit(prep, events.put)
        finished = False
        try:
            while True:
                ev = events.get()  # the loop always ends a Work with a FinishEvent or an error
                if isinstance(ev, BaseException):
                    finished = True
                    raise ev
                finished = isinstance(ev, FinishEvent)
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                handle.cancel()  # the caller stopped listening: free the batch place at the next step


class _Handle:
    """A submitted Work, as its submitter holds it (the Handle of the Engine interface)."""

    def __init__(self, loop: BatchLoop, work: Work):
        self._loop, self._work = loop, work

    def cancel(self) -> None:
        if not self._work.seq.finished:
            self._loop.cancel(self._work)

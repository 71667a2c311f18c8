"""The PyTorch/transformers reference: the same Engine interface on Qwen3VLForConditionalGeneration.

Used to check every exported graph (parity tests) and as the baseline in the benchmark. It needs
the `reference` extra (torch, transformers). transformers 5's Qwen3VLProcessor insists on
torchvision, so the processor is built from its parts: the numpy/PIL image processor, the
video processor's steps (reference_video.py), the tokenizer, and the pads expanded here.

It runs one answer at a time. `generate` runs in the caller's thread; `submit` (the server's way
in) queues behind the same admission rules as the ONNX engine's loop (runtime/admission.py) and
runs the queue on one thread of its own.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgevl.checkpoint import load_checkpoint
from edgevl.preprocess.chat import images_in
from edgevl.runtime.admission import Admission
from edgevl.runtime.generate import token_bytes
from edgevl.runtime.prompt import answer_limit
from edgevl.runtime.reasoning import ThinkMarkers
from edgevl.runtime.reference_video import ReferenceVideoProcessor
from edgevl.runtime.sequence import Sequence
from edgevl.types import (
    EngineError,
    EngineInfo,
    EngineOptions,
    Event,
    GenerationRequest,
    Histogram,
    Message,
    PreparedRequest,
    Sink,
    TextPart,
    VideoPart,
)


class ReferenceProcessor:
    """transformers' own pieces: Qwen2VLImageProcessorPil + tokenizer (+ its chat template)."""

    def __init__(self, folder: Path, max_pixels: int | None = None, max_video_pixels: int | None = None):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ckpt = load_checkpoint(folder)
        pre = {k: v for k, v in ckpt.preprocessor.items() if k not in ("processor_class", "image_processor_type")}
        if max_pixels is not None:
            size = dict(pre.get("size", {}))
            size["longest_edge"] = min(max_pixels, size.get("longest_edge", max_pixels))
            pre["size"] = size
        self.image_processor = Qwen2VLImageProcessorPil(**pre)
        self.video_processor = ReferenceVideoProcessor(Path(folder), max_video_pixels)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.config = ckpt.config

    def __call__(self, messages: list[Message]) -> dict:
        import torch

        hf = [{"role": m.role, "content": [{"type": "image"} if hasattr(p, "image") else {"type": "video"}
                                           if isinstance(p, VideoPart) else {"type": "text", "text": p.text}
                                           for p in m.content], **({"reasoning_content": m.reasoning} if m.reasoning
                                                                   else {})}
              for m in messages]
        text = self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        images = [p.image for p in images_in(messages)]
        videos = [p for m in messages for p in m.content if isinstance(p, VideoPart)]
        out: dict = {}
        replace = {"<|image_pad|>": iter([]), "<|video_pad|>": iter([])}
        if images:
            r = self.image_processor(images=images, return_tensors="np")
            grids = r["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            replace["<|image_pad|>"] = iter(["<|image_pad|>" * int(g.prod() // merge) for g in grids])
            out["pixel_values"] = torch.from_numpy(r["pixel_values"])
            out["image_grid_thw"] = torch.from_numpy(grids)
        if videos:
            pv, vg, texts = zip(*(self.video_processor(v) for v in videos))
            replace["<|video_pad|>"] = iter(texts)
            out["pixel_values_videos"] = torch.cat(pv)
            out["video_grid_thw"] = torch.cat(vg)
        # one pass over the template's placeholders, as ProcessorMixin.get_text_with_replacements
        text = re.sub(r"<\|image_pad\|>|<\|video_pad\|>", lambda m: next(replace[m.group()]), text)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        out["input_ids"] = ids
        out["mm_token_type_ids"] = ((ids == self.config.image_token_id).int()
                                    + 2 * (ids == self.config.video_token_id).int())
        return out


class TransformersEngine:
    def __init__(self, folder: str | Path, options: EngineOptions | None = None):
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        self.folder = Path(folder)
        self.options = options or EngineOptions()
        if self.options.intra_op_threads:
            torch.set_num_threads(self.options.intra_op_threads)
        self.ckpt = load_checkpoint(self.folder)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            str(self.folder), dtype=torch.float32, attn_implementation="eager").eval()
        self.processor = ReferenceProcessor(self.folder, self.options.max_pixels, self.options.max_video_pixels)
        self.eos_ids = set(self.ckpt.config.eos_token_ids)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.think = ThinkMarkers.from_tokenizer(self.tokenizer)
        probe = self.processor([Message("user", [TextPart("?")])])["input_ids"][0].tolist()
        self.thinking = self.think is not None and self.think.opened_by(probe)
        self.stats: dict[str, int] = dict.fromkeys(("requests", "finished", "cancelled", "errors", "cancelled_waiting",
                                                    "rejected_queue_full", "rejected_paused"), 0)
        self._grammar = None
        self._cv = threading.Condition()
        self._admission: Admission[_Job] = Admission(1, self.options.queue_size, lambda j: j.cancelled,
                                                     self._count)
        self._running = 0
        self._worker: threading.Thread | None = None

    def info(self) -> EngineInfo:
        import torch

        return EngineInfo(self.ckpt.name, str(self.folder), "transformers", "fp32", self.ckpt.random_weights,
                          torch.get_num_threads(), self.options.max_context, thinking=self.thinking)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return int(self.processor(request.messages)["input_ids"].shape[1])

    def close(self) -> None:
        with self._cv:
            self._admission.closed = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)

    def warmup(self) -> None:
        pass  # eager PyTorch has nothing to compile or page in ahead of the first request

    def sampling_defaults(self) -> dict:
        g = self.ckpt.generation
        if not g.get("do_sample", False):
            return {"temperature": 0.0}
        return {k: g[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in g}

    def cache_stats(self) -> dict[str, int]:
        return dict.fromkeys(("vision_cache_entries", "vision_cache_bytes", "kv_rows", "kv_running",
                              "kv_cached_tokens", "kv_used_bytes", "kv_free_bytes", "kv_budget_bytes"), 0)

    def request_states(self) -> dict[str, int]:
        with self._cv:  # vision and prompt are one forward: a running answer counts as decoding
            return {"waiting": self._admission.live(), "encoding": 0, "prefilling": 0, "decoding": self._running}

    def batch_histograms(self) -> dict[str, dict[int, int]]:
        return {}  # one sequence at a time

    def run_histograms(self) -> dict[str, dict[str, Histogram]]:
        return {}  # vision and prompt run as one forward: nothing to tell apart

    def json_constraint(self, schema: dict | None, budget: int = 0):
        return self._grammars().json_schema(schema, budget)

    def tool_call_constraint(self, call_schema: dict, several: bool, budget: int = 0):
        from edgevl.runtime.constrain import TOOL_CALL_MARKERS, tool_call_grammar

        ids = [self.special_token_id(t) for t in TOOL_CALL_MARKERS]
        return self._grammars().lark(tool_call_grammar(call_schema, several, ids), budget)

    def _grammars(self):
        if self._grammar is None:
            from edgevl.runtime.constrain import GrammarCompiler

            self._grammar = GrammarCompiler(self.folder / "tokenizer.json", self.ckpt.config.text.vocab_size,
                                            sorted(self.eos_ids))
        return self._grammar

    def token_bytes(self, token_id: int) -> bytes:
        return token_bytes(self.tokenizer, token_id)

    def special_token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def prefill_logits(self, messages: list[Message]) -> np.ndarray:
        """Last-position logits of the prompt: what parity tests compare against."""
        import torch

        with torch.no_grad():
            out = self.model(**self.processor(messages))
        return out.logits[0, -1].float().numpy()

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """transformers' inputs, built and checked against the context window before the request is queued."""
        t0 = time.perf_counter()
        inputs = self.processor(request.messages)
        ids = inputs["input_ids"][0].tolist()
        max_new = answer_limit(len(ids), request, self.options.max_context)
        return PreparedRequest(request, len(ids), max_new, ids.count(self.ckpt.config.image_token_id),
                               ids.count(self.ckpt.config.video_token_id), t0,
                               (time.perf_counter() - t0) * 1000, inputs)

    # ---- the queue: admission as the ONNX engine's, served by one thread -----------------------
    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def check_room(self) -> None:
        with self._cv:
            self._admission.check(self._running)

    def set_max_running(self, n: int) -> None:
        with self._cv:
            self._admission.set_allowed(n)
            self._cv.notify_all()

    def submit(self, prepared: PreparedRequest, sink: Sink) -> _Job:
        job = _Job(prepared, sink, self._cv)
        with self._cv:
            self._admission.add(job, self._running)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="reference-engine", daemon=True)
                self._worker.start()
            self._cv.notify_all()
        return job

    def _next(self) -> _Job | None:
        """The next job to run (None: closing); cancelled ones leave the queue with their end."""
        a = self._admission
        with self._cv:
            while True:
                if a.closed:
                    for job in a.waiting:
                        job.sink(EngineError("the engine is shutting down"))
                    a.waiting.clear()
                    return None
                self._drop_cancelled()
                if a.waiting and a.allowed > 0:
                    self._running = 1
                    return a.waiting.popleft()
                self._cv.wait(timeout=1.0)

    def _drop_cancelled(self) -> None:
        """Cancelled waiting jobs leave the queue with their end (called with the lock held)."""
        for job in self._admission.drop_cancelled():
            for ev in self._sequence(job.prepared).cancel():
                job.sink(ev)

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            t0 = time.perf_counter()
            try:
                for ev in self._run(job.prepared):
                    job.sink(ev)
                    with self._cv:  # a waiting request cancelled now ends now, not after this answer
                        self._drop_cancelled()
            except Exception as e:  # one request fails; the thread serves on
                self._count("errors")
                job.sink(e)
            finally:
                job.done = True
                with self._cv:
                    self._running = 0
                    self._admission.served(time.perf_counter() - t0)

    # ---- one answer ------------------------------------------------------------------------------
    def _sequence(self, prep: PreparedRequest) -> Sequence:
        return Sequence(prep.request, prep.inputs["input_ids"][0].tolist(), prep.max_new_tokens, self.eos_ids,
                        self.tokenizer, self.special_ids, prep.t_start, n_image_tokens=prep.image_tokens,
                        n_video_tokens=prep.video_tokens, think=self.think,
                        reasoning_budget=self.options.reasoning_budget)

    def generate(self, request: GenerationRequest | PreparedRequest) -> Iterator[Event]:
        """In the caller's thread, outside the queue (parity tests and the benchmark's baseline)."""
        self._count("requests")
        prep = request if isinstance(request, PreparedRequest) else self.prepare(request)
        yield from self._run(prep)

    def _run(self, prep: PreparedRequest) -> Iterator[Event]:
        """Token by token with the model's own KV cache, so TTFT and decode speed are measurable."""
        import torch

        inputs = prep.inputs
        seq = self._sequence(prep)
        self.model.model.rope_deltas = None  # transformers keeps MRoPE offsets across calls
        t_model = time.perf_counter()
        seq.timings.preprocess_ms = prep.preprocess_ms
        with torch.no_grad():
            out = self.model(**inputs, use_cache=True)
            seq.timings.prefill_ms = (time.perf_counter() - t_model) * 1000  # vision and prompt: one forward
            while True:
                events = seq.accept(out.logits[0, -1].float().numpy())
                yield from events
                if seq.finished:
                    self.stats["cancelled" if seq.reason == "cancelled" else "finished"] += 1
                    return
                # positions continue from the prompt's MRoPE offset, which the model kept
                out = self.model(input_ids=torch.tensor([[seq.last_token]]), cache=out.cache, use_cache=True)


class _Job:
    """A submitted request (the Handle of the Engine interface)."""

    def __init__(self, prepared: PreparedRequest, sink: Sink, cv: threading.Condition):
        self.prepared, self.sink, self._cv = prepared, sink, cv
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self.prepared.request.cancel.is_set()

    def cancel(self) -> None:
        if not self.done:
            self.prepared.request.cancel.set()
            with self._cv:
                self._cv.notify_all()

"""The PyTorch/transformers reference: the same Engine interface on Qwen3VLForConditionalGeneration.

Used to check every exported graph (parity tests) and as the baseline in the benchmark. It needs
the `reference` extra (torch, transformers). transformers 5's Qwen3VLProcessor insists on
torchvision, so the processor is built from its parts: the numpy/PIL image processor, the
tokenizer, and `<|image_pad|>` expanded here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgevl.checkpoint import load_checkpoint
from edgevl.preprocess.chat import images_in
from edgevl.runtime.generate import Sampler, StopMatcher, StreamDecoder, token_bytes, token_logprobs
from edgevl.types import (
    EngineInfo,
    EngineOptions,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Message,
    Timings,
    TokenEvent,
    Usage,
)


class ReferenceProcessor:
    """transformers' own pieces: Qwen2VLImageProcessorPil + tokenizer (+ its chat template)."""

    def __init__(self, folder: Path, max_pixels: int | None = None):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ckpt = load_checkpoint(folder)
        pre = {k: v for k, v in ckpt.preprocessor.items() if k not in ("processor_class", "image_processor_type")}
        if max_pixels is not None:
            size = dict(pre.get("size", {}))
            size["longest_edge"] = min(max_pixels, size.get("longest_edge", max_pixels))
            pre["size"] = size
        self.image_processor = Qwen2VLImageProcessorPil(**pre)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.config = ckpt.config

    def __call__(self, messages: list[Message]) -> dict:
        import torch

        hf = [{"role": m.role, "content": [{"type": "image"} if hasattr(p, "image") else
                                           {"type": "text", "text": p.text} for p in m.content]}
              for m in messages]
        text = self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        images = [p.image for p in images_in(messages)]
        out: dict = {}
        if images:
            r = self.image_processor(images=images, return_tensors="np")
            grids = r["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            pad = "<|image_pad|>"
            parts = text.split(pad)
            text = parts[0] + "".join(pad * int(g.prod() // merge) + rest for g, rest in zip(grids, parts[1:]))
            out["pixel_values"] = torch.from_numpy(r["pixel_values"])
            out["image_grid_thw"] = torch.from_numpy(grids)
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        out["input_ids"] = ids
        out["mm_token_type_ids"] = (ids == self.config.image_token_id).int()
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
        self.processor = ReferenceProcessor(self.folder, self.options.max_pixels)
        gen = self.ckpt.generation.get("eos_token_id", [])
        self.eos_ids = set(gen if isinstance(gen, list) else [gen])
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.stats: dict[str, int] = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0}
        self._grammar = None

    def info(self) -> EngineInfo:
        import torch

        return EngineInfo(self.ckpt.name, str(self.folder), "transformers", "fp32", self.ckpt.random_weights,
                          torch.get_num_threads(), self.options.max_context)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return int(self.processor(request.messages)["input_ids"].shape[1])

    def close(self) -> None:
        pass

    def warmup(self) -> None:
        pass  # eager PyTorch has nothing to compile or page in ahead of the first request

    def sampling_defaults(self) -> dict:
        g = self.ckpt.generation
        if not g.get("do_sample", False):
            return {"temperature": 0.0}
        return {k: g[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in g}

    def cache_stats(self) -> dict[str, int]:
        return {"vision_cache_entries": 0, "vision_cache_bytes": 0, "kv_slots": 0, "kv_cache_bytes": 0,
                "kv_cached_tokens": 0}

    def json_constraint(self, schema: dict | None, budget: int = 0):
        return self._grammars().json_schema(schema, budget)

    def grammar_constraint(self, lark: str, budget: int = 0):
        return self._grammars().lark(lark, budget)

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

    def generate(self, request: GenerationRequest) -> Iterator[Event]:
        """Token by token with the model's own KV cache, so TTFT and decode speed are measurable."""
        import torch

        t0 = time.perf_counter()
        p = request.params
        inputs = self.processor(request.messages)
        n_prompt = int(inputs["input_ids"].shape[1])
        sampler = Sampler(p)
        detok = StreamDecoder(self.tokenizer, self.special_ids)
        stops = StopMatcher(p.stop)
        timings = Timings()
        generated: list[int] = []
        history = inputs["input_ids"][0].tolist()
        reason: FinishReason = "length"
        text: list[str] = []
        t_first = None
        self.model.model.rope_deltas = None  # transformers keeps MRoPE offsets across calls
        with torch.no_grad():
            out = self.model(**inputs, use_cache=True)
            while len(generated) < p.max_new_tokens:
                logits = out.logits[0, -1].float().numpy()
                tok = sampler(logits, history)
                lp = token_logprobs(logits, tok, p.logprobs) if p.logprobs is not None else (None, None)
                generated.append(tok)
                history.append(tok)
                if t_first is None:
                    t_first = time.perf_counter()
                    timings.ttft_ms = (t_first - t0) * 1000
                    timings.prefill_ms = timings.ttft_ms  # vision and prompt run as one forward here
                if tok in self.eos_ids and not p.ignore_eos:
                    reason = "stop"
                    break
                piece, stopped = stops.feed(detok.push(tok))
                text.append(piece)
                yield TokenEvent(piece, tok, *lp)
                if stopped:
                    reason = "stop"
                    break
                if request.cancel.is_set():
                    reason = "cancelled"
                    break
                if len(generated) >= p.max_new_tokens:
                    break
                # positions continue from the prompt's MRoPE offset, which the model kept
                out = self.model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
        now = time.perf_counter()
        timings.total_ms = (now - t0) * 1000
        if t_first is not None and len(generated) > 1:
            timings.decode_ms = (now - t_first) * 1000
            timings.tokens_per_s = (len(generated) - 1) / (timings.decode_ms / 1000)
        yield FinishEvent(reason, Usage(n_prompt, len(generated)), timings, "".join(text))


def torch_available() -> bool:
    if os.environ.get("EDGEVL_NO_TORCH"):
        return False
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True

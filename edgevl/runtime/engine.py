"""The ONNX Runtime engine: messages in, tokens out, one request at a time per KV slot.

    request ─► chat template + image patches ─► vision (LRU-cached per image) ─► prefill
            ─► decode loop (sample, stop, detokenise) ─► TokenEvent … FinishEvent

The KV cache of each slot is a numpy buffer bound as both past and present of
GroupQueryAttention, so decode steps write in place and copy nothing. A slot remembers what
its cache holds; a request whose prompt starts with the same tokens and images (the next turn
of a chat) prefills only the new part.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from edgevl.checkpoint import ModelConfig
from edgevl.export import MANIFEST, export_model, is_exported
from edgevl.preprocess import positions as pos
from edgevl.preprocess.chat import ChatFormatter, images_in
from edgevl.preprocess.image import ImagePatches, ImageProcessorConfig, patchify
from edgevl.runtime.generate import Sampler, StopMatcher, StreamDecoder
from edgevl.types import (
    EngineError,
    EngineInfo,
    EngineOptions,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InputError,
    Timings,
    TokenEvent,
    Usage,
)

_KV_BLOCK = 256  # KV buffers grow in these steps, so a slot is rarely reallocated


@dataclass
class ImageFeatures:
    embeds: np.ndarray  # (n_tokens, hidden)
    deepstack: np.ndarray  # (n_deepstack, n_tokens, hidden)


@dataclass
class KVSlot:
    keys: list[np.ndarray]
    values: list[np.ndarray]
    capacity: int
    content: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # token keys held
    busy: bool = False


@dataclass
class PreparedPrompt:
    ids: np.ndarray
    keys: np.ndarray  # ids with image tokens replaced by a per-image fingerprint (prefix matching)
    cos: np.ndarray
    sin: np.ndarray
    next_position: int
    patches: list[ImagePatches]
    spans: list[tuple[int, int]]
    fingerprints: list[str]


class OrtEngine:
    def __init__(self, folder: str | Path, options: EngineOptions | None = None):
        self.folder = Path(folder)
        self.options = options or EngineOptions()
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.config = ModelConfig.from_dict(json.loads((self.folder / "config.json").read_text()))
        self.ipc = ImageProcessorConfig.from_dict(
            json.loads((self.folder / "preprocessor_config.json").read_text()))
        gen = self.folder / "generation_config.json"
        self.generation_defaults = json.loads(gen.read_text()) if gen.is_file() else {}
        self.chat = ChatFormatter(self.folder, self.config.image_token_id)
        eos = self.generation_defaults.get("eos_token_id", self.config.raw.get("text_config", {}).get(
            "eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.special_ids = {i for i, t in self.chat.tokenizer.get_added_tokens_decoder().items() if t.special}

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if self.options.execution_mode == "parallel"
                             else ort.ExecutionMode.ORT_SEQUENTIAL)
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.graph_optimization]
        if not self.options.prepack_weights:
            so.add_session_config_entry("session.disable_prepacking", "1")
        providers = ["CPUExecutionProvider"]
        graphs = self.manifest["graphs"]
        # decoder first: prepacking its largest weight (the lm_head) briefly holds it twice, and that
        # transient must not stack on a vision tower already resident (it set fp32's peak RSS)
        self.decoder = ort.InferenceSession(str(self.folder / graphs["decoder"]), so, providers=providers)
        self.vision = ort.InferenceSession(str(self.folder / graphs["vision"]), so, providers=providers)
        self.embed = ort.InferenceSession(str(self.folder / graphs["embed"]), so, providers=providers)
        self._has_deepstack = any(i.name == "deepstack_embeds" for i in self.decoder.get_inputs())

        self._vision_cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._slots: list[KVSlot] = []
        self._slots_lock = threading.Lock()
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "vision_cache_hits": 0,
                      "vision_cache_misses": 0, "prefix_reused_tokens": 0, "generated_tokens": 0}
        self._stats_lock = threading.Lock()

    # ---- public interface ------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.manifest.get("model_name", self.folder.name),
            model_dir=str(self.folder),
            backend="onnxruntime",
            precision=self.manifest.get("precision", "fp32"),
            random_weights=bool(self.manifest.get("random_weights")),
            intra_op_threads=self.options.intra_op_threads or (os.cpu_count() or 1),
            max_context=self.options.max_context,
            vision_cache_entries=len(self._vision_cache),
        )

    def json_constraint(self, schema: dict | None, budget: int = 0):
        """A Constraint for a JSON schema (None: any JSON object); invalid schemas raise InputError.
        `budget`: the request's max_new_tokens, so the answer is steered to close before it."""
        if getattr(self, "_grammar", None) is None:
            from edgevl.runtime.constrain import GrammarCompiler

            self._grammar = GrammarCompiler(self.folder / "tokenizer.json", self.config.text.vocab_size,
                                            sorted(self.eos_ids))
        return self._grammar.json_schema(schema, budget)

    def cache_stats(self) -> dict[str, int]:
        """Sizes of the two caches (for /metrics): both are bounded, this shows by how much."""
        with self._cache_lock:
            vision_bytes = sum(f.embeds.nbytes + f.deepstack.nbytes for f in self._vision_cache.values())
            n_vision = len(self._vision_cache)
        with self._slots_lock:
            kv_bytes = sum(sum(a.nbytes for a in s.keys + s.values) for s in self._slots)
            cached_tokens = sum(int(s.content.size) for s in self._slots)
            n_slots = len(self._slots)
        return {"vision_cache_entries": n_vision, "vision_cache_bytes": vision_bytes, "kv_slots": n_slots,
                "kv_cache_bytes": kv_bytes, "kv_cached_tokens": cached_tokens}

    def sampling_defaults(self) -> dict:
        """The checkpoint's recommended sampling (generation_config.json), for callers that set none."""
        g = self.generation_defaults
        if not g.get("do_sample", False):
            return {"temperature": 0.0}
        return {k: g[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in g}

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return int(self._prepare(request, with_positions=False).ids.size)

    def warmup(self) -> None:
        from edgevl.types import ImagePart, Message, SamplingParams, TextPart

        img = Image.new("RGB", (64, 64), (120, 160, 200))
        req = GenerationRequest([Message("user", [ImagePart(img), TextPart("warm up")])],
                                SamplingParams(max_new_tokens=2, ignore_eos=True))
        for _ in self.generate(req):
            pass
        with self._cache_lock:
            self._vision_cache.clear()
        with self._stats_lock:
            for k in self.stats:
                self.stats[k] = 0

    def close(self) -> None:
        self._slots.clear()
        self._vision_cache.clear()

    def generate(self, request: GenerationRequest) -> Iterator[Event]:
        t_start = time.perf_counter()
        self._count("requests")
        params = request.params
        timings = Timings()
        prompt = self._prepare(request)
        timings.preprocess_ms = _ms(t_start)
        n_prompt = int(prompt.ids.size)
        room = self.options.max_context - n_prompt
        if room < 1:
            raise InputError(f"the prompt is {n_prompt} tokens; the context holds {self.options.max_context}",
                             code="context_length_exceeded")
        max_new = max(0, min(params.max_new_tokens, room))

        t_vision = time.perf_counter()
        feats = []
        for patches, fp in zip(prompt.patches, prompt.fingerprints):
            f, hit = self._image_features(patches, fp)
            timings.vision_cache_hits += int(hit)
            feats.append(f)
        timings.vision_ms = _ms(t_vision)

        slot, reuse = self._acquire_slot(prompt.keys, n_prompt + max_new)
        try:
            yield from self._run(request, prompt, feats, slot, reuse, max_new, timings, t_start)
        finally:
            with self._slots_lock:
                slot.busy = False

    # ---- preparation -----------------------------------------------------------------
    def _prepare(self, request: GenerationRequest, with_positions: bool = True) -> PreparedPrompt:
        images = images_in(request.messages)
        if len(images) > self.options.max_images:
            raise InputError(f"{len(images)} images in one request; the limit is {self.options.max_images}",
                             code="too_many_images", param="images")
        budget = min(request.max_pixels or self.options.max_pixels, self.options.max_pixels)
        patches = [patchify(p.image, self.ipc, budget) for p in images]
        try:
            chat = self.chat.encode(request.messages, [p.n_tokens for p in patches])
        except ValueError as e:
            raise InputError(str(e)) from e
        fps = [_fingerprint(p.image, pt) for p, pt in zip(images, patches)]
        keys = chat.ids.copy()
        for (s, e), fp in zip(chat.image_spans, fps):
            keys[s:e] = -1 - (int(fp[:15], 16))  # negative: never equal to a real token id
        if not with_positions:
            return PreparedPrompt(chat.ids, keys, np.empty(0), np.empty(0), 0, patches, chat.image_spans, fps)
        t = self.config.text
        positions, next_pos = pos.mrope_positions(chat.ids.size, chat.image_spans,
                                                  [p.grid_thw for p in patches],
                                                  self.config.vision.spatial_merge_size)
        cos, sin = pos.text_cos_sin(positions, self._inv_freq, t.mrope_section, t.mrope_interleaved)
        return PreparedPrompt(chat.ids, keys, cos, sin, next_pos, patches, chat.image_spans, fps)

    @property
    def _inv_freq(self) -> np.ndarray:
        if not hasattr(self, "_inv_freq_cache"):
            self._inv_freq_cache = pos.text_inv_freq(self.config.text.head_dim, self.config.text.rope_theta)
        return self._inv_freq_cache

    def _image_features(self, patches: ImagePatches, fp: str) -> tuple[ImageFeatures, bool]:
        with self._cache_lock:
            if fp in self._vision_cache:
                self._vision_cache.move_to_end(fp)
                self._count("vision_cache_hits")
                return self._vision_cache[fp], True
        self._count("vision_cache_misses")
        v = self.config.vision
        cos, sin = pos.vision_cos_sin(patches.grid_thw, v.hidden_size // v.num_heads, v.rope_theta,
                                      v.spatial_merge_size)
        idx, wts = pos.vision_pos_interpolation(patches.grid_thw, v.num_position_embeddings,
                                                v.spatial_merge_size)
        outs = self.vision.run(None, {"pixel_values": patches.pixel_values, "pos_idx": idx,
                                      "pos_weights": wts, "cos": cos, "sin": sin})
        embeds = outs[0]
        deep = outs[1] if len(outs) > 1 else np.zeros((0, *embeds.shape), np.float32)
        f = ImageFeatures(embeds, deep)
        if self.options.vision_cache_entries > 0:
            with self._cache_lock:
                self._vision_cache[fp] = f
                while len(self._vision_cache) > self.options.vision_cache_entries:
                    self._vision_cache.popitem(last=False)
        return f, False

    # ---- KV slots --------------------------------------------------------------------
    def _acquire_slot(self, keys: np.ndarray, needed: int) -> tuple[KVSlot, int]:
        """The free slot sharing the longest prefix with `keys` (0 if none), grown if too small."""
        t = self.config.text
        with self._slots_lock:
            best, best_len = None, -1
            for s in self._slots:
                if s.busy:
                    continue
                n = min(s.content.size, keys.size) if self.options.prefix_cache else 0
                same = int(np.argmin(np.append(s.content[:n] == keys[:n], False)))
                if same > best_len:
                    best, best_len = s, same
            if best is None:
                best = KVSlot([], [], 0)
                self._slots.append(best)
                best_len = 0
            best.busy = True
        reuse = min(best_len, keys.size - 1)  # at least one token must run to produce logits
        cap = min(self.options.max_context, -(-needed // _KV_BLOCK) * _KV_BLOCK)
        if best.capacity < needed:
            shape = (1, t.num_kv_heads, cap, t.head_dim)
            old_k, old_v = best.keys, best.values
            best.keys = [np.zeros(shape, np.float32) for _ in range(t.num_layers)]
            best.values = [np.zeros(shape, np.float32) for _ in range(t.num_layers)]
            for new, old in zip(best.keys + best.values, old_k + old_v):
                new[:, :, :reuse] = old[:, :, :reuse]
            best.capacity = cap
        best.content = keys[:reuse].copy()
        return best, reuse

    # ---- the loop --------------------------------------------------------------------
    def _run(self, request: GenerationRequest, prompt: PreparedPrompt, feats: list[ImageFeatures],
             slot: KVSlot, reuse: int, max_new: int, timings: Timings, t_start: float) -> Iterator[Event]:
        params = request.params
        n_prompt = int(prompt.ids.size)
        timings.prefix_reused_tokens = reuse
        self._count("prefix_reused_tokens", reuse)
        binding, logits_buf = self._bind(slot)

        t_prefill = time.perf_counter()
        vis_idx, vis_emb, vis_deep = self._visual_inputs(prompt, feats, reuse)
        if request.cancel.is_set():
            yield self._finish("cancelled", n_prompt, [], timings, t_start, "")
            return
        self._step(binding, prompt.ids[reuse:], prompt.cos[reuse:], prompt.sin[reuse:], reuse,
                   vis_idx, vis_emb, vis_deep)
        slot.content = prompt.keys.copy()
        timings.prefill_ms = _ms(t_prefill)

        sampler = Sampler(params)
        detok = StreamDecoder(self.chat.tokenizer, self.special_ids)
        stops = StopMatcher(params.stop)
        text_parts: list[str] = []
        generated: list[int] = []
        history = prompt.ids.tolist()
        reason: FinishReason = "length"
        by_stop_string = False
        t_first = None
        empty_idx = np.zeros((0, 2), np.int64)
        empty_emb = np.zeros((0, self.config.text.hidden_size), np.float32)
        empty_deep = np.zeros((vis_deep.shape[0], 0, self.config.text.hidden_size), np.float32)
        constraint = request.constraint
        while len(generated) < max_new:
            if constraint is not None:
                constraint.mask(logits_buf[0])
            tok = sampler(logits_buf[0], history)
            if constraint is not None:
                constraint.advance(tok)
            generated.append(tok)
            history.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
                timings.ttft_ms = (t_first - t_start) * 1000
            if tok in self.eos_ids and not params.ignore_eos:
                reason = "stop"
                break
            piece, stopped = stops.feed(detok.push(tok))
            if piece or not stopped:
                text_parts.append(piece)
                yield TokenEvent(piece, tok)
            if stopped:
                reason, by_stop_string = "stop", True
                break
            if constraint is not None and constraint.is_done():
                reason = "stop"
                break
            if len(generated) >= max_new:
                break
            if request.cancel.is_set():
                reason = "cancelled"
                break
            p = prompt.next_position + len(generated) - 1
            cos, sin = pos.text_cos_sin(np.full((3, 1), p, np.int64), self._inv_freq,
                                        self.config.text.mrope_section, self.config.text.mrope_interleaved)
            past = n_prompt + len(generated) - 1
            self._step(binding, np.asarray([tok], np.int64), cos, sin, past, empty_idx, empty_emb, empty_deep)
            slot.content = np.append(slot.content, tok)
        if not by_stop_string:
            tail, _ = stops.feed(detok.flush())
            tail += stops.flush()
            if tail and reason != "cancelled":
                text_parts.append(tail)
                yield TokenEvent(tail, -1)
        self._count("generated_tokens", len(generated))
        n_img = sum(e - s for s, e in prompt.spans)
        yield self._finish(reason, n_prompt, generated, timings, t_start, "".join(text_parts), t_first, n_img)

    def _bind(self, slot: KVSlot) -> tuple[ort.IOBinding, np.ndarray]:
        """One buffer per layer serves as past and present: GroupQueryAttention writes in place."""
        binding = self.decoder.io_binding()
        for i in range(self.config.text.num_layers):
            for kind, bufs in (("key", slot.keys), ("value", slot.values)):
                ov = ort.OrtValue.ortvalue_from_numpy(bufs[i])
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", ov)
        logits = np.zeros((1, self.config.text.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        return binding, logits

    def prefill_logits(self, request: GenerationRequest, drop_deepstack: bool = False) -> np.ndarray:
        """The prompt's last-position logits, computed cold (no caches): what parity checks compare."""
        prompt = self._prepare(request)
        feats = []
        for patches, fp in zip(prompt.patches, prompt.fingerprints):
            f = self._image_features(patches, fp + "-uncached")[0]
            feats.append(ImageFeatures(f.embeds, np.zeros_like(f.deepstack) if drop_deepstack else f.deepstack))
        slot = KVSlot([], [], 0)
        t = self.config.text
        shape = (1, t.num_kv_heads, -(-(prompt.ids.size + 1) // _KV_BLOCK) * _KV_BLOCK, t.head_dim)
        slot.keys = [np.zeros(shape, np.float32) for _ in range(t.num_layers)]
        slot.values = [np.zeros(shape, np.float32) for _ in range(t.num_layers)]
        binding, logits = self._bind(slot)
        self._step(binding, prompt.ids, prompt.cos, prompt.sin, 0, *self._visual_inputs(prompt, feats, 0))
        with self._cache_lock:
            for fp in prompt.fingerprints:
                self._vision_cache.pop(fp + "-uncached", None)
        return logits[0].copy()

    def _visual_inputs(self, prompt: PreparedPrompt, feats: list[ImageFeatures], start: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of image features for the image tokens at or after `start` (the prefill chunk)."""
        idx, emb, deep = [], [], []
        h = self.config.text.hidden_size
        n_deep = len(self.config.vision.deepstack_visual_indexes) if self._has_deepstack else 0
        for (s, e), f in zip(prompt.spans, feats):
            if e <= start:
                continue
            skip = max(0, start - s)
            idx.append(np.arange(max(s, start), e) - start)
            emb.append(f.embeds[skip:])
            deep.append(f.deepstack[:, skip:])
        if not idx:
            return np.zeros((0, 2), np.int64), np.zeros((0, h), np.float32), np.zeros((n_deep, 0, h), np.float32)
        rows = np.concatenate(idx)
        return (np.stack([np.zeros_like(rows), rows], axis=1), np.concatenate(emb).astype(np.float32),
                np.concatenate(deep, axis=1).astype(np.float32))

    def _step(self, binding: ort.IOBinding, ids: np.ndarray, cos: np.ndarray, sin: np.ndarray, past: int,
              vis_idx: np.ndarray, vis_emb: np.ndarray, vis_deep: np.ndarray) -> None:
        total = past + ids.size
        embeds = self.embed.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)[None, :]})[0]
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("cos", np.ascontiguousarray(cos))
        binding.bind_cpu_input("sin", np.ascontiguousarray(sin))
        binding.bind_cpu_input("seqlens_k", np.asarray([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.asarray(total, np.int32))
        binding.bind_cpu_input("visual_idx", vis_idx)
        binding.bind_cpu_input("image_embeds", vis_emb)
        if self._has_deepstack:
            binding.bind_cpu_input("deepstack_embeds", vis_deep)
        try:
            self.decoder.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises its own types; one request fails, not the engine
            self._count("errors")
            raise EngineError(f"decoder failed: {e}") from e

    def _finish(self, reason: FinishReason, n_prompt: int, generated: list[int], timings: Timings,
                t_start: float, text: str, t_first: float | None = None, n_image_tokens: int = 0
                ) -> FinishEvent:
        now = time.perf_counter()
        timings.total_ms = (now - t_start) * 1000
        if t_first is not None:
            timings.decode_ms = (now - t_first) * 1000
            if len(generated) > 1 and timings.decode_ms > 0:
                timings.tokens_per_s = (len(generated) - 1) / (timings.decode_ms / 1000)
        self._count("cancelled" if reason == "cancelled" else "finished")
        return FinishEvent(reason, Usage(n_prompt, len(generated), n_image_tokens), timings, text)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n


def _fingerprint(img: Image.Image, patches: ImagePatches) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.size}{img.mode}{patches.resized_hw}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVL_CACHE", Path.home() / ".cache" / "edgevl"))


def exported_dir_for(checkpoint: Path, precision: str) -> Path:
    """Where the export of a checkpoint is cached: keyed by its path, its weights' size and mtime,
    the precision and the exporter's own source (a changed graph builder never reuses old graphs)."""
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(checkpoint.glob("*.safetensors"))]
    h = hashlib.blake2b(f"{checkpoint.resolve()}{st}".encode(), digest_size=6)
    for src in sorted((Path(__file__).parent.parent / "export").glob("*.py")):
        h.update(src.read_bytes())
    key = h.hexdigest()
    return cache_root() / "onnx" / f"{checkpoint.name}-{precision}-{key}"


def load_engine(model_path: str | Path, options: EngineOptions | None = None, warmup: bool = True) -> OrtEngine:
    """An exported folder is loaded as is; a Hugging Face checkpoint is exported once and cached."""
    options = options or EngineOptions()
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not is_exported(path):
        target = exported_dir_for(path, options.precision)
        if not is_exported(target):
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            export_model(path, tmp, options.precision)
            tmp.rename(target)
        path = target
    if options.max_memory_mb:
        from edgevl.ops.memory import check_fits

        check_fits(path, options, options.max_memory_mb * 2**20)
    engine = OrtEngine(path, options)
    if warmup:
        engine.warmup()
    return engine

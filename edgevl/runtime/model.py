"""The exported graphs behind small calls: encode an image (the vision tower's slices, through a
VisionJob), run the decoder over rows of the KV pool. Knows ONNX Runtime; knows nothing of
requests, sampling or scheduling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevl.checkpoint import ModelConfig
from edgevl.preprocess.image import ImagePatches
from edgevl.preprocess.video_patches import VideoPatches
from edgevl.runtime.vision_cache import ImageFeatures
from edgevl.runtime.vision_job import VisionJob, VisionSlice
from edgevl.types import EngineError, EngineOptions


def session_options(options: EngineOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    if not options.prepack_weights:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def open_session(path: Path, options: EngineOptions, bf16_weights: bool = False,
                 slice_of_many: bool = False) -> ort.InferenceSession:
    """`bf16_weights`: the graph widens bf16 weights at run time (GraphBuilder.fp32_weight); constant
    folding would widen them all once at load and keep them, undoing the saving.

    `slice_of_many`: one of the vision tower's slices, which run one after another with the decoder
    in between. They share one arena (the process's, see _shared_arena) instead of one each, which
    would hold a largest picture's activations per slice for good.

    Every session's pool threads spin inside a run but stop as soon as it ends
    (`session.force_spinning_stop`): the loop runs the decoder and the vision slices one after the
    other on the same cores, and a pool left spinning takes a core from the next session's run.
    Measured on the 2B int8 export, 448² pictures, 2 threads, a Xeon, four clients (the load
    bench's short scenario, traced): a vision block right after a decode step took 47 ms with the
    decoder's pool left spinning, 29 ms with it stopped (28 ms with no decoder between); a decode
    step alone is as fast either way (profile_step, b=1 and b=4)."""
    so = session_options(options)
    if slice_of_many:
        _shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"] if bf16_weights else None)


def kv_dtype(decoder: ort.InferenceSession) -> np.dtype:
    """The KV cache's element type a decoder graph takes: int8 for an export with an int8 cache."""
    past = next(i for i in decoder.get_inputs() if i.name == "past_key_values.0.key")
    return np.dtype(np.int8 if past.type == "tensor(int8)" else np.float32)


_arena_registered = False


def _shared_arena() -> None:
    """One CPU arena in ONNX Runtime's environment for the sessions that ask for it (once a process)."""
    global _arena_registered
    if not _arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _arena_registered = True


@dataclass
class Group:
    """Rows of the KV pool in one decoder run and the tokens each gets: `keys`/`values` per layer
    (rows, kv_heads, max_len, head_dim), views of the pool; `ids` (rows, new tokens); `lengths` (rows,)
    each row's total length after the run."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    ids: np.ndarray
    lengths: np.ndarray


class OnnxModel:
    def __init__(self, config: ModelConfig, vision: ort.InferenceSession | list[VisionSlice],
                 embed: ort.InferenceSession, decoder: ort.InferenceSession, groups_together: bool = False,
                 max_run_rows: int = 4096):
        """`vision`: the tower's slices in run order (runtime/vision_job.open_vision), or one session
        for the whole tower (exports before slices)."""
        self.config = config
        self.groups_together = groups_together  # the vision graph takes a clip's frame groups as a batch
        self.max_run_rows = max_run_rows  # patches per vision run when batching frame groups
        self.vision, self.embed, self.decoder = vision, embed, decoder
        self.vision_slices = vision if isinstance(vision, list) else [VisionSlice(vision, "whole")]
        self.has_deepstack = any(i.name == "deepstack_embeds" for i in decoder.get_inputs())
        self.n_deepstack = len(config.vision.deepstack_visual_indexes) if self.has_deepstack else 0
        names = {i.name for i in decoder.get_inputs()}
        # graphs exported before mixed runs take (B, S) rows only; before drafts, only the last logits
        self.can_mix = "mixed" in names
        self.has_num_logits = self.can_mix or "num_logits" in names
        t = config.text
        self.kv_dtype = kv_dtype(decoder)  # the KV pool's elements
        # group B's KV when a run has no group B: one token's room, passed through untouched
        self._spare = [np.zeros((1, t.num_kv_heads, 1, t.head_dim), self.kv_dtype) for _ in range(t.num_layers)]

    def vision_job(self, patches: ImagePatches | VideoPatches) -> VisionJob:
        """The tower over an image or a clip, to be run a few slices at a time (runtime/vision_job.py)."""
        return VisionJob(self.config, self.vision_slices, patches, self.groups_together, self.max_run_rows)

    def encode_image(self, patches: ImagePatches | VideoPatches) -> ImageFeatures:
        """An image's features, or a clip's, at once: its frame groups run as batches (attention stays
        within each group, as transformers' does) of at most `max_run_rows` patches, so a clip's vision
        activations stay within a largest image's; graphs exported before batches run one group at
        a time. Rows in time order."""
        job = self.vision_job(patches)
        job.run()
        return job.features

    def no_visual(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = self.config.text.hidden_size
        return (np.zeros((0, 2), np.int64), np.zeros((0, h), np.float32),
                np.zeros((self.n_deepstack, 0, h), np.float32))

    def decode(self, keys: list[np.ndarray], values: list[np.ndarray], ids: np.ndarray, cos: np.ndarray,
               sin: np.ndarray, lengths: np.ndarray,
               visual: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, n_logits: int = 1) -> np.ndarray:
        """One decoder run over rows with the same number of new tokens. `keys`/`values`: per layer, the
        pool rows being run, (B, heads, max_len, hd); `ids` (B, S): tokens to add after each row's past;
        `lengths` (B,): each row's total length after this run (GroupQueryAttention writes the new K/V
        at length - S in place). `cos`/`sin`: (B*S, head_dim); `visual` indices (row, position).
        → the last `n_logits` positions' logits of each row (B * n_logits, vocab)."""
        rows, s = ids.shape
        if not self.can_mix:
            return self._run_rows(keys, values, ids, cos, sin, lengths, visual, n_logits)
        if visual is not None and visual[0].size:  # (row, position) → (0, packed position)
            visual = (np.stack([np.zeros(len(visual[0]), np.int64), visual[0][:, 0] * s + visual[0][:, 1]], 1),
                      *visual[1:])
        last = (np.arange(rows)[:, None] * s + np.arange(s - n_logits, s)[None, :]).reshape(-1)
        return self.run(Group(keys, values, ids, lengths), None, cos, sin, visual, last)

    def run(self, a: Group, b: Group | None, cos: np.ndarray, sin: np.ndarray,
            visual: tuple[np.ndarray, np.ndarray, np.ndarray] | None, logit_idx: np.ndarray) -> np.ndarray:
        """One decoder run carrying group A (rows with the same number of new tokens each) and, in a
        mixed run, group B (one row with a number of its own: a newcomer's prompt slice while A's rows
        decode). Tokens are packed A row by row, then B: `cos`/`sin` (T, head_dim) in that order,
        `visual` indices (0, packed position), `logit_idx` the packed positions whose logits are wanted.
        → (len(logit_idx), vocab)."""
        bind = self.decoder.io_binding()
        kv_b = (b.keys, b.values) if b is not None else (self._spare, self._spare)
        for i in range(len(a.keys)):
            for kind, arr, arr_b in (("key", a.keys[i], kv_b[0][i]), ("value", a.values[i], kv_b[1][i])):
                for past, present, buf in (("past_key_values", "present", arr), ("b_key_values", "b_present", arr_b)):
                    ov = ort.OrtValue.ortvalue_from_numpy(buf)
                    bind.bind_ortvalue_input(f"{past}.{i}.{kind}", ov)
                    bind.bind_ortvalue_output(f"{present}.{i}.{kind}", ov)
        logits = np.empty((len(logit_idx), self.config.text.vocab_size), np.float32)
        bind.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        ids = a.ids.reshape(-1) if b is None else np.concatenate([a.ids.reshape(-1), b.ids.reshape(-1)])
        b_lengths = b.lengths if b is not None else np.ones(1, np.int64)
        try:
            self._bind_shared(bind, ids[None, :], cos, sin, a.lengths, visual)
            bind.bind_cpu_input("mixed", np.asarray(b is not None))
            bind.bind_cpu_input("a_shape", np.asarray(a.ids.shape, np.int64))
            bind.bind_cpu_input("b_seqlens_k", np.ascontiguousarray(b_lengths - 1, dtype=np.int32))
            bind.bind_cpu_input("b_total_sequence_length", np.asarray(int(b_lengths.max()), np.int32))
            bind.bind_cpu_input("logit_idx", np.ascontiguousarray(logit_idx, dtype=np.int64))
            self.decoder.run_with_iobinding(bind)
        except Exception as e:
            raise EngineError(f"decoder failed: {e}") from e
        return logits

    def _run_rows(self, keys: list[np.ndarray], values: list[np.ndarray], ids: np.ndarray, cos: np.ndarray,
                  sin: np.ndarray, lengths: np.ndarray,
                  visual: tuple[np.ndarray, np.ndarray, np.ndarray] | None, n_logits: int) -> np.ndarray:
        """`decode` on graphs exported before mixed runs (inputs (B, S, ·), logits of the last positions)."""
        b = self.decoder.io_binding()
        for i, (k, v) in enumerate(zip(keys, values)):
            for kind, arr in (("key", k), ("value", v)):
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                b.bind_ortvalue_output(f"present.{i}.{kind}", ov)
        logits = np.empty((ids.shape[0] * n_logits, self.config.text.vocab_size), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        try:
            self._bind_shared(b, ids, cos, sin, lengths, visual)
            if self.has_num_logits:
                b.bind_cpu_input("num_logits", np.asarray([n_logits], np.int64))
            self.decoder.run_with_iobinding(b)
        except Exception as e:
            raise EngineError(f"decoder failed: {e}") from e
        return logits

    def _bind_shared(self, bind: ort.IOBinding, ids: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                     lengths: np.ndarray, visual: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        """The inputs both decoder layouts take: the tokens' embeddings, their angles, group A's
        lengths, and the image features scattered in."""
        vis_idx, vis_emb, vis_deep = visual if visual is not None else self.no_visual()
        bind.bind_cpu_input("inputs_embeds",
                            self.embed.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0])
        bind.bind_cpu_input("cos", np.ascontiguousarray(cos, dtype=np.float32))
        bind.bind_cpu_input("sin", np.ascontiguousarray(sin, dtype=np.float32))
        bind.bind_cpu_input("seqlens_k", np.ascontiguousarray(lengths - 1, dtype=np.int32))
        bind.bind_cpu_input("total_sequence_length", np.asarray(int(lengths.max()), np.int32))
        bind.bind_cpu_input("visual_idx", vis_idx)
        bind.bind_cpu_input("image_embeds", vis_emb)
        if self.has_deepstack:
            bind.bind_cpu_input("deepstack_embeds", vis_deep)

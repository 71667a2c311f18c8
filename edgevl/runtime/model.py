"""The exported graphs behind small calls: encode an image (the vision tower's slices, through a
VisionJob), run the decoder over rows of the KV pool. Knows ONNX Runtime; knows nothing of
requests, sampling or scheduling."""

from __future__ import annotations

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
    return so


def open_session(path: Path, options: EngineOptions, bf16_weights: bool = False,
                 slice_of_many: bool = False) -> ort.InferenceSession:
    """`bf16_weights`: the graph widens bf16 weights at run time (GraphBuilder.fp32_weight); constant
    folding would widen them all once at load and keep them, undoing the saving.

    `slice_of_many`: one of the vision tower's slices, which run one after another with the decoder
    in between. They share one arena (the process's, see _shared_arena) instead of one each, which
    would hold a largest picture's activations per slice for good; and their threads sleep as soon
    as a run ends: spinning, they would take the cores from the next slice or decoder step. Measured
    on the 2B int8 tower at 448², 2 threads, a busy machine: spinning slices took ~35% longer than
    the whole graph, slices without an arena ~11%, shared-arena non-spinning slices the same time."""
    so = session_options(options)
    if slice_of_many:
        _shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"] if bf16_weights else None)


_arena_registered = False


def _shared_arena() -> None:
    """One CPU arena in ONNX Runtime's environment for the sessions that ask for it (once a process)."""
    global _arena_registered
    if not _arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _arena_registered = True


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
        # exports made before it compute the last position's logits only (no jump-forward drafts)
        self.has_num_logits = any(i.name == "num_logits" for i in decoder.get_inputs())

    def vision_job(self, patches: ImagePatches | VideoPatches) -> VisionJob:
        """The tower over an image or a clip, to be run a few slices at a time (runtime/vision_job.py)."""
        return VisionJob(self.config, self.vision_slices, patches, self.groups_together, self.max_run_rows)

    def encode_image(self, patches: ImagePatches | VideoPatches) -> ImageFeatures:
        """An image's features, or a clip's, at once: its frame groups run as batches (attention stays
        within each group, as transformers' does) of at most `max_run_rows` patches, so a clip's vision
        activations stay within a largest image's; graphs exported before batches run one group at
        a time. Rows in time order."""
        job = self.vision_job(patches)
        job.run(None)
        return job.features

    def no_visual(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = self.config.text.hidden_size
        return (np.zeros((0, 2), np.int64), np.zeros((0, h), np.float32),
                np.zeros((self.n_deepstack, 0, h), np.float32))

    def decode(self, keys: list[np.ndarray], values: list[np.ndarray], ids: np.ndarray, cos: np.ndarray,
               sin: np.ndarray, lengths: np.ndarray,
               visual: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, n_logits: int = 1) -> np.ndarray:
        """One decoder run. `keys`/`values`: per layer, the pool rows being run, (B, heads, max_len, hd);
        `ids` (B, S): tokens to add after each row's past; `lengths` (B,): each row's total length
        after this run (GroupQueryAttention writes the new K/V at length - S in place).
        `cos`/`sin`: (B*S, head_dim). → the last `n_logits` positions' logits (B * n_logits, vocab)."""
        b = self.decoder.io_binding()
        for i, (k, v) in enumerate(zip(keys, values)):
            for kind, arr in (("key", k), ("value", v)):
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                b.bind_ortvalue_output(f"present.{i}.{kind}", ov)
        logits = np.empty((ids.shape[0] * n_logits, self.config.text.vocab_size), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        vis_idx, vis_emb, vis_deep = visual if visual is not None else self.no_visual()
        try:
            embeds = self.embed.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]
            b.bind_cpu_input("inputs_embeds", embeds)
            b.bind_cpu_input("cos", np.ascontiguousarray(cos, dtype=np.float32))
            b.bind_cpu_input("sin", np.ascontiguousarray(sin, dtype=np.float32))
            b.bind_cpu_input("seqlens_k", np.ascontiguousarray(lengths - 1, dtype=np.int32))
            b.bind_cpu_input("total_sequence_length", np.asarray(int(lengths.max()), np.int32))
            b.bind_cpu_input("visual_idx", vis_idx)
            b.bind_cpu_input("image_embeds", vis_emb)
            if self.has_deepstack:
                b.bind_cpu_input("deepstack_embeds", vis_deep)
            if self.has_num_logits:
                b.bind_cpu_input("num_logits", np.asarray([n_logits], np.int64))
            self.decoder.run_with_iobinding(b)
        except Exception as e:
            raise EngineError(f"decoder failed: {e}") from e
        return logits

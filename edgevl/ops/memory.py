"""Predict a model's resident memory before loading it, so a box refuses cleanly instead of being
OOM-killed an hour later.

Resident set ≈ weights that stay resident (vision + decoder; the embedding table is memory-mapped
and only touched rows count) + the KV pool's ceiling (--kv-cache-mb, or every batch row at full
context in the export's cache type if that is less) + the vision tower's
activations for the largest image allowed (CPU attention materialises heads × N × N scores)
+ a fixed runtime overhead. Measured on the 2B model (docs/benchmarks.md), the estimate is within
about 10% and errs high.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.checkpoint import ModelConfig
from edgevl.export.manifest import Manifest
from edgevl.types import EngineOptions

RUNTIME_OVERHEAD = 400 * 2**20  # interpreter, onnxruntime, tokenizer, arenas


class MemoryBudgetError(RuntimeError):
    pass


def estimate_bytes(folder: Path, options: EngineOptions) -> dict[str, int]:
    cfg = ModelConfig.read(folder)
    # the vision tower is vision.onnx, or its slices vision_embed / vision_blocks.<i> / vision_merger
    weights = sum(f.stat().st_size for f in [*folder.glob("vision*.onnx.data"), folder / "decoder.onnx.data"]
                  if f.exists())
    t, v = cfg.text, cfg.vision
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * (1 if Manifest.read(folder).kv_cache == "int8" else 4)
    kv = min(options.kv_cache_mb * 2**20, per_token * options.max_context * options.max_batch)
    patches = options.max_pixels // (v.patch_size**2)
    vision = v.num_heads * patches * patches * 4 + 8 * patches * v.intermediate_size * 4
    return {"weights": weights, "kv_cache": kv, "vision_activations": vision, "runtime": RUNTIME_OVERHEAD,
            "total": weights + kv + vision + RUNTIME_OVERHEAD}


def check_fits(folder: Path, options: EngineOptions, limit_bytes: int) -> dict[str, int]:
    est = estimate_bytes(folder, options)
    if est["total"] > limit_bytes:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in est.items() if k != "total")
        raise MemoryBudgetError(
            f"the model would need about {est['total'] / 2**30:.2f} GiB ({parts}) but --max-memory is "
            f"{limit_bytes / 2**30:.2f} GiB: use a smaller precision (--precision int8 or int4), a smaller "
            f"--kv-cache-mb, --max-context or --max-pixels, or raise the limit")
    return est

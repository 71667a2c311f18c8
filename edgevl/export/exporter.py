"""The exporter: a checkpoint folder → ONNX graphs + manifest, ready for the runtime engine (no torch
needed)."""

from __future__ import annotations

import dataclasses
import shutil
import time
import typing
from pathlib import Path

from edgevl.checkpoint import ModelConfig, Weights, load_checkpoint
from edgevl.export.builder import GraphBuilder, QuantSpec
from edgevl.export.decoder import build_decoder, build_embedding, embedding_precision
from edgevl.export.kv_scales import KVScales, calibration_ids, measure_kv_scales
from edgevl.export.manifest import Manifest
from edgevl.export.quantize import int8_gemm_saturates
from edgevl.export.vision import build_vision, build_vision_slices
from edgevl.types import KVCache

PRECISIONS: dict[str, QuantSpec | None] = {
    "fp32": None,
    # per-channel int8 + integer GEMM: 3x faster prompts than MatMulNBits-8 on VNNI CPUs (docs/quantization.md)
    "int8": QuantSpec(method="dynamic", bits=8),
    "int4": QuantSpec(method="nbits", bits=4, block_size=128),  # block 128: 1.5x faster decode than 32
    "int8-nbits": QuantSpec(method="nbits", bits=8, block_size=32),  # kept to measure int8 against
    # int8 with a scale per activation row: an answer does not depend on what runs beside it
    "int8-rowwise": QuantSpec(method="dynamic", bits=8, per_row=True),
}
# the vision tower is compute-bound: integer GEMM helps it, 4-bit weights do not
DEFAULT_VISION_PRECISION = {"fp32": "fp32", "int8": "int8", "int4": "int8", "int8-nbits": "int8",
                            "int8-rowwise": "int8-rowwise"}
_COPIED = ("config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
           "tokenizer.json",
           "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
           "edgevl_random_weights.json")


def _calibrated_kv_scales(folder: Path, out: Path, cfg: ModelConfig, weights: Weights, quant: QuantSpec | None,
                          head: QuantSpec | None) -> list[KVScales]:
    """The int8 KV cache's scales, from a float-cache decoder of the same precision (then deleted)."""
    name = "decoder_kv_calibration"
    cb = GraphBuilder(name, out, quant)
    build_decoder(cb, cfg, weights, lm_head=head)
    path = cb.save("float-cache decoder to calibrate the int8 KV cache's scales")
    try:
        return measure_kv_scales(path, cfg, weights, calibration_ids(folder / "tokenizer.json"))
    finally:
        path.unlink()
        (out / f"{name}.onnx.data").unlink()


# patches per vision chunk: a 448² picture (784 patches) stays one chunk; a 1024² page (4,096) runs
# each block in four, each costing about a 448² picture's block
VISION_CHUNK_ROWS = 1024


def export_model(checkpoint: str | Path, out: str | Path, precision: str = "fp32",
                 vision_precision: str | None = None, lm_head_precision: str | None = None,
                 vision_blocks_per_slice: int = 1, vision_chunk_rows: int = VISION_CHUNK_ROWS,
                 kv_cache: str = "fp32") -> Path:
    """Write the vision tower's slices, embed.onnx and decoder.onnx (each with its .data), the
    tokenizer/processor files and a manifest.

    The vision tower is written in slices (export/vision.py: `vision_embed`, `vision_blocks.<i>` of
    `vision_blocks_per_slice` blocks each, `vision_merger`) that the batch loop runs between decoder
    steps; `vision_blocks_per_slice=0` writes the whole tower as one `vision.onnx` instead (as
    exports before slices did). `vision_chunk_rows` > 0 splits every block so that it runs over
    chunks of at most that many patches (export/vision.py); 0 runs each block over a picture at once.

    `vision_precision` defaults to DEFAULT_VISION_PRECISION[precision] (int8 for the 4-bit exports:
    the vision tower is compute-bound and small; fp32 may be asked for while the bandwidth-bound
    decoder is quantized). `lm_head_precision` defaults to `precision`, but int8 under int4: the
    last layer decides every token.

    `kv_cache` "int8" stores the KV cache as int8 with a fixed scale per head and channel, measured
    by running the float-cache decoder over calibration text first (export/kv_scales.py): a quarter
    of fp32's memory per token, and less to read per step when answers run long.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if kv_cache not in typing.get_args(KVCache):
        raise ValueError(f"kv_cache must be one of {', '.join(typing.get_args(KVCache))}")
    vision_precision = vision_precision or DEFAULT_VISION_PRECISION[precision]
    # the last layer decides every token: keep it int8 when the body is 4-bit
    lm_head_precision = lm_head_precision or {"int4": "int8"}.get(precision, precision)
    unsigned = int8_gemm_saturates()

    def spec(name: str) -> QuantSpec | None:
        q = PRECISIONS[name]
        return dataclasses.replace(q, unsigned_weights=unsigned) if q is not None and q.method == "dynamic" else q

    ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = ckpt.weights()
    try:
        # fp32 vision keeps the checkpoint's bf16 weights as they are: 0.75 GB less for the 2B
        def vision_builder(name: str) -> GraphBuilder:
            return GraphBuilder(name, out, spec(vision_precision), bf16_weights=vision_precision == "fp32")

        slices = None
        if vision_blocks_per_slice > 0:
            slices = build_vision_slices(out, ckpt.config, weights, vision_builder, vision_blocks_per_slice,
                                         vision_chunk_rows)
            vision_widened = bool(slices.pop("bf16_weight_graphs"))
        else:
            vb = vision_builder("vision")
            build_vision(vb, ckpt.config, weights)
            vb.save("Qwen3-VL vision tower: one image, or a clip's frame groups as a batch, per run")
            vision_widened = bool(vb.widened)
        scales = _calibrated_kv_scales(ckpt.folder, out, ckpt.config, weights, spec(precision),
                                       spec(lm_head_precision)) if kv_cache == "int8" else None
        db = GraphBuilder("decoder", out, spec(precision))
        build_decoder(db, ckpt.config, weights, lm_head=spec(lm_head_precision), kv_scales=scales)
        db.save(f"Qwen3-VL language model with GroupQueryAttention KV cache ({kv_cache}) and DeepStack")
        embed_precision = embedding_precision(ckpt.config, weights, PRECISIONS[lm_head_precision])
        eb = GraphBuilder("embed", out)
        build_embedding(eb, ckpt.config, weights, embed_precision)
        eb.save(f"Qwen3-VL token embedding ({embed_precision})")
    finally:
        weights.close()
    for name in _COPIED:
        if (ckpt.folder / name).is_file():
            shutil.copy2(ckpt.folder / name, out / name)
    graphs = {"embed": "embed.onnx", "decoder": "decoder.onnx", **({} if slices else {"vision": "vision.onnx"})}
    Manifest(model_name=ckpt.name, source=str(ckpt.folder.resolve()), precision=precision,
             vision_precision=vision_precision, lm_head_precision=lm_head_precision,
             random_weights=ckpt.random_weights, embedding_precision=embed_precision,
             int8_unsigned_weights=unsigned, graphs=graphs, bf16_weight_graphs=["vision"] if vision_widened else [],
             vision_runs_frame_groups_together=True, vision_slices=slices, kv_cache=kv_cache,
             export_seconds=round(time.perf_counter() - t0, 2)).write(out)
    return out

"""Block-wise weight quantization in MatMulNBits' layout (asymmetric, uint zero points)."""

from __future__ import annotations

import numpy as np


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch-layout weight (N, K) → packed (N, n_blocks, block_size*bits/8) uint8, scales (N*n_blocks,),
    zero points packed (N * ceil(n_blocks*bits/8),) uint8; uses ONNX Runtime's own C++ quantizer."""
    from onnxruntime.capi import _pybind_state as ort_c

    n, k = w.shape
    n_blocks = (k + block_size - 1) // block_size
    blob = block_size * bits // 8
    packed = np.zeros((n, n_blocks, blob), dtype=np.uint8)
    zp_bytes = (n_blocks * bits + 7) // 8
    zeros = np.zeros((n, zp_bytes), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    # ORT's quantizer takes the (K, N) layout of a MatMul's B input
    b = np.ascontiguousarray(w.T.astype(np.float32))
    if bits == 4:
        ort_c.quantize_matmul_4bits(packed, b, scales, zeros, block_size, n, k, False)
    elif bits == 8:
        ort_c.quantize_matmul_8bits(packed, b, scales, zeros, block_size, n, k, False)
    else:
        raise ValueError("bits must be 4 or 8")
    return packed, scales.reshape(-1), zeros.reshape(-1)


def quantize_per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch-layout weight (N, K) → symmetric int8 B in MatMul layout (K, N) and per-column scales (N,)."""
    w = w.astype(np.float32)
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale.astype(np.float32)


def int8_gemm_saturates(flags: set[str] | None = None) -> bool:
    """True on an x86 CPU without VNNI, where int8 weights are stored as uint8 (see below).

    Without VNNI, ONNX Runtime's u8×s8 GEMM multiplies with VPMADDUBSW, which adds pairs of
    products into int16 and saturates: with one-sided activations (zero point near 0, values up to
    255) and weights near ±127 the sums clip. Measured on an AVX2-only AMD EPYC: up to 7% relative
    error against exact integer arithmetic, and the tiny model's int8 logits at cosine 0.976 against
    fp32. The same integers stored as uint8 with zero point 128 take the u8×u8 kernel, which widens
    to int16 before multiplying: exact, with all 8 bits kept (7-bit weights, ONNX Runtime's
    `reduce_range`, also avoid it but double the weights' error). With VNNI, products go to int32."""
    from edgevl.ops.doctor import cpu_flags

    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx2", "avx"}) and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}

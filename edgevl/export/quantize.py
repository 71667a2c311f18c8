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

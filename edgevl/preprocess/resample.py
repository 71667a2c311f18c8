"""Antialiased bicubic resize of uint8 frames, bit-exact with PyTorch's CPU kernel.

transformers' video processor resizes frames with torchvision, which on CPU runs
`F.interpolate(uint8, mode="bicubic", antialias=True)`: PIL's filter (Keys cubic, a = -0.5,
support scaled by the reduction) but with int16 weights at a precision chosen per axis, and
the width pass before the height pass, each rounded and clamped to uint8. PIL's own resize
differs from it by a few levels, so the video path reproduces PyTorch's arithmetic here
(aten/src/ATen/native/cpu/UpSampleKernel.cpp: `_compute_indices_min_size_weights_aa`,
`_compute_index_ranges_int16_weights`, `basic_loop_aa_horizontal<uint8_t>`).
"""

from __future__ import annotations

import numpy as np

_BLOCK_BYTES = 1 << 20


def _cubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first source index per output (O,), int64 weights (O, K), precision bits) for one axis."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    k = int(np.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C casts truncate toward zero
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin, 0, k)
    j = np.arange(k)
    w = _cubic((j[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    w = np.where(j[None, :] < xsize[:, None], w, 0.0)
    total = np.zeros(out_size)
    for col in range(k):  # sequential sums, as the C loop adds them
        total += w[:, col]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    wt_max = float(w.max()) if w.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    ints = np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int64)
    return xmin, ints, precision


def _pass(x: np.ndarray, out_size: int) -> np.ndarray:
    """One separable pass over axis 0 of a contiguous uint8 array, rounded and clamped as PyTorch
    does. Axis 0 so that every tap gathers whole rows; the other axes are worked through in
    column blocks of about 1 MB of int32 each, so the taps' passes stay in cache, into buffers
    made once (whole-array passes made a clip's preprocessing twice as long)."""
    xmin, w, precision = axis_weights(x.shape[0], out_size)
    rows = x.reshape(x.shape[0], -1)
    # a tap past the edge has weight 0: clamping its index is harmless
    taps = np.minimum(xmin[None, :] + np.arange(w.shape[1])[:, None], x.shape[0] - 1)  # (K, out)
    weights = w.T.astype(np.int32)[:, :, None]  # (K, out, 1)
    out = np.empty((out_size, rows.shape[1]), np.uint8)
    block = max(1, _BLOCK_BYTES // (4 * x.shape[0]))
    acc_buf = np.empty((out_size, block), np.int32)
    tap_buf = np.empty((out_size, block), np.int32)
    for lo in range(0, rows.shape[1], block):
        hi = min(lo + block, rows.shape[1])
        src = rows[:, lo:hi].astype(np.int32)
        acc, tap = acc_buf[:, :hi - lo], tap_buf[:, :hi - lo]
        acc.fill(1 << (precision - 1))
        for j in range(taps.shape[0]):
            np.take(src, taps[j], axis=0, out=tap)
            tap *= weights[j]
            acc += tap
        acc >>= precision
        out[:, lo:hi] = np.clip(acc, 0, 255, out=acc)
    return out.reshape(out_size, *x.shape[1:])


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, C) uint8 → (N, height, width, C) uint8: the width pass first, as PyTorch."""
    out = frames
    if out.shape[2] != width:
        out = np.moveaxis(_pass(np.ascontiguousarray(np.moveaxis(out, 2, 0)), width), 0, 2)
    if out.shape[1] != height:
        out = np.moveaxis(_pass(np.ascontiguousarray(np.moveaxis(out, 1, 0)), height), 0, 1)
    return np.ascontiguousarray(out)

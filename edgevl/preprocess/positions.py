"""Rotary positions: Qwen3-VL's 3-D MRoPE for the text model, 2-D axial RoPE for the vision tower.

Computed on the host in float32 exactly as transformers does, then fed to the graphs as
cos/sin tables: the graphs stay free of position logic and prefix reuse is just slicing.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(
    n_tokens: int, image_spans: list[tuple[int, int]], image_grids: list[tuple[int, int, int]],
    merge_size: int,
) -> tuple[np.ndarray, int]:
    """(3, S) int64 positions (temporal, height, width) and the next free position.

    Text tokens advance all three axes together; an image's tokens take a grid of positions
    starting at the current offset, which then advances by the grid's longer side.
    """
    pos = np.zeros((3, n_tokens), dtype=np.int64)
    cur = 0
    i = 0
    for (start, end), (t, h, w) in zip(image_spans, image_grids):
        pos[:, i:start] = np.arange(start - i) + cur
        cur += start - i
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pos[0, start:end] = tt.ravel() + cur
        pos[1, start:end] = hh.ravel() + cur
        pos[2, start:end] = ww.ravel() + cur
        cur += max(gh, gw)
        i = end
    pos[:, i:] = np.arange(n_tokens - i) + cur
    cur += n_tokens - i
    return pos, cur


def text_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


def text_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, mrope_section: tuple[int, ...], interleaved: bool
) -> tuple[np.ndarray, np.ndarray]:
    """positions (3, S) → cos, sin (S, head_dim) float32."""
    freqs = positions[..., None].astype(np.float32) * inv_freq  # (3, S, D/2)
    cos, sin = np.cos(freqs), np.sin(freqs)

    def recompose(f: np.ndarray) -> np.ndarray:
        out = f[0].copy()
        if interleaved:  # T H W T H W ... over the first 3*section entries
            for axis, offset in ((1, 1), (2, 2)):
                idx = slice(offset, mrope_section[axis] * 3, 3)
                out[..., idx] = f[axis][..., idx]
        else:  # contiguous sections, as Qwen2.5-VL
            s0, s1 = mrope_section[0], mrope_section[0] + mrope_section[1]
            out[..., s0:s1] = f[1][..., s0:s1]
            out[..., s1:] = f[2][..., s1:]
        return np.concatenate([out, out], axis=-1)

    return recompose(cos).astype(np.float32), recompose(sin).astype(np.float32)


def vision_cos_sin(grid_thw: tuple[int, int, int], head_dim: int, theta: float, merge: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Axial 2-D rotary tables for the patches of one image, in merge-block order."""
    t, h, w = grid_thw
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = np.tile(hpos.reshape(shape).transpose(0, 2, 1, 3).ravel(), t)
    wpos = np.tile(wpos.reshape(shape).transpose(0, 2, 1, 3).ravel(), t)
    spatial = head_dim // 2
    exps = np.arange(0, spatial, 2, dtype=np.int64).astype(np.float32) / np.float32(spatial)
    inv = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    fh = hpos[:, None].astype(np.float32) * inv
    fw = wpos[:, None].astype(np.float32) * inv
    cos = np.concatenate([np.cos(fh), np.cos(fw)], axis=-1)
    sin = np.concatenate([np.sin(fh), np.sin(fw)], axis=-1)
    return (np.concatenate([cos, cos], -1).astype(np.float32),
            np.concatenate([sin, sin], -1).astype(np.float32))


def vision_pos_interpolation(grid_thw: tuple[int, int, int], num_pos: int, merge: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners) taps into the learnt square position table: (N, 4) idx, weights."""
    side = int(round(num_pos ** 0.5))
    t, h, w = grid_thw
    within = np.arange(t * h * w) % (h * w)
    blocks_w = w // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    row, col = block_row * merge + in_row, block_col * merge + in_col

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        dist = np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32))
        return taps, np.clip(1 - dist, 0, None).astype(np.float32)

    ht, hw_ = axis(row, h)
    wt, ww = axis(col, w)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4).astype(np.float32)
    return idx, wts

"""Sampled frames → Qwen3-VL video patches and the per-frame-group timestamps of the prompt.

The layout is transformers' Qwen3VLVideoProcessor: one `smart_resize` for the whole clip (its
pixel budget counts every frame), torchvision's antialiased bicubic (resample.py), mean/std
folded into one float32 subtract-and-divide, the last frame repeated to fill a temporal patch,
and patches in (group, merge block, channel, frame, row, column) order. The tests compare both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.preprocess.image import ImageError, ImagePatches, ImageProcessorConfig
from edgevl.preprocess.resample import resize_bicubic_aa
from edgevl.types import VideoPart

# Qwen3VLVideoProcessor's class defaults, for a checkpoint without video_preprocessor_config.json
_DEFAULT_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}


def video_processor_config(folder: str | Path, image_config: dict) -> ImageProcessorConfig:
    path = Path(folder) / "video_preprocessor_config.json"
    d = json.loads(path.read_text()) if path.is_file() else {**image_config, "size": _DEFAULT_SIZE}
    return ImageProcessorConfig.from_dict(d)


def video_target_size(n_frames: int, height: int, width: int, cfg: ImageProcessorConfig,
                      max_pixels: int | None = None) -> tuple[int, int]:
    """Qwen3-VL's video smart_resize: the area budget covers all frames (t x h x w)."""
    factor, temporal = cfg.patch_size * cfg.merge_size, cfg.temporal_patch_size
    budget = max(cfg.min_pixels, min(max_pixels or cfg.max_pixels, cfg.max_pixels))
    if n_frames < temporal:
        raise ImageError(f"a video needs at least {temporal} frames", code="too_few_frames")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ImageError("the video's aspect ratio is over the limit of 200:1", code="invalid_video")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(n_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > budget:
        beta = math.sqrt((n_frames * height * width) / budget)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (n_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def group_timestamps(times: list[float], temporal: int) -> list[float]:
    """One time per frame group: the mean of its first and last frame (Qwen3VLProcessor)."""
    t = list(times) + [times[-1]] * (-len(times) % temporal)
    return [(t[i] + t[i + temporal - 1]) / 2 for i in range(0, len(t), temporal)]


@dataclass
class VideoPatches:
    pixel_values: np.ndarray  # (grid_t * grid_h * grid_w, C * T * P * P) float32
    grid_thw: tuple[int, int, int]
    resized_hw: tuple[int, int]
    merge_size: int
    timestamps: list[float]  # seconds, one per frame group

    @property
    def tokens_per_group(self) -> int:
        _, h, w = self.grid_thw
        return h * w // (self.merge_size * self.merge_size)

    @property
    def n_tokens(self) -> int:
        return self.grid_thw[0] * self.tokens_per_group

    def groups(self) -> list[ImagePatches]:
        """Each frame group as an image: the vision tower attends within a group only."""
        t, h, w = self.grid_thw
        return [ImagePatches(self.pixel_values[g * h * w:(g + 1) * h * w], (1, h, w), self.resized_hw,
                             self.resized_hw, self.merge_size) for g in range(t)]


def patchify_video(video: VideoPart, cfg: ImageProcessorConfig, max_pixels: int | None = None) -> VideoPatches:
    frames = video.frames
    n, height, width = frames.shape[:3]
    rh, rw = video_target_size(n, height, width, cfg, max_pixels)
    x = resize_bicubic_aa(frames, rh, rw)
    mean = np.asarray(cfg.image_mean, np.float32) * np.float32(255.0)
    std = np.asarray(cfg.image_std, np.float32) * np.float32(255.0)
    x = ((x.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)  # (n, C, H, W)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -n % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    gt, gh, gw, c = x.shape[0] // tp, rh // p, rw // p, x.shape[1]
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32)
    return VideoPatches(pixel_values, (gt, gh, gw), (rh, rw), m, group_timestamps(video.times, tp))

"""transformers' Qwen3-VL video processing, assembled from its parts (torchvision is not needed).

Qwen3VLVideoProcessor requires torchvision to be instantiated, so its steps are called here one by
one: transformers' own `smart_resize`, `patchify` and `Qwen3VLProcessor.replace_video_token`
(unbound, on a stand-in `self`), with torchvision's CPU resize written out as the `interpolate`
call it makes (torchvision `resize_image`: uint8 bicubic stays uint8, antialias on) and its fused
rescale + normalize (`TorchvisionBackend.rescale_and_normalize`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgevl.types import VideoPart


class ReferenceVideoProcessor:
    def __init__(self, folder: Path, max_pixels: int | None = None):
        path = folder / "video_preprocessor_config.json"
        d = json.loads(path.read_text()) if path.is_file() else {}
        size = d.get("size", {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768})
        self.min_pixels = size["shortest_edge"]
        self.max_pixels = size["longest_edge"] if max_pixels is None else min(max_pixels, size["longest_edge"])
        self.max_pixels = max(self.max_pixels, self.min_pixels)
        self.patch_size = d.get("patch_size", 16)
        self.temporal_patch_size = d.get("temporal_patch_size", 2)
        self.merge_size = d.get("merge_size", 2)
        self.mean = d.get("image_mean", [0.5, 0.5, 0.5])
        self.std = d.get("image_std", [0.5, 0.5, 0.5])

    def __call__(self, video: VideoPart) -> tuple:
        """→ (pixel_values_videos, video_grid_thw (1, 3), prompt text replacing `<|video_pad|>`)."""
        import torch
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
        from transformers.video_utils import VideoMetadata

        x = torch.from_numpy(np.ascontiguousarray(video.frames)).permute(0, 3, 1, 2).contiguous()
        n, _, h, w = x.shape
        rh, rw = smart_resize(num_frames=n, height=h, width=w, temporal_factor=self.temporal_patch_size,
                              factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels)
        if (rh, rw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=[rh, rw], mode="bicubic", align_corners=False,
                                                antialias=True)
        mean = torch.tensor(self.mean) * (1.0 / (1 / 255))
        std = torch.tensor(self.std) * (1.0 / (1 / 255))
        x = x.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        patches, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, x[None], patch_size=self.patch_size,
                                                             merge_size=self.merge_size,
                                                             temporal_patch_size=self.temporal_patch_size)
        grid = torch.tensor([[gt, gh, gw]])
        # times = index / fps with fps 1: the processor's own timestamp arithmetic on our times
        meta = VideoMetadata(total_num_frames=n, fps=1.0, frames_indices=list(video.times))
        stand_in = SimpleNamespace(
            video_processor=SimpleNamespace(merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size),
            video_token="<|video_pad|>", vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
        stand_in._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(stand_in, *a)
        text = Qwen3VLProcessor.replace_video_token(stand_in, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)
        return patches[0], grid, text

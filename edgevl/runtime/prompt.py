"""A request's messages made ready for the model: token ids, image patches, MRoPE tables, and
the keys that prefix matching compares (image tokens stand for their image's fingerprint)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgevl.checkpoint import ModelConfig
from edgevl.preprocess import positions as pos
from edgevl.preprocess.chat import ChatFormatter, images_in
from edgevl.preprocess.image import ImagePatches, ImageProcessorConfig, patchify
from edgevl.types import EngineOptions, GenerationRequest, InputError


@dataclass
class PreparedPrompt:
    ids: np.ndarray
    keys: np.ndarray  # ids with image tokens replaced by a per-image fingerprint (prefix matching)
    cos: np.ndarray  # (S, head_dim) per token
    sin: np.ndarray
    next_position: int  # the MRoPE position of the first answer token
    patches: list[ImagePatches]
    spans: list[tuple[int, int]]  # [start, end) of each image's tokens
    fingerprints: list[str]

    @property
    def n_image_tokens(self) -> int:
        return sum(e - s for s, e in self.spans)


class PromptBuilder:
    def __init__(self, folder: Path, config: ModelConfig, ipc: ImageProcessorConfig, options: EngineOptions):
        self.config = config
        self.ipc = ipc
        self.options = options
        self.chat = ChatFormatter(folder, config.image_token_id)
        t = config.text
        self.inv_freq = pos.text_inv_freq(t.head_dim, t.rope_theta)

    def build(self, request: GenerationRequest, with_positions: bool = True) -> PreparedPrompt:
        images = images_in(request.messages)
        if len(images) > self.options.max_images:
            raise InputError(f"{len(images)} images in one request; the limit is {self.options.max_images}",
                             code="too_many_images", param="images")
        budget = min(request.max_pixels or self.options.max_pixels, self.options.max_pixels)
        patches = [patchify(p.image, self.ipc, budget) for p in images]
        try:
            chat = self.chat.encode(request.messages, [p.n_tokens for p in patches])
        except ValueError as e:
            raise InputError(str(e)) from e
        fps = [_fingerprint(p.image, pt) for p, pt in zip(images, patches)]
        keys = chat.ids.copy()
        for (s, e), fp in zip(chat.image_spans, fps):
            keys[s:e] = -1 - (int(fp[:15], 16))  # negative: never equal to a real token id
        if not with_positions:
            return PreparedPrompt(chat.ids, keys, np.empty(0), np.empty(0), 0, patches, chat.image_spans, fps)
        positions, next_pos = pos.mrope_positions(chat.ids.size, chat.image_spans, [p.grid_thw for p in patches],
                                                  self.config.vision.spatial_merge_size)
        cos, sin = self.cos_sin(positions)
        return PreparedPrompt(chat.ids, keys, cos, sin, next_pos, patches, chat.image_spans, fps)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.config.text
        return pos.text_cos_sin(positions, self.inv_freq, t.mrope_section, t.mrope_interleaved)


def _fingerprint(img: Image.Image, patches: ImagePatches) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.size}{img.mode}{patches.resized_hw}".encode())
    h.update(img.tobytes())
    return h.hexdigest()

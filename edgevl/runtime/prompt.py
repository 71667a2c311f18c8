"""A request's messages made ready for the model: token ids, image and clip patches, MRoPE
tables, and the keys that prefix matching compares (image and video tokens stand for their
item's fingerprint)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevl.checkpoint import ModelConfig
from edgevl.preprocess import positions as pos
from edgevl.preprocess.chat import ChatFormatter, visuals_in
from edgevl.preprocess.image import ImagePatches, ImageProcessorConfig, patchify
from edgevl.preprocess.video_patches import VideoPatches, patchify_video
from edgevl.types import EngineOptions, GenerationRequest, ImagePart, InputError, VideoPart


@dataclass
class PreparedPrompt:
    ids: np.ndarray
    keys: np.ndarray  # ids with visual tokens replaced by their item's fingerprint (prefix matching)
    cos: np.ndarray  # (S, head_dim) per token
    sin: np.ndarray
    next_position: int  # the MRoPE position of the first answer token
    patches: list[ImagePatches | VideoPatches]  # one per image or clip, in message order
    spans: list[tuple[int, int]]  # [start, end) of each image's or frame group's tokens, in prompt order
    fingerprints: list[str]  # one per image or clip: the vision cache's keys
    span_items: list[int] = field(default_factory=list)  # the item (index in `patches`) of each span

    def visual_tokens(self, video: bool) -> int:
        return sum(e - s for (s, e), k in zip(self.spans, self.span_items)
                   if isinstance(self.patches[k], VideoPatches) == video)

    def item_spans(self, item: int) -> list[tuple[int, int]]:
        return [sp for sp, k in zip(self.spans, self.span_items) if k == item]


class PromptBuilder:
    def __init__(self, folder: Path, config: ModelConfig, ipc: ImageProcessorConfig, vpc: ImageProcessorConfig,
                 options: EngineOptions):
        self.config = config
        self.ipc, self.vpc = ipc, vpc
        self.options = options
        self.chat = ChatFormatter(folder, config.image_token_id, config.video_token_id)
        t = config.text
        self.inv_freq = pos.text_inv_freq(t.head_dim, t.rope_theta)

    def build(self, request: GenerationRequest, with_positions: bool = True) -> PreparedPrompt:
        visuals = visuals_in(request.messages)
        n_images = sum(isinstance(p, ImagePart) for p in visuals)
        if n_images > self.options.max_images:
            raise InputError(f"{n_images} images in one request; the limit is {self.options.max_images}",
                             code="too_many_images", param="images")
        budget = min(request.max_pixels or self.options.max_pixels, self.options.max_pixels)
        patches = [patchify_video(p, self.vpc, self.options.max_video_pixels) if isinstance(p, VideoPart)
                   else patchify(p.image, self.ipc, min(p.max_pixels or budget, budget)) for p in visuals]
        try:
            chat = self.chat.encode(request.messages, patches, request.tools)
        except ValueError as e:
            raise InputError(str(e)) from e
        fps = [_fingerprint(p, pt) for p, pt in zip(visuals, patches)]
        keys = chat.ids.copy()
        for (s, e), k in zip(chat.image_spans, chat.span_items):
            keys[s:e] = -1 - (int(fps[k][:15], 16))  # negative: never equal to a real token id
        if not with_positions:
            return PreparedPrompt(chat.ids, keys, np.empty(0), np.empty(0), 0, patches, chat.image_spans, fps,
                                  chat.span_items)
        # a clip's frame groups are placed like images, one grid each (transformers' get_rope_index)
        grids = [patches[k].groups()[0].grid_thw for k in chat.span_items]
        positions, next_pos = pos.mrope_positions(chat.ids.size, chat.image_spans, grids,
                                                  self.config.vision.spatial_merge_size)
        cos, sin = self.cos_sin(positions)
        return PreparedPrompt(chat.ids, keys, cos, sin, next_pos, patches, chat.image_spans, fps, chat.span_items)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.config.text
        return pos.text_cos_sin(positions, self.inv_freq, t.mrope_section, t.mrope_interleaved)


def answer_limit(n_prompt: int, request: GenerationRequest, max_context: int) -> int:
    """The answer tokens a prompt leaves in the context window (the request's max_tokens, cut to fit);
    a prompt that fills the window alone is an InputError."""
    window = min(max_context, request.max_context or max_context)
    room = window - n_prompt
    if room < 1:
        raise InputError(f"the prompt is {n_prompt} tokens; the context holds {window}",
                         code="context_length_exceeded")
    return max(1, min(request.params.max_new_tokens, room))


def _fingerprint(part: ImagePart | VideoPart, patches: ImagePatches | VideoPatches) -> str:
    """The vision cache key: a whole clip is one entry, so a second question skips the encoder."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(part, VideoPart):
        h.update(f"video{part.frames.shape}{patches.resized_hw}".encode())
        h.update(np.ascontiguousarray(part.frames).data)
    else:
        h.update(f"{part.image.size}{part.image.mode}{patches.resized_hw}".encode())
        h.update(part.image.tobytes())
    return h.hexdigest()

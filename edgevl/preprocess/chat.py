"""Messages → token ids, with the checkpoint's own chat template and tokenizer.

The rendered prompt has one ``<|image_pad|>`` per image; it is expanded here to the number of
tokens the vision encoder will produce for that image, as transformers' processor does. A clip's
``<|video_pad|>`` becomes, per frame group, ``<t seconds><|vision_start|>`` + pads +
``<|vision_end|>`` (Qwen3VLProcessor.replace_video_token); transformers 5 replaces the pad token
only, so the template's own ``<|vision_start|>`` / ``<|vision_end|>`` stay around the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgevl.checkpoint import read_chat_template
from edgevl.preprocess.image import ImagePatches
from edgevl.preprocess.video_patches import VideoPatches
from edgevl.types import ImagePart, Message, TextPart, VideoPart


@dataclass
class ChatTokens:
    ids: np.ndarray  # (S,) int64, image and video pads expanded
    image_spans: list[tuple[int, int]]  # [start, end) of each image's / frame group's tokens in `ids`
    span_items: list[int]  # which visual item (in message order) each span belongs to


class ChatFormatter:
    def __init__(self, folder: Path, image_token_id: int, video_token_id: int | None = None):
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # as transformers compiles chat templates: trim and lstrip blocks, sandboxed
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        self.template = env.from_string(read_chat_template(folder))
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_id = self.tokenizer.token_to_id("<|vision_start|>")
        self.vision_end_id = self.tokenizer.token_to_id("<|vision_end|>")

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        return self.template.render(messages=[_as_hf(m) for m in messages], tools=tools or None,
                                    add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[Message], items: list[ImagePatches | VideoPatches],
               tools: list[dict] | None = None) -> ChatTokens:
        """`items`: the patches of every image and clip, in message order; `tools`: the OpenAI-style
        function specs the template lists for the model."""
        ids = self.tokenizer.encode(self.render(messages, tools=tools), add_special_tokens=False).ids
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        owners: list[int] = []
        k = 0
        for t in ids:
            if t not in (self.image_token_id, self.video_token_id):
                out.append(t)
                continue
            if k >= len(items):
                raise ValueError("the prompt has more image or video placeholders than images and videos")
            item = items[k]
            if isinstance(item, VideoPatches) != (t == self.video_token_id):
                raise ValueError("images and videos are not in the order of their placeholders")
            if isinstance(item, VideoPatches):
                for stamp in item.timestamps:
                    out.extend(self.tokenizer.encode(f"<{stamp:.1f} seconds>", add_special_tokens=False).ids)
                    out.append(self.vision_start_id)
                    spans.append((len(out), len(out) + item.tokens_per_group))
                    out.extend([t] * item.tokens_per_group)
                    out.append(self.vision_end_id)
                    owners.append(k)
            else:
                spans.append((len(out), len(out) + item.n_tokens))
                out.extend([t] * item.n_tokens)
                owners.append(k)
            k += 1
        if k != len(items):
            raise ValueError(f"{len(items)} images and videos but {k} placeholders in the prompt")
        return ChatTokens(np.asarray(out, dtype=np.int64), spans, owners)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _as_hf(m: Message) -> dict:
    parts = []
    for p in m.content:
        if isinstance(p, ImagePart):
            parts.append({"type": "image"})
        elif isinstance(p, VideoPart):
            parts.append({"type": "video"})
        elif isinstance(p, TextPart):
            parts.append({"type": "text", "text": p.text})
    out: dict = {"role": m.role, "content": parts}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.reasoning:  # a Thinking template shows the thought of turns after the last question again
        out["reasoning_content"] = m.reasoning
    return out


def _tojson(x: object, indent: int | None = None) -> str:
    import json

    return json.dumps(x, ensure_ascii=False, indent=indent)


def images_in(messages: list[Message]) -> list[ImagePart]:
    return [p for m in messages for p in m.content if isinstance(p, ImagePart)]


def visuals_in(messages: list[Message]) -> list[ImagePart | VideoPart]:
    """Images and clips in message order: the order of their placeholders in the prompt."""
    return [p for m in messages for p in m.content if isinstance(p, (ImagePart, VideoPart))]

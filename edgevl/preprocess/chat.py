"""Messages → token ids, with the checkpoint's own chat template and tokenizer.

The rendered prompt has one ``<|image_pad|>`` per image; it is expanded here to the number of
tokens the vision encoder will produce for that image, as transformers' processor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from edgevl.checkpoint import read_chat_template
from edgevl.types import ImagePart, Message, TextPart


@dataclass
class ChatTokens:
    ids: np.ndarray  # (S,) int64, image pads expanded
    image_spans: list[tuple[int, int]]  # [start, end) of each image's tokens in `ids`


class ChatFormatter:
    def __init__(self, folder: Path, image_token_id: int):
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # as transformers compiles chat templates: trim and lstrip blocks, sandboxed
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        self.template = env.from_string(read_chat_template(folder))
        self.image_token_id = image_token_id

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        return self.template.render(messages=[_as_hf(m) for m in messages], tools=tools or None,
                                    add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[Message], image_tokens: list[int], tools: list[dict] | None = None
               ) -> ChatTokens:
        """`image_tokens[i]`: how many tokens the i-th image (in message order) becomes; `tools`: the
        OpenAI-style function specs the template lists for the model."""
        ids = self.tokenizer.encode(self.render(messages, tools=tools), add_special_tokens=False).ids
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        k = 0
        for t in ids:
            if t == self.image_token_id:
                if k >= len(image_tokens):
                    raise ValueError("the prompt has more image placeholders than images")
                spans.append((len(out), len(out) + image_tokens[k]))
                out.extend([t] * image_tokens[k])
                k += 1
            else:
                out.append(t)
        if k != len(image_tokens):
            raise ValueError(f"{len(image_tokens)} images but {k} placeholders in the prompt")
        return ChatTokens(np.asarray(out, dtype=np.int64), spans)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _as_hf(m: Message) -> dict:
    parts = []
    for p in m.content:
        if isinstance(p, ImagePart):
            parts.append({"type": "image"})
        elif isinstance(p, TextPart):
            parts.append({"type": "text", "text": p.text})
    out: dict = {"role": m.role, "content": parts}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


def _tojson(x: object, indent: int | None = None) -> str:
    import json

    return json.dumps(x, ensure_ascii=False, indent=indent)


def images_in(messages: list[Message]) -> list[ImagePart]:
    return [p for m in messages for p in m.content if isinstance(p, ImagePart)]

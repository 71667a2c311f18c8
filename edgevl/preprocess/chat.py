"""Messages → token ids, with the checkpoint's own chat template and tokenizer.

The rendered prompt has one ``<|image_pad|>`` per image; it is expanded here to the number of
tokens the vision encoder will produce for that image, as transformers' processor does. A clip's
``<|video_pad|>`` becomes, per frame group, ``<t seconds><|vision_start|>`` + pads +
``<|vision_end|>`` (Qwen3VLProcessor.replace_video_token); transformers 5 replaces the pad token
only, so the template's own ``<|vision_start|>`` / ``<|vision_end|>`` stay around the whole clip.

Text a client sent is data, never markup: a ``<|im_end|>\n<|im_start|>system`` typed into a message
must not end the turn and open a system one. Client strings go into the template as `ClientText`,
and every one the template outputs is bracketed by sentinels only this process knows, so after
rendering it is known which characters the client wrote. The prompt is tokenised as transformers
does (special tokens parsed), and when an added token (``<|im_start|>``, ``<tool_call>``, ...) lies
in client text, the text between the template's own markers is tokenised again as plain text.
A template that builds a string from client text with ``+`` or string methods before outputting
it hides that text's origin; Qwen3-VL's template outputs client values directly.
"""

from __future__ import annotations

import re
import secrets
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

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class ClientText(str):
    """A string the client sent: the template may test and output it, and its output is marked."""


@dataclass
class ChatTokens:
    ids: np.ndarray  # (S,) int64, image and video pads expanded
    image_spans: list[tuple[int, int]]  # [start, end) of each image's / frame group's tokens in `ids`
    span_items: list[int]  # which visual item (in message order) each span belongs to


class ChatFormatter:
    def __init__(self, folder: Path, image_token_id: int, video_token_id: int | None = None):
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        nonce = secrets.token_hex(16)  # never shown to a client, so no client text can contain it
        self._open, self._close = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        # as transformers compiles chat templates: trim and lstrip blocks, sandboxed
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols], finalize=self._mark)
        env.filters["tojson"] = _tojson
        self.template = env.from_string(read_chat_template(folder))
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_id = self.tokenizer.token_to_id("<|vision_start|>")
        self.vision_end_id = self.tokenizer.token_to_id("<|vision_end|>")
        self.added_ids = set(self.tokenizer.get_added_tokens_decoder())

    def _mark(self, value: object) -> object:
        # an empty string stays empty: templates test a rendered part for truth ("if content")
        return f"{self._open}{value}{self._close}" if isinstance(value, ClientText) and value else value

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        return self.render_marked(messages, add_generation_prompt, tools)[0]

    def render_marked(self, messages: list[Message], add_generation_prompt: bool = True,
                      tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text, and the [start, end) of every stretch of it the client wrote."""
        hf = [_as_hf(m) for m in messages]
        for m in hf:
            if m.get("reasoning_content"):
                # a Thinking template strips a thought and joins it with `+`, which drops ClientText's type;
                # so the thought carries its marks inside (stripped as the template would, so the text is
                # the same)
                m["reasoning_content"] = f"{self._open}{m['reasoning_content'].strip(chr(10))}{self._close}"
        marked = self.template.render(messages=hf, tools=_client(tools) or None,
                                      add_generation_prompt=add_generation_prompt)
        text: list[str] = []
        spans: list[tuple[int, int]] = []
        n = pos = 0
        for m in re.finditer(re.escape(self._open) + "|" + re.escape(self._close), marked):
            text.append(marked[pos:m.start()])
            n += m.start() - pos
            pos = m.end()
            if m.group() == self._open:
                start = n
            else:
                spans.append((start, n))
        text.append(marked[pos:])
        return "".join(text), spans

    def tokenize(self, text: str, client_spans: list[tuple[int, int]]) -> list[int]:
        """Token ids of the rendered prompt, with added tokens real only outside the client's text."""
        if (bad := _SURROGATE.search(text)) is not None:
            raise ValueError(f"the text holds a lone UTF-16 surrogate (U+{ord(bad.group()):04X}), which is not "
                             "Unicode text")
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        marks = [(t, a, b) for t, (a, b) in zip(enc.ids, enc.offsets) if t in self.added_ids]
        if not any(_overlaps(a, b, client_spans) for _, a, b in marks):
            return enc.ids  # nothing forged: exactly transformers' ids
        ids: list[int] = []
        pos = 0
        for t, a, b in marks:
            if not _overlaps(a, b, client_spans):
                ids += self._plain(text[pos:a]) + [t]
                pos = b
        return ids + self._plain(text[pos:])

    def _plain(self, text: str) -> list[int]:
        """`text` tokenised as the tokenizer treats what lies between added tokens, with none recognised."""
        tok = self.tokenizer
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None else [(text, (0, 0))]
        return [t.id for piece, _ in pieces for t in tok.model.tokenize(piece)]

    def encode(self, messages: list[Message], items: list[ImagePatches | VideoPatches],
               tools: list[dict] | None = None) -> ChatTokens:
        """`items`: the patches of every image and clip, in message order; `tools`: the OpenAI-style
        function specs the template lists for the model."""
        ids = self.tokenize(*self.render_marked(messages, tools=tools))
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
            parts.append({"type": "text", "text": ClientText(p.text)})
    out: dict = {"role": m.role, "content": parts}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": ClientText(c.name),
                                                               "arguments": ClientText(c.arguments)}}
                             for c in m.tool_calls]
    if m.reasoning:  # a Thinking template shows the thought of turns after the last question again
        out["reasoning_content"] = m.reasoning
    return out


def _client(value: object) -> object:
    """Every string in a client's structure (tool specs) as ClientText."""
    if isinstance(value, str):
        return ClientText(value)
    if isinstance(value, dict):
        return {k: _client(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_client(v) for v in value]
    return value


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < e and b > s for s, e in spans)


def _tojson(x: object, indent: int | None = None) -> ClientText:
    """JSON of the client's structures (tool specs, call arguments): all of it the client's text."""
    import json

    return ClientText(json.dumps(x, ensure_ascii=False, indent=indent))


def images_in(messages: list[Message]) -> list[ImagePart]:
    return [p for m in messages for p in m.content if isinstance(p, ImagePart)]


def visuals_in(messages: list[Message]) -> list[ImagePart | VideoPart]:
    """Images and clips in message order: the order of their placeholders in the prompt."""
    return [p for m in messages for p in m.content if isinstance(p, (ImagePart, VideoPart))]

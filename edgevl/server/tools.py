"""Tool calls in the checkpoint's own format: the grammar that forces them, the parser that finds them.

Qwen3-VL's chat template lists the tools in the system turn and asks for each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; that text is what the model
writes, and what this module turns into OpenAI's ``tool_calls`` (and back, through the template,
when a later request carries them in its history).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from edgevl.schema import has_finite_instance
from edgevl.server.errors import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAIL_TOKENS = 3  # "\n", "</tool_call>" and an end-of-turn: what must fit after the arguments close


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def call_schema(tools: list[dict], only: str | None = None) -> dict:
    """{"name": one of the tools, "arguments": valid for that tool}, in the template's key order."""
    options = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object"}
        if not has_finite_instance(params):
            raise ApiError(f"tools: the parameters of {fn['name']!r} have no finite instance (a required "
                           "property refers back to itself)", "invalid_schema", "tools")
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(tools: list[dict], only: str | None, parallel: bool, open_tok: str, close_tok: str) -> str:
    """A Lark grammar (llguidance's dialect) for one call, or several when parallel calls are allowed.
    `open_tok`/`close_tok`: how the grammar names the markers (a special token, or a quoted string)."""
    # without this, llguidance lets JSON whitespace run free, and a random model fills its budget with it
    schema = json.dumps({**call_schema(tools, only), "x-guidance": {
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}},
                        ensure_ascii=False)
    calls = 'call ("\\n" call)*' if parallel and only is None else "call"
    return f'start: {calls}\ncall: {open_tok} "\\n" args "\\n" {close_tok}\nargs: %json {schema}\n'


def parse_call(block: str) -> ParsedCall | None:
    """The inside of one <tool_call> block → a call, or None when it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models quote the object; keep it if it parses
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass
class ToolCallSplitter:
    """Separates streamed text into free text and tool calls. Text that might be the start of a
    ``<tool_call>`` is held back until it is known not to be; a block that does not parse as a
    call of a known tool is given back as text, as the model wrote it."""

    names: set[str]
    max_calls: int = 64  # parallel_tool_calls false: 1, and a second block stays text
    pending: str = ""
    in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, piece: str) -> tuple[str, list[ParsedCall]]:
        """→ (text safe to show now, calls completed by this piece)."""
        self.pending += piece
        text, done = "", []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return text, done
                block, self.pending = self.pending[:end], self.pending[end + len(CLOSE):]
                self.in_call = False
                call = parse_call(block.strip())
                if call is not None and call.name in self.names and len(self.calls) < self.max_calls:
                    done.append(call)
                    self.calls.append(call)
                    self.pending = self.pending.removeprefix("\n")
                else:
                    text += OPEN + block + CLOSE
                continue
            start = self.pending.find(OPEN)
            if start >= 0:
                text += self.pending[:start]
                self.pending = self.pending[start + len(OPEN):]
                self.in_call = True
                continue
            keep = _partial_suffix(self.pending, OPEN)
            text += self.pending[:len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
            return text, done

    def flush(self) -> str:
        """At the end: whatever was held (an unfinished block is text)."""
        out = (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return out


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

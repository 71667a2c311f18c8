"""Tool calls in the checkpoint's own format: the request's tools checked, the schema of one call
(what the grammar in runtime/constrain.py forces), and the parser that finds the calls (whole, or
piece by piece as they are written when the grammar forced them).

Qwen3-VL's chat template lists the tools in the system turn and asks for each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; that text is what the model
writes, and what this module turns into OpenAI's ``tool_calls`` (and back, through the template,
when a later request carries them in its history).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from edgevl.schema import SchemaTooComplex, has_finite_instance
from edgevl.server.errors import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAIL_TOKENS = 3  # "\n", "</tool_call>" and an end-of-turn: what must fit after the arguments close


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def check_parameters(tools: list[dict]) -> None:
    """Every tool's parameters must admit a finite instance, whatever the tool_choice (the README
    promises so); the check has a step bound, and a schema past it is refused too. Seconds of
    CPU at worst: callers run it off the event loop."""
    for i, t in enumerate(tools):
        fn, where = t["function"], f"tools.{i}.function.parameters"
        try:
            finite = has_finite_instance(fn.get("parameters") or {"type": "object"})
        except SchemaTooComplex as e:
            raise ApiError(f"{where}: {e}", "invalid_schema", where) from e
        if not finite:
            raise ApiError(f"tools: the parameters of {fn['name']!r} have no finite instance (a required "
                           "property refers back to itself)", "invalid_schema", where)


def call_schema(tools: list[dict], only: str | None = None) -> dict:
    """{"name": one of the tools, "arguments": valid for that tool}, in the template's key order."""
    check_parameters(tools)
    options: list[tuple[str, dict]] = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append((fn["name"], params))
    # the parameters sit inside the wrapper, so their own pointers (`#/$defs/...`, as pydantic writes a
    # nested model's) are moved to where the parameters now are
    wrapped = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                "properties": {"name": {"const": name},
                               "arguments": _rebase(params, ("" if len(options) == 1 else f"/anyOf/{i}")
                                                    + "/properties/arguments")}}
               for i, (name, params) in enumerate(options)]
    return wrapped[0] if len(wrapped) == 1 else {"anyOf": wrapped}


_DATA = frozenset({"const", "enum", "default", "examples"})  # instance data, not schemas: left as it is
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})  # name → schema


def _rebase(node: object, base: str) -> object:
    """`node` with every local JSON-pointer `$ref` ("#" or "#/...") pointing under `base`, a pointer
    from the new root. A dialect tag (`$schema`) is the root's alone, so it is dropped."""
    if isinstance(node, list):
        return [_rebase(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key == "$schema" and isinstance(value, str):
            continue
        if key in _DATA:
            out[key] = value
        elif key in _NAMED and isinstance(value, dict):  # its keys are names, whatever they spell
            out[key] = {name: _rebase(schema, base) for name, schema in value.items()}
        else:
            out[key] = _rebase(value, base)
    ref = node.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = "#" + base + ref[1:]
    return out


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
class CallPiece:
    """A part of the `index`-th call, as OpenAI streams it: the header (`name` set) or a fragment of the
    arguments text (`name` None). A call is one header and any fragments after it, in order; the
    header's `arguments` and the fragments concatenate to the call's whole arguments text."""

    index: int
    arguments: str
    name: str | None = None


@dataclass
class _OpenCall:
    """A constrained call whose header is out: its arguments are sent as they are written."""

    index: int
    name: str
    start: int  # where the arguments begin in the block's text
    sent: str = ""  # the arguments text sent so far


# the block as the grammar writes it, up to the arguments' value (whitespace left free for safety)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


@dataclass
class ToolCallSplitter:
    """Separates streamed text into free text and tool calls. Text that might be the start of a
    ``<tool_call>`` is held back until it is known not to be.

    Without a grammar (`stream_arguments` false, tool_choice auto) a block is held until it closes:
    one that does not parse as a call of a known tool is given back as text, as the model wrote it,
    and a call comes out whole (header and arguments in one piece), because text streamed as a call
    could not be taken back. Under the tool-call grammar (`stream_arguments` true) every block is a
    call, so its header goes out as soon as the name is known and its arguments as they are written,
    as the model wrote them."""

    names: set[str]
    max_calls: int = 64  # parallel_tool_calls false: 1, and a second block stays text
    stream_arguments: bool = False
    pending: str = ""
    in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)
    current: _OpenCall | None = None
    after_call: bool = False  # the "\n" between a call and what follows may come in the next piece

    def feed(self, piece: str) -> tuple[str, list[CallPiece]]:
        """→ (text safe to show now, the pieces of calls this piece made known)."""
        self.pending += piece
        text, out = "", []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return text, out + self._stream()
                block, self.pending = self.pending[:end], self.pending[end + len(CLOSE):]
                self.in_call = False
                shown, pieces = self._close(block)
                text, out = text + shown, out + pieces
                continue
            if self.after_call and self.pending:
                self.pending, self.after_call = self.pending.removeprefix("\n"), False
            start = self.pending.find(OPEN)
            if start >= 0:
                text += self.pending[:start]
                self.pending = self.pending[start + len(OPEN):]
                self.in_call = True
                continue
            keep = _partial_suffix(self.pending, OPEN)
            text += self.pending[:len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
            return text, out

    def flush(self) -> tuple[str, list[CallPiece]]:
        """At the end: whatever was held. An unfinished block is text, unless its header is out:
        then the rest of its arguments goes out as written (cut short, as OpenAI's are at length).
        Under the grammar nothing is text: a block cut short before its name is dropped, never shown
        as the template's markup."""
        if self.current is not None:
            block = self.pending[:len(self.pending) - _partial_suffix(self.pending, CLOSE)]
            self.pending, self.in_call = "", False
            return "", self._finish(block)
        out = "" if self.stream_arguments else (OPEN if self.in_call else "") + self.pending
        self.pending, self.in_call = "", False
        return out, []

    def _close(self, block: str) -> tuple[str, list[CallPiece]]:
        """A block has closed: the end of a streamed call, a whole call, or text."""
        header = self._open(block)
        if self.current is not None:
            self.after_call = True
            return "", header + self._finish(block)
        call = parse_call(block.strip())
        if call is None or call.name not in self.names or len(self.calls) >= self.max_calls:
            return OPEN + block + CLOSE, []
        self.calls.append(call)
        self.after_call = True
        return "", [CallPiece(len(self.calls) - 1, call.arguments, call.name)]

    def _stream(self) -> list[CallPiece]:
        """Inside an unclosed block: the header once the name is known, then what more of the
        arguments is sure to be theirs."""
        out = self._open(self.pending)
        call = self.current
        if call is None:
            return out
        text = self.pending[call.start:]
        text = text[:len(text) - _partial_suffix(text, CLOSE)].lstrip()
        sure = _without_last_brace(text)
        if len(sure) > len(call.sent):
            out.append(CallPiece(call.index, sure[len(call.sent):]))
            call.sent = sure
        return out

    def _open(self, block: str) -> list[CallPiece]:
        """The header of a constrained call, once `block` shows its name (and only once)."""
        if not self.stream_arguments or self.current is not None or len(self.calls) >= self.max_calls:
            return []
        m = _HEAD.match(block)
        if m is None:
            return []
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return []
        if name not in self.names:
            return []  # not for streaming: the block is judged whole when it closes
        self.current = _OpenCall(len(self.calls), name, m.end())
        return [CallPiece(self.current.index, "", name)]

    def _finish(self, block: str) -> list[CallPiece]:
        """The streamed call's last fragment: its arguments end where the outer object's brace
        begins, when what precedes that brace is a whole object; otherwise the block was cut short
        and its arguments are all that was written."""
        call, self.current = self.current, None
        body = block[call.start:].strip()
        args = _without_last_brace(body)
        if not (body.endswith("}") and _is_object(args)):
            args = body
        self.calls.append(ParsedCall(call.name, args))
        rest = args[len(call.sent):]
        return [CallPiece(call.index, rest)] if rest else []


def _without_last_brace(text: str) -> str:
    """`text` less what may yet be the outer object's closing brace (a `}` could close the arguments
    or the call: only the block's close tells) and the whitespace around it."""
    text = text.rstrip()
    return text[:-1].rstrip() if text.endswith("}") else text


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

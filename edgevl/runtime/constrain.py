"""Structured output: decoding constrained token by token so the answer always parses and validates.

The grammar engine is llguidance (Microsoft's, the one llama.cpp and vLLM embed): a Rust core
with a numpy API, no torch, and masks computed in tens of microseconds for JSON schemas over a
150k vocabulary because it walks a token trie with lexer "slices" instead of testing every token.
xgrammar is as fast but its Python API centres on torch tensors, which the serving path avoids;
outlines-core compiles a full index ahead of time, which costs seconds per new schema.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevl.schema import SchemaTooComplex, has_finite_instance
from edgevl.types import InputError

log = logging.getLogger("edgevl.constrain")
TOO_COMPLEX = "the schema is too complex for constrained decoding; simplify it"
TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")  # the chat template's; server/tools.py parses the same


class GrammarCompiler:
    """Per model: the tokenizer in llguidance's form (built once, about a second)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: list[int]):
        import llguidance
        from tokenizers import Tokenizer

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json.read_text(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_ids))
        # tokens made only of JSON's closing punctuation: what the budget guard steers towards
        hf = Tokenizer.from_file(str(tokenizer_json))
        n = min(vocab_size, hf.get_vocab_size())
        self.texts = [hf.decode([tid]) for tid in range(n)] + [""] * (vocab_size - n)
        # how fast a token closes: outside strings, only brackets; inside, a quote then brackets
        out_score = np.zeros(vocab_size, dtype=np.int16)
        in_score = np.zeros(vocab_size, dtype=np.int16)
        for tid, text in enumerate(self.texts):
            t = text.strip()
            brackets = t.count("}") + t.count("]")
            if t and set(t) <= set("}]"):
                out_score[tid] = 100 + 10 * brackets
            elif t and set(t) <= set("}],:\""):
                out_score[tid] = 1 + 10 * brackets
            if t.startswith('"') and set(t[1:]) <= set("}],:"):
                in_score[tid] = 100 + 10 * brackets - (len(t) - 1 - brackets)  # separators last
        self.out_score, self.in_score = out_score, in_score
        self._lock = threading.Lock()

    def json_schema(self, schema: dict | bool | None, budget: int = 0) -> JsonConstraint:
        """`None` means any JSON object (response_format json_object), nested at most 4 deep."""
        if schema is None or schema is True:
            schema = any_json_object(4)
        if not isinstance(schema, dict):
            raise InputError("the schema must be a JSON object", code="invalid_schema", param="schema")
        try:
            finite = has_finite_instance(schema)
        except SchemaTooComplex as e:
            raise InputError(str(e), code="invalid_schema", param="schema") from e
        if not finite:
            raise InputError("the schema has no finite instance: a required property refers back to itself",
                             code="invalid_schema", param="schema")
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise InputError(f"invalid JSON schema: {e}", code="invalid_schema", param="schema") from e
        return JsonConstraint(self._matcher(grammar, "schema"), self, budget)

    def lark(self, grammar: str, budget: int = 0, param: str = "tools") -> JsonConstraint:
        """A Lark grammar in llguidance's dialect (`%json {schema}` embeds a JSON schema)."""
        try:
            compiled = self._ll.LLMatcher.grammar_from_lark(grammar)
        except (ValueError, TypeError) as e:
            raise InputError(f"invalid grammar: {e}", code="invalid_schema", param=param) from e
        return JsonConstraint(self._matcher(compiled, param), self, budget)

    def _matcher(self, grammar: str, param: str):
        err = self._ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err and not err.startswith("WARNING"):
            # llguidance's first line says what is wrong; the rest is its parser state, not the client's business
            raise InputError(f"invalid JSON schema: {err.splitlines()[0][:300]}", code="invalid_schema", param=param)
        matcher = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)  # limits blow here, not mid-answer
        if matcher.is_error() or not words.any():
            log.info("grammar refused before generation: %s", matcher.get_error())
            raise InputError(TOO_COMPLEX, code="invalid_schema", param=param)
        return matcher


def tool_call_grammar(call_schema: dict, several: bool, marker_ids: Sequence[int | None]) -> str:
    """A Lark grammar (llguidance's dialect) for one tool call as the chat template writes it,
    ``<tool_call>\\n{call}\\n</tool_call>`` with the call valid for `call_schema`, or for several
    separated by newlines. `marker_ids`: the tokenizer's ids of the two markers (``<[id]>``: the model
    writes the one special token), None for a marker the tokenizer keeps as text (then its quoted text)."""
    open_tok, close_tok = (f"<[{tid}]>" if tid is not None else json.dumps(text)
                           for tid, text in zip(marker_ids, TOOL_CALL_MARKERS, strict=True))
    # without this, llguidance lets JSON whitespace run free, and a random model fills its budget with it
    schema = json.dumps({**call_schema, "x-guidance": {
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}, ensure_ascii=False)
    calls = 'call ("\\n" call)*' if several else "call"
    return f'start: {calls}\ncall: {open_tok} "\\n" args "\\n" {close_tok}\nargs: %json {schema}\n'


def any_json_object(depth: int) -> dict:
    """Any JSON object whose nesting stops at `depth`: a model (a random one especially) could
    otherwise open brackets faster than any token budget could close them."""
    value: dict = {"type": ["string", "number", "boolean", "null"]}
    for _ in range(depth - 1):
        value = {"anyOf": [{"type": ["string", "number", "boolean", "null"]},
                           {"type": "array", "items": value}, {"type": "object", "additionalProperties": value}]}
    return {"type": "object", "additionalProperties": value}


class JsonConstraint:
    """The engine's Constraint: mask() before sampling, advance() after, is_done() ends it.

    A grammar guarantees every prefix can still become valid JSON, not that the model will ever
    close it: a number may go on digit after digit. Near the token budget the guard prefers
    tokens of closing punctuation whenever the grammar allows one, so answers end valid."""

    def __init__(self, matcher, compiler: GrammarCompiler, budget: int = 0):
        self.matcher = matcher
        self.c = compiler
        self.vocab_size = compiler.vocab_size
        self.budget = budget
        self.reserve = min(8, budget // 4) if budget else 0
        self.consumed = 0
        self.depth, self.in_string, self.escaped = 0, False, False  # a JSON lexer over what was emitted
        self._words = np.full((self.vocab_size + 31) // 32, -1, dtype=np.int32)
        self.mask_calls = 0

    def mask(self, logits: np.ndarray) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self.matcher.is_error():
            log.info("grammar failed during generation: %s", self.matcher.get_error())
            raise InputError(TOO_COMPLEX, code="invalid_schema", param="schema")
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: logits.size].astype(bool)
        # every open bracket (and an open string) costs at least one more token: keep that many in hand
        near = self.budget and self.consumed + self.depth + int(self.in_string) + self.reserve >= self.budget
        if near and self.matcher.is_accepting() and allowed[self.c.eos_ids].any():
            ends = np.zeros_like(allowed)  # complete already (one tool call of several): end here
            ends[self.c.eos_ids] = True
            allowed &= ends
        elif near:
            score = np.where(allowed, self.c.in_score if self.in_string else self.c.out_score, 0)
            if score.max() > 0:  # the allowed token that closes the most, whatever the model prefers
                allowed = score == score.max()
        logits[~allowed] = -np.inf
        self.mask_calls += 1

    def advance(self, token_id: int) -> None:
        self.consumed += 1
        for ch in self.c.texts[token_id] if token_id < len(self.c.texts) else "":
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
        if not self.matcher.consume_token(token_id):
            log.info("grammar failed during generation: %s", self.matcher.get_error())
            raise InputError(TOO_COMPLEX, code="invalid_schema", param="schema")

    def is_done(self) -> bool:
        return self.matcher.is_stopped()

    def forced_tokens(self) -> list[int]:
        """What the grammar allows and nothing else, as llguidance tokenizes it (empty near the budget,
        where the guard above may steer elsewhere)."""
        if self.budget and self.consumed + self.depth + int(self.in_string) + 2 * self.reserve >= self.budget:
            return []
        return list(self.matcher.compute_ff_tokens())

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


@dataclass
class Recorder:
    """Records the logits of every step; forces `tokens` when given (teacher forcing)."""

    tokens: list[int] | None = None
    logits: list[np.ndarray] = field(default_factory=list)
    i: int = 0

    def mask(self, logits: np.ndarray) -> None:
        self.logits.append(logits.copy())
        if self.tokens is not None:
            keep = logits[self.tokens[self.i]]
            logits[:] = -np.inf
            logits[self.tokens[self.i]] = keep

    def advance(self, token_id: int) -> None:
        self.i += 1

    def is_done(self) -> bool:
        return self.tokens is not None and self.i >= len(self.tokens)

    def forced_tokens(self) -> list[int]:
        return []  # every step's logits are recorded, so none is skipped

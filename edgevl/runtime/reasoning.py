"""Thinking models: which answer tokens are thought, and the budget that closes a thought.

Qwen3-VL-*-Thinking's chat template ends the prompt with ``<|im_start|>assistant\\n<think>\\n``: the
model thinks, writes ``</think>``, then answers. ``<think>`` and ``</think>`` are single tokens, so
the split is made on token ids (never by searching text) in `Sequence`, the one place every engine
feeds logits through:

    prompt leaves <think> open? ─► Thought: tokens flagged `reasoning` ─► </think> ─► answer tokens
                                    past the budget: "\\n</think>\\n\\n" forced (each at log-probability 0)

A thought is open only when the generation prompt itself opened it (after the last
``<|im_start|>``), so an Instruct checkpoint, or ``<think>`` typed in a user's message, never
turns into one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

THINK_OPEN, THINK_CLOSE, TURN_START = "<think>", "</think>", "<|im_start|>"
CLOSING = "\n" + THINK_CLOSE + "\n\n"  # what a budget forces, as llama.cpp's --reasoning-budget does


@dataclass(frozen=True)
class ThinkMarkers:
    """A tokenizer's thought markers, and the closing it forces, as token ids."""

    open_id: int
    close_id: int
    turn_id: int
    before_close: tuple[int, ...]  # "\n": forced before `</think>` when the budget still has room for it
    after_close: tuple[int, ...]  # "\n\n": forced after it, so the answer starts where the template's does

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> ThinkMarkers | None:
        """None when the tokenizer has no single `<think>` / `</think>` tokens (no thinking model)."""
        ids = [tok.token_to_id(t) for t in (THINK_OPEN, THINK_CLOSE, TURN_START)]
        if None in ids:
            return None
        closing = tok.encode(CLOSING, add_special_tokens=False).ids
        if closing.count(ids[1]) != 1:
            return None
        i = closing.index(ids[1])
        return cls(ids[0], ids[1], ids[2], tuple(closing[:i]), tuple(closing[i + 1:]))

    def opened_by(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt leaves a thought open for the answer: a `<think>` after the last
        `<|im_start|>` and no `</think>` after it."""
        for t in reversed(prompt_ids):
            if t == self.open_id:
                return True
            if t in (self.close_id, self.turn_id):
                return False
        return False


class Thought:
    """One answer's thought: counts its tokens, forces the closing at the budget, and trims the
    newlines around the markup (the template writes a thought back as `<think>\\n` + thought +
    `\\n</think>\\n\\n` + answer, so those newlines belong to neither text)."""

    def __init__(self, markers: ThinkMarkers, budget: int | None):
        self.m = markers
        self.budget = budget if budget is not None and budget >= 0 else None
        self.open = True
        self.tokens = 0  # reasoning tokens: every token before `</think>`, forced ones included
        self._forced: deque[int] = deque()
        self._held = ""  # trailing newlines of the thought so far: dropped if `</think>` follows
        self._shown = self._answer_shown = False

    def forced(self) -> int | None:
        """The token this step must take, if the budget is spent (or its closing is under way)."""
        if self.open and not self._forced and self.budget is not None:
            room = self.budget - self.tokens
            before = self.m.before_close if room >= len(self.m.before_close) else ()
            if room <= len(before):
                self._forced.extend((*before, self.m.close_id, *self.m.after_close))
        return self._forced.popleft() if self._forced else None

    @property
    def answering(self) -> bool:
        """The thought is closed and its markup written: what follows is the answer."""
        return not self.open and not self._forced

    def take(self, token_id: int) -> None:
        if self.open:
            if token_id == self.m.close_id:
                self.open = False
            else:
                self.tokens += 1

    def thought_text(self, piece: str, last: bool = False) -> str:
        """What of the thought can be shown now: newlines at its start dropped, at its end held
        (and dropped when it ends: `last`)."""
        text = self._held + piece
        if not self._shown:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        self._held = "" if last else text[len(body):]
        self._shown = self._shown or bool(body)
        return body

    def answer_text(self, piece: str) -> str:
        """The answer's text, less the newlines that open it."""
        if not self._answer_shown:
            piece = piece.lstrip("\n")
            self._answer_shown = bool(piece)
        return piece

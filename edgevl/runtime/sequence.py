"""One request's answer, token by token: what every engine does with a row of logits.

    logits ─► constraint mask ─► sample (+ logprobs) ─► EOS? ─► detokenise ─► stop strings ─► TokenEvent
                                                                              … ─► FinishEvent

The ONNX batch loop and the transformers reference both feed logits here, so sampling, stops,
constraints and streaming text are one piece of code, whatever computed the logits.
"""

from __future__ import annotations

import time

import numpy as np
from tokenizers import Tokenizer

from edgevl.runtime.generate import Sampler, StopMatcher, StreamDecoder, token_logprobs
from edgevl.types import Event, FinishEvent, FinishReason, GenerationRequest, Timings, TokenEvent, Usage


class Sequence:
    def __init__(self, request: GenerationRequest, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                 tokenizer: Tokenizer, special_ids: set[int], t_start: float, timings: Timings | None = None,
                 n_image_tokens: int = 0, n_video_tokens: int = 0):
        self.request = request
        self.params = request.params
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.n_prompt = len(prompt_ids)
        self.n_image_tokens = n_image_tokens
        self.n_video_tokens = n_video_tokens
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.t_start = t_start
        self.t_first: float | None = None
        self.timings = timings or Timings()
        self.finished = False
        self.reason: FinishReason = "length"
        self._sampler = Sampler(self.params)
        self._detok = StreamDecoder(tokenizer, special_ids)
        self._stops = StopMatcher(self.params.stop)
        self._text: list[str] = []
        self._by_stop_string = False

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()

    def accept(self, logits: np.ndarray) -> list[Event]:
        """Choose the next token from this step's logits (modified in place by a constraint)."""
        constraint = self.request.constraint
        if constraint is not None:
            constraint.mask(logits)
        tok = self._sampler(logits, self.history)
        # after the grammar's mask (forbidden tokens are no alternatives), before penalties and temperature
        lp = token_logprobs(logits, tok, self.params.logprobs) if self.params.logprobs is not None else (None, None)
        if constraint is not None:
            constraint.advance(tok)
        self.generated.append(tok)
        self.history.append(tok)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.timings.ttft_ms = (self.t_first - self.t_start) * 1000
        if tok in self.eos_ids and not self.params.ignore_eos:
            return self._end("stop")
        piece, stopped = self._stops.feed(self._detok.push(tok))
        events: list[Event] = []
        if piece or not stopped:
            self._text.append(piece)
            events.append(TokenEvent(piece, tok, *lp))
        if stopped:
            self._by_stop_string = True
            return events + self._end("stop")
        if constraint is not None and constraint.is_done():
            return events + self._end("stop")
        if len(self.generated) >= self.max_new_tokens:
            return events + self._end("length")
        if self.cancelled:
            return events + self._end("cancelled")
        return events

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def draft(self) -> list[int]:
        """Jump-forward: the tokens the constraint forces after the last one, at most what the answer
        may still hold. The caller runs them in one decoder pass and feeds each position's logits to
        `accept` while the model's choice equals the draft (`accept_draft`), so the answer is the same
        token for token as without it. Off when log-probabilities are asked for: those would be the
        draft's, computed in a different pass, not the step-by-step ones."""
        c = self.request.constraint
        if self.finished or c is None or self.params.logprobs is not None:
            return []
        room = self.max_new_tokens - len(self.generated) - 1
        return c.forced_tokens()[:room] if room > 0 else []

    def accept_draft(self, logits: np.ndarray, draft: list[int]) -> tuple[list[Event], int]:
        """`logits`: one row per position of [last token, *draft]. Accepts tokens while each is the
        draft's; the first other choice (or the one after the whole draft) ends it. → the events and
        how many draft tokens were the model's own choice too."""
        events: list[Event] = []
        for j, row in enumerate(logits):
            events += self.accept(row)
            if j == len(draft) or self.last_token != draft[j]:
                return events, j
            self.timings.forced_tokens += 1
            if self.finished:
                return events, j + 1
        return events, len(draft)

    def cancel(self) -> list[Event]:
        return self._end("cancelled")

    def _end(self, reason: FinishReason) -> list[Event]:
        """The held-back tail (unless the answer was cut by a stop string or cancelled), then the end."""
        if self.finished:
            return []
        self.finished, self.reason = True, reason
        events: list[Event] = []
        if not self._by_stop_string:
            tail, _ = self._stops.feed(self._detok.flush())
            tail += self._stops.flush()
            if tail and reason != "cancelled":
                self._text.append(tail)
                events.append(TokenEvent(tail, -1))
        now = time.perf_counter()
        t = self.timings
        t.total_ms = (now - self.t_start) * 1000
        if self.t_first is not None:
            t.decode_ms = (now - self.t_first) * 1000
            if len(self.generated) > 1 and t.decode_ms > 0:
                t.tokens_per_s = (len(self.generated) - 1) / (t.decode_ms / 1000)
        usage = Usage(self.n_prompt, len(self.generated), self.n_image_tokens, self.n_video_tokens)
        events.append(FinishEvent(reason, usage, t, "".join(self._text)))
        return events

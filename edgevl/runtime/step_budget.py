"""How much of a newcomer's work one loop step may carry while answers stream, learnt from the steps.

A prompt token or a vision slice costs very different times on different CPUs next to a decode step
(the 2B int8: ~1.8 ms a prompt token beside a 78 ms step on a Xeon with VNNI, ~17 ms beside ~120 ms
on a Zen 3 without), so a budget in tokens makes streams stall on one box and newcomers crawl on the
other. The budget is time instead: a step may take up to `stretch` × what a plain decode step of the
same rows takes. The loop reports every run's wall time; this keeps running averages of

    a plain decode step, by decoding rows       (seconds)
    one prompt token riding in a decode step    (the mixed step's time less the plain step's, per token)
    a vision slice, by kind, per unit of cost   (runtime/vision_job.py's decoder-token equivalents)

and turns the allowance into prompt tokens or vision slices. `max_tokens` (decoder tokens: the
decoding rows' own and the rest) caps a step whatever the clock says. Until a kind has been seen,
its guess is conservative (a prompt token or a unit of vision: an eighth of a decode step), so the
first slices are short and the averages take over within a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevl.runtime.vision_job import MIN_CUT_ROWS, VisionJob

_SMOOTHING = 0.3  # weight of the newest observation: a few steps to settle, not thrown by one outlier
_FIRST_GUESS = 1 / 8  # of a decode step, per prompt token or vision unit not yet measured


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + _SMOOTHING * (new - old)


@dataclass
class StepBudget:
    stretch: float  # a step carrying a newcomer's work may take this × a plain decode step (≥ 1)
    max_tokens: int  # decoder tokens a step may carry at most (its decoding rows' included)
    decode_s: dict[int, float] = field(default_factory=dict)  # plain decode step, by rows
    token_s: float | None = None  # one prompt token beside decoding rows
    vision_unit_s: dict[str, float] = field(default_factory=dict)  # vision slice kind → seconds per unit

    # ---- what the loop saw ------------------------------------------------------------------
    def observe_decode(self, rows: int, seconds: float) -> None:
        self.decode_s[rows] = _average(self.decode_s.get(rows), seconds)

    def observe_mixed(self, rows: int, tokens: int, seconds: float) -> None:
        """A decoder run of `rows` decoding rows and a prompt slice of `tokens`."""
        plain = self._decode(rows)
        if plain is not None and tokens > 0:
            self.token_s = _average(self.token_s, max(seconds - plain, 0.0) / tokens)

    def observe_vision(self, kind: str, units: float, seconds: float) -> None:
        if units > 0:
            self.vision_unit_s[kind] = _average(self.vision_unit_s.get(kind), seconds / units)

    # ---- what a step may carry --------------------------------------------------------------
    def prompt_tokens(self, rows: int) -> int:
        """Prompt tokens to ride beside `rows` decoding rows (at least one, so a newcomer moves on)."""
        cap = self.max_tokens - rows
        plain = self._decode(rows)
        if plain is None:
            return max(1, cap)
        per_token = self.token_s if self.token_s is not None else plain * _FIRST_GUESS
        return max(1, min(cap, int(self.allowance(rows) / max(per_token, 1e-6))))

    def allowance(self, rows: int) -> float:
        """Seconds a step beside `rows` decoding rows may add for a newcomer (inf before any is timed)."""
        plain = self._decode(rows)
        return float("inf") if plain is None else (self.stretch - 1.0) * plain

    def vision_seconds(self, rows: int, kind: str, units: float) -> float:
        """The expected time of a vision slice of this kind and cost."""
        per_unit = self.vision_unit_s.get(kind)
        if per_unit is None:
            plain = self._decode(rows)
            per_unit = 0.0 if plain is None else plain * _FIRST_GUESS
        return per_unit * units

    def run_vision(self, job: VisionJob, rows: int) -> None:
        """A picture's slices beside `rows` decoding rows: while the next one's expected time fits what
        the allowance has left and its cost the token cap's rest. A piece over a picture's patches
        that does not fit is cut to what does (runtime/vision_job.py); at least one piece runs, cut
        to its shortest if need be (a picture moves on)."""
        units, seconds = self.max_tokens - rows, self.allowance(rows)
        first = True
        while not job.done:
            kind, cost = job.next_kind, job.next_cost
            expected = self.vision_seconds(rows, kind, cost)
            if cost > units or expected > seconds:
                if job.next_rows:
                    fits = job.next_rows * min(units / cost, seconds / expected if expected > 0 else 1.0)
                    if fits < MIN_CUT_ROWS and not first:
                        return
                    job.cut(int(fits))
                    cost = job.next_cost
                elif not first:
                    return
            took = job.step()
            self.observe_vision(kind, cost, took)
            units, seconds, first = units - cost, seconds - took, False

    def _decode(self, rows: int) -> float | None:
        """A plain step of `rows` rows, or of the nearest row count timed (decode reads the same
        weights whatever the rows, so a neighbour is a fair guess)."""
        if rows in self.decode_s:
            return self.decode_s[rows]
        if not self.decode_s:
            return None
        return self.decode_s[min(self.decode_s, key=lambda r: abs(r - rows))]

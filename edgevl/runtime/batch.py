"""The loop that owns the CPU: continuous batching, one decoder run per step under a time budget.

    submit() ─► refused at once (runtime/admission.py: queue full, paused, shutting down), or
                waiting (a deque, under the loop's lock) ──(a batch place, its KV row and budget free?)──► admitted
                                                                      │
    each step:  1. one decoder run: every sequence that has a token to add (group A: its KV rows
                   lo..hi of the pool; idle rows in between run a harmless dummy token past their
                   content) and, riding in the same run, one slice (group B): the next part of the
                   oldest ready newcomer's prompt — as many tokens as the step budget allows
                   (runtime/step_budget.py: the step may take `step_stretch` × a plain decode
                   step's time, at most `step_tokens` decoder tokens) — or else a jump-forward
                   draft. The run reads the weights once for both, so a newcomer's prompt no
                   longer stops the running streams for a run of its own.
                   With nothing decoding, a newcomer reads `prefill_chunk` tokens a run (full speed);
                   with `step_tokens` 0 (or a graph exported before mixed runs), its chunks run
                   between the decode runs, as they used to.
                2. the drafts that did not ride along run on their own (see _draft_steps)
                3. vision: the picture or clip a newcomer needs goes through the vision tower's
                   slices (runtime/vision_job.py), one picture at a time, on this thread: to the end
                   when no sequence is decoding, else the slices that fit the step budget (at least
                   one) in a step whose run carried no prompt slice (the two take turns)
                4. sequences that finished, failed or were cancelled leave; their rows stay
                   cached for the next turn of their conversation
    events of each sequence ─► its sink, called on this thread (a server's puts them on its event
                               loop; generate() blocks its caller on a queue) — no thread per request

Admission, the bounded queue, the KV budget, cancellation and the allowed running count (the thermal
governor's lever, `set_max_running`) are all here, on this thread: nothing queues in front of it.
Cancellation is seen at every step boundary (between decoder runs and vision slices); a cancelled
request's picture is dropped with it, half encoded.

Energy (with a readable counter, ops/energy.py): after every decoder run the loop reads the CPU
package's energy since the previous read and shares it among the sequences of that run by their
tokens in it (one each in a decode step; the whole chunk for a prefill or a jump-forward draft). Energy spent while no
tokens ran (vision slices) goes to the next run; energy spent idle goes to no one.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edgevl.ops.energy import EnergyCounter
from edgevl.runtime.admission import Admission
from edgevl.runtime.kv_pool import KVPool
from edgevl.runtime.model import Group, OnnxModel
from edgevl.runtime.prompt import PreparedPrompt, PromptBuilder
from edgevl.runtime.sequence import Sequence
from edgevl.runtime.step_budget import StepBudget
from edgevl.runtime.vision_cache import ImageFeatures, VisionCache
from edgevl.runtime.vision_job import VisionJob
from edgevl.types import EngineError, Event, Histogram, Sink

CHUNK_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class State(enum.Enum):
    """Where a request stands in the loop; only the loop's thread changes it.

    waiting ─► (a KV row) ─► encoding ⇄ prefilling ─► decoding ─► finished | cancelled | failed
    (encoding: a picture or clip the next prompt chunk needs is in, or waits for, the vision tower;
    prefilling also covers a prompt read whose first token is held, `Work.held`, until the newcomers
    admitted with it are read too: see BatchLoop._hold_first)"""

    WAITING = "waiting"
    ENCODING = "encoding"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


LIVE_STATES = (State.WAITING, State.ENCODING, State.PREFILLING, State.DECODING)


@dataclass
class Work:
    """A sequence inside the loop: its state, where its prompt stands and where its events go."""

    seq: Sequence
    prompt: PreparedPrompt
    needed: int  # KV tokens it may use: prompt + answer limit
    sink: Sink  # where its events go, called on the loop's thread
    t_submit: float = field(default_factory=time.perf_counter)  # prepared: Timings.queue_ms runs from here
    t_admit: float = 0.0
    row: int = -1
    prefilled: int = 0  # prompt tokens whose KV is in the row
    feats: dict[int, ImageFeatures] = field(default_factory=dict)  # image or clip index → features
    draft: list[int] = field(default_factory=list)  # tokens its constraint forces next (jump-forward)
    held: np.ndarray | None = None  # its prompt's last logits while its first token is held (_hold_first)
    t_read: float = 0.0  # when its prompt was read (a held first token waits from here)
    state: State = State.WAITING


@dataclass
class Slice:
    """Tokens one run adds to one sequence's row besides the decoding rows': the next part of a
    newcomer's prompt, or a jump-forward draft (the last token and the tokens forced after it)."""

    w: Work
    ids: np.ndarray  # (1, n)
    cos: np.ndarray  # (n, head_dim)
    sin: np.ndarray
    total: int  # the row's length after the run
    logits: list[int]  # positions within the slice whose logits are wanted
    start: int = 0  # a prompt slice: where in the prompt it starts
    draft: list[int] | None = None  # a draft: the forced tokens


class BatchLoop:
    def __init__(self, model: OnnxModel, pool: KVPool, vision_cache: VisionCache, prompts: PromptBuilder,
                 max_batch: int, prefill_chunk: int, stats: dict[str, int], stats_lock: threading.Lock,
                 jump_forward: bool = True, energy: EnergyCounter | None = None, step_tokens: int = 0,
                 step_stretch: float = 1.2, queue_size: int = 16, start_together: bool = True):
        self.model, self.pool, self.vision_cache, self.prompts = model, pool, vision_cache, prompts
        self.energy = energy if energy is not None and energy.available else None
        self._energy_pending = 0.0  # joules not yet charged to a run's sequences
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # what one step may carry beside decoding sequences: a step_stretch × a plain step's time, at
        # most step_tokens decoder tokens (0, or a graph exported before mixed runs: a newcomer's
        # prompt runs in chunks of its own)
        self.budget = StepBudget(step_stretch, step_tokens if model.can_mix else 0)
        self.jump_forward = jump_forward and model.has_num_logits
        self.start_together = start_together
        self.stats, self._stats_lock = stats, stats_lock
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decoder runs by sequences in them
        self.chunk_tokens: collections.Counter[int] = collections.Counter()  # prefill chunks by size bucket
        # wall time of each decoder run by kind, the tokens it carried, and each picture's vision time
        # (summed over its slices)
        self.step_seconds = {k: Histogram(SECONDS_BUCKETS) for k in ("decode", "mixed", "prefill", "draft")}
        self.run_tokens = Histogram(TOKEN_BUCKETS)
        self.vision_seconds = Histogram(SECONDS_BUCKETS)
        self.admission: Admission[Work] = Admission(max_batch, queue_size, lambda w: w.seq.cancelled, self._count)
        self.active: list[Work] = []
        # admitted requests by state, as of the last change: other threads read this, never `active`
        self._states = {s.value: 0 for s in LIVE_STATES}
        self._cv = threading.Condition()
        # the picture going through the vision tower, a few slices per step: (work, item, job)
        self._vision: tuple[Work, int, VisionJob] | None = None
        self._vision_next = False  # a step's budget went to a prompt slice while vision waited: its turn
        self._thread = threading.Thread(target=self._loop, name="batch-loop", daemon=True)
        self._thread.start()

    # ---- called from other threads (a server's event loop, a caller of generate) --------------
    def check(self) -> None:
        """Raises what `submit` would raise now (QueueFull, Paused, ShuttingDown)."""
        with self._cv:
            self.admission.check(self._running())

    def submit(self, work: Work) -> None:
        """Queues `work`, or raises QueueFull, Paused or ShuttingDown (and nothing of it runs)."""
        with self._cv:
            self.admission.add(work, self._running())
            self._cv.notify()

    def cancel(self, work: Work) -> None:
        """Stops `work`: its place in the queue is free at once; the loop ends it at its next turn."""
        work.seq.request.cancel.set()
        with self._cv:
            self._cv.notify()

    def set_max_running(self, n: int) -> None:
        with self._cv:
            self.admission.set_allowed(n)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self.admission.closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def load(self) -> dict[str, int]:
        """Requests in each live state, each counted once: the loop's last published snapshot of the
        admitted ones, and the queue now (without the cancelled that have not left it yet)."""
        with self._cv:
            return {**self._states, State.WAITING.value: self.admission.live()}

    def _running(self) -> int:
        """Admitted requests, as of the last published change (other threads never read `active`)."""
        return sum(n for state, n in self._states.items() if state != State.WAITING.value)

    def _admissible(self) -> bool:
        """Whether the head of the queue has a place to take now (a peek from the loop's thread)."""
        return bool(self.admission.waiting) and len(self.active) < self.admission.allowed

    def _idle(self) -> bool:
        """Whether the loop has nothing to do until someone calls in (held under the lock)."""
        a = self.admission
        return not self.active and not (a.waiting and (a.allowed > 0 or a.live() < len(a.waiting)))

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not self.admission.waiting and not self.active
                while not self.admission.closed and self._idle():
                    # paused with a queue: look again now and then for a cancel that bypassed `cancel`
                    self._cv.wait(timeout=1.0 if self.admission.waiting else None)
                if self.admission.closed:
                    for w in list(self.admission.waiting) + self.active:
                        self._deliver(w, EngineError("the engine is shutting down"))
                    return
                self._admit()
            if idle and self.energy is not None:  # what the box spent idle is no answer's
                self.energy.read()
                self._energy_pending = 0.0
            try:
                self._drop_cancelled()
                self._release_held()
                rode = self._step()
                self._draft_steps()
                self._vision_step(rode)
            except BaseException as e:  # a bug here must not leave callers waiting forever
                for w in list(self.active):
                    self._fail(w, e)

    def _admit(self) -> None:
        """First come, first served, while fewer than the allowed number run: the head of the queue waits
        until its KV fits, and so do those behind it. Called holding the lock."""
        waiting = self.admission.waiting
        for w in self.admission.drop_cancelled():
            events = w.seq.cancel()
            self._set(w, State.CANCELLED)
            for ev in events:
                self._deliver(w, ev)
        while waiting and len(self.active) < self.admission.allowed:
            w = waiting[0]
            try:
                got = self.pool.acquire(w.prompt.keys, w.needed)
                if got is None:
                    return
                w.row, w.prefilled = got
                self.pool.advance(w.row, w.prompt.keys[:w.prefilled])
            except Exception as e:  # a bug admitting one request ends that request, not the loop
                waiting.popleft()
                if w.row >= 0:
                    self.pool.release(w.row)
                self._fail(w, e)
                continue
            waiting.popleft()
            w.t_admit = time.perf_counter()
            w.seq.timings.queue_ms = (w.t_admit - w.t_submit) * 1000
            w.seq.timings.prefix_reused_tokens = w.prefilled
            self._count("prefix_reused_tokens", w.prefilled)
            self.active.append(w)
            self._set(w, State.PREFILLING)

    def _drop_cancelled(self) -> None:
        for w in list(self.active):
            if w.seq.cancelled and not w.seq.finished:
                if self._vision is not None and self._vision[0] is w:
                    self._vision = None  # its picture, half encoded, is dropped: the tower is free
                self._emit(w, w.seq.cancel())

    def _step(self) -> bool:
        """One step: the decoding sequences' next tokens, with one slice in the same decoder run when
        the step budget allows — the oldest ready newcomer's next prompt tokens (as many as fit its
        time allowance and token cap), else a jump-forward draft. Without a budget, or with nothing decoding,
        each runs on its own (a newcomer's chunk `prefill_chunk` long). A prompt slice and a picture's
        vision slices take turns at the budget (see _vision_step).
        → whether a prompt slice rode in the decoding rows' run (the step's budget is spent)."""
        running = [w for w in self.active if w.state is State.DECODING and not w.draft]
        newcomer = self._ready_newcomer()
        budgeted = bool(running) and self.budget.max_tokens > 0
        if budgeted:
            if newcomer is not None and not (self._vision_next and self._vision is not None):
                self._run(running, self._prompt_slice(newcomer, self.budget.prompt_tokens(len(running))))
                return True
            drafting = next((w for w in self.active if w.state is State.DECODING and w.draft), None)
            if drafting is not None and self._fits_beside(drafting):
                self._run(running, self._draft_slice(drafting))  # a few forced tokens: not the budget's
                return False
        if running:
            self._run(running, None)
        if newcomer is not None and not budgeted and newcomer in self.active and not newcomer.seq.cancelled:
            self._run([], self._prompt_slice(newcomer, self.prefill_chunk))
        return False

    def _prompt_slice(self, w: Work, n: int) -> Slice:
        p = w.prompt
        start, end = w.prefilled, min(p.ids.size, w.prefilled + n)
        return Slice(w, p.ids[None, start:end], p.cos[start:end], p.sin[start:end], end,
                     [end - start - 1] if end == p.ids.size else [], start)

    def _draft_slice(self, w: Work) -> Slice:
        """The last token and the tokens the constraint forces after it, with logits at every position."""
        draft, w.draft = w.draft, []
        n_gen = len(w.seq.generated)
        ids = np.asarray([[w.seq.last_token, *draft]], np.int64)
        first = w.prompt.next_position + n_gen - 1
        cos, sin = self.prompts.cos_sin(np.tile(np.arange(first, first + ids.shape[1]), (3, 1)))
        return Slice(w, ids, cos, sin, w.prompt.ids.size + n_gen + len(draft), list(range(ids.shape[1])),
                     draft=draft)

    def _fits_beside(self, w: Work) -> bool:
        # a bystander's dummy token goes one past the slice (see _run): it must fit in the row
        return w.prompt.ids.size + len(w.seq.generated) + len(w.draft) < self.pool.max_len

    def _run(self, running: list[Work], sl: Slice | None) -> None:
        """One decoder run: `running` decode a token each (group A: their rows lo..hi of the pool) and
        `sl` adds its tokens to its own row (group B, or A when no one decodes)."""
        by_row = {x.row: x for x in running}
        lo, hi = (min(by_row), max(by_row) + 1) if by_row else (0, 0)
        ids = np.zeros((hi - lo, 1), np.int64)
        positions = np.zeros((3, hi - lo), np.int64)
        lengths = np.zeros(hi - lo, np.int64)
        for r in range(lo, hi):
            x = by_row.get(r)
            if x is None:  # a bystander row (idle, mid-prompt, drafting): a dummy token past its content —
                # past the slice, for the slice's own row, since the two groups' writes are unordered
                lengths[r - lo] = sl.total + 1 if sl is not None and r == sl.w.row else self.pool.idle_length(r) + 1
                continue
            n_gen = len(x.seq.generated)
            ids[r - lo, 0] = x.seq.last_token
            positions[:, r - lo] = x.prompt.next_position + n_gen - 1
            lengths[r - lo] = x.prompt.ids.size + n_gen
        keys, values = self.pool.keys, self.pool.values
        n_a = hi - lo
        logit_idx = [r - lo for r in by_row]  # with a slice: its logits follow, in its order
        cos, sin = [], []  # packed: group A's tokens, then the slice's
        if running:
            c, s = self.prompts.cos_sin(positions)
            cos.append(c)
            sin.append(s)
        visual = None
        if sl is not None:
            w = sl.w
            cos.append(sl.cos)
            sin.append(sl.sin)
            logit_idx += [n_a + i for i in sl.logits]
            if sl.draft is None:
                visual = self._visual(w, sl.start, sl.start + sl.ids.shape[1], offset=n_a)
        t_run = time.perf_counter()
        try:
            if sl is None:
                logits = self.model.decode([k[lo:hi] for k in keys], [v[lo:hi] for v in values], ids, cos[0], sin[0],
                                           lengths)
            else:
                row = slice(sl.w.row, sl.w.row + 1)
                b = Group([k[row] for k in keys], [v[row] for v in values], sl.ids, np.asarray([sl.total]))
                if not running:  # the slice alone
                    logits = self.model.decode(b.keys, b.values, b.ids, sl.cos, sl.sin, b.lengths, visual,
                                               n_logits=sl.ids.shape[1] if sl.draft is not None else 1)
                else:
                    a = Group([k[lo:hi] for k in keys], [v[lo:hi] for v in values], ids, lengths)
                    logits = self.model.run(a, b, np.concatenate(cos), np.concatenate(sin), visual,
                                            np.asarray(logit_idx))
        except EngineError as e:
            for x in [*running, *([sl.w] if sl is not None else [])]:
                self._fail(x, e)
            return
        n_slice = sl.ids.shape[1] if sl is not None else 0
        kind = ("mixed" if running and sl is not None else "decode" if running
                else "draft" if sl.draft is not None else "prefill")
        seconds = time.perf_counter() - t_run
        self._ran(kind, seconds, len(running) + n_slice)
        if kind == "decode":
            self.budget.observe_decode(len(running), seconds)
        elif kind == "mixed" and sl is not None and sl.draft is None:
            self.budget.observe_mixed(len(running), n_slice, seconds)
        if kind == "mixed":
            self._count("mixed_steps")
        if running:
            self.batch_sizes[len(running)] += 1
        self._charge([(x, 1) for x in running] + ([(sl.w, n_slice)] if sl is not None else []))
        for j, (r, x) in enumerate(by_row.items()):
            self.pool.advance(r, np.append(x.prompt.keys, x.seq.generated))
            # decode rows' logits come first in a mixed run; a plain one gives one per row of lo..hi
            self._emit(x, x.seq.accept(logits[j if sl is not None else r - lo]))
            self._plan_draft(x)
        if sl is not None:
            rest = logits[len(by_row):] if running else logits
            self._finish_slice(sl, rest, time.perf_counter() - t_run)

    def _finish_slice(self, sl: Slice, logits: np.ndarray, seconds: float) -> None:
        w = sl.w
        if sl.draft is not None:
            events, kept = w.seq.accept_draft(logits, sl.draft)
            self._count("forced_tokens", kept)
            self.pool.advance(w.row, np.append(w.prompt.keys, w.seq.generated[:-1]))
            self._emit(w, events)
            self._plan_draft(w)
            return
        n = sl.ids.shape[1]
        self.chunk_tokens[next((b for b in CHUNK_BUCKETS if n <= b), CHUNK_BUCKETS[-1])] += 1
        w.prefilled = sl.total
        self.pool.advance(w.row, w.prompt.keys[:sl.total])
        w.seq.timings.prefill_ms += seconds * 1000
        if sl.total == w.prompt.ids.size:
            w.t_read = time.perf_counter()
            if self._hold_first(w):
                w.held = logits[-1].copy()
            else:
                self._start(w, logits[-1])

    def _start(self, w: Work, logits: np.ndarray) -> None:
        """A newcomer's prompt is read: its first token, and it decodes from the next step on."""
        events = w.seq.accept(logits)
        if not w.seq.finished:
            self._set(w, State.DECODING)
        self._emit(w, events)
        self._plan_draft(w)

    def _hold_first(self, w: Work) -> bool:
        """Whether a newcomer whose prompt is read waits to start until the newcomers admitted with it
        are read too: only while no answer streams (no stream's pace is at stake) and another newcomer
        still reads. Otherwise its stream would start at once and the step budget would slow the others'
        pictures and prompts to a fraction of the CPU to keep its pace — for four pictures arriving
        together, the last first token came ~3× later than reading all four first. vLLM's scheduler
        gives the same order (every waiting prompt in one step's budget). The wait is bounded by the
        newcomer's own cost: at most `max_batch` times as long as reading its prompt took (see
        _release_held), so a short question admitted beside a 1024² page is not held for the page's
        ten seconds, while four like pictures all start together."""
        return (self.start_together and not self._decoding()
                and any(self._reading(x) for x in self.active if x is not w))

    def _decoding(self) -> int:
        return sum(x.state is State.DECODING for x in self.active)

    @staticmethod
    def _reading(w: Work) -> bool:
        return w.state in (State.ENCODING, State.PREFILLING) and w.held is None and not w.seq.cancelled

    def _release_held(self) -> None:
        """The held newcomers start together once no newcomer is still reading, a stream runs, or one
        of them has waited `max_batch` times as long as reading its own prompt took."""
        held = [w for w in self.active if w.held is not None]
        if not held:
            return
        now = time.perf_counter()
        waited_enough = any(now - w.t_read > self.max_batch * (w.t_read - w.t_admit) for w in held)
        if any(self._reading(w) for w in self.active) and not waited_enough and not self._decoding():
            return
        for w in held:
            logits, w.held = w.held, None
            if not w.seq.cancelled:
                self._start(w, logits)

    def _plan_draft(self, w: Work) -> None:
        if self.jump_forward and not w.seq.finished:
            w.draft = w.seq.draft()

    def _draft_steps(self) -> bool:
        """Jump-forward: a sequence whose constraint forces its next tokens runs the last token and
        that draft as one slice, with logits at every position; the draft is kept while the model,
        masked and sampled as always, chooses it (a forced run of k tokens: one pass, not k steps).
        The KV of a rejected tail is left past the row's length, where the next run overwrites it.
        (One draft a step rides in the decoding rows' run instead, see _step; these are the rest.)"""
        drafting = [w for w in self.active if w.state is State.DECODING and w.draft]
        for w in drafting:
            self._run([], self._draft_slice(w))
        return bool(drafting)

    def _ready_newcomer(self) -> Work | None:
        """The oldest newcomer whose images are all encoded (its state: prefilling), or None; images
        become vision jobs one at a time meanwhile (their newcomers: encoding; see _vision_step)."""
        self._collect_vision()
        for w in self.active:
            if not self._reading(w):
                continue
            if self._features_ready(w):
                self._set(w, State.PREFILLING)
                return w
            self._set(w, State.ENCODING)
        return None

    def _features_ready(self, w: Work) -> bool:
        """Whether every image and clip the chunks still need has its features; if not, and the vision
        tower is free, the next one becomes its job (run by _vision_step)."""
        p = w.prompt
        for i, (patches, fp) in enumerate(zip(p.patches, p.fingerprints)):
            if i in w.feats or all(e <= w.prefilled for _, e in p.item_spans(i)):
                continue  # encoded, or already in the KV (prefix reuse)
            if self._vision is not None and self._vision[0] is w:
                return False  # its image is being encoded
            f = self.vision_cache.get(fp)
            if f is not None:
                w.seq.timings.vision_cache_hits += 1
                self._count("vision_cache_hits")
                w.feats[i] = f
                continue
            if self._vision is None:
                self._count("vision_cache_misses")
                self._vision = (w, i, self.model.vision_job(patches))
            return False
        return True

    def _vision_step(self, budget_spent: bool) -> None:
        """The picture in the vision tower moves on: to the end when no sequence is decoding (a lone
        request waits no longer than for one whole-tower run; between slices a cancel, or a queued
        request that has a place to take, is still seen), else by the slices that fit one step's
        budget, at least one, so streams keep their pace — in a step whose budget a prompt slice did
        not take (`budget_spent`; then the picture goes first next step)."""
        if self._vision is None:
            return
        w, _, job = self._vision
        if w not in self.active or w.seq.cancelled:
            self._vision = None
            return
        decoding = self._decoding()
        if decoding and budget_spent:
            self._vision_next = True
            return
        self._vision_next = False
        before = job.slices_run
        try:
            if decoding:
                self.budget.run_vision(job, decoding)
            else:  # a slice at least: a queue that cannot be admitted yet must not hold the tower
                job.step()
                while not job.done and not w.seq.cancelled and not self._admissible():
                    job.step()
        except EngineError as err:
            self._vision = None
            self._fail(w, err)
            return
        finally:
            self._count("vision_slices", job.slices_run - before)
        self._collect_vision()

    def _collect_vision(self) -> None:
        """A finished picture's features go to its newcomer (unless that one left) and the cache."""
        if self._vision is None or not self._vision[2].done:
            return
        w, i, job = self._vision
        self._vision = None
        if w not in self.active or w.seq.cancelled:
            return
        f = job.features
        self.vision_seconds.observe(job.seconds)
        self.vision_cache.put(w.prompt.fingerprints[i], f)
        w.feats[i] = f
        w.seq.timings.vision_ms += job.seconds * 1000

    def _visual(self, w: Work, start: int, end: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of image features for the image tokens in [start, end), at (0, offset + position in the
        chunk): the chunk's place in a packed run."""
        idx, emb, deep = [], [], []
        row_of = {}  # an item's features run through its spans in order (a clip: frame group by group)
        for (s, e), k in zip(w.prompt.spans, w.prompt.span_items):
            first = row_of.setdefault(k, 0)
            row_of[k] = first + e - s
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                continue
            f = w.feats[k]
            idx.append(np.arange(lo, hi) - start + offset)
            emb.append(f.embeds[first + lo - s:first + hi - s])
            deep.append(f.deepstack[:, first + lo - s:first + hi - s])
        if not idx:
            return self.model.no_visual()
        rows = np.concatenate(idx)
        return (np.stack([np.zeros_like(rows), rows], axis=1), np.concatenate(emb).astype(np.float32),
                np.concatenate(deep, axis=1).astype(np.float32))

    def _ran(self, kind: str, seconds: float, tokens: int) -> None:
        self.step_seconds[kind].observe(seconds)
        self.run_tokens.observe(tokens)

    def clear_histograms(self) -> None:
        self.batch_sizes.clear()
        self.chunk_tokens.clear()
        for h in (*self.step_seconds.values(), self.run_tokens, self.vision_seconds):
            h.clear()

    # ---- leaving -----------------------------------------------------------------------------
    def _charge(self, tokens: list[tuple[Work, int]]) -> None:
        """The energy since the previous run, shared by the sequences of this one by their tokens in it
        (before their events go out: the last one carries the timings)."""
        if self.energy is None:
            return
        joules = self._energy_pending + (self.energy.read() or 0.0)
        self._energy_pending = 0.0
        total = sum(n for _, n in tokens)
        for w, n in tokens:
            t = w.seq.timings
            t.energy_j = (t.energy_j or 0.0) + joules * n / total

    def _emit(self, w: Work, events: list[Event]) -> None:
        if w.seq.finished:  # the row is free before the caller hears the end, so its next turn finds it
            self._leave(w, State.CANCELLED if w.seq.reason == "cancelled" else State.FINISHED)
            self._count("cancelled" if w.seq.reason == "cancelled" else "finished")
            self._count("generated_tokens", len(w.seq.generated))
        for ev in events:
            self._deliver(w, ev)

    def _fail(self, w: Work, error: BaseException) -> None:
        w.seq.finished = True
        self._leave(w, State.FAILED)
        self._count("errors")
        self._deliver(w, error)

    def _deliver(self, w: Work, item: Event | BaseException) -> None:
        try:
            w.sink(item)
        except Exception:  # a sink with no listener left (its event loop closed): stop what it was for
            w.seq.request.cancel.set()

    def _leave(self, w: Work, state: State) -> None:
        if w in self.active:
            self.active.remove(w)
            self.pool.release(w.row)
            self.admission.served(time.perf_counter() - w.t_admit)
        self._set(w, state)

    def _set(self, w: Work, state: State) -> None:
        """Moves a request to `state` and publishes the counts before anyone hears of the change."""
        if w.state is state:
            return
        w.state = state
        counts = collections.Counter(x.state for x in self.active)
        self._states = {s.value: counts[s] for s in LIVE_STATES}  # one assignment: readers see a whole snapshot

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + n

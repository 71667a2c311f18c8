"""The loop that owns the CPU: continuous batching with chunked prefill.

    submit() ─► waiting (a deque, under the loop's lock) ──(a KV row and budget free?)──► admitted
                                                                      │
    each step:  1. decode: every sequence that has a token to add, in ONE decoder run over
                   its KV rows (rows lo..hi of the pool; idle rows in between run a harmless
                   dummy token past their content)
                   (a sequence whose constraint forces its next tokens runs them as a draft of its
                   own instead: checked position by position in one run, see _draft_steps)
                2. admit: one prompt chunk (at most `prefill_chunk` tokens) of the oldest
                   newcomer whose images are encoded, so running streams keep flowing while a
                   long prompt is read
                3. vision: the picture or clip a newcomer needs goes through the vision tower's
                   slices (runtime/vision_job.py), one picture at a time: to the end when no
                   sequence is decoding, else `step_budget` minus the decoding rows' worth of
                   slices per step (decoder-token equivalents; at least one slice)
                4. sequences that finished, failed or were cancelled leave; their rows stay
                   cached for the next turn of their conversation
    events of each sequence ─► its own queue ─► the generate() iterator of its caller

Cancellation is seen at every step boundary (between decode steps, prompt chunks and vision
slices); a cancelled request's picture is dropped with it, half encoded.

Energy (with a readable counter, ops/energy.py): after every decoder run the loop reads the CPU
package's energy since the previous read and shares it among the sequences of that run by their
tokens in it (one each in a decode step; the whole chunk for a prefill or a jump-forward draft). Energy spent while no
tokens ran (vision slices) goes to the next run; energy spent idle goes to no one.
"""

from __future__ import annotations

import collections
import enum
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edgevl.ops.energy import EnergyCounter
from edgevl.runtime.kv_pool import KVPool
from edgevl.runtime.model import OnnxModel
from edgevl.runtime.prompt import PreparedPrompt, PromptBuilder
from edgevl.runtime.sequence import Sequence
from edgevl.runtime.vision_cache import ImageFeatures, VisionCache
from edgevl.runtime.vision_job import VisionJob
from edgevl.types import EngineError, Event, Histogram

CHUNK_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class State(enum.Enum):
    """Where a request stands in the loop; only the loop's thread changes it.

    waiting ─► (a KV row) ─► encoding ⇄ prefilling ─► decoding ─► finished | cancelled | failed
    (encoding: a picture or clip the next prompt chunk needs is in, or waits for, the vision tower)"""

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
    events: queue.Queue = field(default_factory=queue.Queue)
    t_submit: float = field(default_factory=time.perf_counter)  # prepared: Timings.queue_ms runs from here
    row: int = -1
    prefilled: int = 0  # prompt tokens whose KV is in the row
    feats: dict[int, ImageFeatures] = field(default_factory=dict)  # image or clip index → features
    draft: list[int] = field(default_factory=list)  # tokens its constraint forces next (jump-forward)
    state: State = State.WAITING


class BatchLoop:
    def __init__(self, model: OnnxModel, pool: KVPool, vision_cache: VisionCache, prompts: PromptBuilder,
                 max_batch: int, prefill_chunk: int, stats: dict[str, int], stats_lock: threading.Lock,
                 jump_forward: bool = True, energy: EnergyCounter | None = None, step_budget: int = 32):
        self.model, self.pool, self.vision_cache, self.prompts = model, pool, vision_cache, prompts
        self.energy = energy if energy is not None and energy.available else None
        self._energy_pending = 0.0  # joules not yet charged to a run's sequences
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # a step's work while others decode, in decoder-token equivalents (EngineOptions.step_tokens)
        self.step_budget = step_budget
        self.jump_forward = jump_forward and model.has_num_logits
        self.stats, self._stats_lock = stats, stats_lock
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decoder runs by sequences in them
        self.chunk_tokens: collections.Counter[int] = collections.Counter()  # prefill chunks by size bucket
        # wall time of each decoder run by kind, the tokens it carried, and each picture's vision time
        # (summed over its slices)
        self.step_seconds = {k: Histogram(SECONDS_BUCKETS) for k in ("decode", "prefill", "draft")}
        self.step_tokens = Histogram(TOKEN_BUCKETS)
        self.vision_seconds = Histogram(SECONDS_BUCKETS)
        self.waiting: collections.deque[Work] = collections.deque()
        self.active: list[Work] = []
        # admitted requests by state, as of the last change: other threads read this, never `active`
        self._states = {s.value: 0 for s in LIVE_STATES}
        self._cv = threading.Condition()
        self._closed = False
        # the picture going through the vision tower, a few slices per step: (work, item, job)
        self._vision: tuple[Work, int, VisionJob] | None = None
        self._thread = threading.Thread(target=self._loop, name="batch-loop", daemon=True)
        self._thread.start()

    # ---- called from request threads ---------------------------------------------------------
    def submit(self, work: Work) -> None:
        with self._cv:
            if self._closed:
                raise EngineError("the engine is closed")
            self.waiting.append(work)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def load(self) -> dict[str, int]:
        """Requests in each live state: the loop's last published snapshot, and its queue now."""
        return {**self._states, State.WAITING.value: len(self.waiting)}

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not self.waiting and not self.active
                while not self._closed and not self.waiting and not self.active:
                    self._cv.wait()
                if self._closed:
                    for w in list(self.waiting) + self.active:
                        w.events.put(EngineError("the engine is shutting down"))
                    return
                self._admit()
            if idle and self.energy is not None:  # what the box spent idle is no answer's
                self.energy.read()
                self._energy_pending = 0.0
            try:
                self._drop_cancelled()
                self._decode_step()
                self._draft_steps()
                self._prefill_step()
                self._vision_step()
            except BaseException as e:  # a bug here must not leave callers waiting forever
                for w in list(self.active):
                    self._fail(w, e)

    def _admit(self) -> None:
        """First come, first served: the head of the queue waits until its KV fits, and so do those behind it."""
        for w in [w for w in self.waiting if w.seq.cancelled]:
            self.waiting.remove(w)
            self._emit(w, w.seq.cancel())
        while self.waiting and len(self.active) < self.max_batch:
            w = self.waiting[0]
            try:
                got = self.pool.acquire(w.prompt.keys, w.needed)
                if got is None:
                    return
                w.row, w.prefilled = got
                self.pool.advance(w.row, w.prompt.keys[:w.prefilled])
            except Exception as e:  # a bug admitting one request ends that request, not the loop
                self.waiting.popleft()
                if w.row >= 0:
                    self.pool.release(w.row)
                self._fail(w, e)
                continue
            self.waiting.popleft()
            w.seq.timings.queue_ms = (time.perf_counter() - w.t_submit) * 1000
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

    def _decode_step(self) -> bool:
        running = [w for w in self.active if w.state is State.DECODING and not w.draft]
        if not running:
            return False
        by_row = {w.row: w for w in running}
        lo, hi = min(by_row), max(by_row) + 1
        ids = np.zeros((hi - lo, 1), np.int64)
        positions = np.zeros((3, hi - lo), np.int64)
        lengths = np.zeros(hi - lo, np.int64)
        for r in range(lo, hi):
            w = by_row.get(r)
            if w is None:  # a bystander row (idle, or a newcomer mid-prompt): a dummy token past its content
                lengths[r - lo] = self.pool.idle_length(r) + 1
                continue
            n_gen = len(w.seq.generated)
            ids[r - lo, 0] = w.seq.last_token
            positions[:, r - lo] = w.prompt.next_position + n_gen - 1
            lengths[r - lo] = w.prompt.ids.size + n_gen
        cos, sin = self.prompts.cos_sin(positions)
        t0 = time.perf_counter()
        try:
            logits = self.model.decode([k[lo:hi] for k in self.pool.keys], [v[lo:hi] for v in self.pool.values],
                                       ids, cos, sin, lengths)
        except EngineError as e:
            for w in running:
                self._fail(w, e)
            return True
        self._ran("decode", t0, len(running))
        self.batch_sizes[len(running)] += 1
        self._charge([(w, 1) for w in running])
        for r, w in by_row.items():
            self.pool.advance(r, np.append(w.prompt.keys, w.seq.generated))
            self._emit(w, w.seq.accept(logits[r - lo]))
            self._plan_draft(w)
        return True

    def _plan_draft(self, w: Work) -> None:
        if self.jump_forward and not w.seq.finished:
            w.draft = w.seq.draft()

    def _draft_steps(self) -> bool:
        """Jump-forward: a sequence whose constraint forces its next tokens runs the last token and
        that draft as one chunk, with logits at every position; the draft is kept while the model,
        masked and sampled as always, chooses it (a forced run of k tokens: one pass, not k steps).
        The KV of a rejected tail is left past the row's length, where the next run overwrites it."""
        drafting = [w for w in self.active if w.state is State.DECODING and w.draft]
        for w in drafting:
            draft, w.draft = w.draft, []
            n_gen = len(w.seq.generated)
            ids = np.asarray([[w.seq.last_token, *draft]], np.int64)
            first = w.prompt.next_position + n_gen - 1
            cos, sin = self.prompts.cos_sin(np.tile(np.arange(first, first + ids.shape[1]), (3, 1)))
            row = slice(w.row, w.row + 1)
            t0 = time.perf_counter()
            try:
                logits = self.model.decode([k[row] for k in self.pool.keys], [v[row] for v in self.pool.values],
                                           ids, cos, sin, np.asarray([w.prompt.ids.size + n_gen + len(draft)]),
                                           n_logits=ids.shape[1])
            except EngineError as e:
                self._fail(w, e)
                continue
            self._charge([(w, ids.shape[1])])
            self._ran("draft", t0, ids.shape[1])
            events, kept = w.seq.accept_draft(logits, draft)
            self._count("forced_tokens", kept)
            self.pool.advance(w.row, np.append(w.prompt.keys, w.seq.generated[:-1]))
            self._emit(w, events)
            self._plan_draft(w)
        return bool(drafting)

    def _prefill_step(self) -> bool:
        """Newcomers' work, oldest first: images go to the vision tower one at a time; the oldest
        newcomer whose images are all encoded reads one chunk of its prompt. → whether a chunk ran."""
        self._collect_vision()
        for w in self.active:
            if w.state not in (State.ENCODING, State.PREFILLING) or w.seq.cancelled:
                continue
            if self._features_ready(w):
                self._set(w, State.PREFILLING)
                self._prefill_chunk(w)
                return True
            self._set(w, State.ENCODING)
        return False

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

    def _vision_step(self) -> None:
        """The picture in the vision tower moves on: to the end when no sequence is decoding (a lone
        request waits no longer than for one whole-tower run; between slices a cancel or a newcomer
        to admit is still seen), else by one step's budget, `step_budget` decoder-token equivalents
        less the decoding rows, at least one slice, so streams keep their pace."""
        if self._vision is None:
            return
        w, _, job = self._vision
        if w not in self.active or w.seq.cancelled:
            self._vision = None
            return
        before = job.slices_run
        decoding = sum(x.state is State.DECODING for x in self.active)
        try:
            if decoding:
                job.run(max(0, self.step_budget - decoding))
            else:
                while not job.done and not w.seq.cancelled and not self.waiting:
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

    def _prefill_chunk(self, w: Work) -> None:
        p = w.prompt
        t0 = time.perf_counter()
        start, end = w.prefilled, min(p.ids.size, w.prefilled + self.prefill_chunk)
        row = slice(w.row, w.row + 1)
        visual = self._visual(w, start, end)
        t_run = time.perf_counter()
        try:
            logits = self.model.decode([k[row] for k in self.pool.keys], [v[row] for v in self.pool.values],
                                       p.ids[None, start:end], p.cos[start:end], p.sin[start:end],
                                       np.asarray([end]), visual)
        except EngineError as err:
            self._fail(w, err)
            return
        self._ran("prefill", t_run, end - start)
        self.chunk_tokens[next((b for b in CHUNK_BUCKETS if end - start <= b), CHUNK_BUCKETS[-1])] += 1
        self._charge([(w, end - start)])
        w.prefilled = end
        self.pool.advance(w.row, p.keys[:end])
        w.seq.timings.prefill_ms += (time.perf_counter() - t0) * 1000
        if end == p.ids.size:
            events = w.seq.accept(logits[0])
            if not w.seq.finished:
                self._set(w, State.DECODING)
            self._emit(w, events)
            self._plan_draft(w)

    def _visual(self, w: Work, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of image features for the image tokens in [start, end), indexed within the chunk."""
        idx, emb, deep = [], [], []
        row_of = {}  # an item's features run through its spans in order (a clip: frame group by group)
        for (s, e), k in zip(w.prompt.spans, w.prompt.span_items):
            first = row_of.setdefault(k, 0)
            row_of[k] = first + e - s
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                continue
            f = w.feats[k]
            idx.append(np.arange(lo, hi) - start)
            emb.append(f.embeds[first + lo - s:first + hi - s])
            deep.append(f.deepstack[:, first + lo - s:first + hi - s])
        if not idx:
            return self.model.no_visual()
        rows = np.concatenate(idx)
        return (np.stack([np.zeros_like(rows), rows], axis=1), np.concatenate(emb).astype(np.float32),
                np.concatenate(deep, axis=1).astype(np.float32))

    def _ran(self, kind: str, t0: float, tokens: int) -> None:
        self.step_seconds[kind].observe(time.perf_counter() - t0)
        self.step_tokens.observe(tokens)

    def clear_histograms(self) -> None:
        self.batch_sizes.clear()
        self.chunk_tokens.clear()
        for h in (*self.step_seconds.values(), self.step_tokens, self.vision_seconds):
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
            w.events.put(ev)

    def _fail(self, w: Work, error: BaseException) -> None:
        w.seq.finished = True
        self._leave(w, State.FAILED)
        self._count("errors")
        w.events.put(error)

    def _leave(self, w: Work, state: State) -> None:
        if w in self.active:
            self.active.remove(w)
            self.pool.release(w.row)
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

"""The KV cache of every sequence: rows of one batched buffer per layer, under a memory budget.

    keys[layer], values[layer]: (rows, kv_heads, max_len, head_dim) float32, or int8 for an export
    whose cache is int8 (export/kv_scales.py)
    row r ── running (a sequence decodes into it) │ cached (a finished turn, kept for prefix reuse)
                                                  │ empty

The buffers are anonymous memory maps: a page becomes resident only when written, and a row
given up is handed back to the OS (madvise DONTNEED), so resident memory follows the tokens
actually held, not rows × max_len. The budget counts tokens: a running row reserves its prompt
plus its answer limit; a cached row holds its content until a newcomer needs the room.
Contiguous rows lo..hi can be bound to the decoder at once (GroupQueryAttention writes each
row's new token at that row's own length), which is what batched decoding needs.
"""

from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass, field

import numpy as np

_PAGE = mmap.PAGESIZE


@dataclass
class Row:
    content: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # token keys whose KV it holds
    running: bool = False
    reserved: int = 0  # tokens promised to the running sequence
    last_used: float = 0.0


class KVPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, rows: int, max_len: int,
                 budget_bytes: int, prefix_cache: bool = True, dtype: type = np.float32):
        self.dtype = np.dtype(dtype)
        self._item = self.dtype.itemsize
        unit = max(1, _PAGE // (head_dim * self._item))  # whole pages per head, so a row's tail can be released
        max_len = -(-max_len // unit) * unit
        self.shape = (rows, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.bytes_per_token = n_layers * 2 * n_kv_heads * head_dim * self._item
        self.budget_tokens = budget_bytes // self.bytes_per_token
        self.prefix_cache = prefix_cache
        size = int(np.prod(self.shape)) * self._item
        self._maps = [mmap.mmap(-1, size) for _ in range(2 * n_layers)]
        arrays = [np.frombuffer(m, self.dtype).reshape(self.shape) for m in self._maps]
        self.keys, self.values = arrays[:n_layers], arrays[n_layers:]
        self.rows = [Row() for _ in range(rows)]
        self._lock = threading.Lock()

    # ---- accounting ------------------------------------------------------------------------
    def _held(self, r: Row) -> int:
        return r.reserved if r.running else int(r.content.size)

    def used_tokens(self) -> int:
        return sum(self._held(r) for r in self.rows)

    def fits_ever(self, needed: int) -> bool:
        return needed <= min(self.budget_tokens, self.max_len)

    def stats(self) -> dict[str, int]:
        with self._lock:
            used = self.used_tokens()
            return {"kv_rows": len(self.rows), "kv_running": sum(r.running for r in self.rows),
                    "kv_cached_tokens": sum(int(r.content.size) for r in self.rows if not r.running),
                    "kv_used_bytes": used * self.bytes_per_token,
                    "kv_free_bytes": max(0, self.budget_tokens - used) * self.bytes_per_token,
                    "kv_budget_bytes": self.budget_tokens * self.bytes_per_token}

    # ---- rows ------------------------------------------------------------------------------
    def acquire(self, keys: np.ndarray, needed: int) -> tuple[int, int] | None:
        """A row for a prompt whose token keys are `keys` and that may grow to `needed` tokens:
        the idle row sharing the longest prefix (its KV is reused) when that is most of what the row
        holds; else the row that keeps the running rows closest together, and among those an empty
        row, else the emptiest, least recently used one. A decoder run takes the running rows as one
        contiguous block, and every idle row inside it runs a dummy token over its whole cache: four
        answers on rows 0, 5, 6 and 7 cost a step of eight rows.
        → (row, reused tokens), or None while the budget or the rows are taken."""
        with self._lock:
            idle = [i for i, r in enumerate(self.rows) if not r.running]
            if not idle:
                return None

            def shared(i: int) -> int:
                c = self.rows[i].content
                n = min(c.size, keys.size) if self.prefix_cache else 0
                return int(np.argmin(np.append(c[:n] == keys[:n], False)))

            has_empty = any(self.rows[i].content.size == 0 for i in idle)

            def worth(i: int) -> int:
                # a row whose cache would mostly be overwritten is kept for its own conversation while an
                # empty row exists (a common template start is not worth another turn's cache)
                n = shared(i)
                return n if n * 2 >= self.rows[i].content.size or not has_empty else 0

            running = [i for i, r in enumerate(self.rows) if r.running]

            def span(i: int) -> int:  # rows a decoder run over the running ones and this one covers
                return max(running + [i]) - min(running + [i]) + 1

            best = max(idle, key=lambda i: (worth(i), -span(i), -self.rows[i].content.size, -self.rows[i].last_used))
            reuse = min(shared(best), keys.size - 1)  # at least one token must run to produce logits
            # room: everything held except what the chosen row holds now, plus the newcomer
            others = self.used_tokens() - self._held(self.rows[best])
            victims = sorted((i for i in idle if i != best and self.rows[i].content.size),
                             key=lambda i: self.rows[i].last_used)
            while others + needed > self.budget_tokens and victims:
                v = victims.pop(0)
                others -= int(self.rows[v].content.size)
                self._trim(v, 0)
            if others + needed > self.budget_tokens:
                return None
            row = self.rows[best]
            self._trim(best, reuse)
            row.running, row.reserved, row.last_used = True, needed, time.monotonic()
            return best, reuse

    def advance(self, row: int, keys: np.ndarray) -> None:
        """The row now holds KV for exactly these token keys."""
        self.rows[row].content = keys

    def release(self, row: int) -> None:
        """The sequence is done; its KV stays for the next turn of the conversation (prefix cache)."""
        with self._lock:
            r = self.rows[row]
            r.running, r.reserved, r.last_used = False, 0, time.monotonic()
            if not self.prefix_cache:
                self._trim(row, 0)

    def idle_length(self, row: int) -> int:
        """Where a batched decode may harmlessly write in an idle row bound between running ones:
        just past its content (the last slot if the row is full, which then forgets one token)."""
        r = self.rows[row]
        if r.content.size >= self.max_len:
            r.content = r.content[: self.max_len - 1]
        return int(r.content.size)

    def _trim(self, row: int, keep: int) -> None:
        """Forget all but the first `keep` tokens of a row and hand the rest of its pages back."""
        r = self.rows[row]
        r.content = r.content[:keep].copy()
        _, heads, max_len, hd = self.shape
        head_bytes = max_len * hd * self._item
        start = -(-keep * hd * self._item // _PAGE) * _PAGE
        if start >= head_bytes:
            return
        for m in self._maps:
            for h in range(heads):
                m.madvise(mmap.MADV_DONTNEED, (row * heads + h) * head_bytes + start, head_bytes - start)

    def close(self) -> None:
        self.keys, self.values = [], []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # an array still views it; the OS reclaims it with the process
                pass

"""Admission: the one queue in front of the batch loop, and the rules at its door.

    submit ─► closing? ShuttingDown ─► paused (0 allowed)? Paused ─► no place left? QueueFull (+ retry-after)
       └─► waiting, first come first served ─► the loop admits its head while fewer than `allowed`
           run and its KV memory fits (runtime/batch.py `_admit`)

The loop owns it: everything here runs under the loop's lock, and only the loop's thread takes a
request out of `waiting` (a cancelled one too: it stops counting for a place at once, and leaves at
the loop's next turn). `allowed` is the lever — the thermal governor's: `max_batch` normally, fewer
when the CPU is hot, 0 to pause; running answers finish either way, only admission changes.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Generic, TypeVar

from edgevl.types import Paused, QueueFull, ShuttingDown

T = TypeVar("T")
PAUSED_RETRY_S = 30  # a hot CPU takes minutes to cool: a client should not come back at once
CLOSING_RETRY_S = 5  # a replacement process (or another replica) is usually up by then


class Admission(Generic[T]):
    def __init__(self, max_batch: int, queue_size: int, cancelled: Callable[[T], bool],
                 count: Callable[[str], None]):
        self.max_batch, self.queue_size = max_batch, queue_size
        self.allowed = max_batch
        self.waiting: collections.deque[T] = collections.deque()
        self.closed = False
        self._cancelled, self._count = cancelled, count
        self._service_s: float | None = None  # moving mean of how long an admitted request runs

    def live(self) -> int:
        """Waiting requests not cancelled: those that hold a place in the queue."""
        return sum(1 for w in self.waiting if not self._cancelled(w))

    def check(self, running: int) -> None:
        """Raises the refusal a newcomer gets now; `running`: requests admitted."""
        if self.closed:
            raise ShuttingDown("the engine is shutting down", CLOSING_RETRY_S)
        if self.allowed == 0:
            self._count("rejected_paused")
            raise Paused("admission is paused", PAUSED_RETRY_S)
        waiting = self.live()
        if waiting - max(0, self.allowed - running) >= self.queue_size:
            self._count("rejected_queue_full")
            raise QueueFull(f"{running} running, {waiting} waiting (queue size {self.queue_size})",
                            self.retry_after_s(waiting), running, waiting, self.queue_size)

    def drop_cancelled(self) -> list[T]:
        """Takes the cancelled out of the queue (the loop's thread only) and counts them; the caller
        delivers their ends."""
        dropped = [w for w in self.waiting if self._cancelled(w)]
        for w in dropped:
            self.waiting.remove(w)
            self._count("cancelled_waiting")
        return dropped

    def add(self, work: T, running: int) -> None:
        self.check(running)
        self.waiting.append(work)
        self._count("requests")

    def set_allowed(self, n: int) -> None:
        self.allowed = max(0, min(n, self.max_batch))

    def served(self, seconds: float) -> None:
        """An admitted request left after `seconds`: the estimate behind Retry-After follows it."""
        self._service_s = seconds if self._service_s is None else 0.8 * self._service_s + 0.2 * seconds

    def retry_after_s(self, waiting: int) -> int:
        """When a place is likely free: the queue ahead and one more, served `allowed` at a time at the
        recent pace (2 s each before any has finished), within 1 s .. 60 s."""
        per = self._service_s if self._service_s is not None else 2.0
        return int(min(60, max(1, math.ceil(per * (waiting + 1) / max(1, self.allowed)))))

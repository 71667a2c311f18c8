"""Clip decoding, bounded like generation: a few at a time, a bounded wait, 429 beyond it, a CPU
budget per request, and stopped between two frames when the client leaves.

    request ──► full? 429 now ──► decode thread (≤ max_batch at once) ──► frames ──► engine.submit
                                     ▲ budget.check() between frames: cancelled / over budget → 4xx
    client gone, timeout ────────────┘ (the cancel flag)

Decoding happens before the request is queued for generation, so that a broken clip is refused
at once; these bounds keep that early step from being a way around the engine's queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request

from edgevl.preprocess.video import DecodeBudget, DecodeCancelled
from edgevl.server.errors import QueueFull, Timeout

T = TypeVar("T")


class DecodePool:
    """`workers` decodes run at once (the server's max_batch) and `waiting` more may wait (its
    queue_size); `cpu_s` is each request's CPU budget for all its clips together (0: none)."""

    def __init__(self, workers: int, waiting: int, cpu_s: float, timeout_s: float):
        self.workers, self.waiting, self.cpu_s, self.timeout_s = workers, waiting, cpu_s, timeout_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._lock = threading.Lock()
        self.admitted = 0  # running or waiting for a thread
        self.running = 0
        self.cpu_seconds = 0.0  # since start, all decodes
        self.counts: collections.Counter[str] = collections.Counter()

    async def run(self, http: Request, decode: Callable[[DecodeBudget], T]) -> T:
        """`decode(budget)` on a decode thread; it calls `budget.check()` between frames."""
        with self._lock:
            if self.admitted >= self.workers + self.waiting:
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy decoding videos: {self.running} decoding, "
                                f"{self.admitted - self.running} waiting", "queue_full",
                                headers={"Retry-After": str(max(1, min(60, self.admitted)))})
            self.admitted += 1
        spent = getattr(http.state, "decode_cpu_s", 0.0)  # by the request's earlier clips
        budget = DecodeBudget(max(1e-3, self.cpu_s - spent) if self.cpu_s else 0.0)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._call, decode, budget)
        watcher = asyncio.create_task(_watch_disconnect(http, budget))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise Timeout("decoding the video took longer than the server's request timeout", "timeout") from None
        finally:
            if not future.done():  # the client left, the request timed out, or the server is stopping
                budget.cancel.set()
            watcher.cancel()
            http.state.decode_cpu_s = spent + budget.spent_s

    def _call(self, decode: Callable[[DecodeBudget], T], budget: DecodeBudget) -> T:
        with self._lock:
            self.running += 1
            self.counts["started"] += 1
        budget.start()
        try:
            if budget.cancel.is_set():  # gone while it waited for a thread
                raise DecodeCancelled()
            return decode(budget)
        except DecodeCancelled:
            self.counts["cancelled"] += 1
            raise
        except Exception as e:
            self.counts["over_budget" if getattr(e, "code", "") == "video_too_costly" else "refused"] += 1
            raise
        finally:
            budget.stop()
            with self._lock:
                self.cpu_seconds += budget.spent_s
                self.running -= 1
                self.admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _watch_disconnect(http: Request, budget: DecodeBudget) -> None:
    """Waits on the connection itself: `Request.is_disconnected` polls through a cancelled scope
    that, behind Starlette's BaseHTTPMiddleware, loses the disconnect message it receives. The body
    is read by now, so the next message can only be the disconnect; the wait is cancelled when the
    decode ends."""
    with contextlib.suppress(asyncio.CancelledError, RuntimeError):
        while not budget.cancel.is_set():
            if (await http.receive())["type"] == "http.disconnect":
                budget.cancel.set()
                return

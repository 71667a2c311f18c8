"""Admission, a bounded queue, worker threads, cancellation and timeouts.

    submit() ──► full? 429 now ──► pending deque ──► worker thread ──► engine.generate(prepared)
       │            hot? 503 now                       (≤ allowed slots)      │ events
       └──────────── job.events (asyncio.Queue) ◄──── call_soon_threadsafe ◄──┘

Each worker thread carries one request into the engine, whose batch loop decodes all of them
together: the number of workers allowed to run (max_batch, or fewer when the thermal governor
throttles) is the batch size. The event loop only moves bytes. A job whose client left is
cancelled: removed from the queue if still waiting, or
stopped by the engine within one token if running.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgevl.ops.thermal import ThermalGovernor
from edgevl.server.errors import QueueFull, Timeout, Unavailable
from edgevl.types import Engine, Event, GenerationRequest, PreparedRequest

_DONE = object()


@dataclass
class Job:
    prepared: PreparedRequest  # queue time runs from its t_start (the engine's timings), not from here
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False
    finished: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.prepared.request

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.request.cancel.set()

    async def stream(self) -> AsyncIterator[Event]:
        """The job's events; raises Timeout at the deadline and the engine's exception on failure."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.cancel()
                raise Timeout("the request took longer than the server's request timeout", "timeout")
            try:
                item = await asyncio.wait_for(self.events.get(), remaining)
            except asyncio.TimeoutError:
                continue  # the loop above raises
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int, queue_size: int, timeout_s: float,
                 governor: ThermalGovernor | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.governor = governor
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.running = 0
        self.counts = collections.Counter()
        self._workers = [threading.Thread(target=self._work, args=(i,), name=f"generate-{i}", daemon=True)
                         for i in range(max_batch)]
        for w in self._workers:
            w.start()

    # ---- called on the event loop ----------------------------------------------------
    def check(self) -> None:
        """Raises the 429/503 a submit would, so a request is refused before it is prepared."""
        with self._cv:
            self._refuse()

    def submit(self, prepared: PreparedRequest) -> Job:
        job = Job(prepared, asyncio.get_running_loop(), time.monotonic() + self.timeout_s)
        with self._cv:
            self._refuse()
            self._pending.append(job)
            self.counts["submitted"] += 1
            self._cv.notify_all()
        return job

    def _refuse(self) -> None:
        """Called holding the lock."""
        if self._closed:
            raise Unavailable("the server is shutting down", "shutting_down", headers={"Retry-After": "5"})
        if self.governor is not None and not self.governor.admitting():
            self.counts["rejected_thermal"] += 1
            raise Unavailable("the CPU is too hot; no new work until it cools down", "thermal_limit",
                              headers={"Retry-After": "30"})
        idle = max(0, self._slots() - self.running)
        if len(self._pending) - idle >= self.queue_size:
            self.counts["rejected_queue_full"] += 1
            raise QueueFull(f"the server is busy: {self.running} running, {len(self._pending)} waiting "
                            f"(queue size {self.queue_size})", "queue_full",
                            headers={"Retry-After": str(self._retry_after())})

    def abandon(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop it between tokens."""
        if job.finished:
            return
        job.cancel()
        with self._cv:
            if not job.started and job in self._pending:
                self._pending.remove(job)
                self.counts["cancelled_waiting"] += 1
                # no worker will ever end its stream: end it here, so whoever still reads it is let go
                job.finished = True
                job.put(_DONE)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def request_states(self) -> dict[str, int]:
        """Requests by state: the engine's, with this queue's counted as waiting too."""
        states = self.engine.request_states()
        return {**states, "waiting": states.get("waiting", 0) + self.queue_depth}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # ---- worker threads ------------------------------------------------------------
    def _slots(self) -> int:
        return self.governor.allowed_slots() if self.governor is not None else self.max_batch

    def _retry_after(self) -> int:
        return max(1, min(60, (len(self._pending) + 1) * 2))

    def _work(self, index: int) -> None:
        while True:
            with self._cv:
                # worker i runs only while i is below the allowed slots: that is the governor's lever
                while not self._closed and not (self._pending and index < self._slots()):
                    self._cv.wait(timeout=0.5)
                if self._closed and not self._pending:
                    return
                if not self._pending or index >= self._slots():
                    continue
                job = self._pending.popleft()
                job.started = True
                self.running += 1
            try:
                if job.request.cancel.is_set():
                    self.counts["cancelled_waiting"] += 1
                else:
                    for ev in self.engine.generate(job.prepared):
                        job.put(ev)
            except BaseException as e:  # one request fails; the worker and the engine go on
                self.counts["failed"] += 1
                job.put(e)
            finally:
                job.finished = True
                job.put(_DONE)
                with self._cv:
                    self.running -= 1
                    self.counts["completed"] += 1
                    self._cv.notify_all()

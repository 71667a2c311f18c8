"""Running a job for every API: submitted to the engine, its events read until the end of the run
(a Done with the figures all report), cancelled when the client leaves.

    check_room ─► prepare (a thread of asyncio's pool) ─► engine.submit(prepared, sink) ─► Handle
        refusals (QueueFull, Paused, ShuttingDown) ─► 429 / 503 with Retry-After, before any response
    the engine's thread ─► sink: loop.call_soon_threadsafe(queue.put_nowait, event) ─► Job.stream()

No thread waits on a request: the engine delivers its events to the event loop, and the request's
deadline, its client's disconnect and an early end of its stream all cancel it through the Handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from edgevl.server.errors import ApiError, QueueFull, Timeout, Unavailable
from edgevl.server.metrics import Metrics
from edgevl.server.protocol import Timings, Usage
from edgevl.server.wire import timings_of, usage_of
from edgevl.types import (
    Engine,
    Event,
    FinishEvent,
    GenerationRequest,
    Paused,
    PreparedRequest,
    Refused,
    ShuttingDown,
    TokenEvent,
)
from edgevl.types import QueueFull as EngineQueueFull


@dataclass
class Done:
    """How a run ended, with the figures every API reports."""

    finish: FinishEvent
    usage: Usage
    timings: Timings


class Job:
    """One submitted request: the engine's Handle, and its events as they reach this event loop."""

    def __init__(self, engine: Engine, prepared: PreparedRequest, deadline: float):
        self.deadline = deadline
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.finished = False  # its end (a FinishEvent or an error) is on its way here
        loop = asyncio.get_running_loop()

        def sink(item: Event | BaseException) -> None:  # on the engine's thread
            if isinstance(item, FinishEvent | BaseException):
                self.finished = True
            loop.call_soon_threadsafe(self.events.put_nowait, item)

        self.handle = engine.submit(prepared, sink)  # refusals raise here

    def cancel(self) -> None:
        if not self.finished:
            self.handle.cancel()

    async def stream(self) -> AsyncIterator[Event]:
        """The events up to the FinishEvent; Timeout at the deadline, the engine's exception on failure."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.cancel()
                raise Timeout("the request took longer than the server's request timeout", "timeout")
            try:
                item = await asyncio.wait_for(self.events.get(), remaining)
            except asyncio.TimeoutError:
                continue  # the check above raises
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, FinishEvent):
                return


def refusal(e: Refused) -> ApiError:
    """The engine's refusal as the API's error: 429 for a full queue, 503 when paused or closing."""
    headers = {"Retry-After": str(e.retry_after_s)}
    if isinstance(e, EngineQueueFull):
        return QueueFull(f"the server is busy: {e.running} running, {e.waiting} waiting (queue size {e.queue_size})",
                         "queue_full", headers=headers)
    if isinstance(e, Paused):  # only the thermal governor pauses admission
        return Unavailable("the CPU is too hot; no new work until it cools down", "thermal_limit", headers=headers)
    if isinstance(e, ShuttingDown):
        return Unavailable("the server is shutting down", "shutting_down", headers=headers)
    return Unavailable(str(e), "unavailable", headers=headers)


class Runner:
    """Submits to the engine and keeps the metrics honest however the request ends."""

    def __init__(self, engine: Engine, metrics: Metrics, timeout_s: float):
        self.engine = engine
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def start(self, req: GenerationRequest) -> Job:
        """Prepares (off the event loop) and submits the request: 429/503, and a 400 for a prompt over
        the context window or the KV budget, are raised here, before any response starts."""
        try:
            self.engine.check_room()  # a busy server refuses before spending a prompt's preprocessing
            prepared = await asyncio.to_thread(self.engine.prepare, req)
            return Job(self.engine, prepared, time.monotonic() + self.timeout_s)
        except Refused as e:
            raise refusal(e) from None

    def record(self, endpoint: str, fin: FinishEvent) -> None:
        m = self.metrics
        m.finish.labels(fin.finish_reason).inc()
        m.prompt_tokens.inc(fin.usage.prompt_tokens)
        m.generated_tokens.inc(fin.usage.completion_tokens)
        m.vision_cache_hits.inc(fin.timings.vision_cache_hits)
        m.prefix_reused.inc(fin.timings.prefix_reused_tokens)
        m.queue_wait.observe(fin.timings.queue_ms / 1000)
        if fin.usage.completion_tokens:
            m.ttft.labels(endpoint).observe(fin.timings.ttft_ms / 1000)
        m.latency.labels(endpoint).observe(fin.timings.total_ms / 1000)

    async def events(self, endpoint: str, job: Job, http: Request) -> AsyncIterator[TokenEvent | Done]:
        """The job's events, the last one a Done; the job is cancelled if the client disconnects or
        the stream is closed early."""
        watcher = asyncio.create_task(_watch_disconnect(http, job))
        try:
            async for ev in job.stream():
                if isinstance(ev, FinishEvent):
                    self.record(endpoint, ev)
                    yield Done(ev, usage_of(ev), timings_of(ev))
                    return
                yield ev
            raise ApiError("the request was cancelled", "cancelled")
        finally:
            watcher.cancel()
            job.cancel()


async def _watch_disconnect(http: Request, job: Job) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not job.finished:
            if await http.is_disconnected():
                job.cancel()  # waiting: it leaves the queue; running: it stops at the engine's next step
                return
            await asyncio.sleep(0.1)

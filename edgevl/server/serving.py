"""Running a job for every API: submitted to the scheduler, its events read until the end of the run
(a Done with the figures all report), abandoned when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from edgevl.server.errors import ApiError
from edgevl.server.metrics import Metrics
from edgevl.server.protocol import Timings, Usage
from edgevl.server.scheduler import Job, Scheduler
from edgevl.server.wire import timings_of, usage_of
from edgevl.types import FinishEvent, GenerationRequest, TokenEvent


@dataclass
class Done:
    """How a run ended, with the figures every API reports."""

    finish: FinishEvent
    usage: Usage
    timings: Timings


class Runner:
    """Submits to the scheduler and keeps the metrics honest however the request ends."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics):
        self.scheduler = scheduler
        self.metrics = metrics

    async def start(self, req: GenerationRequest) -> Job:
        """Prepares (off the event loop) and queues the request: 429/503, and a 400 for a prompt over
        the context window or the KV budget, are raised here, before any response starts."""
        self.scheduler.check()  # a busy server refuses before spending a prompt's preprocessing
        prepared = await asyncio.to_thread(self.scheduler.engine.prepare, req)
        return self.scheduler.submit(prepared)

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
        """The job's events, the last one a Done; the job is abandoned if the client disconnects or
        the stream is closed."""
        watcher = asyncio.create_task(_watch_disconnect(http, self.scheduler, job))
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
            self.scheduler.abandon(job)


async def _watch_disconnect(http: Request, scheduler: Scheduler, job: Job) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not job.finished:
            if await http.is_disconnected():
                scheduler.abandon(job)
                return
            await asyncio.sleep(0.1)

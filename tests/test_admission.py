"""The engine's one queue: refusals at its door (full, paused), a cancelled waiting request's place
freed at once, and events delivered to a sink on the loop's thread."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from edgevl.runtime.engine import OrtEngine
from edgevl.types import (
    EngineOptions,
    FinishEvent,
    GenerationRequest,
    Message,
    Paused,
    QueueFull,
    SamplingParams,
    ShuttingDown,
    TextPart,
)


def _request(text: str, n: int) -> GenerationRequest:
    return GenerationRequest([Message("user", [TextPart(text)])], SamplingParams(max_new_tokens=n, ignore_eos=True))


class Inbox:
    """A sink that keeps what the loop delivers, and on which thread."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: set[str] = set()

    def __call__(self, item) -> None:
        self.threads.add(threading.current_thread().name)
        self.items.put(item)

    def end(self, timeout: float = 60):
        while True:
            item = self.items.get(timeout=timeout)
            if isinstance(item, FinishEvent | BaseException):
                return item


@pytest.fixture
def one_place(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=1, queue_size=1, prefix_cache=False))
    yield e
    e.close()


def _until(cond, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_cancelled_waiting_request_frees_its_place_at_once(one_place):
    e = one_place
    running, waiting = Inbox(), Inbox()
    a = e.submit(e.prepare(_request("hold the only place", 3000)), running)
    b = e.submit(e.prepare(_request("wait behind it", 3)), waiting)
    with pytest.raises(QueueFull) as full:
        e.submit(e.prepare(_request("no room", 3)), Inbox())
    assert full.value.retry_after_s >= 1 and full.value.queue_size == 1
    assert e.stats["rejected_queue_full"] == 1
    b.cancel()  # its place is free now, before the loop has even seen the cancel
    third = Inbox()
    c = e.submit(e.prepare(_request("now there is room", 3)), third)
    fin = waiting.end()
    assert isinstance(fin, FinishEvent) and fin.finish_reason == "cancelled" and fin.usage.completion_tokens == 0
    assert e.stats["cancelled_waiting"] == 1 and e.stats["cancelled"] == 0  # counted once, as waiting
    a.cancel()
    assert running.end().finish_reason == "cancelled"
    assert third.end().usage.completion_tokens == 3
    c.cancel()  # after its end: a no-op
    assert running.threads == third.threads == {"batch-loop"}  # delivered by the loop itself, no thread each
    _until(lambda: not any(e.request_states().values()))


def test_paused_admission_refuses_new_work_and_lets_running_answers_finish(one_place):
    e = one_place
    running = Inbox()
    e.submit(e.prepare(_request("keep going", 40)), running)
    _until(lambda: e.request_states()["decoding"] == 1)
    e.set_max_running(0)  # the thermal governor's lever, halted
    with pytest.raises(Paused) as paused:
        e.check_room()
    assert paused.value.retry_after_s >= 1
    with pytest.raises(Paused):
        e.submit(e.prepare(_request("too hot", 2)), Inbox())
    assert running.end().usage.completion_tokens == 40  # the running answer was not stopped
    assert e.stats["rejected_paused"] == 2
    e.set_max_running(1)
    cool = Inbox()
    e.submit(e.prepare(_request("cooled", 2)), cool)
    assert cool.end().usage.completion_tokens == 2


def test_a_request_queued_before_a_pause_waits_for_the_lever(one_place):
    e = one_place
    running, queued = Inbox(), Inbox()
    a = e.submit(e.prepare(_request("hold", 3000)), running)
    e.submit(e.prepare(_request("queued", 2)), queued)
    _until(lambda: e.request_states()["decoding"] == 1)
    e.set_max_running(0)
    a.cancel()
    assert running.end().finish_reason == "cancelled"
    time.sleep(0.3)  # the loop has turned many times: paused, it admitted no one
    assert e.request_states() == {"waiting": 1, "encoding": 0, "prefilling": 0, "decoding": 0}
    e.set_max_running(1)
    assert queued.end().usage.completion_tokens == 2


def test_a_closed_engine_refuses(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=1))
    prepared = e.prepare(_request("late", 2))
    e.close()
    with pytest.raises(ShuttingDown):
        e.submit(prepared, Inbox())


def test_the_reference_engine_queues_behind_the_same_interface(tiny_checkpoint):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgevl.runtime.reference import TransformersEngine

    ref = TransformersEngine(tiny_checkpoint, EngineOptions(queue_size=1))
    try:
        running, waiting = Inbox(), Inbox()
        a = ref.submit(ref.prepare(_request("hold", 3000)), running)
        b = ref.submit(ref.prepare(_request("wait", 3)), waiting)
        with pytest.raises(QueueFull):
            ref.submit(ref.prepare(_request("no room", 3)), Inbox())
        b.cancel()
        ref.check_room()  # the cancelled request's place is free
        assert waiting.end().finish_reason == "cancelled" and ref.stats["cancelled_waiting"] == 1
        a.cancel()
        assert running.end().finish_reason == "cancelled"
        done = Inbox()
        ref.submit(ref.prepare(_request("answer", 3)), done)
        fin = done.end()
        assert fin.usage.completion_tokens == 3 and done.threads == {"reference-engine"}
    finally:
        ref.close()

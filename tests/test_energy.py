"""Energy per answer from a CPU package energy counter (ops/energy.py): read as the kernel's powercap
files are (microjoules, wrapping at max_energy_range_uj), apportioned by the batch loop to the
answers of each model run by their tokens in it, idle time charged to no one; n/a, with the reason,
where no counter can be read. The counter here is a file the test writes and advances."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from edgevl.ops.energy import EnergyCounter
from edgevl.runtime.engine import OrtEngine
from edgevl.types import EngineOptions, FinishEvent, GenerationRequest, Message, SamplingParams, TextPart


def _write(path: Path, microjoules: int) -> None:
    """In place and in one write of a fixed width, so that a reader never sees a half-written value
    (the kernel's file is read whole or not at all)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, f"{microjoules:>20}\n".encode(), 0)
    finally:
        os.close(fd)


def test_joules_between_reads_with_the_wrap_undone(tmp_path):
    counter = tmp_path / "energy_uj"
    _write(counter, 9_000_000)
    (tmp_path / "max_energy_range_uj").write_text("10000000\n")
    e = EnergyCounter(str(counter))
    assert e.available and e.status.startswith("ok")
    _write(counter, 9_500_000)
    assert e.read() == pytest.approx(0.5)
    _write(counter, 1_000_000)  # wrapped past 10 J
    assert e.read() == pytest.approx(1.5)
    assert e.read() == 0.0 and e.total_j == pytest.approx(2.0)
    e.close()


def test_a_wrap_without_its_range_counts_nothing_rather_than_a_guess(tmp_path):
    counter = tmp_path / "energy_uj"
    _write(counter, 5_000_000)
    e = EnergyCounter(str(counter))
    _write(counter, 1_000_000)
    assert e.read() == 0.0
    _write(counter, 3_000_000)
    assert e.read() == pytest.approx(2.0)
    e.close()


def test_no_counter_is_n_a_and_says_why(tmp_path):
    absent = EnergyCounter(str(tmp_path / "missing" / "energy_uj"))
    assert not absent.available and absent.read() is None
    assert absent.status.startswith("n/a: absent")
    assert absent.power_w() != absent.power_w()  # NaN


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: 'not permitted' needs an unprivileged user")
def test_an_unreadable_counter_is_not_permitted(tmp_path):
    counter = tmp_path / "energy_uj"
    _write(counter, 1)
    counter.chmod(0)
    e = EnergyCounter(str(counter))
    assert not e.available and e.status.startswith("n/a: not permitted")


class Meter:
    """Advances a counter file at `watts` while running, as a CPU package's would: its value follows
    the clock, however seldom this thread gets to write it."""

    def __init__(self, path: Path, watts: float):
        self.path, self.watts, self.uj = path, watts, 1_000_000
        _write(path, self.uj)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(0.002):
            self.uj = 1_000_000 + int(self.watts * (time.monotonic() - t0) * 1e6)
            _write(self.path, self.uj)

    def __enter__(self) -> Meter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def joules(self) -> float:
        return (self.uj - 1_000_000) / 1e6


def _answer(engine: OrtEngine, text: str, tokens: int) -> FinishEvent:
    req = GenerationRequest([Message("user", [TextPart(text)])], SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    return [ev for ev in engine.generate(req) if isinstance(ev, FinishEvent)][-1]


@pytest.fixture(scope="module")
def metered(tiny_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("rapl") / "energy_uj"
    _write(path, 1_000_000)
    engine = OrtEngine(tiny_onnx, EngineOptions(max_context=512, energy_counter=str(path), max_batch=2))
    yield engine, path
    engine.close()


def test_answers_get_the_energy_of_the_runs_they_took_part_in(metered):
    engine, path = metered
    results: list[FinishEvent] = []
    with Meter(path, watts=50.0) as meter:
        threads = [threading.Thread(target=lambda n=n: results.append(_answer(engine, f"Count to {n}.", 12 + 8 * n)))
                   for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    shares = [r.timings.energy_j for r in results]
    assert all(s is not None and s > 0 for s in shares)
    assert sum(shares) <= meter.joules + 1e-9  # shares of what the counter counted, never more
    # the longer answer took part in more runs
    long, short = sorted(results, key=lambda r: -r.usage.completion_tokens)
    assert long.timings.energy_j > short.timings.energy_j


def test_energy_spent_idle_is_charged_to_no_answer(metered):
    engine, path = metered
    _write(path, 50_000_000)  # the box idled: 49 J since the last run
    time.sleep(0.05)
    fin = _answer(engine, "Hello.", 4)  # nothing advances while it runs
    assert fin.timings.energy_j == 0.0


def test_without_a_counter_energy_is_none(tiny_onnx, tmp_path):
    engine = OrtEngine(tiny_onnx, EngineOptions(max_context=512, energy_counter=str(tmp_path / "absent")))
    try:
        assert engine.energy.status.startswith("n/a: absent")
        assert _answer(engine, "Hello.", 2).timings.energy_j is None
    finally:
        engine.close()

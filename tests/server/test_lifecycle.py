"""Queue limits, timeouts and graceful shutdown, each on its own server process."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    s = start_server(tmp_path_factory, "--queue-size", "1", "--max-batch", "1")
    yield s
    stop_server(s)


def _wait(cond, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_answers_429_at_once(small_queue):
    s = small_queue
    waiting: dict = {}
    with httpx.Client(base_url=s.url, timeout=120) as a, a.stream(
            "POST", "/api/predict", json={"prompt": "long", "max_tokens": 3000, "stream": True}) as running:
        lines = running.iter_lines()
        next(lines)  # A is generating

        def ask_b() -> None:
            waiting["b"] = httpx.post(s.url + "/api/predict", json={"prompt": "b", "max_tokens": 3}, timeout=120)

        t = threading.Thread(target=ask_b)
        t.start()
        assert _wait(lambda: httpx.get(s.url + "/api/health").json()["queue_depth"] == 1)
        t0 = time.monotonic()
        c = httpx.post(s.url + "/api/predict", json={"prompt": "c", "max_tokens": 3}, timeout=120)
        assert c.status_code == 429 and time.monotonic() - t0 < 5
        assert c.json()["error"]["code"] == "queue_full" and int(c.headers["retry-after"]) >= 1
    # A's client left: its slot goes to B
    t.join(60)
    assert waiting["b"].status_code == 200
    assert s.metric("edgevl_scheduler_rejected_queue_full") >= 1


def test_request_timeout_ends_with_a_clear_error(tmp_path_factory):
    s = start_server(tmp_path_factory, "--request-timeout-s", "1")
    try:
        r = httpx.post(s.url + "/api/predict", json={"prompt": "long", "max_tokens": 4000}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.url + "/api/predict", json={"prompt": "long", "max_tokens": 4000,
                                                                "stream": True}, timeout=60) as st:
            last = [json.loads(x) for x in st.iter_lines() if x][-1]
        assert last["error"]["code"] == "timeout" and last["done"] is True
        assert _wait(lambda: s.metric("edgevl_in_flight") == 0)
        ok = httpx.post(s.url + "/api/predict", json={"prompt": "short", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
    finally:
        stop_server(s)


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path_factory):
    s = start_server(tmp_path_factory, "--grace-period-s", "60")
    got: list[dict] = []
    with httpx.stream("POST", s.url + "/api/predict", json={"prompt": "long", "max_tokens": 1500, "stream": True,
                                                            "temperature": 0}, timeout=120) as r:
        for i, line in enumerate(r.iter_lines()):
            if line:
                got.append(json.loads(line))
            if i == 3:
                s.proc.send_signal(signal.SIGTERM)
    assert got[-1]["done"] is True and got[-1]["usage"]["completion_tokens"] == 1500
    assert s.proc.wait(60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/api/health", timeout=2)

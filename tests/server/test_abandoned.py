"""Abandoned work stops: a client that gives up on a non-streamed answer (a timeout, a crash) stops its
generation, running or queued, and so does the server's own request timeout."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import Server, start_server, stop_server

LONG = {"max_tokens": 3000, "ignore_eos": True}  # far longer than a second on any machine


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    """One answer at a time, so a second request waits in the queue."""
    s = start_server(tmp_path_factory, "--max-batch", "1", "--queue-size", "4", "--max-tokens", "4000")
    yield s
    stop_server(s)


def stopped(server: Server) -> float:
    """Generations the server has stopped so far: running ones cancelled, waiting ones dropped."""
    return server.metric("edgevl_engine_cancelled") + server.metric("edgevl_scheduler_cancelled_waiting")


def wait_idle(server: Server, deadline_s: float = 30.0) -> float:
    """Seconds until nothing runs or waits (health and the engine agree); fails past the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        h = httpx.get(server.url + "/api/health", timeout=10).json()
        if h["in_flight"] == 0 and h["queue_depth"] == 0 and not any(h["requests"].values()):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"still busy {deadline_s} s after the client left: {h}")


def test_openai_client_timeouts_and_retries_leave_nothing_running(one_slot):
    before = stopped(one_slot)
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="none", timeout=1, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="edgevl", messages=[{"role": "user", "content": "Talk for a long time."}],
                                       extra_body=LONG)
    idle_after = wait_idle(one_slot)
    print(f"idle {idle_after:.2f} s after the client's last try")
    assert stopped(one_slot) - before == 3  # the first try and both retries
    assert one_slot.metric("edgevl_in_flight") == 0


def test_edge_api_client_timeout_stops_the_answer(one_slot):
    before = one_slot.metric("edgevl_engine_cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot.url + "/api/predict", json={"prompt": "Talk for a long time.", **LONG}, timeout=1)
    wait_idle(one_slot)
    assert one_slot.metric("edgevl_engine_cancelled") - before == 1


def test_a_queued_request_whose_client_left_leaves_the_queue(one_slot):
    running = threading.Event()
    release = threading.Event()

    def hold() -> None:  # a streamed answer that occupies the only slot until released
        with httpx.stream("POST", one_slot.url + "/api/predict", json={"prompt": "hold", "stream": True, **LONG},
                          timeout=120) as r:
            for _ in r.iter_lines():
                running.set()
                if release.is_set():
                    break

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert running.wait(60)
        dropped = one_slot.metric("edgevl_scheduler_cancelled_waiting")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(one_slot.url + "/v1/chat/completions", timeout=1,
                       json={"messages": [{"role": "user", "content": "wait"}], **LONG})
        deadline = time.monotonic() + 30
        while one_slot.metric("edgevl_scheduler_cancelled_waiting") == dropped and time.monotonic() < deadline:
            time.sleep(0.05)
        assert one_slot.metric("edgevl_scheduler_cancelled_waiting") == dropped + 1
        health = httpx.get(one_slot.url + "/api/health", timeout=10).json()
        assert health["queue_depth"] == 0 and health["in_flight"] == 1  # the holder still runs
    finally:
        release.set()
        holder.join(120)
    wait_idle(one_slot)


def test_the_servers_request_timeout_stops_a_non_streamed_answer(tmp_path_factory):
    s = start_server(tmp_path_factory, "--request-timeout-s", "2", "--max-tokens", "4000")
    try:
        before = s.metric("edgevl_engine_cancelled")
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Talk for a long time."}], **LONG})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        wait_idle(s)
        assert s.metric("edgevl_engine_cancelled") - before == 1
    finally:
        stop_server(s)

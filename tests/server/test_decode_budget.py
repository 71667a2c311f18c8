"""Video decoding over real HTTP costs bounded memory and CPU and stops when its client leaves: a few
kilobytes of MP4 with 64 frames of 2000² (or 32 large pictures as a frame list) raise the server's
RSS by little, a GIF of 3,000 frames is refused before decoding, a decode over the CPU budget ends
in 413, a full decode pool answers 429, and a client that leaves stops its decode."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image

from tests import clips
from tests.server.conftest import start_server, stop_server

CPU_BUDGET_S = 3.0


@pytest.fixture(scope="module")
def dserver(tmp_path_factory):
    # one decode at a time and no waiting, so that a second clip meets a full pool
    s = start_server(tmp_path_factory, "--max-batch", "1", "--queue-size", "0", "--max-decode-cpu-s",
                     str(CPU_BUDGET_S), "--default-max-tokens", "2")
    yield s
    stop_server(s)


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _rss_mb(server) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def _wait_for(server, name: str, predicate, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = server.metric(name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


BURN = _url(clips.gif_flicker(900, 1000, 1000), "image/gif")  # 0.7–5 CPU-seconds to decode by CPU, 1.7 MB


def test_many_large_frames_cost_bounded_memory(dserver):
    """Before: every sampled frame decoded at full size, 64 × 2000² × 3 bytes held twice (+1.5 GB)."""
    bomb = _url(clips.mp4_bomb(64, 2, 2000), "video/mp4")
    assert len(bomb) < 40_000
    png = io.BytesIO()
    Image.new("RGB", (2000, 2000), (10, 120, 40)).save(png, format="PNG")
    frames = [_url(png.getvalue(), "image/png")] * 32
    with dserver.client() as c:
        c.post("/api/predict", json={"video": _url(clips.mp4(n=8), "video/mp4"), "prompt": "x", "max_tokens": 1})
        before = _rss_mb(dserver)
        r = c.post("/api/predict", json={"video": bomb, "prompt": "What moves?", "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["video_tokens"] > 0
        r = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "x"}]}]})
        assert r.status_code == 200, r.text
        after = _rss_mb(dserver)
    assert after - before < 400, f"RSS grew {after - before:.0f} MB for clips of 64 and 32 frames at 2000²"


def test_a_gif_of_thousands_of_frames_is_refused_before_decoding(dserver):
    gif = _url(clips.gif_flicker(3000, 500, 500), "image/gif")
    cpu0 = dserver.metric("edgevl_decode_cpu_seconds")
    with dserver.client() as c:
        r = c.post("/api/predict", json={"video": gif, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "video_too_long" and "over 1000 frames" in err["message"] and err["param"] == "video"
    # counting 3,000 frame headers; decoding them would take seconds
    assert dserver.metric("edgevl_decode_cpu_seconds") - cpu0 < CPU_BUDGET_S / 2


def test_a_full_decode_pool_answers_429(dserver):
    out: dict = {}

    def burn() -> None:
        with dserver.client() as c:
            out["r"] = c.post("/api/predict", json={"video": BURN, "prompt": "x", "max_tokens": 1})

    t = threading.Thread(target=burn)
    t.start()
    assert _wait_for(dserver, "edgevl_decode_running", lambda v: v == 1) == 1
    with dserver.client() as c:  # the one decode thread is busy and none may wait
        r = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": _url(clips.mp4(), "video/mp4")}},
                                         {"type": "text", "text": "x"}]}]})
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    t.join(120)
    # answered, or refused for its CPU time where this CPU decodes slower than the budget
    assert out["r"].status_code in (200, 413), out["r"].text


def test_a_decode_over_the_cpu_budget_is_refused(tmp_path_factory):
    """A budget far below what the clip costs on any CPU (0.7 CPU-seconds on a fast Xeon, ~5 elsewhere):
    the decode stops at the budget, the request gets a 413, and the server keeps serving."""
    s = start_server(tmp_path_factory, "--max-decode-cpu-s", "0.1", "--default-max-tokens", "2")
    try:
        with s.client() as c:
            r = c.post("/api/predict", json={"video": BURN, "prompt": "x", "max_tokens": 1})
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["code"] == "video_too_costly" and "max_decode_cpu_s" in err["message"]
            assert err["param"] == "video"
            assert s.metric("edgevl_decode_over_budget") >= 1
            assert c.get("/api/health").status_code == 200
    finally:
        stop_server(s)


def test_a_client_that_leaves_stops_its_decode(dserver):
    cancelled = dserver.metric("edgevl_decode_cancelled")
    started = dserver.metric("edgevl_decode_started")
    with pytest.raises(httpx.ReadTimeout), dserver.client(timeout=httpx.Timeout(60, read=1.0)) as c:
        c.post("/api/predict", json={"video": BURN, "prompt": "x", "max_tokens": 1})
    assert dserver.metric("edgevl_decode_started") == started + 1
    assert _wait_for(dserver, "edgevl_decode_cancelled", lambda v: v > cancelled) == cancelled + 1
    assert dserver.metric("edgevl_decode_running") == 0
    cpu = dserver.metric("edgevl_decode_cpu_seconds")
    time.sleep(1.0)
    assert dserver.metric("edgevl_decode_cpu_seconds") == cpu  # nothing decodes any more

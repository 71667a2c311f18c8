"""The single-box server on a local Ray Serve instance with two replicas of the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.server.conftest import free_port

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'edgevl[cluster]'")


def _ray_processes() -> list[str]:
    names = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in (p.info["name"] or "") or k in cmd for k in ("raylet", "gcs_server", "ray::", "ray/dashboard")):
            names.append(p.info["name"] or cmd[:60])
    return names


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if _ray_processes():
        pytest.skip("another Ray instance is running on this machine")
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "edgevl.cli", "serve", "--ray", "--ray-replicas", "2",
                             "--ray-num-cpus", "0.5", "--port", str(port), "--queue-size", "1",
                             "--ray-max-queued-requests", "4", "--threads", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/api/health", timeout=3).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("Ray Serve did not become ready:\n" + log.read_text()[-3000:])
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def test_both_replicas_answer(cluster):
    url, _ = cluster
    seen: set[str] = set()
    lock = threading.Lock()

    def ask(i: int) -> None:
        r = httpx.post(url + "/api/predict", json={"prompt": f"hello {i}", "max_tokens": 4}, timeout=120)
        if r.status_code == 200:
            with lock:
                seen.add(r.headers["x-edgevl-replica"])

    for _ in range(5):
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    assert httpx.get(url + "/api/health", timeout=60).json()["replica"]


def test_streaming_through_ray(cluster):
    url, _ = cluster
    with httpx.stream("POST", url + "/api/predict", json={"prompt": "x", "max_tokens": 24, "stream": True},
                      timeout=120) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert len(lines) > 3 and lines[-1]["done"] is True and lines[-1]["usage"]["completion_tokens"] == 24
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 12}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [x for x in r.iter_lines() if x]
    assert len(events) > 3 and events[-1] == "data: [DONE]"


def test_flood_gets_documented_refusals_and_nothing_is_lost(cluster):
    url, _ = cluster
    statuses: list[int] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        r = httpx.post(url + "/api/predict", json={"prompt": f"flood {i}", "max_tokens": 120}, timeout=300)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 24 and set(statuses) <= {200, 429, 503}
    assert statuses.count(200) >= 2 and (statuses.count(429) + statuses.count(503)) > 0


def test_throughput_one_and_two_replicas_are_reported(cluster):
    url, _ = cluster
    t0 = time.perf_counter()
    n = 0
    for i in range(12):
        r = httpx.post(url + "/api/predict", json={"prompt": f"t {i}", "max_tokens": 16}, timeout=120)
        n += r.status_code == 200
    print(f"ray, 2 replicas, sequential: {n / (time.perf_counter() - t0):.1f} requests/s")


def test_shutdown_leaves_no_stray_processes(cluster):
    _, proc = cluster
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert _ray_processes() == []

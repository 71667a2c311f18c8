"""Running for months: the thermal governor over HTTP, flat memory, JSON logs (deployment files: tests/deploy)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.server.conftest import png_b64, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]


def _health(s) -> dict:
    return httpx.get(s.url + "/api/health", timeout=10).json()


def test_thermal_governor_transitions_over_http(tmp_path_factory, tmp_path):
    sensor = tmp_path / "temp"
    sensor.write_text("50000")
    s = start_server(tmp_path_factory, "--thermal-sensor", str(sensor), "--thermal-soft-c", "80",
                     "--thermal-hard-c", "90", "--thermal-hysteresis-c", "5", "--thermal-poll-s", "0.1",
                     "--max-batch", "2")
    try:
        def settle(milli: int, level: str) -> dict:
            sensor.write_text(str(milli))
            end = time.monotonic() + 10
            while time.monotonic() < end:
                h = _health(s)
                if h["thermal"]["level"] == level and h["thermal"]["temperature_c"] == milli / 1000:
                    return h
                time.sleep(0.05)
            raise AssertionError(f"no {level} at {milli}: {h['thermal']}")

        assert settle(50000, "normal")["thermal"]["allowed_slots"] == 2
        assert settle(85000, "throttled")["thermal"]["allowed_slots"] == 1
        ok = httpx.post(s.url + "/api/predict", json={"prompt": "warm", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200  # throttled still serves, one at a time
        settle(77000, "throttled")  # inside the hysteresis band
        settle(92000, "halted")
        r = httpx.post(s.url + "/api/predict", json={"prompt": "hot", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "thermal_limit" and r.headers["retry-after"]
        settle(79000, "halted")  # cooling, but not below soft - hysteresis
        assert settle(74000, "normal")["thermal"]["allowed_slots"] == 2
        cool = httpx.post(s.url + "/api/predict", json={"prompt": "cool", "max_tokens": 2}, timeout=60)
        assert cool.status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
        assert "edgevl_cpu_temperature_celsius 74.0" in metrics and "edgevl_thermal_level 0.0" in metrics
        assert s.metric("edgevl_scheduler_rejected_thermal") == 1
        log = s.log()
        for move in ("normal -> throttled", "throttled -> halted", "halted -> normal"):
            assert move in log
    finally:
        stop_server(s)


def test_memory_stays_flat_over_a_soak(server):
    """Several hundred requests with varied images: RSS after warm-up stays within a bound."""
    proc = psutil.Process(server.proc.pid)
    sizes = [(64, 64), (320, 240), (100, 700), (640, 480), (33, 97), (800, 200)]

    def burst(n: int, offset: int) -> None:
        with server.client() as c:
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                r = c.post("/api/predict", json={"image": png_b64(w, h, seed=offset + i), "prompt": f"soak {i}",
                                                 "max_tokens": 3, "max_pixels": 65536 * (1 + i % 3)})
                assert r.status_code == 200

    burst(60, 0)  # warm-up: caches fill to their bounds
    start = proc.memory_info().rss
    samples = []
    for k in range(4):
        burst(60, 1000 * (k + 1))
        samples.append(proc.memory_info().rss)
    growth_mb = (max(samples) - start) / 2**20
    print(f"soak: 300 requests, RSS after warm-up {start / 2**20:.0f} MB, max {max(samples) / 2**20:.0f} MB, "
          f"growth {growth_mb:.1f} MB")
    assert growth_mb < 40


def test_json_logs_carry_the_request_id(tmp_path_factory):
    s = start_server(tmp_path_factory, "--log-format", "json")
    try:
        r = httpx.post(s.url + "/api/predict", json={"prompt": "hi", "max_tokens": 2},
                       headers={"X-Request-Id": "abc123"}, timeout=60)
        assert r.headers["x-request-id"] == "abc123"
        r2 = httpx.get(s.url + "/api/health")
        rid = r2.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
        time.sleep(0.3)
        lines = [json.loads(x) for x in s.log().splitlines() if x.startswith("{")]
        by_id = {x.get("request_id"): x for x in lines}
        assert by_id["abc123"]["path"] == "/api/predict" and by_id["abc123"]["status"] == 200
        assert by_id[rid]["path"] == "/api/health"
    finally:
        stop_server(s)


def test_max_memory_refuses_to_start_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "serve", "--max-memory-mb", "1", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--max-memory" in out.stderr


"""`edgevl bench --soak` on the tiny model: a mixed load (pictures, clips, schemas, tools, both APIs,
streamed or not, clients walking away), sampled per interval; the server idle afterwards holds no
more descriptors, threads or KV reservations than before the load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _soak(tmp_path, tiny_checkpoint, *args: str, timeout: int) -> dict:
    out = tmp_path / "soak"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--model", str(tiny_checkpoint),
                        "--precisions", "fp32", "--max-batch", "2", "--soak-clients", "3", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[soak] {" in r.stderr  # a line per interval while it runs
    assert (out / "soak.md").read_text().startswith("| t (s) |")
    return json.loads((out / "soak.json").read_text())


def _idle_and_no_errors(report: dict) -> None:
    after = report["after_idle"]
    assert after["in_flight"] == after["kv_running"] == after["decode_running"] == after["decoding"] == 0
    assert set(report["by_status"]) <= {"ok", "left"}, report["by_status"]  # no 4xx, no 5xx, no dropped connection
    assert report["by_status"].get("ok", 0) > 0
    for row in report["intervals"]:
        assert row["rss_mb"] > 0 and row["fds"] > 0 and row["threads"] > 0 and row["kv_budget_bytes"] > 0
        assert {"kv_used_bytes", "vision_cache_entries", "p95_latency_s", "requests"} <= set(row)


def test_a_short_soak_reports_each_interval_and_leaves_the_server_idle(tmp_path, tiny_checkpoint):
    report = _soak(tmp_path, tiny_checkpoint, "--soak", str(10 / 60), "--soak-warmup", "5", "--soak-interval", "5",
                   "--soak-leave", "0.3", timeout=600)
    assert report["minutes"] == pytest.approx(10 / 60) and len(report["intervals"]) >= 2
    _idle_and_no_errors(report)
    assert report["growth"]["kv_running"] == 0


@pytest.mark.slow
def test_a_two_minute_soak_grows_no_fds_threads_or_kv_reservations(tmp_path, tiny_checkpoint):
    report = _soak(tmp_path, tiny_checkpoint, "--soak", "2", "--soak-warmup", "30", "--soak-interval", "15",
                   "--soak-leave", "0.2", timeout=1200)
    _idle_and_no_errors(report)
    assert report["by_status"].get("left", 0) > 0  # clients did walk away
    assert set(report["by_kind"]) == {"picture", "repeat", "clip", "schema", "tools"}
    growth = report["growth"]
    # thread pools start their threads lazily, up to their bounds (a few); a leak grows per request
    assert growth["fds"] <= 2 and growth["threads"] <= 4 and growth["kv_running"] == 0, growth
    assert report["rss_slope_mb_per_min"] is not None

"""`edgevl bench --quick` on the tiny model: every field of the report is there."""

from __future__ import annotations

import json
import subprocess
import sys

from edgevl.bench.cli import METRICS


def test_quick_bench_writes_json_markdown_and_chart(tmp_path, tiny_checkpoint):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--quick", "--model", str(tiny_checkpoint),
                        "--backends", "transformers,edgevl-fp32,edgevl-int8", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[bench] edgevl-fp32" in r.stderr  # progress while it runs
    report = json.loads((out / "bench.json").read_text())
    backends = {row["backend"] for row in report["rows"]}
    assert backends == {"transformers", "edgevl-fp32", "edgevl-int8"}
    assert {(row["backend"], row["task"]) for row in report["rows"]} == {
        (b, t) for b in backends for t in ("caption", "video")}
    for row in (r for r in report["rows"] if r["task"] == "video"):  # TTFT split: frames, vision, prefill
        assert row["decode_ms"]["median"] > 0 and row["video_tokens"]["median"] > 0
        assert row["ttft_ms"]["median"] > row["decode_ms"]["median"]
    for row in report["rows"]:
        assert row["runs"] == 2
        for m in METRICS:
            assert set(row[m]) == {"mean", "std", "median", "n"}, m
        assert row["output_tokens"]["median"] == 8  # fixed length: EOS ignored
        if row["backend"] != "transformers":
            assert set(row["vs_transformers"]) == {"ttft", "decode", "peak_rss"}
            assert row["vision_ms"]["median"] > 0
    assert report["energy"].startswith(("RAPL", "n/a"))
    assert {r["backend"] for r in report["repeat_image"]} == {"edgevl-fp32", "edgevl-int8"}
    # the image's tokens come back from the KV prefix (same system prompt and image) or the vision cache
    assert all(r["cache_hits"] == 1 or r["prefix_reused_tokens"] > 0 for r in report["repeat_image"])
    assert {r["backend"] for r in report["constraint_overhead"]} == {"edgevl-fp32", "edgevl-int8"}
    assert "cpu" in report["machine"] and "onnxruntime" in report["machine"]
    assert report["read_bandwidth_gbs"] > 0.1
    assert {w["backend"] for w in report["memory_wall"]} == {"edgevl-fp32", "edgevl-int8"}
    wall = {w["backend"]: w for w in report["memory_wall"]}
    # int8 weights are about a quarter of fp32's: fewer bytes per step, a higher ceiling
    assert 0 < wall["edgevl-int8"]["bytes_per_step"] < wall["edgevl-fp32"]["bytes_per_step"]
    for w in wall.values():
        assert w["ceiling_tokens_per_s"] == report["read_bandwidth_gbs"] * 1e9 / w["bytes_per_step"]
        assert w["share_1"] == w["tokens_per_s_1"] / w["ceiling_tokens_per_s"] and w["tokens_per_s_each"] > 0
    assert "| step of 4 ÷ step of 1 |" in (out / "bench.md").read_text()
    assert (out / "bench.md").read_text().startswith("| backend |")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_export_folder_runs_beside_todays_export_and_a_repeated_backend_pools_its_runs(tmp_path, tiny_checkpoint,
                                                                                           tiny_onnx):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--model", str(tiny_checkpoint), "--runs", "1",
                        "--max-tokens", "4", "--pixel-sweep", "64",
                        "--backends", f"edgevl-int8,edgevl@{tiny_onnx},edgevl-int8", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {row["backend"]: row["runs"] for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert runs == {"edgevl-int8": 2, f"edgevl@{tiny_onnx}": 1}


def test_load_mode_drives_the_server_with_concurrent_streams(tmp_path, tiny_checkpoint):
    out = tmp_path / "load"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--load", "1,2", "--model", str(tiny_checkpoint),
                        "--precisions", "fp32", "--scenarios", "short,big", "--rounds", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "load.json").read_text())["rows"]
    assert [(x["scenario"], x["clients"]) for x in rows] == [("short", 1), ("short", 2), ("big", 2)]
    short2 = rows[1]
    assert short2["requests"] == 2 and short2["tokens"] == 128  # fixed-length answers: ignore_eos honoured
    for x in rows:
        assert x["agg_tokens_per_s"] > 0 and x["ttft_p95_s"] >= x["ttft_p50_s"] > 0
        assert x["gap_max_ms"] >= x["gap_p95_ms"] > 0 and x["peak_rss_mb"] > 0
    assert (out / "load.md").read_text().startswith("| server |")


def _failing_peer(tmp_path) -> str:
    """A llama.cpp binary that cannot run: what a bench meets when a peer crashes (e.g. an illegal instruction)."""
    peer = tmp_path / "llama-broken"
    peer.write_text("#!/bin/sh\necho 'Illegal instruction' >&2\nexit 132\n")
    peer.chmod(0o755)
    return str(peer)


def test_a_failing_llama_cpp_binary_keeps_the_rows_already_measured_and_runs_every_swept_size(tmp_path,
                                                                                             tiny_checkpoint):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--model", str(tiny_checkpoint), "--runs", "1",
                        "--max-tokens", "2", "--tasks", "caption", "--pixel-sweep", "64,96", "--backends",
                        "edgevl-fp32", "--llama-cpp", _failing_peer(tmp_path), "--gguf", f"Q8_0={tmp_path}/m.gguf",
                        "--mmproj", f"{tmp_path}/p.gguf", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]  # a failure is reported, not hidden
    report = json.loads((out / "bench.json").read_text())
    assert {(row["backend"], row["size"]) for row in report["rows"]} == {("edgevl-fp32", 64), ("edgevl-fp32", 96)}
    # the peer was tried on the same sizes as edgevl, each failure named
    assert set(report["failures"]) == {"llama.cpp-Q8_0@64", "llama.cpp-Q8_0@96"}


def test_llama_cpp_binary_without_gguf_is_refused_before_anything_runs(tmp_path, tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--model", str(tiny_checkpoint),
                        "--llama-cpp", "/usr/bin/true", "--out", str(tmp_path / "b")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "--gguf NAME=MODEL.gguf" in r.stderr
    assert not (tmp_path / "b" / "bench.json").exists()


def test_load_mode_reports_a_peer_server_that_fails_to_start_and_goes_on(tmp_path, tiny_checkpoint):
    out = tmp_path / "load"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--load", "1", "--model", str(tiny_checkpoint),
                        "--precisions", "fp32", "--scenarios", "short", "--rounds", "1", "--llama-server",
                        _failing_peer(tmp_path), "--gguf", f"Q8_0={tmp_path}/m.gguf", "--mmproj",
                        f"{tmp_path}/p.gguf", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "load.json").read_text())
    assert [(x["server"], x["scenario"]) for x in report["rows"]] == [("edgevl-fp32", "short")]
    [failure] = report["failures"]
    assert failure["server"] == "llama.cpp-Q8_0" and failure["scenario"] == "start" and failure["server_exited"]


def test_structured_tasks_compare_jump_forward_on_and_off_in_one_run(tmp_path, tiny_checkpoint):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--model", str(tiny_checkpoint), "--runs", "2",
                        "--max-tokens", "48", "--tasks", "receipt,detect", "--size", "96",
                        "--backends", "edgevl-fp32,edgevl-fp32:no-jump-forward", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    jump = {j["task"]: j for j in report["jump_forward"]}
    assert set(jump) == {"receipt", "detect"}
    for j in jump.values():
        assert j["same_output"] and j["backend"] == "edgevl-fp32" and j["total_ms_without"] > 0
    assert sum(j["forced_tokens"] for j in jump.values()) > 0
    assert "| without jump-forward |" in (out / "bench.md").read_text()
    # the JSON-schema table: with drafts (forced tokens counted) and the mask alone (none forced)
    forced = {c["backend"]: sum(c["constrained_forced_tokens"]) for c in report["constraint_overhead"]}
    assert forced["edgevl-fp32:no-jump-forward"] == 0 and forced["edgevl-fp32"] > 0


def test_load_mode_reports_power_from_an_energy_counter(tmp_path, tiny_checkpoint):
    """A counter file advanced by 2 J every 0.1 s (20 W): the table's phases read about that."""
    import os
    import threading

    counter = tmp_path / "energy_uj"
    counter.write_text("0" * 16)
    stop = threading.Event()

    def advance() -> None:
        # in place, as sysfs changes (the server keeps the file open), and of a fixed width in one
        # write, so a reader never sees half a number
        uj = 0
        with open(counter, "r+b", buffering=0) as f:
            while not stop.wait(0.1):
                uj += 2_000_000
                os.pwrite(f.fileno(), b"%016d" % uj, 0)

    threading.Thread(target=advance, daemon=True).start()
    out = tmp_path / "load"
    try:
        r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--load", "1", "--model",
                            str(tiny_checkpoint), "--precisions", "fp32", "--scenarios", "short", "--rounds", "1",
                            "--energy-counter", str(counter), "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "load.json").read_text())
    assert report["power"]["counter"].startswith("ok")
    phases = {p["phase"]: p for p in report["power"]["rows"]}
    assert set(phases) == {"idle", "loading", "answering (short)"}
    for p in phases.values():
        assert 10 < p["watts"] < 40, p  # 20 W, give or take the 0.1 s ticks at each end
    assert report["rows"][0]["energy_per_answer_j"] > 0
    assert "| mean W |" in (out / "load.md").read_text()


def test_load_mode_says_why_there_is_no_power_figure(tmp_path, tiny_checkpoint):
    out = tmp_path / "load"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--load", "1", "--model", str(tiny_checkpoint),
                        "--precisions", "fp32", "--scenarios", "short", "--rounds", "1", "--energy-counter",
                        str(tmp_path / "missing"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "load.json").read_text())
    assert report["power"]["counter"].startswith("n/a") and report["power"]["rows"] == []
    assert report["rows"][0]["energy_per_answer_j"] is None
    assert "not measured, not estimated" in (out / "load.md").read_text()

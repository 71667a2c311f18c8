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
    assert all(r["cache_hits"] == 1 for r in report["repeat_image"])
    assert {r["backend"] for r in report["constraint_overhead"]} == {"edgevl-fp32", "edgevl-int8"}
    assert "cpu" in report["machine"] and "onnxruntime" in report["machine"]
    assert (out / "bench.md").read_text().startswith("| backend |")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

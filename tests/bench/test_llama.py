"""llama.cpp in the bench: its log parsed as today's llama-mtmd-cli writes it, and a real build run
end to end through `edgevl bench --llama-cpp auto` on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgevl.bench.gguf_files import parse_spec
from edgevl.bench.llama import CONTEXT, LlamaLogError, command, parse_log
from edgevl.bench.llama_build import VERSION, is_built

DATA = Path(__file__).parent / "data"


# recorded from llama-mtmd-cli of llama-cpp-python 0.3.36's llama.cpp, 448² caption image, -n 16 -lv 4:
# (file, vision ms, prompt eval ms, prompt tokens, eval ms over 15 runs)
RECORDED = [("llama-mtmd-cli-tiny.log", 553.0, 1189.11, 240, 279.34),
            ("llama-mtmd-cli-2b-f32.log", 15733.0, 41054.40, 240, 46711.84)]  # 2B F32 + F16 mmproj


@pytest.mark.parametrize(("name", "vision", "prompt", "n_prompt", "eval_ms"), RECORDED)
def test_parses_a_recorded_log_of_todays_llama_mtmd_cli(name, vision, prompt, n_prompt, eval_ms):
    rec = parse_log((DATA / name).read_text())
    assert rec["vision_ms"] == vision  # "mtmd batch encoding done in N ms"
    assert rec["ttft_ms"] == prompt  # the prompt eval, image encode included
    assert rec["prefill_ms"] == pytest.approx(prompt - vision)
    assert rec["prompt_tokens"] == n_prompt
    assert rec["output_tokens"] == 16  # 15 eval runs after the prompt's own token
    assert rec["decode_tokens_per_s"] == pytest.approx(15 / (eval_ms / 1000))
    assert rec["total_ms"] == pytest.approx(prompt + eval_ms)


def test_a_log_without_the_timing_report_is_an_error_that_says_why():
    log = (DATA / "llama-mtmd-cli-tiny.log").read_text()
    without = "\n".join(line for line in log.splitlines() if "llama_perf_context_print" not in line)
    with pytest.raises(LlamaLogError, match="-lv 4"):
        parse_log(without)


def test_the_command_bounds_the_context_and_asks_for_timings():
    cmd = command("llama-mtmd-cli", "m.gguf", "mmproj.gguf", "i.png", "hi", 8, 2)
    assert cmd[cmd.index("-c") + 1] == str(CONTEXT)
    assert cmd[cmd.index("-lv") + 1] == "4"
    assert cmd[cmd.index("--mmproj") + 1] == "mmproj.gguf"


def test_gguf_specs_name_the_text_type_and_the_projector():
    assert parse_spec("Q8_0") == ("Q8_0", "F16")  # llama.cpp's usual F16 projector
    assert parse_spec("F32:F32") == ("F32", "F32")
    with pytest.raises(SystemExit, match="Q3_K"):
        parse_spec("Q3_K")


@pytest.mark.skipif(not is_built(), reason=f"llama.cpp {VERSION} is not built in the cache (a first "
                    "`edgevl bench --llama-cpp auto` builds it in about 7 minutes)")
def test_bench_llama_cpp_auto_runs_a_real_build_on_the_tiny_checkpoint(tmp_path, tiny_checkpoint):
    pytest.importorskip("torch")  # llama.cpp's converter reads the checkpoint with torch
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "edgevl.cli", "bench", "--quick", "--model", str(tiny_checkpoint),
                        "--backends", "edgevl-fp32", "--tasks", "caption", "--llama-cpp", "auto", "--gguf", "F32",
                        "--gguf", "Q8_0",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["backend"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"edgevl-fp32", "llama.cpp-F32", "llama.cpp-Q8_0"}
    for name in ("llama.cpp-F32", "llama.cpp-Q8_0"):
        row = rows[name]
        assert row["runs"] == 2
        assert row["output_tokens"]["median"] == 8  # --quick: 8 tokens, EOS ignored
        # the same prompt and image: the same number of prompt tokens as edgevl's
        assert row["prompt_tokens"]["median"] == rows["edgevl-fp32"]["prompt_tokens"]["median"]
        assert 0 < row["vision_ms"]["median"] < row["ttft_ms"]["median"]
        assert row["decode_tokens_per_s"]["median"] > 0
        assert row["peak_rss_mb"]["median"] > 0
    assert "llama.cpp-Q8_0" in (out / "bench.md").read_text()

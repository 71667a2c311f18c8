"""llama.cpp's `llama-mtmd-cli` on GGUF files of the same checkpoint, measured in the same run.

The binary and GGUF files are given on the command line, or built and converted by
`edgevl bench --llama-cpp auto` (edgevl.bench.llama_build, edgevl.bench.gguf_files). Timings are
parsed from llama.cpp's own report, which today's llama-mtmd-cli prints only at `-lv 4`:

    mtmd batch encoding done in 553 ms                                      ← the vision tower
    llama_perf_context_print: prompt eval time =  1189.11 ms /   240 tokens ← text + image, vision included
    llama_perf_context_print:        eval time =   279.34 ms /    15 runs   ← decode after the first token
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

from edgevl.bench.tasks import TASKS

# without -c llama.cpp sizes the KV cache for the model's full 262k context (~30 GB for the 2B)
CONTEXT = 4096
_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs")
_VISION = re.compile(r"mtmd batch encoding done in\s*([\d.]+) ms")


class LlamaLogError(RuntimeError):
    """llama-mtmd-cli failed, or printed no timing report to read."""


def parse_log(log: str) -> dict:
    """The request's timings from one llama-mtmd-cli run's log (stderr)."""
    p, e = _PROMPT.search(log), _EVAL.search(log)
    if not p or not e:
        raise LlamaLogError("no `prompt eval time` / `eval time` lines in llama-mtmd-cli's log (they need "
                            "-lv 4):\n" + log[-1500:])
    prompt_ms, eval_ms, n_eval = float(p.group(1)), float(e.group(1)), int(e.group(2))
    vision_ms = sum(float(m) for m in _VISION.findall(log))  # one line per image batch
    return {
        # the prompt eval covers the image encode, and the first token comes out of it
        "ttft_ms": prompt_ms, "total_ms": prompt_ms + eval_ms, "vision_ms": vision_ms,
        "prefill_ms": prompt_ms - vision_ms, "prompt_tokens": int(p.group(2)),
        "output_tokens": n_eval + 1, "decode_tokens_per_s": n_eval / (eval_ms / 1000) if eval_ms else None,
    }


def command(binary: str, gguf: str, mmproj: str | None, image: str, prompt: str, max_tokens: int,
            threads: int) -> list[str]:
    cmd = [binary, "-m", gguf, "--image", image, "-p", prompt, "-n", str(max_tokens), "--temp", "0",
           "--ignore-eos", "-t", str(threads or os.cpu_count() or 1), "-c", str(CONTEXT), "-lv", "4"]
    return cmd + (["--mmproj", mmproj] if mmproj else [])


def run_llama(binary: str, name: str, gguf: str, mmproj: str | None, tasks: list[str], size: int, runs: int,
              max_tokens: int, threads: int, warmup: int = 1) -> list[dict]:
    """`warmup` runs first, unrecorded: the GGUF is memory-mapped, and a first run after the page
    cache dropped it measures the disk, not llama.cpp."""
    out = []
    for task in tasks:
        t = TASKS[task]
        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            t.draw(size).save(f.name)
            img = f.name
        try:
            for i in range(-warmup, runs):
                cmd = command(binary, gguf, mmproj, img, t.prompt, max_tokens, threads)
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                log = proc.stderr.read()
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                if status != 0:
                    raise LlamaLogError(f"{' '.join(cmd)} failed (status {status}):\n{log[-1500:]}")
                rec = parse_log(log)
                if i < 0:
                    continue
                out.append({
                    "event": "run", "backend": f"llama.cpp-{name}", "run": i, "task": task, "size": size, **rec,
                    "peak_rss_mb": usage.ru_maxrss / 1024, "energy_j": None,
                    "cpu_util": (usage.ru_utime + usage.ru_stime) / wall / (os.cpu_count() or 1),
                })
        finally:
            os.unlink(img)
    return out

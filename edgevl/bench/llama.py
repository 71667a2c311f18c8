"""llama.cpp's `llama-mtmd-cli` on GGUF files of the same checkpoint, measured in the same run.

The project does not ship llama.cpp; give the binary and the GGUF files (text model and vision
projector) on the command line. Timings are parsed from llama.cpp's own performance report.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

from edgevl.bench.tasks import TASKS

_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs")
_IMAGE = re.compile(r"image (?:slice )?encoded in\s*([\d.]+) ms")


def run_llama(binary: str, name: str, gguf: str, mmproj: str | None, tasks: list[str], size: int, runs: int,
              max_tokens: int, threads: int) -> list[dict]:
    out = []
    for task in tasks:
        t = TASKS[task]
        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            t.draw(size).save(f.name)
            img = f.name
        for i in range(runs):
            cmd = [binary, "-m", gguf, "--image", img, "-p", t.prompt, "-n", str(max_tokens), "--temp", "0",
                   "--ignore-eos", "-t", str(threads or os.cpu_count() or 1)]
            if mmproj:
                cmd += ["--mmproj", mmproj]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, _, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            log = proc.stderr.read() + proc.stdout.read()
            p, e, im = _PROMPT.search(log), _EVAL.search(log), _IMAGE.search(log)
            prompt_ms = float(p.group(1)) if p else None
            image_ms = float(im.group(1)) if im else 0.0
            eval_ms, n_eval = (float(e.group(1)), int(e.group(2))) if e else (None, 0)
            out.append({
                "event": "run", "backend": f"llama.cpp-{name}", "run": i, "task": task, "size": size,
                "ttft_ms": (prompt_ms or 0) + image_ms if prompt_ms is not None else None,
                # the process also loads the model: total is what the request itself took, as for edgevl
                "total_ms": (prompt_ms or 0) + image_ms + (eval_ms or 0) if prompt_ms is not None else wall * 1000,
                "decode_tokens_per_s": n_eval / (eval_ms / 1000) if eval_ms else None,
                "vision_ms": image_ms, "prefill_ms": prompt_ms, "prompt_tokens": int(p.group(2)) if p else None,
                "output_tokens": n_eval, "peak_rss_mb": usage.ru_maxrss / 1024,
                "cpu_util": (usage.ru_utime + usage.ru_stime) / wall / (os.cpu_count() or 1), "energy_j": None,
            })
    return out

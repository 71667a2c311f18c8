"""`edgevl bench`: every backend side by side in one run, each in its own process; JSON, Markdown, PNG.

    edgevl bench --model /models/qwen3vl-2b --backends transformers,edgevl-fp32,edgevl-int8,edgevl-int4 --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgevl.ops.bandwidth import decode_ceiling

METRICS = ("ttft_ms", "total_ms", "decode_tokens_per_s", "decode_ms", "preprocess_ms", "vision_ms", "prefill_ms",
           "prompt_tokens", "video_tokens", "output_tokens", "peak_rss_mb", "cpu_util", "energy_j")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Qwen3-VL checkpoint folder (default: the demo model)")
    p.add_argument("--backends", default="transformers,edgevl-fp32,edgevl-int8,edgevl-int4",
                   help="comma-separated: transformers, edgevl-fp32, edgevl-int8, edgevl-int4, or edgevl@DIR "
                        "(an exported folder as it is, e.g. one made by an older exporter); a backend "
                        "named twice runs twice, alternating with the others, its runs pooled")
    p.add_argument("--tasks", default="caption,ocr,chart,video",
                   help="caption, ocr, chart (448² images), video (a generated 4 s clip of 448² frames), and the "
                        "structured receipt (JSON schema) and detect (boxes); name a backend X and "
                        "X:no-jump-forward to compare jump-forward on and off")
    p.add_argument("--size", type=int, default=448, help="image side in pixels (the headline is 448)")
    p.add_argument("--pixel-sweep", default=None, help="e.g. 224,448,672,896: latency curve instead of tasks")
    p.add_argument("--runs", type=int, default=20, help="measured runs per task, after a warm-up")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per run (EOS ignored: fixed length)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.add_argument("--quick", action="store_true", help="2 runs, 8 tokens, the first task and video: a smoke test")
    p.add_argument("--out", default=None, help="output folder (default: artifacts/bench/<time>)")
    p.add_argument("--llama-cpp", default=None,
                   help="compare with llama.cpp on the same machine: a llama-mtmd-cli binary, or `auto` to "
                        "build llama.cpp into the cache once and convert the checkpoint to GGUF F32, Q8_0 and "
                        "Q4_K_M (+ F16 mmproj)")
    p.add_argument("--gguf", action="append", default=[],
                   help="NAME=MODEL.gguf (several allowed, with --mmproj); with `--llama-cpp auto`: "
                        "TEXT[:MMPROJ] types to convert to and run (default F32, Q8_0, Q4_K_M, each with an "
                        "F16 projector), e.g. --gguf F32 --gguf F32:F32")
    p.add_argument("--mmproj", default=None, help="the vision projector GGUF for --llama-cpp")
    from edgevl.bench.load import add_load_arguments
    from edgevl.bench.soak import add_soak_arguments

    add_load_arguments(p)
    add_soak_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    if args.model is None:
        from edgevl.demo import demo_model_dir

        args.model = str(demo_model_dir())
    if args.load:
        from edgevl.bench.load import run_load

        return run_load(args)
    if args.soak:
        from edgevl.bench.soak import run_soak

        return run_soak(args)
    if args.quick:
        first = args.tasks.split(",")[0]
        args.runs, args.max_tokens = 2, 8
        args.tasks = first + (",video" if "video" in args.tasks.split(",")[1:] else "")
    if args.llama_cpp not in (None, "auto") and (not args.gguf or any("=" not in g for g in args.gguf)):
        raise SystemExit("--llama-cpp BIN needs --gguf NAME=MODEL.gguf (one or more) and --mmproj")
    out = Path(args.out or f"artifacts/bench/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    sizes = args.pixel_sweep or str(args.size)
    from edgevl.ops.bandwidth import read_bandwidth_gbs

    bandwidth = read_bandwidth_gbs(args.threads)  # before any backend loads: a quiet machine's figure
    print(f"[bench] read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr, flush=True)
    records: list[dict] = [{"event": "bandwidth", "gbs": bandwidth}]
    failures: dict[str, str] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        cmd = [sys.executable, "-m", "edgevl.bench.worker", "--backend", backend, "--model", args.model,
               "--tasks", args.tasks, "--sizes", sizes, "--runs", str(args.runs), "--max-tokens",
               str(args.max_tokens), "--threads", str(args.threads)]
        if not args.pixel_sweep:
            cmd.append("--repeat-image")
        err = _run_worker(backend, cmd, records)
        if err:
            failures[backend] = err
    if args.llama_cpp:
        try:
            _run_llama_backends(args, [int(s) for s in sizes.split(",")], records, failures)
        except Exception as e:  # whatever fails here, the rows already measured are written below
            print(f"[bench] llama.cpp FAILED: {e!r}", file=sys.stderr)
            failures["llama.cpp"] = repr(e)[:2000]
    report = summarize(records, args, failures)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    chart(report, out / "bench.png")
    print(markdown(report))
    print(f"\nwrote {out}/bench.json, bench.md, bench.png", file=sys.stderr)
    return 0 if not failures else 1


def _run_llama_backends(args: argparse.Namespace, sizes: list[int], records: list[dict],
                        failures: dict[str, str]) -> None:
    """llama.cpp on the same pictures, prompts and token counts as edgevl's rows: every task and every
    size of the sweep."""
    from edgevl.bench.llama import LlamaLogError, run_llama
    from edgevl.bench.tasks import TASKS

    # llama-mtmd-cli is compared on the free-text image tasks; it takes no clip or schema here
    image_tasks = [t for t in args.tasks.split(",") if t in TASKS and TASKS[t].schema is None]
    for name, binary, gguf, mmproj in _llama_inputs(args):
        print(f"[bench] llama.cpp-{name}: {gguf}", file=sys.stderr, flush=True)
        for size in sizes:
            try:
                records += run_llama(binary, name, gguf, mmproj, image_tasks, size, args.runs, args.max_tokens,
                                     args.threads)
            except LlamaLogError as e:
                print(f"[bench] llama.cpp-{name} FAILED:\n{e}", file=sys.stderr)
                failures[f"llama.cpp-{name}@{size}"] = str(e)


def _llama_inputs(args: argparse.Namespace) -> list[tuple[str, str, str, str | None]]:
    """[(name, llama-mtmd-cli, text GGUF, mmproj GGUF)]: as given, or built and converted (`auto`)."""
    if args.llama_cpp != "auto":
        return [(name, args.llama_cpp, gguf, args.mmproj) for name, gguf in (s.split("=", 1) for s in args.gguf)]
    from edgevl.bench.gguf_files import TEXT_TYPES, ensure_gguf
    from edgevl.bench.llama_build import ensure_llama_cpp, source_dir

    bins = ensure_llama_cpp()
    runs = ensure_gguf(Path(args.model), source_dir(), bins, tuple(args.gguf) or TEXT_TYPES)
    return [(name, str(bins / "llama-mtmd-cli"), str(text), str(mmproj)) for name, text, mmproj in runs]


def _run_worker(backend: str, cmd: list[str], records: list[dict]) -> str | None:
    print(f"[bench] {backend}: loading", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    for line in proc.stdout:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append(rec)
        if rec["event"] == "run":
            print(f"[bench] {backend} {rec['task']}@{rec['size']} run {rec['run'] + 1}: ttft {rec['ttft_ms']:.0f} ms, "
                  f"{rec['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        elif rec["event"] == "loaded":
            print(f"[bench] {backend}: loaded in {rec['load_s']:.1f} s", file=sys.stderr, flush=True)
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        print(f"[bench] {backend} FAILED:\n{stderr[-2000:]}", file=sys.stderr)
        return stderr[-2000:]
    return None


def _stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "median": statistics.median(vals), "n": len(vals)}


def summarize(records: list[dict], args: argparse.Namespace, failures: dict) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("event") == "run":
            groups.setdefault((r["backend"], r["task"], r["size"]), []).append(r)
    rows = []
    for (backend, task, size), runs in groups.items():
        row = {"backend": backend, "task": task, "size": size, "runs": len(runs)}
        for m in METRICS:
            row[m] = _stats([r.get(m) for r in runs])
        row["peak_rss_mb"] = {"mean": max(r["peak_rss_mb"] for r in runs), "std": 0.0,
                              "median": max(r["peak_rss_mb"] for r in runs), "n": len(runs)}
        rows.append(row)
    repeats = [r for r in records if r.get("event") == "repeat"]
    constraint = [r for r in records if r.get("event") == "constraint"]
    bandwidth = next((r["gbs"] for r in records if r.get("event") == "bandwidth"), None)
    walls = [r for r in records if r.get("event") == "wall"]
    for w in walls:
        ceiling = decode_ceiling(bandwidth, w["bytes_per_step"]) if bandwidth and w["bytes_per_step"] else None
        w.update(ceiling_tokens_per_s=ceiling,
                 share_1=w["tokens_per_s_1"] / ceiling if ceiling else None,
                 share_each=w["tokens_per_s_each"] / ceiling if ceiling else None)
    for r in repeats:
        r["ratio"] = r["repeat_ttft_ms"] / r["first_ttft_ms"] if r["first_ttft_ms"] else None
    jump = _jump_forward(rows, groups)
    ref = {(r["task"], r["size"]): r for r in rows if r["backend"] == "transformers"}
    for r in rows:
        base = ref.get((r["task"], r["size"]))
        if base and r is not base:
            r["vs_transformers"] = {
                "ttft": _ratio(r["ttft_ms"]["median"], base["ttft_ms"]["median"]),
                "decode": _ratio(r["decode_tokens_per_s"]["median"], base["decode_tokens_per_s"]["median"]),
                "peak_rss": _ratio(r["peak_rss_mb"]["median"], base["peak_rss_mb"]["median"]),
            }
    return {
        "command": "edgevl bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "edgevl bench",
        "machine": machine(), "model": args.model, "runs": args.runs, "max_tokens": args.max_tokens,
        "rows": rows, "repeat_image": repeats, "constraint_overhead": constraint, "failures": failures,
        "read_bandwidth_gbs": bandwidth, "memory_wall": walls, "jump_forward": jump,
        "energy": "RAPL" if any(r.get("energy_j") is not None for r in records) else "n/a (no readable RAPL counters)",
    }


def _jump_forward(rows: list[dict], groups: dict[tuple, list[dict]]) -> list[dict]:
    """Each structured task of a backend beside the same backend with jump-forward off: the whole
    answer's time, and whether every run's answer was the same text."""
    from edgevl.bench.worker import NO_JUMP_FORWARD

    out = []
    for r in rows:
        off = (r["backend"] + NO_JUMP_FORWARD, r["task"], r["size"])
        if off not in groups or "text" not in groups[off][0]:
            continue
        on_runs = sorted(groups[(r["backend"], r["task"], r["size"])], key=lambda x: x["run"])
        off_runs = sorted(groups[off], key=lambda x: x["run"])
        t_off = statistics.median(x["total_ms"] for x in off_runs)
        out.append({"backend": r["backend"], "task": r["task"], "size": r["size"],
                    "total_ms": r["total_ms"]["median"], "total_ms_without": t_off,
                    "ratio": _ratio(r["total_ms"]["median"], t_off),
                    "forced_tokens": statistics.median(x["forced_tokens"] for x in on_runs),
                    "output_tokens": r["output_tokens"]["median"],
                    "same_output": [x["text"] for x in on_runs] == [x["text"] for x in off_runs]})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def machine() -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def _fmt(s: dict, digits: int = 0) -> str:
    if s["median"] is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['mean']:.{digits}f} ± {s['std']:.{digits}f})"


def markdown(report: dict) -> str:
    lines = [
        "| backend | task | image | TTFT ms | total ms | decode tok/s | frames decode ms | preprocess ms | vision ms | "
        "prefill ms | prompt tok | out tok | peak RSS MB | CPU | energy J | TTFT vs ref | decode vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["rows"], key=lambda r: (r["size"], r["task"], r["backend"])):
        vs = r.get("vs_transformers", {})
        lines.append(
            f"| {r['backend']} | {r['task']} | {r['size']}² | {_fmt(r['ttft_ms'])} | {_fmt(r['total_ms'])} | "
            f"{_fmt(r['decode_tokens_per_s'], 1)} | {_fmt(r['decode_ms'])} | {_fmt(r['preprocess_ms'])} | "
            f"{_fmt(r['vision_ms'])} | {_fmt(r['prefill_ms'])} | "
            f"{r['prompt_tokens']['median']:.0f} | {r['output_tokens']['median']:.0f} | "
            f"{r['peak_rss_mb']['median']:.0f} | {r['cpu_util']['median'] * 100:.0f}% | "
            f"{_fmt(r['energy_j'], 1)} | {vs.get('ttft', '')} | {vs.get('decode', '')} |")
    lines.append("")
    lines.append("Cells: median (mean ± std). TTFT/decode vs ref: ratio to the transformers eager fp32 "
                 "reference in the same run (TTFT lower is better, decode higher is better). The video task: "
                 "a generated 4 s clip of the given frame size, sampled at the model's 2 fps; its TTFT = frames "
                 "decode + preprocess (resize to the model's grid, patches) + vision + prefill.")
    if report["repeat_image"]:
        lines += ["", "| backend | task | first ask TTFT ms | same image again TTFT ms | ratio |",
                  "|---|---|---|---|---|"]
        for r in report["repeat_image"]:
            lines.append(f"| {r['backend']} | {r['task']} | {r['first_ttft_ms']:.0f} | {r['repeat_ttft_ms']:.0f} | "
                         f"{r['ratio']:.2f} |")
    if report.get("constraint_overhead"):
        # with jump-forward on, forced tokens arrive in drafts and the constrained answer can be the
        # faster one; a `:no-jump-forward` backend's row is the mask's own cost
        lines += ["", "| backend | decode tok/s free | with a JSON-schema constraint | overhead | "
                  "tokens forced (jump-forward) / output |", "|---|---|---|---|---|"]
        for r in report["constraint_overhead"]:
            forced = sum(r.get("constrained_forced_tokens") or [0])
            lines.append(f"| {r['backend']} | {r['free_tokens_per_s']:.1f} | {r['constrained_tokens_per_s']:.1f} | "
                         f"{r['overhead'] * 100:.1f}% | {forced} / {sum(r['constrained_output_tokens'])} |")
    if report.get("jump_forward"):
        lines += ["", "| backend | task | image | whole answer ms | without jump-forward | ratio | tokens | "
                  "of them from drafts | same answers |", "|---|---|---|---|---|---|---|---|---|"]
        for j in report["jump_forward"]:
            lines.append(f"| {j['backend']} | {j['task']} | {j['size']}² | {j['total_ms']:.0f} | "
                         f"{j['total_ms_without']:.0f} | {j['ratio']} | {j['output_tokens']:.0f} | "
                         f"{j['forced_tokens']:.0f} | {'yes' if j['same_output'] else 'NO'} |")
    if report.get("memory_wall"):
        bw = report["read_bandwidth_gbs"]
        lines += ["", f"Memory wall (read bandwidth {bw:.1f} GB/s here, `edgevl doctor`'s measure): a decode step "
                  "reads every decoder weight once, so tokens/s ≤ bandwidth ÷ bytes per step. Text-only answers; "
                  "a batch of 4 started together.", "",
                  "| backend | GB per step | ceiling tok/s | batch 1 tok/s | share | batch 4 tok/s each | share | "
                  "step of 4 ÷ step of 1 |", "|---|---|---|---|---|---|---|---|"]
        for w in report["memory_wall"]:
            pct = lambda x: f"{x * 100:.0f}%" if x is not None else "n/a"  # noqa: E731
            gb = f"{w['bytes_per_step'] / 1e9:.2f}" if w["bytes_per_step"] else "n/a"
            ceiling = f"{w['ceiling_tokens_per_s']:.1f}" if w["ceiling_tokens_per_s"] else "n/a"
            lines.append(f"| {w['backend']} | {gb} | {ceiling} | {w['tokens_per_s_1']:.1f} | {pct(w['share_1'])} | "
                         f"{w['tokens_per_s_each']:.1f} | {pct(w['share_each'])} | {w['step_cost_vs_1']:.2f}× |")
    lines += ["", f"Energy: {report['energy']}. Machine: {json.dumps(report['machine'])}"]
    if report["failures"]:
        lines += ["", "Failed backends: " + ", ".join(report["failures"])]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    keys = sorted({(r["task"], r["size"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        for ax, metric, scale in ((axes[0], "ttft_ms", 1000), (axes[1], "decode_tokens_per_s", 1)):
            vals = []
            for k in keys:
                row = next((r for r in rows if r["backend"] == b and (r["task"], r["size"]) == k), None)
                vals.append(row[metric]["median"] / scale if row and row[metric]["median"] is not None else 0)
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=b)
    for ax, title in ((axes[0], "time to first token (s, lower is better)"),
                      (axes[1], "decode tokens/s (higher is better)")):
        ax.set_title(title, fontsize=10)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels([f"{t}\n{s}²" for t, s in keys], fontsize=8)
        ax.grid(axis="y", alpha=.3)
    axes[1].legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"edgevl bench — {m.get('cpu', '')}, {m.get('cores')} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

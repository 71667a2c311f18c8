"""One backend, in its own process (so its peak RSS is its own): load, warm up, run, print JSON lines.

    python -m edgevl.bench.worker --backend edgevl-int8 --model DIR --tasks caption,ocr,chart --runs 20
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

from edgevl.bench.clip import make_clip
from edgevl.bench.tasks import TASKS, VIDEO_PROMPT, VIDEO_SECONDS
from edgevl.types import (
    EngineOptions,
    FinishEvent,
    GenerationRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
)


def rapl_uj() -> int | None:
    """Package energy counters (microjoules) where the machine exposes them to us."""
    total, found = 0, False
    for path in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj"):
        if path.count(":") != 1:  # packages only, not their sub-domains
            continue
        try:
            total += int(open(path).read())
            found = True
        except (OSError, ValueError):
            continue
    return total if found else None


def _reference_type() -> type:
    try:
        from edgevl.runtime.reference import TransformersEngine
    except ImportError:
        return type(None)
    return TransformersEngine


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


NO_JUMP_FORWARD = ":no-jump-forward"  # a backend name's suffix: the same export with jump-forward off


def load(backend: str, model: str, threads: int, vision_cache: int, prefix_cache: bool = False):
    opts = dict(intra_op_threads=threads, prefix_cache=prefix_cache, vision_cache_entries=vision_cache,
                jump_forward=not backend.endswith(NO_JUMP_FORWARD))
    backend = backend.removesuffix(NO_JUMP_FORWARD)
    if backend == "transformers":
        from edgevl.runtime.reference import TransformersEngine

        return TransformersEngine(model, EngineOptions(**opts))
    from pathlib import Path

    from edgevl.export.manifest import is_exported
    from edgevl.runtime.loader import exported_dir_for, load_engine

    if backend.startswith("edgevl@"):  # an exported folder as it is: an older export against today's
        return load_engine(backend.removeprefix("edgevl@"), EngineOptions(**opts), warmup=True)
    precision = backend.removeprefix("edgevl-")
    target = exported_dir_for(Path(model), precision)
    if not is_exported(model) and not is_exported(target):
        # export in a child process: its peak memory must not count as the engine's
        import subprocess

        tmp = target.with_name(target.name + ".bench-tmp")
        subprocess.run([sys.executable, "-m", "edgevl.cli", "export", model, str(tmp), "--precision", precision],
                       check=True, stdout=subprocess.DEVNULL)
        tmp.rename(target)
    return load_engine(model, EngineOptions(precision=precision, **opts), warmup=True)


@functools.cache
def _clip(size: int) -> bytes:
    return make_clip(VIDEO_SECONDS, size, size)


def _video_part(engine, size: int):
    """Decode and sample the generated clip as the server does; the decode is part of TTFT."""
    from edgevl.preprocess.video import VideoConfig, VideoLimits, decode_video

    return decode_video(_clip(size), VideoConfig.from_folder(engine.info().model_dir), VideoLimits())


def measure(engine, task: str, size: int, max_tokens: int, image=None, prompt: str | None = None,
            schema: dict | None = None) -> dict:
    decode_ms = None
    if task == "video":
        t0 = time.perf_counter()
        part = _video_part(engine, size)
        decode_ms = (time.perf_counter() - t0) * 1000
        prompt = prompt or VIDEO_PROMPT
    else:
        part = ImagePart(image if image is not None else TASKS[task].draw(size))
        prompt = prompt or TASKS[task].prompt
        schema = schema if schema is not None else TASKS[task].schema
    req = GenerationRequest([Message("user", [part, TextPart(prompt)])],
                            SamplingParams(max_new_tokens=max_tokens, ignore_eos=True, temperature=0.0))
    if schema is not None:
        req.constraint = engine.json_constraint(schema, max_tokens)
        req.params.ignore_eos = False
    e0, c0, w0 = rapl_uj(), time.process_time(), time.perf_counter()
    fin = None
    for ev in engine.generate(req):
        if isinstance(ev, FinishEvent):
            fin = ev
    wall = time.perf_counter() - w0
    e1 = rapl_uj()
    tm = fin.timings
    return {
        # a clip's first token waits for its frames too: decode_ms + the engine's TTFT
        "task": task, "size": size, "ttft_ms": tm.ttft_ms + (decode_ms or 0),
        "total_ms": (tm.total_ms or wall * 1000) + (decode_ms or 0), "decode_ms": decode_ms,
        "video_tokens": fin.usage.video_tokens or None,
        "decode_tokens_per_s": tm.tokens_per_s, "preprocess_ms": tm.preprocess_ms,
        # transformers runs vision and prompt in one forward: no separate vision time to report
        "vision_ms": None if isinstance(engine, _reference_type()) else tm.vision_ms, "prefill_ms": tm.prefill_ms,
        "prompt_tokens": fin.usage.prompt_tokens, "output_tokens": fin.usage.completion_tokens,
        "cpu_util": (time.process_time() - c0) / wall / (os.cpu_count() or 1),
        "energy_j": (e1 - e0) / 1e6 if e0 is not None and e1 is not None and e1 >= e0 else None,
        "peak_rss_mb": peak_rss_mb(), "vision_cache_hits": tm.vision_cache_hits,
        "prefix_reused_tokens": tm.prefix_reused_tokens, "forced_tokens": tm.forced_tokens,
        # a structured answer's text: the same with jump-forward on and off, which the report checks
        **({"text": fin.text} if schema is not None else {}),
    }


def decoder_bytes(backend: str, model: str) -> int | None:
    """Bytes of weights a decode step reads: the decoder graph's (its lm_head included; the token
    table is read one row per token, so embed.onnx is left out)."""
    if backend.startswith("edgevl@"):
        folder = Path(backend.removeprefix("edgevl@"))
    else:
        from edgevl.export.manifest import is_exported
        from edgevl.runtime.loader import exported_dir_for

        folder = Path(model) if is_exported(model) else exported_dir_for(Path(model), backend.removeprefix("edgevl-"))
    data = folder / "decoder.onnx.data"
    return data.stat().st_size if data.is_file() else None


def _decode_speed(engine, max_tokens: int, seed: int) -> float:
    """Decode tokens/s of one text-only answer (a short prompt: the steps are decode steps)."""
    req = GenerationRequest([Message("user", [TextPart(f"Count to a hundred, slowly. ({seed})")])],
                            SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
    fin = next(ev for ev in engine.generate(req) if isinstance(ev, FinishEvent))
    return fin.timings.tokens_per_s


def decode_wall(engine, max_tokens: int, batch: int = 4) -> dict:
    """Decode speed of one sequence alone and per sequence in a batched step of `batch` (all
    started together, so their decode steps overlap): the step of `batch` costs one/each × a step of one."""
    one = statistics.median(_decode_speed(engine, max_tokens, i) for i in range(3))
    speeds: list[float] = []
    threads = [threading.Thread(target=lambda i=i: speeds.append(_decode_speed(engine, max_tokens, 100 + i)))
               for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    each = statistics.median(speeds)
    return {"batch": batch, "tokens_per_s_1": one, "tokens_per_s_each": each, "step_cost_vs_1": one / each}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", default="caption,ocr,chart,video")
    ap.add_argument("--sizes", default="448")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat-image", action="store_true", help="also ask twice about one image (cache on)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    engine = load(args.backend, args.model, args.threads, vision_cache=0)
    emit({"event": "loaded", "backend": args.backend, "load_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    tasks = args.tasks.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        for _ in range(args.warmup):
            measure(engine, tasks[0], size, min(4, args.max_tokens))
        for task in tasks:
            for i in range(args.runs):
                rec = measure(engine, task, size, args.max_tokens)
                emit({"event": "run", "backend": args.backend, "run": i, **rec})
    # the memory wall: bytes per step, speed alone and in a batch of 4
    if args.backend.startswith("edgevl") and not args.backend.endswith(NO_JUMP_FORWARD):
        emit({"event": "wall", "backend": args.backend, "bytes_per_step": decoder_bytes(args.backend, args.model),
              **decode_wall(engine, max(16, args.max_tokens))})
    if args.repeat_image and args.backend.startswith("edgevl"):
        # a chat about one picture: the second question finds the image's embeddings and the
        # prompt's KV cache (system + image) already computed
        engine = load(args.backend, args.model, args.threads, vision_cache=4, prefix_cache=True)
        repeated = [] if args.backend.endswith(NO_JUMP_FORWARD) else [t for t in tasks if t != "video"]
        for task in repeated:
            img = TASKS[task].draw(sizes[0])
            first = measure(engine, task, sizes[0], args.max_tokens, img)
            again = measure(engine, task, sizes[0], args.max_tokens, img.copy(), prompt="And what stands out most?")
            emit({"event": "repeat", "backend": args.backend, "task": task, "first_ttft_ms": first["ttft_ms"],
                  "repeat_ttft_ms": again["ttft_ms"], "cache_hits": again["vision_cache_hits"],
                  "prefix_reused_tokens": again["prefix_reused_tokens"]})
        # structured output: decode speed with and without a JSON-schema constraint (a
        # `:no-jump-forward` backend's figure is the mask's own cost; otherwise drafts are in it)
        schema = {"type": "object", "properties": {"trend": {"enum": ["rising", "falling", "flat"]},
                                                   "peak_month": {"type": "integer", "minimum": 1, "maximum": 12},
                                                   "summary": {"type": "string", "maxLength": 400}},
                  "required": ["trend", "peak_month", "summary"], "additionalProperties": False}
        free = [measure(engine, "chart", sizes[0], args.max_tokens, prompt=f"Describe {i}.") for i in range(3)]
        bound = [measure(engine, "chart", sizes[0], args.max_tokens, prompt=f"Describe {i}.", schema=schema)
                 for i in range(3)]
        tps = lambda rs: sorted(r["decode_tokens_per_s"] for r in rs)[1]  # noqa: E731  (median of 3)
        emit({"event": "constraint", "backend": args.backend, "free_tokens_per_s": tps(free),
              "constrained_tokens_per_s": tps(bound), "constrained_output_tokens": [r["output_tokens"] for r in bound],
              "constrained_forced_tokens": [r["forced_tokens"] for r in bound],
              "overhead": 1 - tps(bound) / tps(free)})
    emit({"event": "done", "backend": args.backend, "peak_rss_mb": peak_rss_mb()})
    return 0


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""`edgevl make-model | export | predict | make-clip | serve | bench | doctor`."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from pathlib import Path


def _make_model(args: argparse.Namespace) -> int:
    from edgevl.make_model import make_model

    t0 = time.perf_counter()
    out = make_model(args.size, args.out, seed=args.seed, variant=args.variant)
    print(f"wrote a {args.size} Qwen3-VL-{args.variant.capitalize()} checkpoint with random weights to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _export(args: argparse.Namespace) -> int:
    from edgevl.export import export_model

    t0 = time.perf_counter()
    out = export_model(args.checkpoint, args.out, args.precision, args.vision_precision, args.lm_head_precision,
                       kv_cache=args.kv_cache)
    print(f"exported {args.checkpoint} ({args.precision}, {args.kv_cache} KV cache) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from edgevl.preprocess.image import decode_image
    from edgevl.runtime.loader import load_engine
    from edgevl.types import (
        EngineOptions,
        FinishEvent,
        GenerationRequest,
        ImagePart,
        InputError,
        Message,
        SamplingParams,
        TextPart,
    )

    model = args.model
    if model is None:
        from edgevl.demo import demo_model_dir

        model = demo_model_dir()
    options = EngineOptions(intra_op_threads=args.threads, precision=args.precision,
                            max_pixels=args.max_pixels, max_video_pixels=args.max_video_pixels,
                            reasoning_budget=args.reasoning_budget)
    engine = load_engine(model, options)
    info = engine.info()
    if info.random_weights:
        print(f"[edgevl] {info.model_name} has RANDOM WEIGHTS (a demo of the real architecture): "
              "the answer is meaningless text.", file=sys.stderr)
    parts: list = []
    if args.image:
        try:
            parts.append(ImagePart(decode_image(Path(args.image).read_bytes())))
        except (OSError, InputError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.video:
        from edgevl.preprocess.video import VideoConfig, VideoLimits, decode_video

        try:
            clip = decode_video(Path(args.video).read_bytes(), VideoConfig.from_folder(info.model_dir),
                                VideoLimits(max_frames=args.max_frames), args.fps, args.max_frames)
        except (OSError, InputError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"[edgevl] {len(clip.times)} frames sampled from {args.video}", file=sys.stderr)
        parts.append(clip)
    parts.append(TextPart(args.prompt))
    sampling = engine.sampling_defaults()  # the checkpoint's own, unless given here
    for key in ("temperature", "top_p"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    params = SamplingParams(max_new_tokens=args.max_tokens, seed=args.seed, **sampling)
    for ev in engine.generate(GenerationRequest([Message("user", parts)], params)):
        if isinstance(ev, FinishEvent):
            t = ev.timings
            visual = f" ({ev.usage.video_tokens} of them video)" if ev.usage.video_tokens else ""
            thought = f" ({ev.usage.reasoning_tokens} of them thinking)" if ev.usage.reasoning_tokens else ""
            print(f"\n[edgevl] {ev.finish_reason}: {ev.usage.prompt_tokens} prompt{visual} + "
                  f"{ev.usage.completion_tokens} answer tokens{thought}; first token {t.ttft_ms:.0f} ms, "
                  f"{t.tokens_per_s:.1f} tokens/s, total {t.total_ms:.0f} ms", file=sys.stderr)
        elif ev.reasoning:  # a thinking model's thought: beside the answer, so stdout is the answer alone
            print(ev.text, end="", flush=True, file=sys.stderr)
        else:
            print(ev.text, end="", flush=True)
    return 0


def _make_clip(args: argparse.Namespace) -> int:
    from edgevl.bench.clip import make_clip

    fmt = "webm" if args.out.endswith(".webm") else "mp4"
    Path(args.out).write_bytes(make_clip(args.seconds, args.size, args.size, args.fps, fmt))
    print(f"wrote {args.out}: {args.seconds:g} s of {args.size}x{args.size} at {args.fps} fps")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from edgevl.server.cli import run_serve

    return run_serve(args)


def build_parser() -> argparse.ArgumentParser:
    from edgevl.types import KVCache, Precision

    precisions = typing.get_args(Precision)
    p = argparse.ArgumentParser(prog="edgevl", description="CPU-first Qwen3-VL inference on ONNX Runtime")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a Qwen3-VL checkpoint with random weights")
    m.add_argument("--size", choices=["tiny", "2b"], default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--variant", choices=["instruct", "thinking"], default="instruct",
                   help="thinking: Qwen3-VL-*-Thinking's chat template (answers open with <think>)")
    m.add_argument("out", help="output folder")
    m.set_defaults(func=_make_model)

    e = sub.add_parser("export", help="export a Hugging Face Qwen3-VL checkpoint to ONNX")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--precision", choices=precisions, default="fp32")
    e.add_argument("--vision-precision", choices=precisions, default=None,
                   help="precision of the vision tower (default: fp32 for fp32, else int8)")
    e.add_argument("--lm-head-precision", choices=precisions, default=None,
                   help="precision of the last layer and the tied embedding (default: fp32 for fp32, else int8)")
    e.add_argument("--kv-cache", choices=typing.get_args(KVCache), default="fp32",
                   help="KV cache elements: int8 with fixed scales measured on calibration text "
                   "(a quarter of the memory per token)")
    e.set_defaults(func=_export)

    r = sub.add_parser("predict", help="answer one question about an image and/or a clip, streaming")
    r.add_argument("prompt")
    r.add_argument("--image", help="image file (PNG, JPEG, WebP, GIF, BMP)")
    r.add_argument("--video", help="video file (MP4, WebM, MOV, animated GIF/WebP)")
    r.add_argument("--fps", type=float, default=None, help="frames read per second of video (default: the model's)")
    r.add_argument("--max-frames", type=int, default=64, help="frames read from the video at most")
    r.add_argument("--max-video-pixels", type=int, default=2 * 1024 * 1024,
                   help="pixel budget of the clip for the vision encoder, all frames together")
    r.add_argument("--model", help="checkpoint or exported folder (default: the demo model)")
    r.add_argument("--precision", choices=precisions, default="fp32")
    r.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--max-pixels", type=int, default=1024 * 1024)
    r.add_argument("--temperature", type=float, default=None,
                   help="0 for greedy (default: the checkpoint's generation_config.json)")
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--reasoning-budget", type=int, default=-1,
                   help="thinking models: thought tokens at most, then it is closed (-1: no limit; 0: no thinking)")
    r.set_defaults(func=_predict)

    c = sub.add_parser("make-clip", help="write a synthetic clip (moving, changing shapes) for trying video")
    c.add_argument("out", help="output file (.mp4 or .webm)")
    c.add_argument("--seconds", type=float, default=4.0)
    c.add_argument("--size", type=int, default=448, help="frame width and height")
    c.add_argument("--fps", type=int, default=10)
    c.set_defaults(func=_make_clip)

    from edgevl.bench.cli import add_bench_arguments, run_bench

    b = sub.add_parser("bench", help="benchmark backends side by side (TTFT, tokens/s, memory, CPU, energy)")
    add_bench_arguments(b)
    b.set_defaults(func=run_bench)

    d = sub.add_parser("doctor", help="CPU features, memory, sensors, and the threads/precision to use")
    d.set_defaults(func=lambda args: __import__("edgevl.ops.doctor", fromlist=["main"]).main())

    try:
        from edgevl.server.cli import add_serve_arguments
    except ImportError:
        add_serve_arguments = None
    if add_serve_arguments is not None:
        s = sub.add_parser("serve", help="serve the HTTP API and the web page")
        add_serve_arguments(s)
        s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

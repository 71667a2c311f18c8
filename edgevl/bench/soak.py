"""`edgevl bench --soak MINUTES`: months unattended, compressed — a mixed load for MINUTES, watched.

    edgevl bench --soak 30 --model CKPT --precisions int8 --threads 2 [--soak-clients 4]

Starts `edgevl serve` as a separate process and drives it with `--soak-clients` clients, each
picking at random (seeded) among: a question about a new picture or a repeated one (the vision
cache), a clip, a JSON-schema answer, a forced tool call; over both APIs, streamed or not; and
some of them walk away mid-answer (a stream closed after its first tokens, or a non-streamed
request given up after a moment). Every `--soak-interval` seconds it records the server's RSS,
open file descriptors and threads (psutil), and from /metrics the KV cache's use, the vision
cache's, the answers in flight and the decodes running, with the p95 latency of the requests
that finished in the interval. The first `--soak-warmup` seconds warm the server up; then it is
let go idle and measured (the baseline), the load runs for MINUTES, and it is let go idle and
measured again: a leak shows as RSS that keeps rising (the slope after warm-up, MB per minute,
by least squares over the intervals) or fds, threads or KV reservations above the baseline.
Writes soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgevl.bench.load import Server, data_url, free_port, picture

KINDS = ("picture", "repeat", "clip", "schema", "tools")
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["colour", "count"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "locate", "description": "where an object is",
                                           "parameters": {"type": "object", "properties": {
                                               "object": {"type": "string", "maxLength": 16}},
                                               "required": ["object"], "additionalProperties": False}}}]
# /metrics gauges sampled each interval
GAUGES = ("edgevl_kv_used_bytes", "edgevl_kv_running", "edgevl_kv_budget_bytes", "edgevl_vision_cache_entries",
          "edgevl_vision_cache_bytes", "edgevl_in_flight", "edgevl_queue_depth", "edgevl_decode_running")
# edgevl_requests_in_state{state="..."}: requests waiting, encoding, prefilling and decoding
STATES = {f'edgevl_requests_in_state{{state="{s}"}}': s for s in ("waiting", "encoding", "prefilling", "decoding")}


@dataclass
class Outcome:
    kind: str
    api: str
    stream: bool
    status: str  # "ok", "left" (the client walked away), or the HTTP status / error
    latency_s: float
    end: float


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)


def _clip(seed: int) -> str:
    from edgevl.bench.clip import make_clip

    data = make_clip(seconds=2.0 + seed % 3, width=160, height=120, fps=4)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def _body(kind: str, api: str, stream: bool, rng: random.Random, pictures: list[str], clips: list[str],
          max_tokens: int) -> tuple[str, dict]:
    image = data_url(picture(rng.randrange(10**6), 224)) if kind == "picture" else rng.choice(pictures)
    prompt = {"schema": "Say the main colour and how many shapes, as JSON.",
              "tools": "Find the red square."}.get(kind, "Describe what you see.")
    if api == "edge":
        body: dict = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream}
        if kind == "clip":
            body["video"] = rng.choice(clips)
        else:
            body["image"] = image
        if kind == "schema":
            body["schema"] = SCHEMA
        if kind == "tools":
            body.update(tools=TOOLS, tool_choice="required")
        return "/api/predict", body
    media = ({"type": "video_url", "video_url": {"url": rng.choice(clips)}} if kind == "clip"
             else {"type": "image_url", "image_url": {"url": image}})
    body = {"model": "m", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": [media, {"type": "text", "text": prompt}]}]}
    if kind == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    if kind == "tools":
        body.update(tools=TOOLS, tool_choice="required")
    return "/v1/chat/completions", body


async def _one(client, base: str, kind: str, api: str, stream: bool, leave: bool, path: str, body: dict) -> Outcome:
    import httpx

    t0 = time.perf_counter()
    status = "ok"
    try:
        if stream:
            async with client.stream("POST", base + path, json=body, timeout=600) as r:
                if r.status_code != 200:
                    status = str(r.status_code)
                lines = 0
                async for line in r.aiter_lines():
                    lines += bool(line.strip())
                    if leave and lines >= 2:  # walk away mid-answer: the stream is closed
                        status = "left"
                        break
        elif leave:  # give up on a non-streamed answer after a moment
            try:
                r = await client.post(base + path, json=body, timeout=httpx.Timeout(600, read=0.3))
                status = "ok" if r.status_code == 200 else str(r.status_code)
            except httpx.ReadTimeout:
                status = "left"
        else:
            r = await client.post(base + path, json=body, timeout=600)
            status = "ok" if r.status_code == 200 else str(r.status_code)
    except httpx.HTTPError as e:
        status = type(e).__name__
    return Outcome(kind, api, stream, status, time.perf_counter() - t0, time.monotonic())


async def drive(base: str, clients: int, until: float, seed: int, leave_p: float, max_tokens: int,
                load: Load) -> None:
    import httpx

    rng0 = random.Random(seed)
    pictures = [data_url(picture(rng0.randrange(10**6), 224)) for _ in range(4)]
    clips = [_clip(i) for i in range(3)]

    async def client_loop(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=4)) as client:
            while time.monotonic() < until:
                kind, api, stream = rng.choice(KINDS), rng.choice(("edge", "openai")), rng.random() < 0.5
                path, body = _body(kind, api, stream, rng, pictures, clips, max_tokens)
                load.outcomes.append(await _one(client, base, kind, api, stream, rng.random() < leave_p, path, body))

    await asyncio.gather(*(client_loop(c) for c in range(clients)))


def gauges(base: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in GAUGES:
            out[name.removeprefix("edgevl_")] = float(value)
        elif name in STATES:
            out[STATES[name]] = float(value)
    return out


def sample(srv: Server, base: str) -> dict:
    import psutil

    p = psutil.Process(srv.proc.pid)
    with p.oneshot():
        row = {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}
    return {**row, **gauges(base)}


def quiesce(base: str, timeout_s: float = 120.0) -> None:
    """Waits for the server to be idle: nothing in flight, decoding, prefilling or queued."""
    deadline = time.monotonic() + timeout_s
    busy = ("in_flight", "queue_depth", "waiting", "encoding", "prefilling", "decoding", "decode_running", "kv_running")
    while time.monotonic() < deadline:
        g = gauges(base)
        if not any(g.get(k, 0) for k in busy):
            time.sleep(0.5)  # connections closing, threads returning to their pools
            return
        time.sleep(0.2)


def rss_slope(times_s: list[float], rss_mb: list[float]) -> float | None:
    """MB per minute, least squares; None with fewer than 3 points."""
    if len(times_s) < 3:
        return None
    return float(np.polyfit(np.asarray(times_s) / 60, np.asarray(rss_mb), 1)[0])


def _p95(xs: list[float]) -> float | None:
    return float(np.percentile(xs, 95)) if xs else None


async def _measured(srv: Server, base: str, args: argparse.Namespace, seconds: float, load: Load,
                    t_start: float) -> list[dict]:
    """Runs the load for `seconds`, sampling every interval (the samples are taken off the loop)."""
    until = time.monotonic() + seconds
    task = asyncio.create_task(drive(base, args.soak_clients, until, args.soak_seed, args.soak_leave,
                                     args.soak_max_tokens, load))
    rows: list[dict] = []
    last = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=max(0.0, min(args.soak_interval, until - time.monotonic() + 0.01)))
        now = time.monotonic()
        if now - last >= args.soak_interval or task.done():
            done = [o for o in load.outcomes if last < o.end <= now]
            row = await asyncio.to_thread(sample, srv, base)
            row.update(t_s=round(now - t_start, 1), requests=len(done),
                       ok=sum(o.status == "ok" for o in done), left=sum(o.status == "left" for o in done),
                       errors=sum(o.status not in ("ok", "left") for o in done),
                       p95_latency_s=_p95([o.latency_s for o in done if o.status == "ok"]))
            rows.append(row)
            print(f"[soak] {json.dumps(row)}", file=sys.stderr, flush=True)
            last = now
    await task
    return rows


def run_soak(args: argparse.Namespace) -> int:
    out = Path(args.out or f"artifacts/bench/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    precision = args.precisions.split(",")[0]
    port = free_port()
    cmd = [sys.executable, "-m", "edgevl.cli", "serve", "--model", args.model, "--precision", precision,
           "--threads", str(args.threads), "--port", str(port), "--max-batch", str(args.max_batch),
           "--queue-size", "64", *args.server_args.split()]
    print(f"[soak] edgevl-{precision}: starting", file=sys.stderr, flush=True)
    srv = Server(cmd, port, f"edgevl-{precision}", out / "server.log")
    base = f"http://127.0.0.1:{port}"
    load = Load()
    try:
        srv.wait_ready("/api/health")
        t_start = time.monotonic()
        warmup = asyncio.run(_measured(srv, base, args, args.soak_warmup, load, t_start))
        quiesce(base)
        baseline = {**sample(srv, base), "t_s": round(time.monotonic() - t_start, 1)}
        rows = asyncio.run(_measured(srv, base, args, args.soak * 60, load, t_start))
        quiesce(base)
        after = {**sample(srv, base), "t_s": round(time.monotonic() - t_start, 1)}
        exited = srv.proc.poll() is not None
    finally:
        srv.stop()
    main = [o for o in load.outcomes if o.end > t_start + args.soak_warmup]
    report = {
        "command": " ".join(sys.argv), "minutes": args.soak, "clients": args.soak_clients,
        "interval_s": args.soak_interval, "warmup_s": args.soak_warmup, "model": args.model, "precision": precision,
        "warmup": warmup, "baseline_idle": baseline, "intervals": rows, "after_idle": after,
        "rss_slope_mb_per_min": rss_slope([r["t_s"] for r in rows], [r["rss_mb"] for r in rows]),
        "growth": {k: after[k] - baseline[k] for k in ("rss_mb", "fds", "threads", "kv_running",
                                                        "vision_cache_entries") if k in after and k in baseline},
        "requests": len(main), "by_status": _count(o.status for o in main), "by_kind": _count(o.kind for o in main),
        "p95_latency_s": _p95([o.latency_s for o in main if o.status == "ok"]),
        "server_exited": exited,
        "outcomes": [asdict(o) for o in main],
    }
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    md = soak_markdown(report)
    (out / "soak.md").write_text(md)
    print(md)
    print(f"\nwrote {out}/soak.json, soak.md", file=sys.stderr)
    return 0 if not exited else 1


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def soak_markdown(report: dict) -> str:
    lines = ["| t (s) | requests | ok | left | errors | p95 latency s | RSS MiB | fds | threads | KV used MiB | "
             "KV running | vision cache |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*report["intervals"]]:
        p95 = f"{r['p95_latency_s']:.2f}" if r["p95_latency_s"] is not None else "–"
        lines.append(f"| {r['t_s']:.0f} | {r['requests']} | {r['ok']} | {r['left']} | {r['errors']} | {p95} | "
                     f"{r['rss_mb']:.0f} | {r['fds']} | {r['threads']} | {r.get('kv_used_bytes', 0) / 2**20:.1f} | "
                     f"{r.get('kv_running', 0):.0f} | {r.get('vision_cache_entries', 0):.0f} |")
    slope = report["rss_slope_mb_per_min"]
    b, a = report["baseline_idle"], report["after_idle"]
    lines += ["", f"RSS slope after warm-up: {slope:+.2f} MiB/min" if slope is not None else
              "RSS slope after warm-up: – (fewer than 3 intervals)",
              f"Idle before → after: RSS {b['rss_mb']:.0f} → {a['rss_mb']:.0f} MiB, fds {b['fds']} → {a['fds']}, "
              f"threads {b['threads']} → {a['threads']}, KV running {b.get('kv_running', 0):.0f} → "
              f"{a.get('kv_running', 0):.0f}, in flight {a.get('in_flight', 0):.0f}",
              f"Requests: {report['requests']} {json.dumps(report['by_status'])}; p95 latency "
              + (f"{report['p95_latency_s']:.2f} s" if report["p95_latency_s"] is not None else "–")]
    return "\n".join(lines) + "\n"


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soak", type=float, default=None, help="MINUTES: a mixed load against a server, watched for leaks")
    p.add_argument("--soak-clients", type=int, default=4, help="--soak: concurrent clients")
    p.add_argument("--soak-interval", type=float, default=30.0, help="--soak: seconds between samples")
    p.add_argument("--soak-warmup", type=float, default=60.0, help="--soak: seconds of load before the baseline")
    p.add_argument("--soak-leave", type=float, default=0.15, help="--soak: share of requests whose client walks away")
    p.add_argument("--soak-max-tokens", type=int, default=32, help="--soak: answer tokens per request")
    p.add_argument("--soak-seed", type=int, default=0, help="--soak: seed of the clients' choices")


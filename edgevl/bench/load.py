"""`edgevl bench --load`: the server's real job — several clients streaming at once over HTTP.

    edgevl bench --load 1,2,4,8 --model CKPT --precision int8 --threads 2 \\
        [--llama-server BIN --gguf q8=MODEL.gguf --mmproj MMPROJ.gguf]

Starts `edgevl serve` (and `llama-server -np N`, when given) as a separate process, drives it
with N concurrent streaming /v1/chat/completions clients, and reports per scenario:
  short  each client asks `--rounds` questions about new, distinct images (64 tokens)
  long   each client's image and prompt are already cached; one 256-token answer each
  big    N-1 clients stream long answers while one newcomer sends a 1024² image
aggregate tokens/s, time to first token p50/p95, and the gaps between tokens of running streams
(p95/max), plus the server's peak RSS. Answers are fixed-length (`ignore_eos`), so every server
does the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(seed: int, size: int) -> Image.Image:
    """A distinct picture per seed: shapes and colours at random places on a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, size // 3, 2)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + w, y0 + h], fill=col)
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Stream:
    ttft_s: float = 0.0
    tokens: int = 0
    arrivals: list[float] = field(default_factory=list)


async def chat(client, url: str, model: str, image: str, prompt: str, max_tokens: int) -> Stream:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": prompt}]}]}
    s, t0 = Stream(), time.perf_counter()
    async with client.stream("POST", url, json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                s.tokens = chunk["usage"].get("completion_tokens", s.tokens)
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if not s.arrivals:
                        s.ttft_s = now - t0
                    s.arrivals.append(now)
    s.tokens = s.tokens or len(s.arrivals)
    return s


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def scenario(base: str, model: str, name: str, clients: int, rounds: int, size: int, seed0: int
                   ) -> dict:
    import httpx

    url = f"{base}/v1/chat/completions"
    prompt = "Describe this picture in detail."
    # every picture is drawn and encoded before the clock starts: clients run on this machine's cores
    # too, and a 1024² PNG encoded while others stream would steal the server's CPU at the moment measured
    if name == "short":
        images = {(r, c): data_url(picture(seed0 + 100 * r + c, size)) for r in range(rounds) for c in range(clients)}
    else:  # big: the last client is a 1024² newcomer arriving while the others stream
        images = {(0, c): data_url(picture(seed0 + c, 1024 if name == "big" and c == clients - 1 else size))
                  for c in range(clients)}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        if name == "long":  # cache each client's image and prompt first
            await asyncio.gather(*(chat(client, url, model, images[0, c], prompt, 1) for c in range(clients)))
        t0 = time.perf_counter()

        async def one_client(c: int) -> list[Stream]:
            out = []
            if name == "short":
                for r in range(rounds):
                    out.append(await chat(client, url, model, images[r, c], prompt, 64))
            elif name == "long":
                out.append(await chat(client, url, model, images[0, c], prompt, 256))
            elif c == clients - 1:
                await asyncio.sleep(3.0)
                out.append(await chat(client, url, model, images[0, c], prompt, 16))
            else:
                out.append(await chat(client, url, model, images[0, c], prompt, 256))
            return out

        streams = [s for group in await asyncio.gather(*(one_client(c) for c in range(clients))) for s in group]
        wall = time.perf_counter() - t0
    gaps = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:])]
    return {"scenario": name, "clients": clients, "requests": len(streams), "wall_s": wall,
            "tokens": sum(s.tokens for s in streams), "agg_tokens_per_s": sum(s.tokens for s in streams) / wall,
            "ttft_p50_s": _pct([s.ttft_s for s in streams], 50), "ttft_p95_s": _pct([s.ttft_s for s in streams], 95),
            "gap_p50_ms": _pct(gaps, 50) * 1000, "gap_p95_ms": _pct(gaps, 95) * 1000,
            "gap_max_ms": max(gaps, default=float("nan")) * 1000}


class Server:
    """A server process on a free loopback port, with its peak RSS sampled while it runs."""

    def __init__(self, cmd: list[str], port: int, name: str, log: Path):
        self.name, self.port, self.log = name, port, log
        # a file, not a pipe: a chatty server must never block on a full pipe
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    def wait_ready(self, path: str, timeout: float = 1800) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready in {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(args: argparse.Namespace, clients: int) -> list[tuple[str, list[str], str, int]]:
    """(name, command, health path, port) of every server to drive at this concurrency."""
    out = []
    variants = [("", "")] + [tuple(v.split("=", 1)) for v in args.variant]
    for precision in args.precisions.split(","):
        for label, flags in variants:
            port = free_port()
            # a variant's flags come last: `--model DIR` there runs another export (an older one as it is)
            out.append((f"edgevl-{precision}" + (f"-{label}" if label else ""),
                        [sys.executable, "-m", "edgevl.cli", "serve", "--model", args.model,
                         "--precision", precision, "--threads", str(args.threads),
                         "--port", str(port), "--max-batch", str(max(clients, args.max_batch)),
                         "--queue-size", "64", *args.server_args.split(), *flags.split()],
                        "/api/health", port))
    for spec in args.gguf if args.llama_server else []:
        name, gguf = spec.split("=", 1)
        port = free_port()
        out.append((f"llama.cpp-{name}", [args.llama_server, "-m", gguf, "--mmproj", args.mmproj, "-np", str(clients),
                                          "-c", str(4096 * clients), "-t", str(args.threads), "--port", str(port),
                                          "--host", "127.0.0.1"], "/health", port))
    return out


def run_load(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.load.split(",")]
    out = Path(args.out or f"artifacts/bench/load-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failures: list[dict] = []
    from edgevl.ops.energy import EnergyCounter

    counter = EnergyCounter(args.energy_counter)
    power: list[dict] = []

    def metered(phase: str, server: str | None, clients: int, run, *run_args):
        """`run(*run_args)`, with the package energy it took and the mean watts (None without a counter)."""
        counter.read()
        t0 = time.monotonic()
        result = run(*run_args)
        seconds, joules = time.monotonic() - t0, counter.read()
        if joules is not None:  # without a counter: no rows, and the report says why
            power.append({"phase": phase, "server": server, "clients": clients, "seconds": seconds,
                          "joules": joules, "watts": joules / seconds if seconds > 0 else None})
        return result, joules

    if counter.available:
        metered("idle", None, 0, time.sleep, 5)
    for n in levels:
        for name, cmd, health, port in servers(args, n):
            print(f"[load] {name}, {n} client(s): starting", file=sys.stderr, flush=True)
            srv = Server(cmd, port, name, out / f"{name}-{n}.log")
            try:
                base = f"http://127.0.0.1:{port}"
                try:
                    metered("loading", name, n, srv.wait_ready, health)
                    asyncio.run(scenario(base, "m", "short", 1, 1, args.size, 999))  # warm: pages in the weights
                except Exception as e:  # a server that cannot start is reported; the others still run
                    failures.append({"server": name, "scenario": "start", "clients": n, "error": repr(e)[:300],
                                     "server_exited": srv.proc.poll() is not None,
                                     "log_tail": srv.log.read_text(errors="replace")[-1500:]})
                    print(json.dumps(failures[-1]), flush=True)
                    continue
                for sc in args.scenarios.split(","):
                    if sc == "big" and n < 2:
                        continue
                    try:
                        r, joules = metered(f"answering ({sc})", name, n, asyncio.run,
                                            scenario(base, "m", sc, n, args.rounds, args.size, 1000 * n))
                        r["energy_per_answer_j"] = joules / r["requests"] if joules is not None else None
                    except Exception as e:  # a server that fails a scenario is reported, not the run aborted
                        died = srv.proc.poll() is not None
                        failures.append({"server": name, "scenario": sc, "clients": n, "error": repr(e)[:300],
                                         "server_exited": died,
                                         "log_tail": srv.log.read_text(errors="replace")[-1500:]})
                        print(json.dumps(failures[-1]), flush=True)
                        if died:
                            break
                        continue
                    r.update(server=name, peak_rss_mb=srv.peak_rss / 2**20)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                srv.stop()
    report = {"command": " ".join(sys.argv), "rows": rows, "failures": failures,
              "power": {"counter": counter.status, "rows": power}}
    (out / "load.json").write_text(json.dumps(report, indent=2))
    md = load_markdown(rows) + "".join(f"\n{f['server']} failed {f['scenario']} with {f['clients']} client(s): "
                                       f"{f['error']}{' (the server exited)' if f['server_exited'] else ''}\n"
                                       for f in failures)
    md += power_markdown(report["power"])
    (out / "load.md").write_text(md)
    print(md)
    print(f"\nwrote {out}/load.json, load.md", file=sys.stderr)
    return 0


def power_markdown(power: dict) -> str:
    """The seed's power table (mean watts idle, loading, answering), measured by the package counter."""
    if not power["rows"]:
        return f"\nPower and energy per answer: {power['counter']} — not measured, not estimated.\n"
    lines = ["", f"Power ({power['counter']}):", "", "| phase | server | clients | seconds | mean W | J |",
             "|---|---|---|---|---|---|"]
    for p in power["rows"]:
        watts = f"{p['watts']:.1f}" if p["watts"] is not None else "n/a"
        joules = f"{p['joules']:.1f}" if p["joules"] is not None else "n/a"
        lines.append(f"| {p['phase']} | {p['server'] or '—'} | {p['clients']} | {p['seconds']:.1f} | {watts} | "
                     f"{joules} |")
    return "\n".join(lines) + "\n"


def load_markdown(rows: list[dict]) -> str:
    lines = ["| server | scenario | clients | agg tok/s | TTFT p50 s | TTFT p95 s | gap p95 ms | gap max ms | "
             "peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['scenario']} | {r['clients']} | {r['agg_tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['gap_p95_ms']:.0f} | {r['gap_max_ms']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", default=None, help="e.g. 1,2,4,8: drive the HTTP server with this many clients")
    p.add_argument("--precisions", default="int8", help="--load: edgevl precisions to serve, comma-separated")
    p.add_argument("--scenarios", default="short,long,big", help="--load: short, long, big")
    p.add_argument("--rounds", type=int, default=2, help="--load: questions per client in the short scenario")
    p.add_argument("--max-batch", type=int, default=4, help="--load: edgevl's --max-batch (at least the clients)")
    p.add_argument("--server-args", default="", help="--load: extra `edgevl serve` flags")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="--load: one more edgevl server per precision with these `edgevl serve` flags, e.g. "
                        "'chunks=--step-tokens 0' or 'old=--model DIR' (repeatable; side by side in one run)")
    p.add_argument("--llama-server", default=None, help="--load: llama-server binary, run as -np N beside edgevl")
    p.add_argument("--energy-counter", default=None,
                   help="--load: a package energy counter file (microjoules; default: the powercap packages)")


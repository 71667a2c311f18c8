"""Throughput of `edgevl serve --ray` with 1 and 2 replicas (the demo model unless --model).

    python -m edgevl.bench.cluster [--replicas 1,2] [--requests 48] [--clients 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(replicas: int, requests: int, clients: int, max_tokens: int, model: str | None) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "edgevl.cli", "serve", "--ray", "--ray-replicas", str(replicas), "--ray-num-cpus",
           "0.5", "--threads", "1", "--port", str(port), "--queue-size", str(requests)]
    proc = subprocess.Popen(cmd + (["--model", model] if model else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for _ in range(2 * replicas):  # warm every replica's caches and code paths
            httpx.post(url + "/api/predict", json={"prompt": "warm", "max_tokens": 4}, timeout=120)
        results: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(k, requests, clients):
                r = httpx.post(url + "/api/predict", json={"prompt": f"q {i}", "max_tokens": max_tokens,
                                                           "temperature": 0}, timeout=300)
                with lock:
                    results.append((r.status_code, r.headers.get("x-edgevl-replica")))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ok = sum(1 for s, _ in results if s == 200)
        return {"replicas": replicas, "answered": ok, "sent": requests, "seconds": round(wall, 2),
                "requests_per_s": round(ok / wall, 2), "replicas_seen": len({r for _, r in results if r})}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(180)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    for n in (int(x) for x in args.replicas.split(",")):
        print(measure(n, args.requests, args.clients, args.max_tokens, args.model), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

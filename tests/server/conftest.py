"""A real `edgevl serve` process on a free loopback port, on the tiny demo model."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import make_image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + (labels and "{" + labels + "}")) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if labels or head == name:
                    return float(value)
        return 0.0

    def edge(self, path: str, body: dict) -> dict:
        """An edge API answer: the JSON body, or with "stream": true the last NDJSON line."""
        import json

        with self.client() as c:
            if not body.get("stream"):
                return c.post(path, json=body).json()
            with c.stream("POST", path, json=body) as r:
                return [json.loads(x) for x in r.iter_lines() if x][-1]

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_server(tmp_path_factory, *args: str, env: dict | None = None, module: str = "edgevl.cli") -> Server:
    """`python -m <module> serve ...`: edgevl's CLI, or a test wrapper around it (tests/fault_server.py)."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", "--port", str(port), *args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {open(log_path).read()}")
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return Server(url, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {open(log_path).read()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory, "--queue-size", "8", "--max-tokens", "2048", "--max-body-mb", "4")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def thinking_server(tmp_path_factory, thinking_checkpoint) -> Iterator[Server]:
    """A server on the tiny Thinking checkpoint: with random weights it never closes a thought itself."""
    s = start_server(tmp_path_factory, "--model", str(thinking_checkpoint), "--max-tokens", "512",
                     "--reasoning-budget", "64")
    yield s
    stop_server(s)


def png_b64(w: int = 160, h: int = 120, seed: int = 0, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    make_image(w, h, seed=seed).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()

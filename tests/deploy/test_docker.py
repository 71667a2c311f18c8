"""deploy/Dockerfile built and run for real, under the limits users deploy with (8 GB, 2 CPUs).

Needs a Docker daemon and a base image with Python 3.11+ that is already local: $EDGEVL_DOCKER_BASE,
else edgevl-base:bookworm (deploy/make-base-image.sh), else python:3.11-slim. Nothing is pulled.
Slow (an image build, several containers): `python -m pytest -q -m slow tests/deploy`; `.ci/run`
runs it when it can start a daemon.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[2]
BASES = [b for b in (os.environ.get("EDGEVL_DOCKER_BASE"), "edgevl-base:bookworm", "python:3.11-slim") if b]
SERVICE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["edgevl"]
LIMITS = ["--memory", SERVICE["mem_limit"], "--cpus", str(SERVICE["cpus"])]
ENV = [arg for k, v in SERVICE["environment"].items() for arg in ("-e", f"{k}={v}")]  # as compose runs it
STOP_S = int(SERVICE["stop_grace_period"].removesuffix("s"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return out


def _daemon_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command (apt-get install docker.io)"
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer within 20 s"
    if out.returncode != 0:
        return f"no Docker daemon reachable ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''})"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    problem = _daemon_problem()
    if problem:
        pytest.skip(problem)
    base = next((b for b in BASES if docker("image", "inspect", b, check=False).returncode == 0), None)
    if base is None:
        pytest.skip(f"no local base image (tried {', '.join(BASES)}): run deploy/make-base-image.sh")
    tag = "edgevl:test"
    # host network: the build's `pip install` reaches the index the way the host does
    docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-f", "deploy/Dockerfile",
           "-t", tag, str(ROOT), timeout=1500)
    return tag


@dataclass
class Container:
    id: str
    url: str

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.id).stdout)

    def logs(self) -> str:
        out = docker("logs", self.id, check=False)
        return out.stdout + out.stderr

    def wait_healthy(self, deadline_s: float = 600) -> None:
        """Docker's own HEALTHCHECK (the image's command) must report healthy."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            state = self.state()
            health = state.get("Health", {}).get("Status")
            if health == "healthy":
                return
            assert state["Running"] and health != "unhealthy", (state, self.logs()[-3000:])
            time.sleep(1)
        raise AssertionError(f"not healthy in {deadline_s} s: {self.logs()[-3000:]}")


@pytest.fixture
def run(image: str) -> Iterator:
    started: list[str] = []

    def start(*args: str) -> Container:
        cid = docker("run", "-d", *LIMITS, *ENV, "-p", "127.0.0.1::8000", *args, image).stdout.strip()
        started.append(cid)
        port = docker("port", cid, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        c = Container(cid, f"http://127.0.0.1:{port}")
        c.wait_healthy()
        return c

    yield start
    for cid in started:
        docker("rm", "-f", "-v", cid, check=False)


@pytest.fixture
def volume(image: str) -> Iterator[str]:
    name = f"edgevl-test-cache-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


def png_b64() -> str:
    buf = io.BytesIO()
    make_image(96, 64).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_demo_is_served_without_a_model_as_a_non_root_user_within_the_limits(run):
    from openai import OpenAI

    c = run()
    health = httpx.get(c.url + "/api/health", timeout=10).json()
    assert health["random_weights"] is True and health["precision"] == "int8", health
    assert "nothing mounted at /models/qwen3-vl" in c.logs()
    assert docker("exec", c.id, "id", "-u").stdout.strip() != "0"
    host = json.loads(docker("inspect", "--format", "{{json .HostConfig}}", c.id).stdout)
    assert host["Memory"] == 8 * 2**30 and host["NanoCpus"] == 2 * 10**9

    r = httpx.post(c.url + "/api/predict", json={"image": png_b64(), "prompt": "What is this?", "max_tokens": 8},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["answer"], str)

    client = OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120)
    done = client.chat.completions.create(model="edgevl", max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}},
        {"type": "text", "text": "Describe it."}]}])
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1 and isinstance(done.choices[0].message.content, str)


# `volume` before `run`: pytest tears down in reverse, so the containers go before their volume
def test_a_mounted_checkpoint_is_exported_once_into_the_cache_volume(volume, run, tiny_checkpoint, image):
    mounts = ["-v", f"{tiny_checkpoint}:/models/qwen3-vl:ro", "-v", f"{volume}:/var/cache/edgevl"]

    def exports() -> list[str]:
        out = docker("run", "--rm", "-v", f"{volume}:/var/cache/edgevl", "--entrypoint", "ls", image,
                     "/var/cache/edgevl/onnx")
        return out.stdout.split()

    first = run(*mounts)
    health = httpx.get(first.url + "/api/health", timeout=10).json()
    assert health["model"] == "qwen3-vl" and health["precision"] == "int8", health
    r = httpx.post(first.url + "/api/predict", json={"image": png_b64(), "prompt": "What is this?",
                                                      "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
    docker("stop", first.id, timeout=90)
    made = exports()
    assert len(made) == 1 and made[0].startswith("qwen3-vl-int8-"), made

    second = run(*mounts)  # same checkpoint, same volume: loads the cached export
    assert httpx.get(second.url + "/api/health", timeout=10).json()["model"] == "qwen3-vl"
    assert exports() == made


def test_docker_stop_lets_an_in_flight_stream_finish_and_exits_0(run):
    from openai import OpenAI

    c = run()
    client = OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120)
    n = 1500  # seconds of decoding on the tiny model; greedy, so no early end-of-text
    stream = client.chat.completions.create(
        model="edgevl", max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me a long story."}])
    chunks = iter(stream)
    first = next(chunks)
    stopped: dict = {}

    def stop() -> None:
        stopped["out"] = docker("stop", "-t", str(STOP_S), c.id, timeout=STOP_S + 60, check=False)

    stopper = threading.Thread(target=stop)
    stopper.start()
    # the server has the signal (it says so) while this client has read one chunk of the answer
    deadline = time.monotonic() + 30
    while "draining in-flight requests" not in c.logs():
        assert time.monotonic() < deadline, c.logs()[-3000:]
        time.sleep(0.1)
    rest = list(chunks)
    stopper.join(STOP_S + 60)

    finish = [ch.choices[0].finish_reason for ch in [first, *rest] if ch.choices and ch.choices[0].finish_reason]
    usage = [ch.usage for ch in rest if ch.usage]
    assert finish == ["length"], finish
    assert usage and usage[-1].completion_tokens == n
    assert stopped["out"].returncode == 0, stopped["out"].stderr
    state = c.state()
    assert state["Status"] == "exited" and state["ExitCode"] == 0 and not state["OOMKilled"], state

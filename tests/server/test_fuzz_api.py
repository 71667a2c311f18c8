"""Schemathesis against the server's own OpenAPI schema: no 5xx, every error in the documented shape.

The cases come from schemathesis' hypothesis strategies, run by a plain test, so the suite does not
depend on its pytest plugin (which trails pytest releases).
"""

from __future__ import annotations

import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import start_server, stop_server

schemathesis = pytest.importorskip("schemathesis")
SEEN: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # small answers keep every generated request cheap; the limits are what the fuzzer should hit
    s = start_server(tmp_path_factory, "--max-tokens", "8", "--default-max-tokens", "4", "--queue-size", "64",
                     "--max-pixels", "65536")
    yield s
    stop_server(s)


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def test_every_operation_survives_generated_requests(fuzz_server):
    ops = _operations(fuzz_server.url)
    assert {op.path for op in ops} >= {"/api/predict", "/api/ocr", "/api/detect", "/api/health",
                                       "/v1/chat/completions", "/v1/models"}
    for op in ops:
        _check(op, SEEN.setdefault(f"{op.method.upper()} {op.path}", {}), fuzz_server.url)()
    print("fuzz statuses:", SEEN)


def _check(op, seen: dict[int, int], url: str):
    @given(case=op.as_strategy())
    @settings(max_examples=int(os.environ.get("EDGEVL_FUZZ_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        r = case.call(base_url=url, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.path, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]

    return check


def test_server_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.proc.poll() is None
    assert httpx.get(fuzz_server.url + "/api/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(fuzz_server.url + "/api/predict", json={"prompt": "ok?", "max_tokens": 2},
                      timeout=60).status_code == 200

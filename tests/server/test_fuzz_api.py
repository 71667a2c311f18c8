"""Schemathesis against the server's own OpenAPI schema: no 5xx, every error in the documented shape."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server.conftest import start_server, stop_server  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # small answers keep every generated request cheap; the limits are what the fuzzer should hit
    s = start_server(tmp_path_factory, "--max-tokens", "8", "--default-max-tokens", "4", "--queue-size", "64",
                     "--max-pixels", "65536")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict[int, int] = {}


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_documented_errors(case, fuzz_server):
    r = case.call(timeout=60)
    SEEN[r.status_code] = SEEN.get(r.status_code, 0) + 1
    assert r.status_code < 500, (case.path, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_server_survived_the_fuzzing(fuzz_server):
    import httpx

    assert fuzz_server.proc.poll() is None
    assert httpx.get(fuzz_server.url + "/api/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(fuzz_server.url + "/api/predict", json={"prompt": "ok?", "max_tokens": 2},
                      timeout=60).status_code == 200

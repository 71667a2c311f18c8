"""Energy over HTTP: with a counter (a file the test advances), every answer's timings carry its
apportioned energy_j on both APIs and /metrics has the total and the power; without one, energy_j
is null, the metrics NaN and /api/health says why."""

from __future__ import annotations

import math

import openai
import pytest

from tests.server.conftest import png_b64, start_server, stop_server
from tests.test_energy import Meter, _write


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    path = tmp_path_factory.mktemp("rapl") / "energy_uj"
    _write(path, 1_000_000)
    s = start_server(tmp_path_factory, "--energy-counter", str(path), "--default-max-tokens", "8")
    yield s, path
    stop_server(s)


def test_answers_carry_their_energy_and_metrics_the_total(metered):
    server, path = metered
    with Meter(path, watts=30.0) as meter:
        body = server.edge("/api/predict", {"image": png_b64(), "prompt": "What is it?", "max_tokens": 6})
        streamed = server.edge("/api/predict", {"prompt": "Hi", "max_tokens": 6, "stream": True})
        chat = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
        total = server.metric("edgevl_energy_joules_total")
        watts = server.metric("edgevl_power_watts")
    shares = [body["timings"]["energy_j"], streamed["timings"]["energy_j"], chat.model_extra["timings"]["energy_j"]]
    assert all(s is not None and s > 0 for s in shares), shares
    assert sum(shares) <= meter.joules
    assert 0 < total <= meter.joules + 1e-6
    assert watts > 0 or math.isnan(watts)  # NaN only when scraped within 0.5 s of the last scrape
    with server.client() as c:
        assert c.get("/api/health").json()["energy"] == f"ok: {path}"


def test_without_a_counter_energy_is_n_a_and_says_why(server):
    health = server.client().get("/api/health").json()
    answer = server.edge("/api/predict", {"prompt": "Hi", "max_tokens": 2})
    total = server.metric("edgevl_energy_joules_total")
    if health["energy"].startswith("n/a"):  # this machine: no readable powercap counter
        assert health["energy"].startswith(("n/a: absent", "n/a: not permitted"))
        assert answer["timings"]["energy_j"] is None and math.isnan(total)
    else:
        assert answer["timings"]["energy_j"] is not None and total >= 0

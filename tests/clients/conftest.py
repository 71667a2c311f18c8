"""One real `edgevl serve` on the tiny demo model for the whole group: each library talks to it over
loopback HTTP exactly as an application would. The model has random weights, so the tests force
tool calls where a library lets them and check the protocol (types, schemas, loops), not content."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import Server, png_b64, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory, "--max-tokens", "1024")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.url + "/v1"


@pytest.fixture(scope="session")
def model(server: Server) -> str:
    return httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def image_url() -> str:
    return "data:image/png;base64," + png_b64(64, 48)

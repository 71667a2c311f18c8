"""Headless Chromium (Debian's package) driven by Playwright, against the real server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import server  # noqa: F401  (the session's real server)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "web"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Per module, not per session: Playwright's sync API keeps an event loop running on the main
    thread while it is open, and any later test that calls asyncio.run (the agent SDKs' run_sync)
    would fail — as the client tests did when run after these in one process."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    pg.goto(server.url + "/")
    pg.wait_for_selector("#health.ok", timeout=20000)
    yield pg
    ctx.close()

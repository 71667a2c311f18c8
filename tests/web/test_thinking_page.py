"""The page on a Thinking checkpoint: the thought folded away above the answer, in a real browser."""

from __future__ import annotations

import pytest

from tests.server.conftest import thinking_server  # noqa: F401  (the session's Thinking server)
from tests.web.conftest import ARTIFACTS


@pytest.fixture
def thinking_page(browser, thinking_server):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    pg.goto(thinking_server.url + "/")
    pg.wait_for_selector("#health.ok", timeout=20000)
    yield pg
    ctx.close()


def test_the_thought_is_folded_away_above_the_answer(thinking_page):
    page = thinking_page
    assert "thinks before answering" in page.inner_text("#model-info")
    page.click("details.options summary")
    page.fill("#max-tokens", "24")
    page.fill("#reasoning-budget", "6")
    page.fill("#question", "Why is the sky blue?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length >= 1", timeout=60000)
    msg = page.locator(".msg.assistant").first
    box = msg.locator("details.thinking")
    assert box.count() == 1 and not box.evaluate("d => d.open")  # folded
    assert box.locator("summary").inner_text() == "Thought"
    assert not box.locator(".thought").is_visible()
    answer = msg.locator(".text").inner_text().strip()
    assert answer and "think>" not in answer
    assert "6 of them thinking" in msg.locator(".stats").inner_text()
    box.locator("summary").click()
    thought = box.locator(".thought")
    assert thought.is_visible() and thought.inner_text().strip()
    assert thought.inner_text().strip() not in answer
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-thinking.png"), full_page=True)

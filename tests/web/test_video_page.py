"""The page with a clip: choose it, see the sampled frames and their token cost, stream the answer."""

from __future__ import annotations

from tests import clips
from tests.web.conftest import ARTIFACTS


def test_a_clip_shows_its_frames_and_cost_and_gets_a_streamed_answer(page, tmp_path):
    path = tmp_path / "door-camera.webm"
    path.write_bytes(clips.webm(n=30, fps=10, w=160, h=96))  # 3 s: 6 frames at 2 fps
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#video-preview:not([hidden])")
    page.wait_for_function("document.querySelector('#image-size').textContent.includes('frames')")
    note = page.inner_text("#image-size")
    assert "160 × 96" in note and "6 frames sampled" in note and "video tokens" in note
    page.fill("#question", "What moves in this clip?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length >= 1", timeout=60000)
    answer = page.locator(".msg.assistant").nth(0)
    assert answer.locator(".text").inner_text().strip()
    stats = answer.locator(".stats").inner_text()
    assert "video tokens" in stats and "first token" in stats
    assert "door-camera.webm" in page.locator(".msg.user").nth(0).inner_text()
    # a follow-up question is about the same clip: attached once, still in the conversation
    page.fill("#question", "And at the end?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length >= 2", timeout=60000)
    assert "clip:" not in page.locator(".msg.user").nth(1).inner_text()
    assert "video tokens" in page.locator(".msg.assistant").nth(1).locator(".stats").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-video.png"), full_page=True)


def test_an_unreadable_clip_gets_the_servers_reason(page, tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#video-preview:not([hidden])")
    page.fill("#question", "What is this?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=30000)
    assert "video" in page.inner_text("#error").lower()

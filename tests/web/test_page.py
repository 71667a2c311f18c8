"""The page at / in a real browser: upload, presets, streaming, stop, errors, conversation."""

from __future__ import annotations

import time

from tests.conftest import make_image
from tests.web.conftest import ARTIFACTS


def _upload(page, tmp_path, name: str = "scene.png", w: int = 320, h: int = 240):
    path = tmp_path / name
    make_image(w, h).save(path)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#preview:not([hidden])")
    return path


def _opt(page, name: str, value: str) -> None:
    page.click("details.options summary") if not page.evaluate("document.querySelector('details.options').open") \
        else None
    page.fill(f"#{name}", value)


def _answers(page):
    return page.locator(".msg.assistant")


def _wait_done(page, n: int, timeout_s: float = 60):
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant .stats').length >= {n}",
                           timeout=timeout_s * 1000)


def test_header_shows_model_and_random_weight_banner(page):
    assert "Qwen3-VL-tiny-random" in page.inner_text("#model-info")
    assert "onnxruntime" in page.inner_text("#model-info") and "fp32" in page.inner_text("#model-info")
    assert page.is_visible("#random-banner") and "random weights" in page.inner_text("#random-banner")


def test_upload_shows_preview_and_resize(page, tmp_path):
    _upload(page, tmp_path, w=640, h=480)
    note = page.inner_text("#image-size")
    assert "640 × 480" in note and "resized to" in note and "image tokens" in note


def test_each_preset_streams_an_answer_with_stats(page, tmp_path):
    _upload(page, tmp_path)
    _opt(page, "max-tokens", "24")
    for i, preset in enumerate(["describe", "ocr", "chart"], start=1):
        page.click(f"[data-preset={preset}]")
        _wait_done(page, i)
        last = _answers(page).nth(i - 1)
        assert last.locator(".text").inner_text().strip()
        stats = last.locator(".stats").inner_text()
        assert "first token" in stats and "tokens/s" in stats and "tokens" in stats
    assert page.locator(".msg.user").count() == 3
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)


def test_tokens_arrive_incrementally_and_stop_cancels(page, tmp_path, server):
    _upload(page, tmp_path)
    _opt(page, "max-tokens", "2000")
    page.fill("#question", "Tell me everything.")
    page.keyboard.press("Enter")  # Enter sends
    lengths = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(lengths)) < 4:
        text = _answers(page).last.locator(".text").inner_text()
        if text:
            lengths.append(len(text))
        time.sleep(0.05)
    assert len(set(lengths)) >= 4 and lengths == sorted(lengths)  # growing while streaming
    assert page.is_enabled("#stop")
    page.click("#stop")
    _wait_done(page, 1)
    assert "stopped" in _answers(page).last.locator(".stats").inner_text()
    # the server frees the slot: the next question is answered
    deadline = time.monotonic() + 20
    while server.metric("edgevl_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    _opt(page, "max-tokens", "8")
    page.fill("#question", "And now?")
    page.click("#send")
    _wait_done(page, 2)
    assert "first token" in _answers(page).last.locator(".stats").inner_text()


def test_shift_enter_makes_a_new_line(page):
    page.click("#question")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#question") == "line one\nline two"
    assert page.locator(".msg.user").count() == 0


def test_non_image_file_shows_an_error_and_page_stays_usable(page, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "neither an image nor a clip" in page.inner_text("#error")
    fake = tmp_path / "fake.png"  # an image name and type, but not an image inside
    fake.write_bytes(b"not really a png")
    page.set_input_files("#file", str(fake))
    page.wait_for_function("document.querySelector('#error').textContent.includes('not an image')")
    _upload(page, tmp_path)
    assert page.is_hidden("#error")
    _opt(page, "max-tokens", "6")
    page.click("[data-preset=describe]")
    _wait_done(page, 1)


def test_follow_up_questions_keep_the_conversation(page, tmp_path):
    _upload(page, tmp_path)
    _opt(page, "max-tokens", "6")
    page.fill("#question", "What is this?")
    page.click("#send")
    _wait_done(page, 1)
    page.fill("#question", "And the colours?")
    page.click("#send")
    _wait_done(page, 2)
    assert page.locator(".msg.user .thumb").count() == 1  # the image went with the first question only
    assert page.evaluate("state.history.length") == 4


def test_server_errors_are_shown_plainly(page, tmp_path):
    _upload(page, tmp_path)
    _opt(page, "max-tokens", "999999")  # over the server's limit: a 400 with the reason
    page.fill("#question", "x")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens" in page.inner_text("#error")
    assert page.is_enabled("#send")


def test_phone_sized_screen(browser, server):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    pg = ctx.new_page()
    pg.goto(server.url + "/")
    pg.wait_for_selector("#health.ok")
    assert pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert pg.get_attribute("#camera", "capture") == "environment"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    ctx.close()


def test_find_draws_boxes_over_the_picture(page, tmp_path):
    _upload(page, tmp_path, w=400, h=300)
    page.fill("#question", "every red car")
    page.click("[data-preset=find]")
    _wait_done(page, 1)
    page.wait_for_function("document.querySelector('.msg.assistant:last-child') !== null")
    note = _answers(page).last.inner_text()
    assert "box(es) drawn" in note
    n = int(note.split("box(es) drawn")[0].split()[-1])
    assert page.locator("#boxes .box").count() == n
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-find.png"))


def test_json_mode_answers_parse(page, tmp_path):
    import json

    _upload(page, tmp_path)
    _opt(page, "max-tokens", "120")
    page.check("#json-mode")
    page.fill("#json-schema", '{"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, '
                              '"required": ["colour"], "additionalProperties": false}')
    page.fill("#question", "Which colour?")
    page.click("#send")
    _wait_done(page, 1)
    assert json.loads(_answers(page).last.locator(".text").inner_text())["colour"] in ("red", "blue")
    page.fill("#json-schema", "{not json")
    page.fill("#question", "Again?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "does not parse" in page.inner_text("#error")


def test_boxes_are_drawn_where_the_pixels_say(page, tmp_path):
    _upload(page, tmp_path, w=400, h=300)
    page.evaluate("drawBoxes([{box_upright: [40, 30, 200, 150], label: 'car'}], {width: 400, height: 300})")
    img = page.locator("#preview").bounding_box()
    box = page.locator("#boxes .box").bounding_box()
    assert abs((box["x"] - img["x"]) / img["width"] - 0.10) < 0.01
    assert abs((box["y"] - img["y"]) / img["height"] - 0.10) < 0.01
    assert abs(box["width"] / img["width"] - 0.40) < 0.02 and abs(box["height"] / img["height"] - 0.40) < 0.02
    assert page.inner_text("#boxes .box span") == "car"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page-boxes.png"))

"""Every endpoint over real HTTP on loopback, streaming and not, on the tiny demo model."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest
from PIL import Image

from tests.server.conftest import png_b64


def test_health_reports_the_model(server):
    h = server.client().get("/api/health").json()
    assert h["status"] == "ok" and h["backend"] == "onnxruntime" and h["precision"] == "fp32"
    assert h["random_weights"] is True and h["model"] == "Qwen3-VL-tiny-random"
    for key in ("threads", "queue_depth", "in_flight", "uptime_s", "version", "thermal", "caches"):
        assert key in h


def test_predict_json(server):
    r = server.client().post("/api/predict", json={"image": png_b64(), "prompt": "Describe.", "max_tokens": 12,
                                                   "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 12 and body["usage"]["image_tokens"] > 0
    assert body["finish_reason"] in ("length", "stop") and isinstance(body["answer"], str)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    for key in ("ttft_ms", "total_ms", "tokens_per_s", "vision_ms", "prefill_ms", "queue_ms"):
        assert key in body["timings"]
    assert r.headers["x-request-id"]


def test_predict_accepts_a_data_url_and_several_images(server):
    url = "data:image/jpeg;base64," + png_b64(fmt="JPEG")
    r = server.client().post("/api/predict", json={"images": [url, png_b64(90, 60, seed=2)], "prompt": "Compare.",
                                                   "max_tokens": 4})
    assert r.status_code == 200, r.text
    one = server.client().post("/api/predict", json={"image": url, "prompt": "Compare.", "max_tokens": 4}).json()
    assert r.json()["usage"]["image_tokens"] > one["usage"]["image_tokens"]


def _ndjson(server, path: str, body: dict) -> list[dict]:
    with server.client().stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_predict_stream_ndjson(server):
    lines = _ndjson(server, "/api/predict", {"image": png_b64(), "prompt": "Describe.", "max_tokens": 16,
                                             "stream": True, "temperature": 0})
    assert len(lines) >= 3 and all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True
    last = lines[-1]
    assert last["token"] == "" and last["usage"]["completion_tokens"] == 16 and "ttft_ms" in last["timings"]
    streamed = "".join(x["token"] for x in lines)
    plain = server.client().post("/api/predict", json={"image": png_b64(), "prompt": "Describe.", "max_tokens": 16,
                                                       "temperature": 0}).json()
    assert streamed == plain["answer"]


def test_metrics_count_vision_slices(server):
    """A new picture goes through the vision tower's slices, each counted."""
    before = server.metric("edgevl_vision_slices_total")
    r = server.client().post("/api/predict", json={"image": png_b64(96, 80, seed=41), "prompt": "What?",
                                                  "max_tokens": 2})
    assert r.status_code == 200
    assert server.metric("edgevl_vision_slices_total") >= before + 3  # patch embedding, blocks, merger
    assert server.metric("edgevl_vision_seconds_count") >= 1


def test_ocr_json_and_stream(server):
    r = server.client().post("/api/ocr", json={"image": png_b64(), "language": "German", "max_tokens": 8})
    assert r.status_code == 200 and "text" in r.json() and r.json()["usage"]["completion_tokens"] <= 8
    lines = _ndjson(server, "/api/ocr", {"image": png_b64(), "language": "German", "max_tokens": 8, "stream": True})
    assert lines[-1]["done"] is True
    assert "".join(x["token"] for x in lines) == r.json()["text"]  # OCR is greedy unless told otherwise


def test_v1_models(server):
    data = server.client().get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "Qwen3-VL-tiny-random"


def test_openapi_and_docs(server):
    spec = server.client().get("/openapi.json").json()
    for path in ("/api/predict", "/api/ocr", "/api/health", "/v1/chat/completions", "/v1/models"):
        assert path in spec["paths"]
    assert server.client().get("/docs").status_code == 200


def test_metrics_count_requests_and_tokens(server):
    before = server.metric("edgevl_generated_tokens_total")
    server.client().post("/api/predict", json={"prompt": "Hello", "max_tokens": 5})
    text = server.client().get("/metrics").text
    assert server.metric("edgevl_generated_tokens_total") >= before + 1
    for name in ("edgevl_requests_total", "edgevl_time_to_first_token_seconds_bucket",
                 "edgevl_request_duration_seconds_bucket", "edgevl_queue_depth", "edgevl_in_flight",
                 "edgevl_vision_cache_entries", "edgevl_thermal_level",
                 "edgevl_kv_used_bytes", "edgevl_kv_free_bytes", 'edgevl_requests_in_state{state="decoding"}',
                 'edgevl_requests_in_state{state="waiting"}', "edgevl_queue_wait_seconds_bucket"):
        assert name in text, name
    # the engine's own histograms: every decoder step and every prefill chunk is counted
    assert server.metric("edgevl_batch_size_bucket", 'le="+Inf"') >= 4
    assert server.metric("edgevl_prefill_chunk_tokens_bucket", 'le="+Inf"') >= 1
    health = server.client().get("/api/health").json()
    caches = health["caches"]
    assert {"kv_used_bytes", "kv_free_bytes"} <= set(caches)
    assert caches["kv_used_bytes"] > 0  # the finished turn is kept for prefix reuse
    assert set(health["requests"]) == {"waiting", "encoding", "prefilling", "decoding"}


def test_metrics_time_every_decoder_and_vision_run(server):
    def read() -> dict[str, float]:
        names = ("step_tokens_sum", "step_tokens_count", "vision_seconds_count", "vision_seconds_sum")
        return {k: server.metric(f"edgevl_{k}") for k in names} | {
            f"{kind}_{x}": server.metric(f"edgevl_step_seconds_{x}", f'kind="{kind}"')
            for kind in ("decode", "mixed", "prefill", "draft") for x in ("count", "sum")}

    before = read()
    r = server.client().post("/api/predict", json={"image": png_b64(72, 56, seed=9301), "prompt": "Describe.",
                                                   "max_tokens": 8})
    assert r.status_code == 200, r.text
    after, body = read(), r.json()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["vision_seconds_count"] >= 1 and delta["vision_seconds_sum"] > 0  # a picture never seen before
    assert delta["prefill_count"] >= 1 and delta["prefill_sum"] > 0
    if body["usage"]["completion_tokens"] > 1:
        assert delta["decode_count"] >= 1 and delta["decode_sum"] > 0
    # every prompt token read and every answer token after the first went through a counted decoder run
    read_tokens = body["usage"]["prompt_tokens"] - body["timings"]["prefix_reused_tokens"]
    assert delta["step_tokens_sum"] >= read_tokens + body["usage"]["completion_tokens"] - 1
    assert delta["step_tokens_count"] == sum(delta[f"{k}_count"] for k in ("decode", "mixed", "prefill", "draft"))
    text = server.client().get("/metrics").text
    assert 'edgevl_step_seconds_bucket{kind="draft",le="+Inf"}' in text
    assert "edgevl_step_tokens_bucket{le=" in text and "edgevl_vision_seconds_bucket{le=" in text


def _png_bytes_b64(img: Image.Image, fmt: str = "PNG", **kw) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


BAD = {
    "broken base64": ({"image": "iVBOR%%%not-base64", "prompt": "x"}, 400, "invalid_base64"),
    "not an image": ({"image": base64.b64encode(b"hello world" * 10).decode(), "prompt": "x"}, 400, "invalid_image"),
    "unsupported format": ({"image": _png_bytes_b64(Image.new("RGB", (8, 8)), "TIFF"), "prompt": "x"}, 400,
                           "unsupported_image_format"),
    "50-megapixel image": ({"image": _png_bytes_b64(Image.new("L", (10000, 5000)), optimize=True), "prompt": "x"},
                           413, "image_too_large"),
    "remote URL": ({"image": "http://example.com/a.png", "prompt": "x"}, 400, "remote_image_refused"),
    "empty prompt": ({"prompt": "   "}, 400, "invalid_parameter"),
    "missing prompt": ({"image": png_b64()}, 400, "invalid_parameter"),
    "max_tokens zero": ({"prompt": "x", "max_tokens": 0}, 400, "invalid_parameter"),
    "huge max_tokens": ({"prompt": "x", "max_tokens": 10**9}, 400, "invalid_parameter"),
    "wrong type": ({"prompt": ["not", "a", "string"]}, 400, "invalid_parameter"),
    "unknown field": ({"prompt": "x", "temprature": 0.5}, 400, "invalid_parameter"),
    "temperature out of range": ({"prompt": "x", "temperature": 9}, 400, "invalid_parameter"),
    "too many images": ({"images": [png_b64(32, 32)] * 9, "prompt": "x"}, 400, "too_many_images"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_4xx(server, case):
    body, status, code = BAD[case]
    r = server.client().post("/api/predict", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}


def test_malformed_json_body(server):
    r = server.client().post("/api/predict", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_body_over_the_size_limit(server):
    r = server.client().post("/api/predict", content=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                             headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unknown_endpoint_and_wrong_method(server):
    c = server.client()
    assert c.get("/api/nope").status_code == 404 and c.get("/api/nope").json()["error"]["code"] == "not_found"
    r = c.get("/api/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_server_keeps_serving_after_bad_input(server):
    for body, _, _ in BAD.values():
        server.client().post("/api/predict", json=body)
    assert server.client().get("/api/health").json()["status"] == "ok"
    r = server.client().post("/api/predict", json={"image": png_b64(), "prompt": "Still there?", "max_tokens": 3})
    assert r.status_code == 200 and server.proc.poll() is None


def test_eight_concurrent_clients_are_all_answered(server):
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        r = server.client().post("/api/predict", json={"image": png_b64(64, 64, seed=i % 3), "prompt": f"Question {i}",
                                                       "max_tokens": 10, "temperature": 0})
        results[i] = {"status": r.status_code, **r.json()}

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    assert all(r["status"] == 200 and r["usage"]["completion_tokens"] >= 1 for r in results.values())
    # same image and prompt → same greedy answer whatever the interleaving
    again = server.client().post("/api/predict", json={"image": png_b64(64, 64, seed=0), "prompt": "Question 0",
                                                       "max_tokens": 10, "temperature": 0}).json()
    assert again["answer"] == results[0]["answer"]


def test_client_disconnect_cancels_generation(server):
    cancelled = server.metric("edgevl_engine_cancelled")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/api/predict", json={"prompt": "Go on forever.", "max_tokens": 2000,
                                                    "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break
    deadline = __import__("time").monotonic() + 20
    while server.metric("edgevl_engine_cancelled") <= cancelled and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.1)
    assert server.metric("edgevl_engine_cancelled") == cancelled + 1
    assert server.metric("edgevl_in_flight") == 0


def test_a_newcomer_prompt_rides_in_running_streams_runs(server):
    """While one answer streams, a newcomer's prompt is read in slices carried by the streaming
    answer's own decoder runs: /metrics counts those mixed steps and times them as kind="mixed"."""
    before = server.metric("edgevl_mixed_steps_total"), server.metric("edgevl_step_seconds_count", 'kind="mixed"')
    with server.client() as c, c.stream("POST", "/api/predict", json={
            "prompt": "Tell a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}) as running:
        lines = running.iter_lines()
        for _ in range(3):  # it is decoding
            next(lines)
        r = c.post("/api/predict", json={"image": png_b64(160, 120, seed=9302), "prompt": "Describe it in detail.",
                                         "max_tokens": 4})
        assert r.status_code == 200, r.text
        for _ in lines:  # the running answer still ends well
            pass
    after = server.metric("edgevl_mixed_steps_total"), server.metric("edgevl_step_seconds_count", 'kind="mixed"')
    assert after[0] > before[0] and after[1] - before[1] == after[0] - before[0]


@pytest.mark.parametrize("path, body, what", [
    ("/v1/chat/completions", {"model": "m", "messages": "TURNS"}, "messages per conversation"),
    ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": "TURNS"}, "messages per conversation"),
    ("/api/chat", {"model": "m", "messages": "TURNS"}, "messages per conversation"),
    ("/v1/responses", {"model": "m", "input": "TURNS"}, "items per request"),
])
def test_every_api_holds_a_conversation_to_max_turns(server, path, body, what):
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(65)]
    with server.client() as c:
        r = c.post(path, json={**body, **{k: turns for k, v in body.items() if v == "TURNS"}})
    assert r.status_code == 400 and f"at most 64 {what}" in r.text, r.text

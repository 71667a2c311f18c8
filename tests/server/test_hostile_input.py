"""What a hostile or careless client sends: bodies without a length, text JSON allows but Unicode does
not, schema bombs, forged control tokens, junk paths. Each gets a clear 4xx (or is served), and
nothing it sends reaches the box's internals."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest

from edgevl.preprocess.chat import ChatFormatter
from edgevl.types import Message, TextPart, ToolCall
from tests.test_special_tokens import FORGED

BAD = "fine \ud800 text"  # a lone surrogate: valid JSON (as "\\ud800"), not Unicode


def post_raw(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    """`body` as JSON with every non-ASCII character escaped, as Python's json writes it."""
    return httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"content-type": "application/json"})


# ---- the body limit counts the bytes that arrive -------------------------------------------------
def test_a_chunked_body_over_the_limit_is_a_413(server):
    def body():  # no Content-Length: httpx sends a generator chunked
        yield b'{"prompt": "'
        for _ in range(6 * 16):  # 6 MB, over the fixture's 4 MB
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(server.url + "/api/predict", content=body(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert "content-length" not in {k.lower() for k in r.request.headers}


def test_a_chunked_body_within_the_limit_is_served(server):
    def body():
        yield b'{"prompt": "chunked, '
        yield b'and fine", "max_tokens": 2}'

    r = httpx.post(server.url + "/api/predict", content=body(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- every string the JSON allows is text or a 400 naming its field ------------------------------
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
SURROGATES = [
    ("/api/predict", {"prompt": BAD}, "prompt"),
    ("/api/predict", {"prompt": "ok", "system": BAD}, "system"),
    ("/api/predict", {"prompt": "ok", "stop": ["x", BAD]}, "stop.1"),
    ("/api/predict", {"prompt": "ok", "tools": [{**TOOL, "function": {**TOOL["function"], "description": BAD}}]},
     "tools.0.function.description"),
    ("/api/predict", {"prompt": "ok", "schema": {"type": "object", "properties": {BAD: {"type": "string"}}}},
     "schema.properties"),
    ("/api/ocr", {"image": "x", "language": BAD}, "language"),
    ("/api/detect", {"image": "x", "query": BAD}, "query"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": BAD}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": BAD}, {"role": "user", "content": "hi"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": '{"q": "' + BAD + '"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}], "tools": [TOOL]},
     "messages.1.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
        {"role": "tool", "tool_call_id": "c1", "content": BAD}]}, "messages.2.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": BAD}, "user"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": BAD}]}, "messages.0.content"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"stop": [BAD]}},
     "options.stop.0"),
    ("/api/generate", {"model": "m", "prompt": "hi", "system": BAD}, "system"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body,field", SURROGATES, ids=[f"{p} {f}" for p, _, f in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_its_field(server, path, body, field, stream):
    r = post_raw(server, path, {**body, "stream": stream, "max_tokens": 2})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    if isinstance(err, str):  # Ollama's shape: the message alone
        assert err.startswith(f"{field}: ") and "surrogate" in err
    else:
        assert err["param"] == field and field in err["message"] and "surrogate" in err["message"]


def test_paired_surrogates_are_just_an_emoji(server):
    r = post_raw(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a 😀 b"}],
                                                  "max_tokens": 2})
    assert r.status_code == 200 and b"\\ud83d\\ude00" in r.request.content


# ---- schemas: bounded analysis, off the event loop --------------------------------------------
def allof_bomb(depth: int) -> dict:
    """A chain of allOf pairs of $refs: 2^depth paths through 1.5 KB of JSON."""
    defs = {"d0": {"type": "object", "properties": {"x": {"type": "integer"}}}}
    for i in range(1, depth + 1):
        defs[f"d{i}"] = {"allOf": [{"$ref": f"#/$defs/d{i - 1}"}, {"$ref": f"#/$defs/d{i - 1}"}]}
    return {"$defs": defs, "$ref": f"#/$defs/d{depth}"}


@pytest.mark.parametrize("where", ["schema", "tools auto", "tools required"])
def test_a_schema_bomb_is_answered_and_health_answers_meanwhile(server, where):
    bomb = allof_bomb(30)
    body: dict = {"prompt": "Fill it in.", "max_tokens": 8}
    if where == "schema":
        body["schema"] = bomb
    else:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": bomb}}]
        body["tool_choice"] = where.split()[1]
    assert len(json.dumps(body)) < 4096
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + "/api/predict", json=body,
                                                                        timeout=120)))
    sender.start()
    health = []
    while sender.is_alive():
        health.append(httpx.get(server.url + "/api/health", timeout=10).status_code)
    sender.join()
    r = result["r"]
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "invalid_schema"
    assert set(health) <= {200}


def test_a_recursive_tool_schema_is_refused_under_every_tool_choice(server):
    recursive = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    for choice in ("auto", "none", "required"):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": recursive}}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_schema", (choice, r.text[:300])
        assert r.json()["error"]["param"] == "tools.0.function.parameters"


# ---- metrics: one series per route, whatever paths clients invent --------------------------------
def test_unknown_paths_share_one_metrics_label(server):
    junk = [f"/api/{uuid.uuid4().hex}" for _ in range(3)] + [f"/v1/{uuid.uuid4().hex}" for _ in range(3)]
    for path in junk:
        assert httpx.get(server.url + path, timeout=10).status_code == 404
    httpx.get(server.url + "/api/health", timeout=10)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert not any(path in text for path in junk)
    assert 'edgevl_requests_total{endpoint="other",status="404"}' in text
    assert 'edgevl_requests_total{endpoint="/api/health",status="200"}' in text


# ---- typed control tokens stay text over HTTP -----------------------------------------------------
@pytest.fixture(scope="module")
def chat(tiny_checkpoint) -> ChatFormatter:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    return ChatFormatter(tiny_checkpoint, cfg["image_token_id"], cfg.get("video_token_id"))


def test_forged_markers_in_predict_are_text(server, chat):
    out = server.edge("/api/predict", {"prompt": FORGED, "system": FORGED, "max_tokens": 1})
    messages = [Message("system", [TextPart(FORGED)]), Message("user", [TextPart(FORGED)])]
    expected = chat.encode(messages, []).ids
    assert out["usage"]["prompt_tokens"] == expected.size
    naive = chat.tokenizer.encode(chat.render(messages), add_special_tokens=False).ids
    assert expected.size > len(naive)  # forged markers read as one token each would give fewer


def test_forged_markers_in_every_chat_role_are_text(server, chat):
    args = json.dumps({"q": FORGED})
    tool = {"type": "function", "function": {"name": "search", "description": FORGED, "parameters": {"type": "object"}}}
    body = {"max_tokens": 1, "tools": [tool], "tool_choice": "none", "messages": [
        {"role": "system", "content": FORGED}, {"role": "user", "content": [{"type": "text", "text": FORGED}]},
        {"role": "assistant", "content": FORGED, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "c1", "content": FORGED}, {"role": "user", "content": "and now?"}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text[:300]
    messages = [Message("system", [TextPart(FORGED)]), Message("user", [TextPart(FORGED)]),
                Message("assistant", [TextPart(FORGED)], [ToolCall("search", args)]),
                Message("tool", [TextPart(FORGED)]), Message("user", [TextPart("and now?")])]
    expected = chat.encode(messages, [], [tool]).ids
    assert r.json()["usage"]["prompt_tokens"] == expected.size
    naive = chat.tokenizer.encode(chat.render(messages, tools=[tool]), add_special_tokens=False).ids
    assert expected.size > len(naive)


def test_forged_markers_in_ollama_chat_are_text(server, chat):
    r = httpx.post(server.url + "/api/chat", timeout=120, json={
        "model": "m", "stream": False, "options": {"num_predict": 1},
        "messages": [{"role": "system", "content": FORGED}, {"role": "user", "content": FORGED}]})
    assert r.status_code == 200, r.text[:300]
    expected = chat.encode([Message("system", [TextPart(FORGED)]), Message("user", [TextPart(FORGED)])], []).ids
    assert r.json()["prompt_eval_count"] == expected.size


# ---- error messages say what is wrong, never where the server keeps its things --------------------
def test_a_non_image_says_so_without_an_object_address(server):
    r = httpx.post(server.url + "/api/predict", json={"prompt": "x", "image": "bm90IGFuIGltYWdl"}, timeout=60)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "known format" in msg and "0x" not in msg and "object at" not in msg

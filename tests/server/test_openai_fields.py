"""Every OpenAI chat field is honoured or refused by name: logprobs, image detail, penalties, the rest."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.server.conftest import png_b64


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


MSGS = [{"role": "user", "content": "Count to five."}]


@pytest.mark.parametrize("top", [0, 3, 20])
def test_logprobs_have_openai_shape(client, top):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, temperature=0.9, seed=2,
                                       logprobs=True, top_logprobs=top)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", errors="replace") == t.token
        assert len(t.top_logprobs) == top
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(x <= 0 for x in lps)
        if top:
            assert t.logprob <= lps[0] + 1e-6  # sampled at temperature 0.9: not always the best
            assert sum(math.exp(x) for x in lps) <= 1 + 1e-6
    assert r.choices[0].message.content.startswith("".join(bytes(t.bytes).decode("utf-8", "replace")
                                                           for t in content)[:1])


def test_logprobs_stream_like_the_whole_answer(client):
    kw = dict(model="m", messages=MSGS, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in whole]
    assert all(t.logprob == t.top_logprobs[0].logprob for t in whole)  # greedy takes the likeliest


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=3)
    assert r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=3, top_logprobs=3)
    assert "top_logprobs" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=3, logprobs=True, top_logprobs=21)


def test_image_detail_low_costs_fewer_tokens(client):
    def tokens(detail: str | None) -> int:
        url: dict = {"url": "data:image/png;base64," + png_b64(1024, 768)}
        if detail:
            url["detail"] = detail
        r = client.chat.completions.create(model="m", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": url}, {"type": "text", "text": "What is this?"}]}])
        return r.usage.prompt_tokens

    low, high, auto = tokens("low"), tokens("high"), tokens(None)
    assert low < high == auto
    assert high - low >= 500  # 1024x768 is 768 image tokens at the server's budget, at most 256 when low


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("store", True), ("metadata", {"a": "b"}),
    ("service_tier", "flex"), ("web_search_options", {}), ("logit_bias", {"1": 5}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("n", 2), ("reasoning_effort", "low"),
    ("made_up_field", 1)])
def test_unserved_fields_are_refused_by_name(server, field, value):
    if field == "web_search_options":
        value = {"search_context_size": "low"}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": MSGS, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["param"].split(".")[0] == field


def test_served_fields_are_accepted(client):
    r = client.chat.completions.create(
        model="m", messages=MSGS, max_tokens=4, n=1, store=False, service_tier="auto", modalities=["text"],
        user="u1", presence_penalty=1.5, frequency_penalty=-0.5, parallel_tool_calls=True)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_penalties_change_greedy_answers(client):
    plain = client.chat.completions.create(model="m", messages=MSGS, max_tokens=24, temperature=0)
    tokens = plain.choices[0].message.content
    pen = client.chat.completions.create(model="m", messages=MSGS, max_tokens=24, temperature=0,
                                         frequency_penalty=2.0, presence_penalty=2.0)
    # a random model repeats itself; penalised, the same greedy decode must take other tokens
    assert pen.choices[0].message.content != tokens or len(set(tokens.split())) == len(tokens.split())


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, "response_format": {"type": "json_schema",
     "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"a": {"$ref": "#"}},
                                              "required": ["a"]}}}}),
    ("/api/predict", {"prompt": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#"}},
                                                 "required": ["a"]}}),
    ("/api/predict", {"prompt": "x", "schema": {"type": "nonsense"}}),
    ("/api/predict", {"prompt": "x", "schema": {"type": "string", "pattern": "^(a{1000}){1000}$"}}),  # too complex
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
    ("/api/predict", {"prompt": "x", "image": "http://127.0.0.1:9/x.png"}),
]


def test_errors_are_4xx_and_keep_the_connection(server):
    """Each error is a 4xx JSON answer without internal state, and the same keep-alive connection
    serves the next request (no exception escapes the app to drop it)."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for path, body in BAD_REQUESTS:
            r = c.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text[:300])
            msg = r.json()["error"]["message"]
            assert "<state>" not in msg and "Parser" not in msg and len(msg) < 400, msg
            ok = c.post("/api/predict", json={"prompt": "still there?", "max_tokens": 2})
            assert ok.status_code == 200
        path, body = BAD_REQUESTS[0]
        assert c.post(path, json=body).json()["error"]["code"] == "invalid_schema"
    assert "Exception in ASGI application" not in server.log()

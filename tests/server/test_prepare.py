"""A request that can never run is refused before its response starts: a 400, streamed or not, that
names what is too big (the prompt, or max_tokens)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import start_server, stop_server

# the tiny model keeps 1 KiB of KV per token: 1 MB holds 1024 tokens, and the context 4096
LONG = "word " * 5000  # over the context window
MID = "word " * 500  # about 1,500 tokens: within the context, but its KV alone is over 1 MB
SHORT = "Say something."


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    s = start_server(tmp_path_factory, "--kv-cache-mb", "1", "--max-context", "4096", "--max-tokens", "4000")
    yield s
    stop_server(s)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _stream_status(server, path: str, body: dict) -> tuple[int, dict]:
    """The status of a streamed request and its body, read whole."""
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", path, json=body) as r:
        return r.status_code, json.loads(r.read())


def test_openai_stream_over_the_context_is_a_400(small):
    with pytest.raises(openai.BadRequestError) as e:
        stream = _client(small).chat.completions.create(model="m", messages=[{"role": "user", "content": LONG}],
                                                        max_tokens=4, stream=True)
        list(stream)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"


def test_responses_stream_over_the_context_is_a_400(small):
    with pytest.raises(openai.BadRequestError) as e:
        list(_client(small).responses.create(model="m", input=LONG, max_output_tokens=4, stream=True))
    assert e.value.status_code == 400 and "the context holds 4096" in e.value.message


@pytest.mark.parametrize("path,body", [
    ("/api/predict", {"prompt": LONG, "max_tokens": 4, "stream": True}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": LONG}], "stream": True}),
])
def test_native_streams_over_the_context_are_a_400(small, path, body):
    status, err = _stream_status(small, path, body)
    assert status == 400
    message = err["error"] if isinstance(err["error"], str) else err["error"]["message"]
    assert "the context holds 4096" in message


def test_a_prompt_alone_over_the_kv_budget_names_the_prompt(small):
    with pytest.raises(openai.BadRequestError) as e:
        list(_client(small).chat.completions.create(model="m", messages=[{"role": "user", "content": MID}],
                                                    max_tokens=1, stream=True))
    assert e.value.code == "kv_cache_exceeded" and e.value.param is None
    assert "the prompt alone is" in e.value.message and "max_tokens" not in e.value.message
    status, err = _stream_status(small, "/api/predict", {"prompt": MID, "max_tokens": 1, "stream": True})
    assert status == 400 and err["error"]["code"] == "kv_cache_exceeded" and err["error"]["param"] is None


def test_prompt_and_max_tokens_over_the_kv_budget_names_max_tokens(small):
    status, err = _stream_status(small, "/api/predict", {"prompt": SHORT, "max_tokens": 2000, "stream": True})
    assert status == 400 and err["error"]["code"] == "kv_cache_exceeded" and err["error"]["param"] == "max_tokens"
    most = int(err["error"]["message"].split("ask for at most ")[1].split()[0])
    # the figure it gives is one that runs
    ok = httpx.post(small.url + "/api/predict", json={"prompt": SHORT, "max_tokens": most}, timeout=120)
    assert ok.status_code == 200, ok.text
    too_many = httpx.post(small.url + "/api/predict", json={"prompt": SHORT, "max_tokens": most + 1}, timeout=60)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"

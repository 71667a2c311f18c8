"""OpenAI compatibility, checked with the official `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import make_image
from tests.server.conftest import png_b64


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _messages(seed: int = 0) -> list[dict]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(seed=seed)}},
                {"type": "text", "text": "What is in this picture?"}]}]


def test_non_streaming_with_an_image(client):
    r = client.chat.completions.create(model="anything", messages=_messages(), max_tokens=12, seed=3,
                                       temperature=0.8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_for_the_same_seed(client):
    kw = dict(model="m", messages=_messages(1), max_completion_tokens=20, seed=42, temperature=0.9, top_p=0.95)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_wire_format_ends_with_done(server):
    import httpx

    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_prompt_tokens_match_the_transformers_processor(client, tiny_checkpoint):
    pytest.importorskip("transformers")
    from edgevl.runtime.reference import ReferenceProcessor
    from edgevl.types import ImagePart, Message, TextPart

    r = client.chat.completions.create(model="m", messages=_messages(2), max_tokens=1)
    ref = ReferenceProcessor(tiny_checkpoint, max_pixels=1024 * 1024)
    msgs = [Message("system", [TextPart("You are terse.")]),
            Message("user", [ImagePart(make_image(160, 120, seed=2)), TextPart("What is in this picture?")])]
    assert r.usage.prompt_tokens == ref(msgs)["input_ids"].shape[1]


def test_stop_sequences_and_multi_turn(client):
    first = client.chat.completions.create(model="m", messages=_messages(), max_tokens=8, temperature=0)
    words = first.choices[0].message.content.split()
    stopped = client.chat.completions.create(model="m", messages=_messages(), max_tokens=8, temperature=0,
                                             stop=[words[1]] if len(words) > 1 else None)
    if len(words) > 1:
        assert words[1] not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    follow = client.chat.completions.create(model="m", max_tokens=4, messages=[
        *_messages(), {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the colours?"}])
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens


def test_errors_come_back_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}])
    assert e.value.status_code == 400 and e.value.body["code"] == "invalid_base64"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=10**8)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert e.value.body["code"] == "remote_image_refused"

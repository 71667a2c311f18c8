"""Other servers' protocol tests, rewritten as black-box cases against `edgevl serve` on the tiny
random-weight model: they assert the OpenAI protocol, never what a trained model would say.

Sources (read, not copied):
- llama.cpp `tools/server/tests/unit/test_chat_completion.py`, `test_tool_call.py`, `test_vision_api.py`;
- vLLM `tests/entrypoints/openai/chat_completion/test_chat.py`, `test_completion_with_function_calling.py`,
  `test_delta_tool_call_serialization.py`, `test_tool_choice_null.py`, `test_non_object_body_validation.py`,
  `test_vision.py`.

A random model never chooses a tool by itself, so tool cases use `tool_choice` "required" or a named
function (decoding is then constrained to a call).

Left out, because they test another server's own extensions (here such fields are refused by name,
which `test_other_servers_extensions_are_refused_by_name` checks): llama.cpp's `json_schema` and
`grammar` request fields, `timings_per_token`, `return_progress`, `/apply-template`, the `__verbose`
prompt echo, assistant-prefill continuation, `/completions` with `multimodal_data`, `/embeddings`,
local media files (`--allowed-local-media-path`), the `capabilities` of `/models`, `reasoning_format`;
vLLM's `prompt_logprobs`, `structured_outputs`, `min_tokens` / `min_characters`,
`stream_options.continuous_usage_stats`, `chat_template_kwargs` (thinking), LoRA model names, beam
search, `n` > 1 (refused here: one answer per request), image `uuid`s, `/invocations`.
Left out because they need a trained model (the answer's content is the assertion): llama.cpp's
real-model tool tests (weather, hello world, calculator results, thoughts) and vLLM's
content checks.

Where the other servers disagree with OpenAI or with each other, the cases follow edgevl's documented
rule (README, "OpenAI fields"):
- unknown fields are refused by name, where vLLM accepts a message's `extra_field` and unknown keys in
  an image part, and a custom role;
- a streamed request whose prompt exceeds the context answers 200 and reports the error as the
  stream's last event (README: "In a stream, an error arrives as the stream's last object"), where
  llama.cpp answers 400 before streaming — the prompt is tokenised on a worker, after the queue;
- a tool call's `arguments` in the history are passed to the chat template as written (vLLM sends
  "" for a call without arguments), where llama.cpp refuses malformed JSON there;
- `image_url` may be a bare URL string (vLLM refuses it): edgevl accepts that shorthand on purpose;
- two assistant messages in a row are accepted, as OpenAI does (llama.cpp's template refuses them).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from tests.conftest import make_image
from tests.server.conftest import png_b64

BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
TEST_TOOL = {"type": "function", "function": {"name": "test", "description": "", "parameters": {
    "type": "object", "properties": {"success": {"type": "boolean", "const": True}}, "required": ["success"]}}}
PYTHON_TOOL = {"type": "function", "function": {"name": "python", "description": "Runs code", "parameters": {
    "type": "object", "properties": {"code": {"type": "string", "maxLength": 40}}, "required": ["code"]}}}
# vLLM's weather tools: `$defs`, defaults, and a stray "strict" keyword inside the parameters
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_current_weather", "description": "Weather now", "parameters": {
        "type": "object", "strict": True,
        "properties": {"city": {"type": "string", "default": "Vienna", "maxLength": 12},
                       "country": {"type": "string", "maxLength": 12},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                       "options": {"$ref": "#/$defs/WeatherOptions"}},
        "required": ["country", "unit"], "additionalProperties": False,
        "$defs": {"WeatherOptions": {"type": "object", "additionalProperties": False, "properties": {
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "include_forecast": {"type": "boolean", "default": False}}}}}}},
    {"type": "function", "function": {"name": "get_forecast", "description": "Forecast", "parameters": {
        "type": "object", "additionalProperties": False,
        "properties": {"country": {"type": "string", "maxLength": 12},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["country", "days", "unit"]}}},
]
EMPLOYEE = {"type": "object", "additionalProperties": False, "required": ["name", "age", "skills"], "properties": {
    "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "skills": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 8}}}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def _sse(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [x.removeprefix("data: ") for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _refused(r: httpx.Response, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    return err


def _data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(url: str, text: str = "What is this:") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


# ---- llama.cpp: test_chat_completion.py ------------------------------------------------------------
@pytest.mark.parametrize("user", ["What is the best book",
                                  [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]])
def test_chat_completion(server, user):
    r = _post(server, {"model": None, "max_tokens": 8, "messages": [BOOK[0], {"role": "user", "content": user}]})
    assert r.status_code == 200
    body = r.json()
    assert "cmpl" in body["id"] and body["object"] == "chat.completion"
    u, choice = body["usage"], body["choices"][0]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 8
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == ("length" if u["completion_tokens"] == 8 else "stop")


def test_chat_completion_stream(server):
    chunks = _sse(server, {"max_tokens": 8, "messages": BOOK, "stream_options": {"include_usage": True}})
    *answer, usage = chunks
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert answer[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in answer[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in answer]
    assert finishes[:-1] == [None] * (len(answer) - 1) and finishes[-1] in ("stop", "length")
    assert "content" not in answer[-1]["choices"][0]["delta"]  # the finishing chunk carries no text
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 8
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]


@pytest.mark.parametrize("response_format,expected", [
    ({"type": "json_object", "schema": {"const": "42"}}, '"42"'),
    ({"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}, '"foooooo"'),
    ({"type": "json_object"}, None),
])
def test_completion_with_response_format(client, response_format, expected):
    r = client.chat.completions.create(model="m", max_tokens=40, messages=BOOK, response_format=response_format,
                                       temperature=1.0, seed=3)
    content = r.choices[0].message.content
    if expected is not None:
        assert content == expected
    else:
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize("response_format", [
    {"type": "sound"}, {"type": "json_object", "schema": 123}, {"type": "json_object", "schema": {"type": 123}},
    {"type": "json_object", "schema": {"type": "hiccup"}}])
def test_invalid_response_format_is_refused(server, response_format):
    _refused(_post(server, {"max_tokens": 4, "messages": BOOK, "response_format": response_format}))


@pytest.mark.parametrize("messages", [
    None, "string", [123], [{}], [{"role": 123}], [{"role": "system", "content": 123}],
    [{"role": "system", "content": "test"}, {}]])
def test_invalid_chat_completion_req(server, messages):
    err = _refused(_post(server, {"messages": messages}))
    assert err["param"] is None or err["param"].startswith("messages")


def test_logprobs(client):
    r = client.chat.completions.create(model="m", temperature=0.0, messages=BOOK, max_tokens=5, logprobs=True,
                                       top_logprobs=10)
    tokens = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == r.choices[0].message.content
    assert all(t.logprob <= 0.0 and len(t.top_logprobs) == 10 for t in tokens)


def test_logprobs_stream(client):
    stream = client.chat.completions.create(model="m", temperature=0.0, messages=BOOK, max_tokens=5, logprobs=True,
                                            top_logprobs=10, stream=True)
    text, raw = "", b""
    for i, chunk in enumerate(stream):
        choice = chunk.choices[0]
        if i == 0:
            assert choice.delta.role == "assistant"
            continue
        assert choice.delta.role is None
        text += choice.delta.content or ""
        if choice.delta.content:
            assert choice.logprobs is not None and choice.logprobs.content
        for t in choice.logprobs.content if choice.logprobs else []:
            raw += bytes(t.bytes)
            assert t.logprob <= 0.0 and len(t.top_logprobs) == 10
    assert raw.decode() == text


def test_context_size_exceeded(server):
    messages = [{"role": "user", "content": "This is a test " * 3000}]
    err = _refused(_post(server, {"messages": messages}))
    assert err["code"] == "context_length_exceeded"
    # checked before the response starts: a stream is refused with a 400 too, not a 200 and an error event
    assert _refused(_post(server, {"messages": messages, "stream": True}))["code"] == "context_length_exceeded"
    assert _post(server, {"messages": BOOK, "max_tokens": 2}).status_code == 200


# ---- llama.cpp: test_tool_call.py --------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool,key", [(TEST_TOOL, "success"), (PYTHON_TOOL, "code")])
def test_completion_with_required_tool_tiny(client, tool, key, stream):
    messages = [{"role": "system", "content": "You are a coding assistant."},
                {"role": "user", "content": "Write an example"}]
    kw = {"model": "m", "max_tokens": 120, "messages": messages, "tool_choice": "required", "tools": [tool],
          "parallel_tool_calls": False, "temperature": 1.0, "seed": 2}
    if stream:
        with client.chat.completions.stream(**kw) as s:
            r = s.get_final_completion()
    else:
        r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert message.content in (None, "") and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.function.name == tool["function"]["name"] and call.id
    assert isinstance(call.function.arguments, str) and key in json.loads(call.function.arguments)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tools,tool_choice", [([], None), ([TEST_TOOL], None), ([PYTHON_TOOL], "none")])
def test_completion_without_tool_call(server, tools, tool_choice, stream):
    body = {"max_tokens": 16, "messages": [{"role": "system", "content": "You are a coding assistant."},
                                           {"role": "user", "content": "say hello world with python"}],
            "tools": tools or None, "tool_choice": tool_choice, "seed": 1, "temperature": 1.0}
    if stream:
        chunks = _sse(server, body)
        assert not any("tool_calls" in ch["delta"] for c in chunks for ch in c["choices"])
    else:
        r = _post(server, body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_calc_result_history_with_a_named_tool_message(server, stream):
    calculate = {"type": "function", "function": {"name": "calculate", "description": "A calculator",
                                                  "parameters": {"type": "object", "required": ["expression"],
                                                                 "properties": {"expression": {"type": "string"}}}}}
    body = {"max_tokens": 8, "tools": [calculate], "tool_choice": "none", "messages": [
        {"role": "system", "content": "You are a tools-calling assistant."},
        {"role": "user", "content": "What's the y coordinate of a point on the unit sphere at angle 30 degrees?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_6789", "type": "function", "function": {
            "name": "calculate", "arguments": "{\"expression\":\"sin(30 * pi / 180)\"}"}}]},
        {"role": "tool", "name": "calculate", "content": "0.55644242476", "tool_call_id": "call_6789"}]}
    if stream:
        chunks = _sse(server, body)
        assert not any("tool_calls" in ch["delta"] for c in chunks for ch in c["choices"])
    else:
        r = _post(server, body)
        assert r.status_code == 200
        message = r.json()["choices"][0]["message"]
        assert message["tool_calls"] is None and isinstance(message["content"], str)


def test_malformed_tool_call_args_in_history_are_text_for_the_template(server):
    r = _post(server, {"max_tokens": 2, "messages": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_123", "type": "function", "function": {"name": "test", "arguments": "{"}}]},
        {"role": "user", "content": "Continue"}]})
    assert r.status_code == 200  # not a 5xx: the arguments are shown to the model as written


# ---- llama.cpp: test_vision_api.py, vLLM: test_vision.py -----------------------------------------------
@pytest.mark.parametrize("url", [
    "data:image/png;base64," + png_b64(seed=11), png_b64(seed=11),
    _data_url(make_image(96, 64, seed=3).convert("L").convert("P"), "PNG"),  # palette greyscale
    _data_url(make_image(96, 64, seed=4).convert("RGBA"), "PNG"),
    _data_url(make_image(200, 90, seed=5), "JPEG")])
def test_vision_chat_completion(client, url):
    messages = _image_message(url)
    r = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=6, temperature=0.0,
                                       logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 20  # the image's tokens are in the prompt
    messages += [{"role": "assistant", "content": choice.message.content},
                 {"role": "user", "content": "express your result in json"}]
    follow = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=4)
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens


def test_vision_same_image_again_is_served_from_the_cache(server):
    url = "data:image/png;base64," + png_b64(seed=21)
    first = _post(server, {"messages": _image_message(url), "max_tokens": 2})
    second = _post(server, {"messages": _image_message(url, "Test test"), "max_tokens": 2})
    assert first.status_code == second.status_code == 200
    assert second.json()["timings"]["vision_cache_hits"] >= 1


@pytest.mark.parametrize("url,code", [
    ("malformed", "invalid_base64"), ("https://google.com/404", "remote_image_refused"),
    ("file:///etc/hostname", "remote_image_refused")])
def test_vision_bad_image_urls_are_refused(server, url, code):
    assert _refused(_post(server, {"messages": _image_message(url)}))["code"] == code


def test_vision_streaming_equals_non_streaming(client):
    kw = {"model": "m", "messages": _image_message("data:image/png;base64," + png_b64(seed=7)),
          "max_completion_tokens": 10, "temperature": 0.0}
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == [whole.finish_reason] and chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content


def test_multi_image_input_over_the_limit(client):
    small = "data:image/png;base64," + png_b64(32, 32, seed=1)
    two = [{"type": "image_url", "image_url": {"url": small}}] * 2 + [{"type": "text", "text": "Compare."}]
    r = client.chat.completions.create(model="m", max_completion_tokens=2, messages=[{"role": "user", "content": two}])
    assert r.choices[0].finish_reason in ("stop", "length")
    too_many = [{"type": "image_url", "image_url": {"url": small}}] * 9  # the server's --max-images is 8
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", max_completion_tokens=2,
                                       messages=[{"role": "user", "content": too_many}])
    assert e.value.body["code"] == "too_many_images"
    assert client.chat.completions.create(model="m", max_completion_tokens=2, messages=BOOK).choices


# ---- vLLM: test_chat.py ------------------------------------------------------------------------------
ONE_PLUS_ONE = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "what is 1+1?"}]


@pytest.mark.parametrize("logprobs,top,expected", [(False, None, None), (True, 0, 0), (True, 5, 5)])
def test_logprobs_chat(client, logprobs, top, expected):
    kw = {"top_logprobs": top} if top is not None else {}
    r = client.chat.completions.create(model="m", messages=ONE_PLUS_ONE, max_completion_tokens=5, temperature=0.0,
                                       logprobs=logprobs, **kw)
    if expected is None:
        assert r.choices[0].logprobs is None
    else:
        assert len(r.choices[0].logprobs.content[0].top_logprobs) == expected


def test_too_many_chat_logprobs(client):
    with pytest.raises(openai.BadRequestError):
        for _ in client.chat.completions.create(model="m", messages=ONE_PLUS_ONE, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=21, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=ONE_PLUS_ONE, max_completion_tokens=10, logprobs=True,
                                       top_logprobs=30)
    assert client.chat.completions.create(model="m", messages=ONE_PLUS_ONE, max_completion_tokens=10).choices


def test_single_chat_session(client):
    messages = list(ONE_PLUS_ONE)
    r = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=5, logprobs=True,
                                       top_logprobs=5)
    assert r.id and len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "express your result in json"}]
    again = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=5)
    assert again.choices[0].message.content is not None and again.usage.prompt_tokens > r.usage.prompt_tokens


def test_chat_streaming(client):
    kw = {"model": "m", "messages": ONE_PLUS_ONE, "max_completion_tokens": 10, "temperature": 0.0}
    whole = client.chat.completions.create(**kw).choices[0]
    pieces, finishes = [], 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        assert delta.role in (None, "assistant")
        pieces.append(delta.content or "")
        finishes += chunk.choices[0].finish_reason is not None
    assert finishes == 1 and chunk.choices[0].finish_reason == whole.finish_reason
    assert "".join(pieces) == whole.message.content


def test_chat_completion_stream_options(client):
    kw = {"model": "m", "messages": ONE_PLUS_ONE, "max_completion_tokens": 10, "temperature": 0.0}
    assert all(c.usage is None for c in client.chat.completions.create(
        stream=True, stream_options={"include_usage": False}, **kw))
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and chunks[-2].choices[0].finish_reason is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    for options in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(stream=False, stream_options=options, **kw)
        assert e.value.body["param"] == "stream_options"


def test_response_format_json_object_and_schema_and_text(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "what is 1+1?"}],
                                       response_format={"type": "json_object"}, max_tokens=30, seed=1,
                                       temperature=1.0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"result": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["result"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "foo_test", "schema": schema}}
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "what is 1+1?"}],
                                       max_tokens=30, temperature=1.0, seed=1, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "what is 1+1?"}],
                                       max_completion_tokens=10, response_format={"type": "text"})
    assert r.choices[0].message.content is not None


def test_complex_message_content_is_the_same_as_a_string(client):
    kw = {"model": "m", "max_tokens": 6, "temperature": 0, "seed": 0}
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "what is 1+1?"}], **kw)
    parts = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "what is 1+1?"}]}], **kw)
    assert plain.usage.prompt_tokens == parts.usage.prompt_tokens
    assert plain.choices[0].message.content == parts.choices[0].message.content


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**63])
def test_long_seed_is_refused(server, seed):
    _refused(_post(server, {"messages": ONE_PLUS_ONE, "temperature": 0, "seed": seed}), "seed")


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "what is 1+1?", "extra_field": "0"}]}, "messages.0.extra_field"),
    ({"messages": [{"role": "my-custom-role", "content": "what is 1+1?"}, *ONE_PLUS_ONE[1:]]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}, "uuid": "x"}]}]},
     "messages.0.content.1.uuid"),
    ({"messages": ONE_PLUS_ONE, "n": 3}, "n"),
    ({"messages": ONE_PLUS_ONE, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"messages": ONE_PLUS_ONE, "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
    ({"messages": ONE_PLUS_ONE, "stream": True, "stream_options": {"include_usage": True,
                                                                  "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"messages": ONE_PLUS_ONE, "chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ({"messages": ONE_PLUS_ONE, "json_schema": {"const": "42"}}, "json_schema"),
    ({"messages": ONE_PLUS_ONE, "grammar": 'root ::= "a"'}, "grammar"),
    ({"messages": ONE_PLUS_ONE, "timings_per_token": True}, "timings_per_token"),
    ({"messages": ONE_PLUS_ONE, "logit_bias": {"1": -100}}, "logit_bias"),
])
def test_other_servers_extensions_are_refused_by_name(server, body, param):
    _refused(_post(server, {"max_tokens": 2, **body}), param)


# ---- vLLM: function calling, delta serialisation, tool_choice null -----------------------------------------
WEATHER_ASK = [{"role": "user", "content": "Hi! How are you doing today?"},
               {"role": "assistant", "content": "I'm doing well! How can I help you?"},
               {"role": "user", "content": "The weather in Berlin and the forecast for 5 days, in fahrenheit?"}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_current_weather"}}])
def test_function_tool_use(client, tool_choice, stream):
    kw = {"model": "m", "messages": WEATHER_ASK, "tools": WEATHER_TOOLS, "tool_choice": tool_choice,
          "max_tokens": 200, "temperature": 1.0, "seed": 4}
    if not stream:
        calls = client.chat.completions.create(**kw).choices[0].message.tool_calls
        assert calls
        for call in calls:
            params = next(t["function"]["parameters"] for t in WEATHER_TOOLS
                          if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), params)
    else:
        deltas = [d for c in client.chat.completions.create(stream=True, **kw) for d in c.choices[0].delta.tool_calls
                  or []]
        assert deltas and deltas[0].id and deltas[0].function.name


@pytest.mark.parametrize("arguments", ["{}", ""])
def test_no_args_tool_call_round_trip(client, arguments):
    tools = [{"type": "function", "function": {"name": "get_current_time", "description": "The time now",
                                               "parameters": {"type": "object", "properties": {}, "required": []}}}]
    messages: list = [{"role": "user", "content": "What time is it now?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=tools, max_tokens=30,
                                           tool_choice={"type": "function", "function": {"name": "get_current_time"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    assert call.function.name == "get_current_time"
    call.function.arguments = arguments
    messages += [message, {"role": "tool", "tool_call_id": call.id, "content": "2025-01-01T12:00:00"}]
    final = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=8)
    assert final.choices[0].message.content is not None


def test_named_tool_use(client):
    tools = [{"type": "function", "function": {"name": "dummy_function_name", "description": "A dummy function",
                                               "parameters": EMPLOYEE}}]
    choice = {"type": "function", "function": {"name": "dummy_function_name"}}
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "Give an example JSON for an employee profile using the specified tool."}]
    r = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=200, tools=tools,
                                       temperature=1.0, seed=1, tool_choice=choice)
    message = r.choices[0].message
    assert message.content in (None, "")
    jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), EMPLOYEE)
    arguments, finishes = [], 0
    for chunk in client.chat.completions.create(model="m", messages=messages, max_completion_tokens=200, tools=tools,
                                                tool_choice=choice, temperature=1.0, seed=2, stream=True):
        delta = chunk.choices[0].delta
        assert delta.role in (None, "assistant") and delta.content in (None, "")
        if delta.tool_calls and delta.tool_calls[0].function.arguments:
            arguments.append(delta.tool_calls[0].function.arguments)
        finishes += chunk.choices[0].finish_reason is not None
    assert finishes == 1
    jsonschema.validate(json.loads("".join(arguments)), EMPLOYEE)


@pytest.mark.parametrize("tools,tool_choice", [
    (None, {"type": "function", "function": {"name": "dummy_function_name"}}),
    ([TEST_TOOL], {"type": "function", "function": {"name": "nondefined_function_name"}}),
    ([TEST_TOOL], {}),
    ([TEST_TOOL], "bogus"),
    (None, "auto"),
])
def test_inconsistent_tool_choice_and_tools(server, tools, tool_choice):
    err = _refused(_post(server, {"messages": ONE_PLUS_ONE, "tools": tools, "tool_choice": tool_choice}))
    assert "tool_choice" in err["message"] or (err["param"] or "").startswith("tool_choice")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_current_weather"}}])
def test_max_tokens_with_tool_choice_required(client, tool_choice, stream):
    kw = {"model": "m", "messages": WEATHER_ASK, "tools": WEATHER_TOOLS, "tool_choice": tool_choice,
          "max_completion_tokens": 1, "temperature": 0}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert not any(c.choices[0].delta.tool_calls or c.choices[0].delta.content for c in chunks)
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        assert choice.finish_reason == "length" and choice.message.tool_calls is None
        assert not choice.message.content


def test_delta_tool_call_serialization_omits_nulls(server):
    chunks = _sse(server, {"messages": WEATHER_ASK, "tools": WEATHER_TOOLS, "max_tokens": 120, "seed": 3,
                           "temperature": 1.0, "parallel_tool_calls": False,
                           "tool_choice": {"type": "function", "function": {"name": "get_forecast"}}})
    head, *rest = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert head["id"].startswith("call_") and head["type"] == "function" and head["index"] == 0
    assert head["function"] == {"name": "get_forecast", "arguments": ""}
    assert rest and all("id" not in d and "type" not in d and "name" not in d["function"] for d in rest)


def test_null_tool_choice_is_like_an_absent_one(server):
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    body = {"messages": [{"role": "user", "content": "what is the weather in Paris?"}], "tools": tools,
            "max_tokens": 6, "temperature": 0}
    omitted, null = _post(server, body), _post(server, {**body, "tool_choice": None})
    assert omitted.status_code == null.status_code == 200
    assert omitted.json()["choices"][0]["message"] == null.json()["choices"][0]["message"]
    assert _post(server, {**body, "tools": None, "tool_choice": None}).status_code == 200


@pytest.mark.parametrize("payload", ["this is not valid json{{{", '["not", "an", "object"]', "42", "null"])
def test_non_object_body_is_a_4xx(server, payload):
    r = httpx.post(server.url + "/v1/chat/completions", content=payload, timeout=60,
                   headers={"content-type": "application/json"})
    _refused(r)

"""litellm through its OpenAI-compatible provider (`openai/<model>` with `api_base`): a picture, a
stream rebuilt by `stream_chunk_builder`, and the tool loop as litellm's function-calling docs write it."""

from __future__ import annotations

import json
import os

import pytest

# litellm fetches its model price list from the internet on import unless told not to
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "unit"]}}}


@pytest.fixture(scope="module")
def kw(base_url: str, model: str) -> dict:
    return {"model": f"openai/{model}", "api_base": base_url, "api_key": "unused", "temperature": 0}


def _picture(image_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What's in this image?"},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def test_vision(kw, image_url):
    r = litellm.completion(messages=_picture(image_url), max_tokens=6, **kw)
    assert isinstance(r, litellm.ModelResponse) and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 6


def test_streaming_rebuilds_the_answer(kw, image_url):
    messages = _picture(image_url)
    chunks = list(litellm.completion(messages=messages, max_tokens=6, stream=True,
                                     stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rebuilt = litellm.stream_chunk_builder(chunks, messages=messages)
    assert text and rebuilt.choices[0].message.content == text
    assert 0 < rebuilt.usage.completion_tokens <= 6


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip_as_the_docs_write_it(kw, stream):
    messages = [{"role": "user", "content": "What's the weather like in San Francisco, Tokyo, and Paris?"}]
    response = litellm.completion(messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=80,
                                  stream=stream, **kw)
    if stream:
        response = litellm.stream_chunk_builder(list(response), messages=messages)
    response_message = response.choices[0].message
    tool_calls = response_message.tool_calls
    assert tool_calls and response.choices[0].finish_reason == "tool_calls"
    messages.append(response_message)
    for tool_call in tool_calls:
        function_name = tool_call.function.name
        function_args = json.loads(tool_call.function.arguments)
        assert function_name == "get_current_weather" and function_args["unit"] in ("celsius", "fahrenheit")
        messages.append({"tool_call_id": tool_call.id, "role": "tool", "name": function_name,
                         "content": json.dumps({"location": function_args["location"], "temperature": "22"})})
    second_response = litellm.completion(messages=messages, max_tokens=6, **kw)
    assert isinstance(second_response.choices[0].message.content, str)

"""The official `openai` SDK: plain and streamed answers, its `.stream()` and `.parse()` helpers, a tool
loop that sends the SDK's own message object back, and `models.retrieve`."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict, Field

openai = pytest.importorskip("openai")


class Address(BaseModel):
    # closed (additionalProperties false): an open schema lets the demo model write keys of its own
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    zip_code: str = Field(max_length=8)


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=20)
    address: Address
    floors: int = Field(ge=0, le=99)


class Zoom(BaseModel):
    """Zoom the camera."""

    model_config = ConfigDict(extra="forbid")
    factor: int = Field(ge=1, le=8)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def _ask(image_url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def test_create_answers_a_picture(client, model, image_url):
    r = client.chat.completions.create(model=model, messages=_ask(image_url), max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == model
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0


def test_stream_helper_text(client, model, image_url):
    pieces: list[str] = []
    with client.chat.completions.stream(model=model, messages=_ask(image_url), max_tokens=6, temperature=0) as s:
        for event in s:
            if event.type == "content.delta":
                pieces.append(event.delta)
        # the snapshot, not get_final_completion(): that raises LengthFinishReasonError when the
        # demo model's words run to max_tokens, as they usually do
        final = s.current_completion_snapshot
    assert pieces and "".join(pieces) == final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")


def test_stream_helper_forced_tool_call(client, model, image_url):
    tool = openai.pydantic_function_tool(Zoom)
    done = []
    with client.chat.completions.stream(model=model, messages=_ask(image_url, "Zoom in."), tools=[tool],
                                        tool_choice={"type": "function", "function": {"name": "Zoom"}},
                                        max_tokens=60, temperature=0) as s:
        for event in s:
            if event.type == "tool_calls.function.arguments.done":
                done.append(event)
        final = s.get_final_completion()
    assert [e.name for e in done] == ["Zoom"] and isinstance(done[0].parsed_arguments, Zoom)
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "Zoom" and isinstance(call.function.parsed_arguments, Zoom)


def test_parse_a_nested_model(client, model, image_url):
    r = client.chat.completions.parse(model=model, messages=_ask(image_url, "Describe the building."),
                                      response_format=Place, max_tokens=120, temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Place) and isinstance(parsed.address, Address)


def test_parse_a_forced_tool_call_with_a_nested_model(client, model, image_url):
    r = client.chat.completions.parse(model=model, messages=_ask(image_url, "File the building."),
                                      tools=[openai.pydantic_function_tool(Place)], tool_choice="required",
                                      max_tokens=120, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "Place" and isinstance(call.function.parsed_arguments, Place)


def test_tool_round_trip_sends_the_message_object_back(client, model, image_url):
    messages: list = _ask(image_url, "Zoom in, then tell me what you see.")
    tools = [openai.pydantic_function_tool(Zoom)]
    first = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                           max_tokens=60, temperature=0)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    messages.append(message)  # the SDK's own object, as OpenAI's function-calling guide does
    for call in message.tool_calls:
        factor = Zoom.model_validate_json(call.function.arguments).factor
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"zoomed": factor})})
    second = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=6,
                                            temperature=0)
    assert second.choices[0].message.role == "assistant"
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_round_trip_with_the_message_dumped(client, model):
    """The same loop as JSON: `model_dump()` keeps the `refusal: null` and `annotations` the SDK read."""
    messages: list = [{"role": "user", "content": "Zoom in."}]
    tools = [openai.pydantic_function_tool(Zoom)]
    first = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                           max_tokens=60, temperature=0)
    message = first.choices[0].message
    messages += [message.model_dump(), {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "ok"}]
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert isinstance(second.choices[0].message.content, str)


def test_models_list_and_retrieve(client, model):
    assert model in [m.id for m in client.models.list()]
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

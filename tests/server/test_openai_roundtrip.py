"""What clients send back and how they read streams (issue 19): our own reply echoed into the next turn,
names on messages, sparse stream deltas and the openai SDK's stream helper, nested pydantic models as
tool parameters, json_object with a schema, forced calls cut short, models.retrieve, and errors that
name the right parameter. Fields that only describe a message are accepted with no effect on the prompt;
fields that would change the answer are still refused by name."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

ASK = [{"role": "user", "content": "Where do I send the parcel?"}]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no free extra keys: a random model would add some


class Address(Closed):
    street: str = Field(max_length=16)  # a random model's strings run to the budget otherwise
    city: Literal["Paris", "Oslo", "Lima"]


class Parcel(Closed):
    recipient: str = Field(max_length=16)
    to: Address
    weight_kg: int = Field(ge=1, le=30)


class Point(Closed):
    x: int = Field(ge=0, le=99)
    y: int = Field(ge=0, le=99)


class Route(Closed):
    stops: list[Point] = Field(max_length=3)
    back: Address | None


def _tool(name: str, model: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


SHIP, ROUTE = _tool("ship", Parcel), _tool("route", Route)
MODELS = {"ship": Parcel, "route": Route}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"max_tokens": 1, **body}, timeout=120)


def _prompt_tokens(server, messages: list) -> int:
    r = _post(server, {"messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


# ---- 1. our own reply goes back ------------------------------------------------------------------
def test_the_returned_message_object_is_appended_in_a_tool_round_trip(client):
    messages: list = list(ASK)
    first = client.chat.completions.create(model="m", messages=messages, tools=[SHIP], tool_choice="required",
                                           max_tokens=150, temperature=1.0, seed=3)
    assert first.choices[0].finish_reason == "tool_calls"
    messages.append(first.choices[0].message)  # the SDK object itself, with its refusal: null and tool calls
    for call in first.choices[0].message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "sent"})
    second = client.chat.completions.create(model="m", messages=messages, tools=[SHIP], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    messages.append(second.choices[0].message)  # a text reply, echoed the same way
    messages.append({"role": "user", "content": "Thanks."})
    third = client.chat.completions.create(model="m", messages=messages, tools=[SHIP], max_tokens=2)
    assert third.usage.prompt_tokens > second.usage.prompt_tokens


def test_a_streamed_reply_echoed_with_its_delta_index_is_accepted(client):
    stream = client.chat.completions.create(model="m", messages=ASK, tools=[SHIP], max_tokens=150, seed=4,
                                            temperature=1.0, tool_choice="required", stream=True)
    calls: dict[int, dict] = {}
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            slot = calls.setdefault(d.index, {"index": d.index, "type": "function",
                                              "function": {"name": "", "arguments": ""}})
            slot["id"] = d.id or slot.get("id")
            slot["function"]["name"] += d.function.name or ""
            slot["function"]["arguments"] += d.function.arguments or ""
    history = [*ASK, {"role": "assistant", "content": None, "refusal": None, "tool_calls": list(calls.values())},
               *({"role": "tool", "tool_call_id": c["id"], "content": "sent"} for c in calls.values())]
    r = client.chat.completions.create(model="m", messages=history, tools=[SHIP], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_parsed_reply_is_appended_too(client):
    first = client.chat.completions.parse(model="m", messages=ASK, response_format=Parcel, max_tokens=120,
                                          temperature=1.0, seed=2)
    assert isinstance(first.choices[0].message.parsed, Parcel)
    second = client.chat.completions.create(model="m", max_tokens=2, messages=[
        *ASK, first.choices[0].message, {"role": "user", "content": "Again."}])
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


DESCRIBING = {"refusal": None, "annotations": [], "audio": None, "function_call": None, "name": "helper"}


def test_describing_fields_are_accepted_and_change_nothing(server):
    plain = [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "To Oslo."},
             {"role": "user", "content": "Sure?"}]
    described = [{**plain[0], "name": "ops"}, {**plain[1], "name": "ann"}, {**plain[2], **DESCRIBING},
                 {**plain[3], "name": "ann"}]
    assert _prompt_tokens(server, described) == _prompt_tokens(server, plain)
    call = {"id": "call_1", "type": "function", "function": {"name": "ship", "arguments": "{}"}}
    calls = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    echoed = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{**call, "index": 0}], **DESCRIBING},
              {"role": "tool", "tool_call_id": "call_1", "content": "ok", "name": "ship"}]
    assert _prompt_tokens(server, echoed) == _prompt_tokens(server, calls)


def test_a_refusal_without_content_is_the_turn_s_text(server):
    said = [*ASK, {"role": "assistant", "content": "I cannot help."}, {"role": "user", "content": "Why?"}]
    refused = [*ASK, {"role": "assistant", "content": None, "refusal": "I cannot help."},
               {"role": "user", "content": "Why?"}]
    assert _prompt_tokens(server, refused) == _prompt_tokens(server, said)


@pytest.mark.parametrize("field,value,param", [
    ("audio", {"id": "audio_1"}, "messages.1.audio"),
    ("function_call", {"name": "ship", "arguments": "{}"}, "messages.1.function_call"),
    ("weight", 2, "messages.1.weight"),
])
def test_fields_that_would_change_the_answer_are_still_refused(server, field, value, param):
    err = _error(_post(server, {"messages": [*ASK, {"role": "assistant", "content": "x", field: value},
                                             {"role": "user", "content": "y"}]}))
    assert err["param"] == param and field in err["message"]


# ---- 2. sparse stream deltas, and the SDK's stream helper --------------------------------------------
def _sse(server, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [x.removeprefix("data: ") for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ship"}}])
def test_tool_call_deltas_leave_absent_keys_out(server, choice):
    chunks = _sse(server, {"messages": ASK, "tools": [SHIP, ROUTE], "tool_choice": choice, "max_tokens": 150,
                           "seed": 5, "temperature": 1.0, "parallel_tool_calls": False})
    for c in chunks:  # what OpenAI sends: a choice's finish_reason and logprobs, null until they are not
        for ch in c["choices"]:
            assert set(ch) == {"index", "delta", "logprobs", "finish_reason"}
            assert None not in ch["delta"].values()
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls", [])]
    head, *fragments = deltas
    assert set(head) == {"index", "id", "type", "function"} and set(head["function"]) == {"name", "arguments"}
    assert fragments and all(d.keys() == {"index", "function"} and d["function"].keys() == {"arguments"}
                             for d in fragments)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _strict(model: type[BaseModel], name: str) -> dict:
    return openai.pydantic_function_tool(model, name=name)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "route"}}])
def test_the_sdk_stream_helper_with_a_forced_call(client, choice):
    tools = [_strict(Parcel, "ship"), _strict(Route, "route")]
    kw = {"model": "m", "messages": ASK, "tools": tools, "tool_choice": choice, "max_tokens": 200, "seed": 6,
          "temperature": 1.0, "parallel_tool_calls": False, "stream_options": {"include_usage": True}}
    with client.chat.completions.stream(**kw) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    call, = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert [e.name for e in done] == [call.function.name] and done[0].arguments == call.function.arguments
    assert isinstance(call.function.parsed_arguments, MODELS[call.function.name])
    if isinstance(choice, dict):
        assert call.function.name == "route"
    # the helper's message carries `parsed` and `parsed_arguments`: it goes back as it is
    again = client.chat.completions.create(model="m", tools=tools, max_tokens=2, messages=[
        *ASK, final.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "done"}])
    assert again.usage.prompt_tokens > final.usage.prompt_tokens


def test_the_sdk_stream_helper_with_text(client):
    # the helper refuses an answer cut at max_tokens; a stop string ends the random model's words first
    kw = {"model": "m", "messages": ASK, "max_tokens": 40, "seed": 1, "temperature": 1.0, "stop": [" ", "a", "e"]}
    with client.chat.completions.stream(**kw) as stream:
        pieces = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(pieces) == final.choices[0].message.content
    assert final.choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


# ---- 4. nested pydantic models as tool parameters -------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tools,choice", [
    ([SHIP], "required"),
    ([SHIP, ROUTE], "required"),
    ([ROUTE, SHIP], {"type": "function", "function": {"name": "ship"}}),
    ([SHIP, ROUTE], {"type": "function", "function": {"name": "route"}}),
])
def test_nested_models_in_tool_parameters(client, tools, choice, stream):
    assert all("$defs" in t["function"]["parameters"] for t in tools)
    kw = {"model": "m", "messages": ASK, "tools": tools, "tool_choice": choice, "max_tokens": 300, "seed": 8,
          "temperature": 1.0, "parallel_tool_calls": False}
    if stream:
        with client.chat.completions.stream(**kw) as s:
            final = s.get_final_completion()
    else:
        final = client.chat.completions.create(**kw)
    call, = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, MODELS[call.function.name].model_json_schema())
    MODELS[call.function.name].model_validate(args)


# ---- 5. json_object with a schema ------------------------------------------------------------------
def test_json_object_with_a_schema_follows_the_schema(client):
    schema = {"type": "object", "properties": {"answer": {"const": "yes"}, "n": {"type": "integer", "minimum": 7,
                                                                                  "maximum": 7}},
              "required": ["answer", "n"], "additionalProperties": False}
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=40, temperature=1.0, seed=1,
                                       response_format={"type": "json_object", "schema": schema})
    assert json.loads(r.choices[0].message.content) == {"answer": "yes", "n": 7}
    nested = client.chat.completions.create(model="m", messages=ASK, max_tokens=120, temperature=1.0, seed=1,
                                            response_format={"type": "json_object",
                                                             "schema": Parcel.model_json_schema()})
    Parcel.model_validate_json(nested.choices[0].message.content)


def test_json_object_with_a_schema_that_is_not_one_is_refused(server):
    err = _error(_post(server, {"messages": ASK, "response_format": {"type": "json_object", "schema": "object"}}))
    assert err["param"] == "response_format.schema"


# ---- 6. a forced call cut short never shows the template's markup ------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 6])
def test_a_forced_call_cut_short_leaks_no_markup(client, max_tokens):
    kw = {"model": "m", "messages": ASK, "tools": [SHIP], "tool_choice": "required", "max_tokens": max_tokens}
    whole = client.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert whole.choices[0].finish_reason == "length"
    for text in (whole.choices[0].message.content or "", streamed):
        assert "<tool_call>" not in text and '{"' not in text and not text.strip()


# ---- 7. models.retrieve ------------------------------------------------------------------------------
def test_models_retrieve(client, server):
    name = client.models.list().data[0].id
    card = client.models.retrieve(name)
    assert card.id == name and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-nonexistent")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert set(httpx.get(server.url + "/v1/models/nope").json()["error"]) == {"message", "type", "param", "code"}


# ---- 8. a content part's keys, named by their own place ---------------------------------------------
def test_an_unknown_key_in_a_content_part_is_named_by_its_place(server):
    part = {"type": "text", "text": "hi"}
    err = _error(_post(server, {"messages": [{"role": "user", "content": [{**part, "foo": 1}]}]}))
    assert err["param"] == "messages.0.content.0.foo"
    err = _error(_post(server, {"messages": [{"role": "user", "content": [part, {"type": "image_url"}]}]}))
    assert err["param"] == "messages.0.content.1" and "image_url" in err["message"]
    err = _error(_post(server, {"messages": [{"role": "user", "content": 5}]}))
    assert err["param"] == "messages.0.content" and "string or a list" in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "uuid": "1"}}]}]},
     "messages.0.content.0.image_url.uuid"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
     "messages.0.content.0.image_url"),
    ({"messages": ASK, "tools": [SHIP], "tool_choice": "bogus"}, "tool_choice"),
    ({"messages": ASK, "tools": [SHIP], "tool_choice": {"type": "function", "function": {"name": 1}}},
     "tool_choice.function.name"),
    ({"messages": ASK, "stop": ["a", 3]}, "stop.1"),
    ({"messages": ASK, "stop": 5}, "stop"),
])
def test_other_unions_name_the_value_s_own_place(server, body, param):
    err = _error(_post(server, body))
    assert err["param"] == param and "literal" not in err["message"] and "ImageURL" not in err["message"]


def test_cache_control_on_a_content_part_is_accepted_with_no_effect(server):
    part = {"type": "text", "text": "hi"}
    cached = [{"role": "user", "content": [{**part, "cache_control": {"type": "ephemeral"}}]}]
    assert _prompt_tokens(server, cached) == _prompt_tokens(server, [{"role": "user", "content": [part]}])


# ---- 9. stream_options only with stream ----------------------------------------------------------------
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_is_refused(server, stream):
    body: dict = {"messages": ASK, "stream_options": {"include_usage": True}}
    if stream is not None:
        body["stream"] = stream
    err = _error(_post(server, body))
    assert err["param"] == "stream_options" and "stream" in err["message"]

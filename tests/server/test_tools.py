"""Tool calls with the official `openai` client: forced (required, named) calls always parse and
validate, even from the random-weight demo model; the round trip through a tool message works."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from edgevl.server.tools import ToolCallSplitter

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ZOOM = {"type": "object", "properties": {"factor": {"type": "integer", "minimum": 1, "maximum": 8}},
        "required": ["factor"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "zoom", "description": "Zoom the camera", "parameters": ZOOM}}]
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 24}, "limit": {"type": "integer", "minimum": 1, "maximum": 50},
    "filters": {"type": "object", "properties": {"lang": {"enum": ["en", "fr"]}, "safe": {"type": "boolean"}},
                "required": ["lang", "safe"], "additionalProperties": False}},
    "required": ["query", "limit", "filters"], "additionalProperties": False}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web",
                                                "parameters": SEARCH}}
SCHEMAS = {"get_weather": WEATHER, "zoom": ZOOM, "search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _calls_from_stream(chunks) -> tuple[list[dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for c in chunks:
        for ch in c.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, text


def _ask(client, stream: bool, **kw) -> tuple[list[dict], str | None, str | None]:
    kw = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 120, "temperature": 1.0, **kw}
    if stream:
        return _calls_from_stream(client.chat.completions.create(stream=True, **kw))
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or []]
    return calls, r.choices[0].finish_reason, m.content


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_calls_always_parse_and_validate(client, stream, seed):
    calls, finish, _ = _ask(client, stream, tool_choice="required", seed=seed)
    assert finish == "tool_calls" and calls
    for c in calls:
        assert c["id"].startswith("call_") and c["name"] in SCHEMAS
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_the_one_called_once(client, stream):
    calls, finish, _ = _ask(client, stream, seed=7, parallel_tool_calls=False,
                            tool_choice={"type": "function", "function": {"name": "zoom"}})
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["zoom"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), ZOOM)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_round_trip_through_a_tool_message(client, stream, choice):
    calls, _, _ = _ask(client, False, tool_choice="required", seed=11)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}] + [{"role": "tool", "tool_call_id": c["id"], "content": "18 C, clear"} for c in calls]
    before = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=1)
    after = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=1)
    assert after.usage.prompt_tokens > before.usage.prompt_tokens  # the call and its result reach the model
    # with auto the model is free to answer in text (or to call again; then the calls must be real tools)
    again, finish, text = _ask(client, stream, messages=history, tool_choice=choice, seed=3, max_tokens=60)
    assert finish in (("tool_calls",) if choice == "required" else ("stop", "length", "tool_calls"))
    assert all(c["name"] in SCHEMAS for c in again)
    if choice == "auto" and not again:
        assert text


def _streamed_deltas(client, **kw) -> tuple[dict[int, list], str | None]:
    """Every tool-call delta of a streamed answer, by call index, and the finish reason."""
    deltas: dict[int, list] = {}
    finish = None
    for c in client.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                deltas.setdefault(d.index, []).append(d)
    return deltas, finish


@pytest.mark.parametrize("tools,choice", [
    ([SEARCH_TOOL], "required"),
    ([*TOOLS, SEARCH_TOOL], {"type": "function", "function": {"name": "search"}}),
])
def test_forced_call_arguments_stream_in_fragments_and_match_the_whole_answer(client, tools, choice):
    kw = {"model": "m", "messages": ASK, "tools": tools, "tool_choice": choice, "max_tokens": 200,
          "temperature": 1.0, "seed": 5, "parallel_tool_calls": False}
    deltas, finish = _streamed_deltas(client, **kw)
    assert finish == "tool_calls" and sorted(deltas) == [0]
    head, *rest = deltas[0]
    assert head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "search" and head.function.arguments == ""
    assert all(d.id is None and d.function.name is None and d.function.arguments for d in rest)
    assert len(rest) > 1  # written piece by piece, not in one delta at the end
    arguments = "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(arguments), SEARCH)
    whole = client.chat.completions.create(**kw)
    call, = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("search", arguments)


def test_a_forced_call_cut_short_by_max_tokens_is_the_same_streamed_or_whole(client):
    kw = {"model": "m", "messages": ASK, "tools": [SEARCH_TOOL], "tool_choice": "required", "max_tokens": 30,
          "temperature": 1.0, "seed": 5}
    calls, finish, _ = _ask(client, True, **kw)
    whole, whole_finish, content = _ask(client, False, **kw)
    assert finish == whole_finish == "length" and content is None  # the header was out: it stays a call
    assert [(c["name"], c["arguments"]) for c in calls] == [(c["name"], c["arguments"]) for c in whole]


def test_tool_choice_none_and_bad_tools_are_refused_or_honoured(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in e.value.body["message"]
    recursive = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=8, tool_choice="required", tools=[
            {"type": "function", "function": {"name": "f", "parameters": recursive}}])
    assert e.value.body["code"] == "invalid_schema"


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_beside_a_response_format_is_the_call(client, stream):
    """Agent SDKs (openai-agents) send their output schema with every turn, also with
    tool_choice "required": the forced call is the answer, and the schema still has to compile."""
    output = {"type": "json_schema", "json_schema": {"name": "Report", "schema": {
        "type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}}}
    calls, finish, text = _ask(client, stream, tool_choice="required", seed=2, response_format=output)
    assert finish == "tool_calls" and calls and not text
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
    recursive = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, stream, tool_choice="required", response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": recursive}})
    assert e.value.body["code"] == "invalid_schema"


@pytest.mark.parametrize("stream", [False, True])
def test_predict_takes_tools_too(server, stream):
    body = {"prompt": "Zoom in twice.", "tools": TOOLS, "tool_choice": "required", "max_tokens": 100, "seed": 4,
            "temperature": 1.0, "stream": stream}
    out = server.edge("/api/predict", body)
    assert out["finish_reason"] == "tool_calls" and out["tool_calls"]
    for call in out["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_the_splitter_separates_text_from_calls_across_pieces():
    s = ToolCallSplitter({"zoom"})
    text = "Sure.\n<tool_call>\n{\"name\": \"zoom\", \"arguments\": {\"factor\": 2}}\n</tool_call>" \
           "<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call> done <tool"
    shown, calls = "", []
    for i in range(0, len(text), 3):
        t, c = s.feed(text[i:i + 3])
        shown += t
        calls += c
    shown += s.flush()[0]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("zoom", {"factor": 2})]
    assert shown.startswith("Sure.\n") and "other" in shown and shown.endswith(" done <tool")
    assert "factor" not in shown
    one = ToolCallSplitter({"zoom"}, max_calls=1)
    block = "<tool_call>\n{\"name\": \"zoom\", \"arguments\": {}}\n</tool_call>"
    text, calls = one.feed(block + block)
    assert len(calls) == 1 and text == block  # parallel_tool_calls false: the second stays text

"""Anthropic's Messages API over real HTTP with the official `anthropic` SDK: images, streaming,
a tool round trip, count_tokens, stop reasons, and errors in Anthropic's shape. The demo model has
random weights, so these assert the protocol and the engine's figures, never what the answer says."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import jsonschema
import pytest

from tests.server.conftest import png_b64, start_server, stop_server

KEY = "anthropic-test-key"
MARKER = "FAULT-MARKER"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER},
         {"name": "zoom", "description": "Zoom the camera", "input_schema": {
             "type": "object", "properties": {"factor": {"type": "integer", "minimum": 1, "maximum": 8}},
             "required": ["factor"], "additionalProperties": False}}]
GREEDY = {"temperature": 0}  # this SDK sends sampling fields through extra_body


def _image(seed: int = 0) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64(seed=seed)}}


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_image_and_text_answer_and_count_tokens(client):
    system = [{"type": "text", "text": "You look at pictures."}, {"type": "text", "text": " Be brief."}]
    messages = [{"role": "user", "content": [_image(), {"type": "text", "text": "What is in this picture?"}]}]
    r = client.messages.create(model="anything", max_tokens=12, system=system, messages=messages,
                               metadata={"user_id": "u-1"}, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    assert 1 <= r.usage.output_tokens <= 12
    counted = client.messages.count_tokens(model="anything", system=system, messages=messages)
    assert counted.input_tokens == r.usage.input_tokens
    text_only = client.messages.count_tokens(model="anything", system=system, messages=[
        {"role": "user", "content": "What is in this picture?"}])
    assert text_only.input_tokens < counted.input_tokens  # the picture's tokens are counted


def test_output_format_consecutive_turns_thinking_disabled_and_metrics(client, server):
    schema = {"type": "object", "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["digit"], "additionalProperties": False}
    label = 'endpoint="/v1/messages",status="200"'
    before = server.metric("edgevl_requests_total", label)
    r = client.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": "A digit?"}],
                               extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}},
                                           "thinking": {"type": "disabled"}})
    jsonschema.validate(json.loads(r.content[0].text), schema)
    assert server.metric("edgevl_requests_total", label) == before + 1
    split = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hello."},
                                                              {"role": "user", "content": "Who are you?"}])
    joined = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello."}, {"type": "text", "text": "Who are you?"}]}])
    assert split.input_tokens == joined.input_tokens  # consecutive turns of one role are one turn


def test_same_greedy_answer_as_openai_chat(client, server):
    """One engine: the same question through both dialects gives the same text and token counts."""
    img = png_b64(seed=3)
    r = client.messages.create(model="m", max_tokens=10, system="Answer.", extra_body=GREEDY, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": img}},
                                     {"type": "text", "text": "Describe it."}]}])
    o = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "m", "max_tokens": 10, "temperature": 0, "messages": [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                                         {"type": "text", "text": "Describe it."}]}]}).json()
    assert r.content[0].text == o["choices"][0]["message"]["content"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (o["usage"]["prompt_tokens"],
                                                             o["usage"]["completion_tokens"])


def test_stream_helper_and_final_message(client, server):
    kw = {"model": "m", "max_tokens": 12, "extra_body": GREEDY,
          "messages": [{"role": "user", "content": [_image(1), {"type": "text", "text": "Describe it."}]}]}
    with client.messages.stream(**kw) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    whole = client.messages.create(**kw)
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens)


def test_raw_stream_is_named_events(server):
    """On the wire: `event: <type>` before each data line, a ping, the usage totals in message_delta."""
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=120,
                      headers={"anthropic-version": "2023-06-01", "x-api-key": "unused"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e.split("\n") for e in raw.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    datas = [json.loads(e[1].removeprefix("data: ")) for e in events]
    assert [d["type"] for d in datas] == names
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert "[DONE]" not in raw
    delta = datas[-2]
    assert delta["usage"]["output_tokens"] == 5 and delta["usage"]["input_tokens"] > 0
    text = "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")
    assert text


def test_tool_round_trip_with_a_named_tool(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.messages.create(model="m", max_tokens=80, tools=TOOLS, messages=messages,
                               tool_choice={"type": "tool", "name": "get_weather"})
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    messages += [{"role": "assistant", "content": [b.model_dump() for b in r.content]},  # as a client stores it
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "18 C, clear sky"}]}]
    answer = client.messages.create(model="m", max_tokens=8, tools=TOOLS, messages=messages,
                                    tool_choice={"type": "none"})
    assert [b.type for b in answer.content] == ["text"] and answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.usage.input_tokens > r.usage.input_tokens  # the call and its result are in the prompt
    assert client.messages.count_tokens(model="m", tools=TOOLS, messages=messages,
                                        tool_choice={"type": "none"}).input_tokens == answer.usage.input_tokens


def test_tool_result_with_an_image_and_an_error(client):
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "zoom",
                                              "input": {"factor": 2}}]}
    ask = {"role": "user", "content": "Zoom in twice."}

    def count(result: dict) -> int:
        return client.messages.count_tokens(model="m", tools=TOOLS, messages=[
            ask, call, {"role": "user", "content": [result]}]).input_tokens

    text = count({"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "done"}]})
    image = count({"type": "tool_result", "tool_use_id": "toolu_1",
                   "content": [{"type": "text", "text": "done"}, _image(2)]})
    failed = count({"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                    "content": [{"type": "text", "text": "done"}]})
    assert image > text and failed > text  # the picture, and the error flag, reach the model
    r = client.messages.create(model="m", max_tokens=4, tools=TOOLS, messages=[
        ask, call, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                 "content": [_image(2)]}, {"type": "text", "text": "And now?"}]}])
    assert r.usage.output_tokens >= 1


def test_streamed_forced_call_sends_input_json_deltas(client):
    with client.messages.stream(model="m", max_tokens=80, tools=TOOLS, tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"] and starts[0].content_block.input == {}
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    (use,) = final.content
    assert final.stop_reason == "tool_use" and json.loads(partial) == use.input
    schema = {t["name"]: t["input_schema"] for t in TOOLS}[use.name]
    jsonschema.validate(use.input, schema)


def test_stop_sequence_and_max_tokens(client):
    ask = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story."}], "extra_body": GREEDY}
    free = client.messages.create(max_tokens=4, **ask)
    assert free.stop_reason == "max_tokens" and free.usage.output_tokens == 4
    text = free.content[0].text
    stop = text.strip()[1:3]  # greedy decoding writes the same text again, so it will meet this
    cut = client.messages.create(max_tokens=4, stop_sequences=["\u2603never", stop], **ask)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]


def test_bad_requests_are_anthropic_shaped_400s(client, server):
    ask = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"max_tokens": anthropic.NOT_GIVEN}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "aGVsbG8="}}]}]}, "messages.0.content.0.source"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "url", "url": "http://127.0.0.1:9/a.png"}}]}]}, "--allow-remote-images"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
        ({"messages": ask + [{"role": "assistant", "content": "The answer is ("}]}, "prefill"),
        ({"extra_body": {"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}}, "mcp_servers"),
        ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "assistant", "content": [_image()]}, *ask]}, "image"),
    ]
    for kw, named in cases:
        kw = {"model": "m", "messages": ask, "max_tokens": 4, "timeout": 60, **kw}
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(**kw)
        assert e.value.status_code == 400
        body = e.value.body
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == "invalid_request_error" and named in body["error"]["message"], body
        assert "0x" not in body["error"]["message"] and "Traceback" not in body["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/messages", content=b" " * (5 * 2**20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"  # the server runs with 4 MB
    r = httpx.post(server.url + "/v1/messages/nothing", json={})
    assert r.status_code == 404 and r.json() == {"type": "error", "error": {"type": "not_found_error",
                                                                           "message": "Not Found"}}
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="m", messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])


def test_error_shape_table():
    from edgevl.server.anthropic_protocol import error_shape
    from edgevl.server.errors import error_response

    for status, kind in [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
                         (405, "invalid_request_error"), (413, "request_too_large"), (429, "rate_limit_error"),
                         (500, "api_error"), (504, "timeout_error")]:
        assert error_shape("m", "t", "c", None, status)["error"]["type"] == kind
    assert error_shape("bad", "t", "c", "messages.0", 400)["error"]["message"] == "messages.0: bad"
    import edgevl.server.anthropic_api  # noqa: F401  (registers the shape)

    resp = error_response("/v1/messages", "busy", "service_unavailable", "thermal_limit", None, 503)
    assert resp.status_code == 529 and json.loads(resp.body)["error"]["type"] == "overloaded_error"
    assert error_response("/v1/chat/completions", "busy", "x", "y", None, 503).status_code == 503


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A server with an API key, an engine fault on a marker, and a temperature file to heat it with."""
    sensor = tmp_path_factory.mktemp("sensor") / "temp"
    sensor.write_text("50000")
    s = start_server(tmp_path_factory, "--api-keys", KEY, "--thermal-sensor", str(sensor), "--thermal-poll-s", "0.1",
                     module="tests.fault_server")  # MARKER in a prompt fails it in the engine
    s.sensor = sensor
    yield s
    stop_server(s)


def test_api_key_by_x_api_key(locked):
    ask = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    wrong = anthropic.Anthropic(base_url=locked.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(**ask)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model="m", messages=ask["messages"])
    right = anthropic.Anthropic(base_url=locked.url, api_key=KEY, max_retries=0)
    assert right.messages.create(**ask).usage.output_tokens >= 1


def test_an_engine_fault_mid_stream_is_an_error_event(locked):
    body = {"model": "m", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": MARKER}]}
    with httpx.stream("POST", locked.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=120) as r:
        assert r.status_code == 200
        last = r.read().decode().strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error"
    err = json.loads(last[1].removeprefix("data: "))
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    assert "injected fault" in err["error"]["message"]
    client = anthropic.Anthropic(base_url=locked.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as e:
        with client.messages.stream(model="m", max_tokens=8, messages=body["messages"]) as stream:
            stream.get_final_message()
    assert e.value.body["error"]["type"] == "api_error"
    assert client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "ok"}])


def test_too_hot_is_529_overloaded(locked):
    client = anthropic.Anthropic(base_url=locked.url, api_key=KEY, max_retries=0)
    locked.sensor.write_text("95000")
    try:
        end = time.monotonic() + 10
        while httpx.get(locked.url + "/api/health").json()["thermal"]["level"] != "halted":
            assert time.monotonic() < end, "the governor did not halt"
            time.sleep(0.05)
        with pytest.raises(anthropic.APIStatusError) as e:  # OverloadedError in newer SDKs
            client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
        assert e.value.response.headers.get("retry-after")
    finally:
        locked.sensor.write_text("50000")


def _run(pieces: list[str], splitter, finish: str = "stop", stop: str | None = None) -> tuple[list, object]:
    """Text pieces as the engine would send them → Anthropic's events and the answer folded from them."""
    import asyncio

    from edgevl.server.anthropic_api import _events, _fold
    from edgevl.server.serving import Done
    from edgevl.server.wire import timings_of, usage_of
    from edgevl.types import FinishEvent, TokenEvent
    from edgevl.types import Timings as EngineTimings
    from edgevl.types import Usage as EngineUsage

    fin = FinishEvent(finish, EngineUsage(7, len(pieces)), EngineTimings(), "".join(pieces), stop)

    async def engine():
        for p in pieces:
            yield TokenEvent(p, 0)
        yield Done(fin, usage_of(fin), timings_of(fin))

    class State:
        class info:
            model_name = "m"

    async def both():
        events = [e async for e in _events(State, engine(), splitter)]

        async def again():
            for e in events:
                yield e.model_copy(deep=True)

        return events, await _fold(again())

    return asyncio.run(both())


def test_blocks_open_in_order_and_whitespace_around_calls_opens_none():
    from edgevl.server.tools import ToolCallSplitter

    call = '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'
    events, message = _run(["Sure", ", zooming.", "\n", call, "\n", " "],
                           ToolCallSplitter({"zoom"}))
    kinds = [(e.type, getattr(e, "index", None)) for e in events]
    assert kinds[:2] == [("message_start", None), ("ping", None)]
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == ["text", "tool_use"]
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Sure, zooming.\n" and message.content[1].input == {"factor": 2}
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 7
    starts = [i for i, e in enumerate(events) if e.type == "content_block_start"]
    stops = [i for i, e in enumerate(events) if e.type == "content_block_stop"]
    assert starts[0] < stops[0] < starts[1] < stops[1]  # one block at a time

    events, message = _run(["\n", call], ToolCallSplitter({"zoom"}))
    assert [b.type for b in message.content] == ["tool_use"]  # the blank line before the call is no block
    _, message = _run(["  "], None)
    assert [(b.type, b.text) for b in message.content] == [("text", "  ")]  # a blank answer is still the answer
    _, message = _run(["ab"], None, "stop", "STOP")
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    _, message = _run(["ab"], None, "length")
    assert message.stop_reason == "max_tokens"


def test_a_call_cut_short_keeps_the_input_written_so_far():
    """As the SDK's stream accumulator reads it: the whole values, not a string left open."""
    from edgevl.server.tools import ToolCallSplitter

    pieces = ['<tool_call>\n{"name": "zoom", "arguments": {"factor": 2, "note": "a', 'bc']
    events, message = _run(pieces, ToolCallSplitter({"zoom"}, stream_arguments=True), "length")
    assert message.stop_reason == "max_tokens"
    (use,) = message.content
    assert use.name == "zoom" and use.input == {"factor": 2}
    from jiter import from_json  # what the anthropic SDK parses streamed input with

    sent = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert from_json(sent.encode(), partial_mode=True) == use.input

"""OpenAI's Responses API (/v1/responses), checked with the official `openai` client and `openai-agents`.

The demo model has random weights, so the tests assert the protocol (events, items, usage, stored
conversations, refusals), never what the answer says; forced tool calls and text formats are
constrained, so their shape holds even for random weights."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from edgevl.server.response_store import ResponseStore, StoredResponse
from edgevl.server.responses_protocol import Response
from tests.server.conftest import png_b64, start_server, stop_server

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _image_input(seed: int = 0, question: str = "What is in this picture?", url: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "input_image", "image_url": url or "data:image/png;base64," + png_b64(seed=seed), "detail": "auto"},
        {"type": "input_text", "text": question}]}]


def _types(events) -> list[str]:
    return [e.type for e in events]


def test_create_with_an_image(client):
    r = client.responses.create(model="anything", input=_image_input(), instructions="Be terse.",
                                max_output_tokens=12, temperature=0.8, top_p=0.9, extra_body={"seed": 3})
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 12
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and r.usage.output_tokens <= 12
    assert r.usage.input_tokens_details.image_tokens > 0  # edgevl's extension in OpenAI's details object
    assert (r.instructions, r.max_output_tokens, r.temperature, r.top_p) == ("Be terse.", 12, 0.8, 0.9)
    raw = client.responses.create(model="m", max_output_tokens=1, instructions="Be terse.", input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": png_b64(), "detail": "high"},
                                     {"type": "input_text", "text": "What is in this picture?"}]}])
    assert raw.usage.input_tokens == r.usage.input_tokens  # raw base64 is the same picture as the data URL
    low = client.responses.create(model="m", max_output_tokens=1, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + png_b64(1024, 768), "detail": "low"},
        {"type": "input_text", "text": "?"}]}])
    high = client.responses.create(model="m", max_output_tokens=1, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + png_b64(1024, 768), "detail": "high"},
        {"type": "input_text", "text": "?"}]}])
    assert low.usage.input_tokens_details.image_tokens < high.usage.input_tokens_details.image_tokens


def test_the_same_greedy_question_answers_as_on_chat_completions(client):
    """One engine: the same conversation through both OpenAI dialects is the same prompt and answer."""
    chat = client.chat.completions.create(model="m", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(seed=7)}},
            {"type": "text", "text": "What is in this picture?"}]}])
    r = client.responses.create(model="m", instructions="Be terse.", input=_image_input(7), max_output_tokens=12,
                                temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)


def test_streamed_events_follow_the_responses_sequence_and_equal_the_whole(client):
    kw = dict(model="m", input=_image_input(1), max_output_tokens=10, temperature=0.9, extra_body={"seed": 42})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = _types(events)
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert {e.response.id for e in events if e.type.startswith("response.") and hasattr(e, "response")} == {
        events[0].response.id}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    assert events[-1].response.usage.input_tokens == whole.usage.input_tokens
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[2].item.id} == {events[-1].response.output[0].id}


def test_sse_wire_names_each_event(server):
    body = {"input": "hi", "stream": True, "max_output_tokens": 3}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/responses", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.read().decode().split("\n\n") if f.strip()]
    for frame in frames:
        event, data = frame.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    assert json.loads(frames[-1].split("data: ", 1)[1])["type"] in ("response.completed", "response.incomplete")


class Weather(BaseModel):  # bounded, so that even a random model's answer closes within its budget
    city: str = Field(max_length=12)
    sky: Literal["clear", "cloudy", "rain"]
    sunny: bool


def test_stream_helper_and_text_format_json_schema(client):
    with client.responses.stream(model="m", input="The weather?", text_format=Weather, max_output_tokens=200) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Weather)
    assert "".join(deltas) == final.output_text
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "tag": {"enum": ["a", "b"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    r = client.responses.create(model="m", input="Answer in JSON.", max_output_tokens=64,
                                text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "answer"
    obj = client.responses.create(model="m", input="JSON please.", max_output_tokens=64,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_function_call_round_trip_with_forced_tool_choice(client):
    first = client.responses.create(model="m", input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64,
                                    instructions="Use the tools.")
    assert first.status == "completed" and [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tools[0].name == "get_weather" and first.tool_choice.name == "get_weather"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, clear sky"}
    chained = client.responses.create(model="m", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                      instructions="Use the tools.", max_output_tokens=6, temperature=0)
    assert chained.status in ("completed", "incomplete") and chained.previous_response_id == first.id
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # the same conversation given back item by item (no store): the same prompt, token for token
    stateless = client.responses.create(model="m", store=False, tools=[WEATHER], instructions="Use the tools.",
                                        max_output_tokens=6, temperature=0, input=[
                                            {"role": "user", "content": "What is the weather in Paris?"},
                                            call.model_dump(exclude_none=True), result])
    assert stateless.usage.input_tokens == chained.usage.input_tokens
    assert stateless.output_text == chained.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", tools=[WEATHER], max_output_tokens=4, input=[
            {"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "call_x", "output": "?"}])
    assert e.value.body["param"] == "input.1.call_id"


def test_tool_choice_none_lists_the_tools_but_calls_none(client):
    plain = client.responses.create(model="m", input="Weather?", max_output_tokens=4, temperature=0)
    none = client.responses.create(model="m", input="Weather?", tools=[WEATHER], tool_choice="none",
                                   max_output_tokens=4, temperature=0)
    assert none.usage.input_tokens > plain.usage.input_tokens  # the template shows the tools to the model
    assert [o.type for o in none.output] == ["message"] and none.tool_choice == "none"


def test_forced_call_streams_its_arguments(client):
    with client.responses.stream(model="m", input="Weather?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=64) as s:
        events = list(s)
        final = s.get_final_response()
    types = _types(events)
    assert types[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert "response.content_part.added" not in types and "response.output_text.delta" not in types
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert len(deltas) > 1 and "".join(deltas) == done.arguments == final.output[0].arguments
    assert done.name == "get_weather" and types[-2:] == ["response.output_item.done", "response.completed"]
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])


def test_previous_response_id_reads_only_the_new_tokens(server, client):
    first = client.responses.create(model="m", input=_image_input(5), max_output_tokens=8, temperature=0)
    before = server.metric("edgevl_prefix_reused_tokens_total")
    second = client.responses.create(model="m", previous_response_id=first.id, input="And the colours?",
                                     max_output_tokens=4, temperature=0)
    reused = second.usage.input_tokens_details.cached_tokens
    assert reused >= first.usage.input_tokens  # the whole first prompt came from the KV cache
    assert second.model_extra["timings"]["prefix_reused_tokens"] == reused
    assert server.metric("edgevl_prefix_reused_tokens_total") - before >= reused
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 2
    # the same conversation given back by the client (the answer as an output_text part): the same prompt
    given_back = client.responses.create(model="m", store=False, max_output_tokens=4, temperature=0, input=[
        *_image_input(5), first.output[0].model_dump(exclude_none=True),
        {"role": "user", "content": "And the colours?"}])
    assert given_back.usage.input_tokens == second.usage.input_tokens
    # a third turn continues the second's whole conversation (its image included) without resending it
    third = client.responses.create(model="m", previous_response_id=second.id, input="Thanks.", max_output_tokens=2)
    assert third.usage.input_tokens_details.image_tokens == first.usage.input_tokens_details.image_tokens


def test_get_and_delete_a_stored_response(server, client):
    r = client.responses.create(model="m", input="hi", max_output_tokens=3, metadata={"ticket": "42"}, user="u1")
    got = client.responses.retrieve(r.id)
    assert (got.id, got.output_text, got.metadata, got.status, got.user) == (r.id, r.output_text, {"ticket": "42"},
                                                                             r.status, "u1")
    assert got.store is True
    again = httpx.get(f"{server.url}/v1/responses/{r.id}", params={"stream": "true"}, timeout=10)
    assert again.status_code == 400 and again.json()["error"]["param"] == "stream"
    client.responses.delete(r.id)
    for action in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as e:
            action(r.id)
        assert set(e.value.body) == ERROR_KEYS and e.value.body["code"] == "not_found"
    # counted by route, not by id: ids asked for never grow the metrics
    assert server.metric("edgevl_requests_total", 'endpoint="/v1/responses/{response_id}",status="404"') >= 2
    assert r.id not in httpx.get(server.url + "/metrics", timeout=10).text


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model="m", input="hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="more", previous_response_id=r.id, max_output_tokens=2)
    assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"


def test_logprobs_when_included(client):
    r = client.responses.create(model="m", input="hi", max_output_tokens=5, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens - (r.status == "completed")  # the end-of-turn token is not listed
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in lps)


@pytest.mark.parametrize("field,value,named", [
    ("tools", [{"type": "web_search"}], "tools"),
    ("tools", [{"type": "file_search", "vector_store_ids": ["v"]}], "tools"),
    ("reasoning", {"effort": "high"}, "reasoning"),
    ("background", True, "background"),
    ("truncation", "auto", "truncation"),
    ("include", ["file_search_call.results"], "include"),
    ("conversation", "conv_1", "conversation"),
    ("prompt", {"id": "pmpt_1"}, "prompt"),
    ("text", {"verbosity": "low"}, "text.verbosity"),
    ("tool_choice", {"type": "allowed_tools", "mode": "auto", "tools": []}, "tool_choice"),
    ("tool_choice", "required", "tool_choice"),
    ("max_tokens", 5, "max_tokens"),
    ("max_output_tokens", 10**7, "max_output_tokens"),
    ("service_tier", "priority", "service_tier"),
    ("top_logprobs", 3, "top_logprobs"),
    ("logit_bias", {"1": 2}, "logit_bias"),
    ("input", [{"type": "item_reference", "id": "msg_1"}], "input.0"),
    ("input", [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}], "input.0"),
    ("input", [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}], "input.0"),
    ("input", [{"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}], "input.0"),
    ("input", "   ", "input"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(server, field, value, named):
    body = {"model": "m", "input": "hi", "max_output_tokens": 4, field: value}
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["type"] == "invalid_request_error"
    assert (err["param"] or "").startswith(named) or named in err["message"], err


def test_bad_images_are_400s_in_openai_shape(client):
    for url, code in (("data:image/png;base64,@@@@", "invalid_base64"),
                      ("https://example.com/cat.png", "remote_image_refused"),
                      ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), None)):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="m", input=_image_input(url=url), max_output_tokens=2)
        assert set(e.value.body) == ERROR_KEYS and e.value.body["param"].startswith("input.0.content.0")
        assert code is None or e.value.body["code"] == code


def test_descriptive_fields_are_accepted_and_echoed(client):
    r = client.responses.create(
        model="m", input=[{"type": "message", "role": "developer", "content": "Be brief."},
                          {"type": "message", "role": "user", "id": "msg_x", "status": "completed",
                           "content": [{"type": "input_text", "text": "hi"}]}],
        max_output_tokens=2, metadata={"a": "b"}, user="someone", safety_identifier="h", prompt_cache_key="k",
        parallel_tool_calls=False, service_tier="auto", truncation="disabled", store=True,
        include=["reasoning.encrypted_content"], reasoning={"effort": None}, max_tool_calls=3,
        stream_options=None)
    assert r.metadata == {"a": "b"} and r.parallel_tool_calls is False and r.truncation == "disabled"


# ---- a second server: image URLs, an engine fault mid-stream, and a store of two ------------------
class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        body = base64.b64decode(png_b64(96, 64))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    s = start_server(tmp_path_factory, "--responses-store", "2", "--allow-remote-images", "--allow-remote-hosts",
                     "127.0.0.1", module="tests.fault_server")  # FAULT-MARKER in a prompt fails it in the engine
    yield s
    stop_server(s)


def test_remote_image_url_and_a_store_of_two(small, images):
    c = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0)
    by_url = c.responses.create(model="m", input=_image_input(url=images + "/cat.png"), max_output_tokens=2)
    inline = c.responses.create(model="m", max_output_tokens=2, input=_image_input(url=png_b64(96, 64)))
    assert by_url.usage.input_tokens == inline.usage.input_tokens
    third = c.responses.create(model="m", input="hi", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):  # the least recently used of three is gone
        c.responses.retrieve(by_url.id)
    assert c.responses.retrieve(inline.id).id == inline.id and c.responses.retrieve(third.id).id == third.id


def test_an_engine_fault_after_the_stream_began_ends_it_as_failed(small):
    c = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0)
    events = list(c.responses.create(model="m", input="FAULT-MARKER please", max_output_tokens=20, stream=True))
    assert _types(events)[:2] == ["response.created", "response.in_progress"]
    assert _types(events)[-2:] == ["error", "response.failed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-2].code == "engine_error" and events[-2].message.startswith("generation failed")
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "engine_error"
    with pytest.raises(openai.InternalServerError) as e:  # not streamed: the status line says it
        c.responses.create(model="m", input="FAULT-MARKER again", max_output_tokens=20)
    assert set(e.value.body) == ERROR_KEYS
    with pytest.raises(openai.NotFoundError):  # a failed response is not kept
        c.responses.retrieve(failed.id)


# ---- openai-agents, in its default Responses mode ----------------------------------------------------
def test_openai_agents_with_a_function_tool(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return "18 C, clear sky"

    class Report(BaseModel):
        sunny: bool

    model = agents.OpenAIResponsesModel(model="edgevl", openai_client=client)
    forced = agents.ModelSettings(tool_choice="required", max_tokens=64)
    once = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=model,
                        model_settings=forced, tool_use_behavior="stop_on_first_tool")
    # the full loop: a forced call, its output given back, then a final answer shaped by output_type
    loop = agents.Agent(name="reporter", instructions="Use the tool, then report.", tools=[get_weather],
                        model=model, model_settings=forced, output_type=Report)

    async def run() -> tuple:
        first = await agents.Runner.run(once, "What is the weather in Paris?")
        streamed = agents.Runner.run_streamed(once, "And in Rome?")
        kinds = [ev.type async for ev in streamed.stream_events()]
        full = await agents.Runner.run(loop, "Is it sunny in Oslo?", max_turns=4)
        return first, streamed, kinds, full

    first, streamed, kinds, full = asyncio.run(run())
    assert first.final_output == "18 C, clear sky" and streamed.final_output == "18 C, clear sky"
    assert "raw_response_event" in kinds and len(cities) == 3
    assert isinstance(full.final_output, Report)
    assert [type(i).__name__ for i in full.new_items] == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]


# ---- the store itself ---------------------------------------------------------------------------------
def _stored(rid: str) -> StoredResponse:
    return StoredResponse(Response(id=rid, created_at=0, model="m"), [])


def test_the_store_is_a_bounded_lru():
    store = ResponseStore(2)
    for rid in ("a", "b"):
        assert store.put(_stored(rid))
    assert store.get("a") is not None  # a is now the most recently used
    store.put(_stored("c"))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.delete("a") and not store.delete("a") and len(store) == 1
    none = ResponseStore(0)
    assert not none.put(_stored("x")) and none.get("x") is None

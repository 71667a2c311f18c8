"""Ollama's API, checked with the official `ollama` Python client over real HTTP."""

from __future__ import annotations

import base64
import io
import json

import httpx
import jsonschema
import pytest

from tests.conftest import make_image
from tests.server.conftest import png_b64

ollama = pytest.importorskip("ollama")


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def served(server) -> str:
    return httpx.get(server.url + "/api/health", timeout=10).json()["model"]


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(320, 240, seed=seed).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _ask(seed: int = 0, **extra) -> list[dict]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is in this picture?", "images": [png_b64(seed=seed)], **extra}]


def _final_figures(r) -> None:
    """The last object's figures: all there, in nanoseconds, and consistent with each other."""
    assert r.done is True and r.done_reason in ("stop", "length")
    for k in ("total_duration", "prompt_eval_duration", "eval_duration", "load_duration"):
        assert isinstance(getattr(r, k), int) and getattr(r, k) >= 0, k
    assert r.total_duration > 0 and r.total_duration >= r.prompt_eval_duration
    assert r.prompt_eval_count > 0 and r.eval_count >= 1


def test_chat_with_an_image_not_streamed(client, served):
    r = client.chat(model="llava:latest", messages=_ask(), options={"num_predict": 8, "temperature": 0})
    _final_figures(r)
    assert r.model == served and r.message.role == "assistant" and r.message.content
    assert r.eval_count <= 8
    text_only = client.chat(model="m", messages=[{"role": "user", "content": "What is in this picture?"}],
                            options={"num_predict": 1})
    assert r.prompt_eval_count > text_only.prompt_eval_count + 20  # the picture's tokens are in the prompt


def test_streaming_equals_not_streaming_for_the_same_seed(client):
    kw = dict(model="m", messages=_ask(1), options={"num_predict": 12, "seed": 7, "temperature": 0.9, "top_p": 0.95})
    whole = client.chat(**kw)
    parts = list(client.chat(stream=True, **kw))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(p.done_reason is None and p.eval_count is None for p in parts[:-1])
    last = parts[-1]
    _final_figures(last)
    assert last.message.content == ""  # the text went in the objects before it
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert (last.eval_count, last.prompt_eval_count, last.done_reason) == (
        whole.eval_count, whole.prompt_eval_count, whole.done_reason)


def test_streams_ndjson_by_default_as_ollama_does(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and all(x["done"] is False for x in lines[:-1])
    assert set(lines[0]) == {"model", "created_at", "message", "done"}  # unset fields are left out
    assert {"done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration"} <= set(lines[-1])


def test_what_ollamas_go_client_sends_nulls_and_empty_strings_for_unset_fields(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi", "images": None}], "options": None,
                "format": "", "stream": None, "tools": None, "keep_alive": None}
        with c.stream("POST", "/api/chat", json=chat) as r:  # stream null: Ollama's default, a stream
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            assert json.loads(list(r.iter_lines())[-1])["done"] is True
        gen = {"model": "m", "prompt": "hi", "suffix": "", "system": "", "template": "", "context": None,
               "options": {"num_predict": 2}, "format": "", "stream": False}
        r = c.post("/api/generate", json=gen)
        assert r.status_code == 200 and r.json()["done"] is True
        assert c.post("/api/chat", json={"model": "m", "messages": None, "stream": False}).json()["done_reason"] \
            == "load"
        # `curl -d '{...}'` as in Ollama's API reference: no JSON content type, read as JSON all the same
        form = {"content-type": "application/x-www-form-urlencoded"}
        r = c.post("/api/generate", content=json.dumps(gen), headers=form)
        assert r.status_code == 200 and r.json()["done"] is True


def test_format_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 12},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["label", "count"], "additionalProperties": False}
    r = client.chat(model="m", messages=_ask(2), format=schema, options={"num_predict": 64, "temperature": 0.8,
                                                                         "seed": 1})
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), schema)
    g = client.generate(model="m", prompt="Reply in JSON.", format="json", options={"num_predict": 48})
    assert g.done_reason == "stop" and isinstance(json.loads(g.response), dict)


def test_tools_are_accepted_and_a_call_round_trip_goes_back_through_the_template(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat(model="m", messages=ask, tools=tools, options={"num_predict": 16})
    _final_figures(r)
    for call in r.message.tool_calls or []:  # random weights: the model decides (Ollama has no tool_choice)
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    history = ask + [{"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": "18 C, clear sky", "tool_name": "get_weather"}]
    again = client.chat(model="m", messages=history, tools=tools, options={"num_predict": 4})
    assert again.done and again.prompt_eval_count > r.prompt_eval_count + 10  # the call and result are read


def test_generate_with_a_snapshot_the_way_a_camera_nvr_sends_it(client, server, served):
    """Frigate's GenAI: the Ollama client's generate(model, prompt, images=[JPEG bytes]), not streamed."""
    prompt = "Describe the person in this camera snapshot in one sentence."
    r = client.generate(model="qwen2.5vl:7b", prompt=prompt, images=[_jpeg()], options={"num_predict": 12})
    _final_figures(r)
    assert r.model == served and isinstance(r.response, str) and r.response
    # the same, as raw JSON with the base64 string, answers the same greedy text
    body = {"model": "x", "prompt": prompt, "images": [base64.b64encode(_jpeg()).decode()], "stream": False,
            "options": {"num_predict": 12, "temperature": 0}}
    a = httpx.post(server.url + "/api/generate", json=body, timeout=120).json()
    b = httpx.post(server.url + "/api/generate", json=body, timeout=120).json()
    assert a["response"] == b["response"] and a["done"] is True and "context" not in a


def test_one_engine_the_same_greedy_question_through_ollama_openai_and_edge(client, server):
    prompt, img = "What colour dominates?", png_b64(seed=3)
    gen = client.generate(model="m", prompt=prompt, images=[img], options={"num_predict": 10, "temperature": 0})
    chat = client.chat(model="m", messages=[{"role": "user", "content": prompt, "images": [img]}],
                       options={"num_predict": 10, "temperature": 0})
    edge = httpx.post(server.url + "/api/predict", json={"image": img, "prompt": prompt, "max_tokens": 10,
                                                         "temperature": 0}, timeout=120).json()
    v1 = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "max_tokens": 10, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": prompt}]}]}).json()
    assert gen.response == chat.message.content == edge["answer"] == v1["choices"][0]["message"]["content"]
    assert gen.prompt_eval_count == chat.prompt_eval_count == edge["usage"]["prompt_tokens"] \
        == v1["usage"]["prompt_tokens"]
    assert gen.eval_count == chat.eval_count == edge["usage"]["completion_tokens"]


def test_options_are_honoured_or_refused_by_name(client):
    base = dict(model="m", messages=[{"role": "user", "content": "Count."}])
    short = client.chat(**base, options={"num_predict": 3, "temperature": 0, "stop": ["zzz-never"]})
    assert short.eval_count <= 3
    same = client.chat(**base, options={"num_predict": 3, "temperature": 0, "mirostat": 0, "min_p": 0.0,
                                         "typical_p": 1.0, "num_thread": 2, "use_mmap": True, "num_keep": 4,
                                         "repeat_last_n": 64, "repeat_penalty": 1.0})
    assert same.message.content == short.message.content  # neutral and load-time options change nothing
    for opts, name in [({"mirostat": 2}, "mirostat"), ({"min_p": 0.05}, "min_p"), ({"typical_p": 0.7}, "typical_p"),
                       ({"tfs_z": 0.9}, "tfs_z"), ({"bogus_option": 1}, "bogus_option"),
                       ({"repeat_penalty": 1.3, "repeat_last_n": 64}, "repeat_last_n"),
                       ({"repeat_penalty": 1.3, "penalize_newline": False}, "penalize_newline"),
                       ({"num_predict": 10**7}, "num_predict"), ({"num_ctx": 10**7}, "num_ctx")]:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(**base, options=opts)
        assert e.value.status_code == 400 and name in e.value.error, (opts, e.value.error)
    penalised = client.chat(**base, options={"num_predict": 3, "repeat_penalty": 1.3, "repeat_last_n": -1})
    assert penalised.done


def test_num_ctx_is_this_requests_context_window(client):
    base = dict(model="m", messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}])
    first = client.chat(**base, options={"num_predict": 1})
    cut = client.chat(**base, options={"num_ctx": first.prompt_eval_count + 2, "num_predict": 50, "temperature": 0})
    assert cut.eval_count <= 2
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(**base, options={"num_ctx": first.prompt_eval_count - 1})
    assert e.value.status_code == 400 and "context" in e.value.error


def test_logprobs(client):
    r = client.chat(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2,
                    options={"num_predict": 4, "temperature": 0})
    assert 1 <= len(r.logprobs) <= r.eval_count
    for lp in r.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].logprob >= lp.logprob - 1e-6  # greedy: nothing likelier than the choice


def test_an_empty_request_only_loads_the_model(client, served):
    r = client.chat(model="m", messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    g = client.generate(model="m", keep_alive="10m")
    assert g.done and g.done_reason == "load" and g.model == served


def test_list_show_ps_version(client, served, server):
    models = client.list().models
    assert [m.model for m in models] == [served]
    assert models[0].details.family == "qwen3vl" and models[0].size > 0 and len(models[0].digest) == 64
    shown = client.show("whatever:7b")
    assert {"completion", "vision", "tools"} <= set(shown.capabilities) and "thinking" not in shown.capabilities
    health = httpx.get(server.url + "/api/health", timeout=10).json()
    assert shown.modelinfo["qwen3vl.context_length"] == health["max_context"]
    assert "num_ctx" in shown.parameters
    running = client.ps().models
    assert running[0].model == served and running[0].context_length == health["max_context"]
    version = httpx.get(server.url + "/api/version", timeout=10).json()["version"]
    assert [int(x) for x in version.split(".")] >= [0, 12, 11]
    assert httpx.head(server.url + "/", timeout=10).status_code == 200  # the Ollama CLI's heartbeat


def test_errors_in_ollamas_shape_with_what_to_do_instead(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2")
    assert e.value.status_code == 400 and "--model" in e.value.error
    for call in (lambda: client.create("mario", from_="llama3"), lambda: client.copy("a", "b"),
                 lambda: client.embed("m", "hi"), lambda: client.push("me/m")):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and "edgevl" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("m")
    assert e.value.status_code == 400 and "--model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # not a picture (valid base64, though)
        client.chat(model="m", messages=[{"role": "user", "content": "hi", "images": ["aGVsbG8gd29ybGQ="]}])
    assert e.value.status_code == 400 and "cannot decode image" in e.value.error and "0x" not in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="m", messages=[{"role": "user", "content": "hi", "images": ["aGVsbG8="] * 9}])
    assert e.value.status_code == 400 and "limit is 8" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="m", messages=[{"role": "user", "content": "hi"}], think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    assert client.chat(model="m", messages=[{"role": "user", "content": "hi"}], think=False,
                       options={"num_predict": 1}).done
    for body, word in [({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "raw": True}, "raw"),
                       ({"prompt": "x", "context": [1, 2]}, "context"), ({"prompt": "x", "template": "{{ .P }}"},
                                                                          "template"),
                       ({"prompt": "x", "images": ["@@@"]}, "images.0"), ({"prompt": "x", "format": "yaml"}, "format")]:
        r = httpx.post(server.url + "/api/generate", json={"model": "m", **body}, timeout=60)
        assert r.status_code == 400 and set(r.json()) == {"error"} and word in r.json()["error"], (body, r.text)
    assert httpx.get(server.url + "/api/chat", timeout=10).json().keys() == {"error"}  # 405, Ollama's shape
    # the edge API under /api keeps its own errors
    assert "message" in httpx.post(server.url + "/api/predict", json={}, timeout=10).json()["error"]


def test_metrics_count_the_ollama_endpoints(client, server):
    before = server.metric("edgevl_requests_total", 'endpoint="/api/generate",status="200"')
    client.generate(model="m", prompt="hi", options={"num_predict": 1})
    assert server.metric("edgevl_requests_total", 'endpoint="/api/generate",status="200"') == before + 1


def test_an_error_after_the_first_object_is_the_streams_last_line_in_ollamas_shape():
    import asyncio

    from edgevl.server import ollama_api
    from edgevl.server.errors import ApiError
    from edgevl.server.ollama_protocol import GenerateFrame
    from edgevl.server.wire import ndjson

    async def frames():
        yield GenerateFrame(model="m", created_at="t", response="a")
        raise ApiError("the request timed out", "timeout")

    async def read() -> bytes:
        return b"".join([chunk async for chunk in ndjson(frames(), ollama_api.shape).body_iterator])

    lines = [json.loads(x) for x in asyncio.run(read()).splitlines()]
    assert lines == [{"model": "m", "created_at": "t", "done": False, "response": "a"},
                     {"error": "the request timed out", "done": True}]

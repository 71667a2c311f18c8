"""Schemathesis against the server's own OpenAPI schema: no 5xx, every error in the documented shape.

The cases come from schemathesis' hypothesis strategies, run by a plain test, so the suite does not
depend on its pytest plugin (which trails pytest releases).
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import start_server, stop_server

schemathesis = pytest.importorskip("schemathesis")
SEEN: dict[str, dict[int, int]] = {}
OLLAMA_PATHS = {"/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version", "/api/pull",
                "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/embed", "/api/embeddings",
                "/api/blobs/{digest}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # small answers keep every generated request cheap; the limits are what the fuzzer should hit
    s = start_server(tmp_path_factory, "--max-tokens", "8", "--default-max-tokens", "4", "--queue-size", "64",
                     "--max-pixels", "65536")
    yield s
    stop_server(s)


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [r.ok() for r in schema.get_all_operations()]


def test_every_operation_survives_generated_requests(fuzz_server):
    ops = _operations(fuzz_server.url)
    assert {op.path for op in ops} >= {"/api/predict", "/api/ocr", "/api/detect", "/api/health",
                                       "/v1/chat/completions", "/v1/models", "/v1/responses",
                                       "/v1/responses/{response_id}", *OLLAMA_PATHS}
    for op in ops:
        _check(op, SEEN.setdefault(f"{op.method.upper()} {op.path}", {}), fuzz_server.url)()
    print("fuzz statuses:", SEEN)


def _check(op, seen: dict[int, int], url: str):
    @given(case=op.as_strategy())
    @settings(max_examples=int(os.environ.get("EDGEVL_FUZZ_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        r = case.call(base_url=url, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.path, r.status_code, r.text[:300])
        if r.status_code >= 400 and op.path in OLLAMA_PATHS:  # Ollama's shape: one string
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str) and r.json()["error"]
        elif r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]

    return check


def test_server_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.proc.poll() is None
    assert httpx.get(fuzz_server.url + "/api/health", timeout=10).json()["status"] == "ok"
    assert httpx.post(fuzz_server.url + "/api/predict", json={"prompt": "ok?", "max_tokens": 2},
                      timeout=60).status_code == 200


def _schemas():
    from hypothesis import strategies as st

    leaf = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
                            {"enum": ["a", "b"]}, {"$ref": "#"}, {"type": "nonsense"}, {}])
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": [k for k in props if req]},
                  st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3), st.booleans()),
        st.builds(lambda items, n: {"type": "array", "items": items, "minItems": n}, inner, st.integers(0, 2)),
        st.builds(lambda opts: {"anyOf": opts}, st.lists(inner, min_size=1, max_size=3))), max_leaves=6)


def test_chat_with_tools_logprobs_and_detail_never_5xx(fuzz_server):
    """Past validation: requests that reach the grammar compiler and the engine with random tools,
    tool choices, logprobs and image details (schemathesis' random bodies rarely get that far)."""
    from hypothesis import strategies as st

    from tests.server.conftest import png_b64

    image = "data:image/png;base64," + png_b64(64, 48)
    tools = st.lists(st.builds(lambda n, p: {"type": "function", "function": {"name": n, "parameters": p}},
                               st.sampled_from(["f", "g", "h"]), _schemas()), max_size=3)
    choice = st.one_of(st.none(), st.sampled_from(["auto", "none", "required"]),
                       st.sampled_from(["f", "g", "x"]).map(lambda n: {"type": "function", "function": {"name": n}}))
    body = st.fixed_dictionaries({
        "messages": st.just([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image, "detail": "low"}}, {"type": "text", "text": "hi"}]}]),
        "tools": tools, "tool_choice": choice, "parallel_tool_calls": st.booleans(),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "stream": st.booleans(),
        "max_tokens": st.integers(1, 8)}).map(lambda b: {k: v for k, v in b.items() if v is not None})

    @given(b=body)
    @settings(max_examples=int(os.environ.get("EDGEVL_FUZZ_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(b: dict) -> None:
        if not b["tools"]:
            b.pop("tool_choice", None)
        r = httpx.post(fuzz_server.url + "/v1/chat/completions", json=b, timeout=60)
        SEEN.setdefault("chat+tools", {}).setdefault(r.status_code, 0)
        SEEN["chat+tools"][r.status_code] += 1
        assert r.status_code < 500, (b, r.status_code, r.text[:300])
        assert '"server_error"' not in r.text, r.text[:300]

    check()
    print("chat+tools statuses:", SEEN["chat+tools"])


def test_ollama_chat_with_formats_tools_and_options_never_5xx(fuzz_server):
    """Past validation on Ollama's /api/chat: random `format` schemas reach the grammar compiler, random
    options the sampler, random tools the template; every answer is a 2xx or Ollama's 4xx."""
    from hypothesis import strategies as st

    from tests.server.conftest import png_b64

    image = png_b64(64, 48)
    tools = st.lists(st.builds(lambda n, p: {"type": "function", "function": {"name": n, "parameters": p}},
                               st.sampled_from(["f", "g", "h"]), _schemas()), max_size=3)
    options = st.fixed_dictionaries({}, optional={
        "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-5, 2000),
        "num_predict": st.integers(-3, 10), "seed": st.integers(-2, 2**40), "repeat_penalty": st.floats(0, 3),
        "repeat_last_n": st.integers(-2, 100), "num_ctx": st.integers(-1, 10**6), "min_p": st.floats(0, 1),
        "mirostat": st.integers(0, 2), "stop": st.lists(st.text(max_size=3), max_size=3),
        "penalize_newline": st.booleans(), "presence_penalty": st.floats(-3, 3)})
    body = st.fixed_dictionaries({
        "model": st.text(max_size=8),
        "messages": st.just([{"role": "user", "content": "hi", "images": [image]}]),
        "format": st.one_of(st.none(), st.sampled_from(["", "json", "xml"]), _schemas()),
        "tools": tools, "options": options, "stream": st.booleans(), "think": st.sampled_from([None, False, True]),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 25)}).map(
        lambda b: {k: v for k, v in b.items() if v is not None})

    @given(b=body)
    @settings(max_examples=int(os.environ.get("EDGEVL_FUZZ_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(b: dict) -> None:
        r = httpx.post(fuzz_server.url + "/api/chat", json=b, timeout=60)
        SEEN.setdefault("ollama chat", {}).setdefault(r.status_code, 0)
        SEEN["ollama chat"][r.status_code] += 1
        assert r.status_code < 500, (b, r.status_code, r.text[:300])
        lines = [json.loads(x) for x in r.text.splitlines() if x]
        if r.status_code >= 400:
            assert lines[0].keys() == {"error"}, r.text[:300]
        else:  # a stream's error arrives as its last line, in the same shape
            assert lines[-1]["done"] is True and "error" not in lines[-1], r.text[-300:]

    check()
    print("ollama chat statuses:", SEEN["ollama chat"])



def test_responses_with_tools_formats_and_stored_turns_never_5xx(fuzz_server):
    """Past validation on /v1/responses: random function tools and tool choices, text formats, logprobs,
    streams, and previous_response_id pointing at stored, unknown and deleted responses."""
    from hypothesis import strategies as st

    from tests.server.conftest import png_b64

    image = "data:image/png;base64," + png_b64(64, 48)
    stored = httpx.post(fuzz_server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 2},
                        timeout=60).json()["id"]
    deleted = httpx.post(fuzz_server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 2},
                         timeout=60).json()["id"]
    assert httpx.delete(f"{fuzz_server.url}/v1/responses/{deleted}", timeout=10).status_code == 200
    tools = st.lists(st.builds(lambda n, p: {"type": "function", "name": n, "parameters": p},
                               st.sampled_from(["f", "g", "h"]), _schemas()), max_size=3)
    choice = st.one_of(st.none(), st.sampled_from(["auto", "none", "required"]),
                       st.sampled_from(["f", "g", "x"]).map(lambda n: {"type": "function", "name": n}))
    fmt = st.one_of(st.none(), st.just({"format": {"type": "json_object"}}),
                    _schemas().map(lambda s: {"format": {"type": "json_schema", "name": "s", "schema": s}}))
    item = st.sampled_from([
        {"role": "user", "content": [{"type": "input_image", "image_url": image, "detail": "low"},
                                     {"type": "input_text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_image", "image_url": image}]},
        {"role": "developer", "content": "be brief"}])
    body = st.fixed_dictionaries({
        "input": st.one_of(st.just("hi"), st.lists(item, min_size=1, max_size=4)),
        "tools": tools, "tool_choice": choice, "text": fmt, "parallel_tool_calls": st.booleans(),
        "previous_response_id": st.sampled_from([None, stored, deleted, "resp_unknown"]),
        "include": st.sampled_from([None, ["message.output_text.logprobs"]]), "top_logprobs": st.integers(0, 3),
        "stream": st.booleans(), "store": st.booleans(), "max_output_tokens": st.integers(1, 8)}).map(
        lambda b: {k: v for k, v in b.items() if v is not None})

    @given(b=body)
    @settings(max_examples=int(os.environ.get("EDGEVL_FUZZ_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(b: dict) -> None:
        if not b["tools"]:
            b.pop("tool_choice", None)
        if "include" not in b:
            b.pop("top_logprobs")
        r = httpx.post(fuzz_server.url + "/v1/responses", json=b, timeout=60)
        SEEN.setdefault("responses", {}).setdefault(r.status_code, 0)
        SEEN["responses"][r.status_code] += 1
        assert r.status_code < 500, (b, r.status_code, r.text[:300])
        assert '"server_error"' not in r.text and "response.failed" not in r.text, r.text[:300]
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    print("responses statuses:", SEEN["responses"])

"""langchain-openai's ChatOpenAI: a `bind_tools` round trip, `with_structured_output` with a nested
model (its json_schema and function_calling methods), and a stream that reports usage."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

pytest.importorskip("langchain_openai")
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402


@tool
def zoom(factor: int) -> str:
    """Zoom the camera by a whole factor."""
    return f"zoomed x{factor}"


class Shelf(BaseModel):
    # closed (additionalProperties false): an open schema lets the demo model write keys of its own
    model_config = ConfigDict(extra="forbid")
    label: str = Field(max_length=16)
    items: int = Field(ge=0, le=50)


class Store(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=20)
    top_shelf: Shelf


def _llm(base_url: str, model: str, max_tokens: int, **kw) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=base_url, api_key="unused", temperature=0, max_tokens=max_tokens,
                      max_retries=0, **kw)


def _picture(image_url: str, text: str) -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": text},
                                 {"type": "image_url", "image_url": {"url": image_url}}])


def test_bind_tools_round_trip(base_url, model, image_url):
    llm = _llm(base_url, model, 60)
    messages: list = [_picture(image_url, "Zoom in on the shelf.")]
    ai = llm.bind_tools([zoom], tool_choice="zoom").invoke(messages)
    assert isinstance(ai, AIMessage) and [c["name"] for c in ai.tool_calls] == ["zoom"]
    assert isinstance(ai.tool_calls[0]["args"]["factor"], int)
    messages.append(ai)
    for call in ai.tool_calls:
        result = zoom.invoke(call)  # a ToolMessage carrying the call's id and the tool's name
        assert isinstance(result, ToolMessage)
        messages.append(result)
    answer = _llm(base_url, model, 6).bind_tools([zoom]).invoke(messages)
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_with_a_nested_model(base_url, model, image_url, method):
    llm = _llm(base_url, model, 120).with_structured_output(Store, method=method, include_raw=True)
    out = llm.invoke([_picture(image_url, "Describe the store.")])
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Store) and isinstance(out["parsed"].top_shelf, Shelf)


def test_streaming_reports_usage(base_url, model, image_url):
    llm = _llm(base_url, model, 6, stream_usage=True)
    chunks = list(llm.stream([_picture(image_url, "What is on the shelf?")]))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) > 1
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    usage = total.usage_metadata
    assert usage is not None and usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 6
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert isinstance(total.content, str) and total.content

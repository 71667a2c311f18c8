"""openai-agents on its Chat Completions model class: an agent with a function tool and an
`output_type`. `tool_choice="required"` makes the first turn call the tool; the SDK then resets it
(its `reset_tool_choice` default), and the structured output comes through `response_format`."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel, ConfigDict, Field

pytest.importorskip("agents")
from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem  # noqa: E402
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402


class Reading(BaseModel):
    # closed (additionalProperties false): an open schema lets the demo model write keys of its own
    model_config = ConfigDict(extra="forbid")
    value: int = Field(ge=-50, le=50)
    unit: str = Field(max_length=4)


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    reading: Reading


@pytest.fixture
def agent(base_url: str, model: str) -> tuple[Agent, list[str]]:
    set_tracing_disabled(True)  # no trace upload to OpenAI's servers
    calls: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """The temperature in a city."""
        calls.append(city)
        return "21 C"

    # a fresh client per test: each run has its own event loop, and an async client keeps its first
    chat = OpenAIChatCompletionsModel(model=model, openai_client=AsyncOpenAI(base_url=base_url, api_key="unused",
                                                                            max_retries=0))
    agent = Agent(name="weather", instructions="Report the weather.", tools=[weather], output_type=Report,
                  model=chat, model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=120))
    return agent, calls


def _check(result, calls: list[str]) -> None:
    assert isinstance(result.final_output, Report) and isinstance(result.final_output.reading, Reading)
    assert len(calls) == 1
    assert any(isinstance(i, ToolCallItem) for i in result.new_items)
    assert any(isinstance(i, ToolCallOutputItem) for i in result.new_items)


def test_a_function_tool_and_an_output_type(agent):
    agent, calls = agent
    _check(Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3), calls)


def test_streamed(agent):
    agent, calls = agent

    async def run():
        result = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=3)
        kinds = {event.type async for event in result.stream_events()}
        return result, kinds

    result, kinds = asyncio.run(run())
    assert {"raw_response_event", "run_item_stream_event"} <= kinds
    _check(result, calls)

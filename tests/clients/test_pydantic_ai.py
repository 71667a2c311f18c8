"""pydantic-ai: an agent with a function tool and a nested output type, streamed, on the OpenAI chat
model class. Its first step is made to call the tool and its second to return the output (through
pydantic-ai's output tool), since the demo model cannot choose."""

from __future__ import annotations

import asyncio
import base64

import pytest
from pydantic import BaseModel, ConfigDict, Field

pytest.importorskip("pydantic_ai")
from pydantic_ai import Agent, RunContext  # noqa: E402
from pydantic_ai.messages import BinaryContent, ToolCallPart, ToolReturnPart  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402
from pydantic_ai.settings import ModelSettings  # noqa: E402


class Reading(BaseModel):
    # closed (additionalProperties false): an open schema lets the demo model write keys of its own
    model_config = ConfigDict(extra="forbid")
    value: int = Field(ge=-50, le=50)
    unit: str = Field(max_length=4)


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=20)
    reading: Reading


def _tool_then_output(ctx: RunContext) -> ModelSettings:
    # step 1: the weather tool, named; after it: function tools off, so only the output tool is left
    return {"tool_choice": ["weather"] if ctx.run_step <= 1 else "none"}


def test_an_agent_with_a_tool_and_a_nested_output_streamed(base_url, model, image_url):
    chat = OpenAIChatModel(model, provider=OpenAIProvider(base_url=base_url, api_key="unused"))
    agent = Agent(chat, output_type=Report, model_settings={"temperature": 0, "max_tokens": 120},
                  retries=1, instructions="Report the weather.")
    calls: list[str] = []

    @agent.tool_plain
    def weather(city: str) -> str:
        """The temperature in a city."""
        calls.append(city)
        return "21 C"

    async def run() -> tuple[list[Report], Report, list]:
        partial: list[Report] = []
        photo = BinaryContent(base64.b64decode(image_url.split(",", 1)[1]), media_type="image/png")
        prompt = ["What is the weather in the city in this photo?", photo]
        async with agent.run_stream(prompt, model_settings=_tool_then_output) as result:
            async for out in result.stream_output(debounce_by=None):
                partial.append(out)
            return partial, await result.get_output(), result.all_messages()

    partial, output, messages = asyncio.run(run())
    assert len(calls) == 1  # the tool ran once, its return went back to the model
    assert isinstance(output, Report) and isinstance(output.reading, Reading)
    assert partial and all(isinstance(p, Report) for p in partial)
    parts = [p for m in messages for p in m.parts]
    assert any(isinstance(p, ToolCallPart) and p.tool_name == "weather" for p in parts)
    assert any(isinstance(p, ToolReturnPart) and p.tool_name == "weather" for p in parts)

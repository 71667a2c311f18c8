"""What a request asks of decoding: a JSON-schema constraint (response_format and its kin) and the
tools (listed for the model; a forced call constrains decoding to calls), each compiled off the event loop."""

from __future__ import annotations

import asyncio
from typing import Protocol

from edgevl.server.tools import TAIL_TOKENS, ToolCallSplitter, call_schema, check_parameters
from edgevl.types import GenerationRequest, SamplingParams

CLOSING_TOKENS = 4  # what a reasoning budget forces after the thought ("\n</think>\n\n"), with a token to spare


def answer_room(state, params: SamplingParams) -> int:
    """Tokens a constrained answer can count on: a thinking model's thought comes first, and takes at
    most its budget and the closing markup (an unbounded thought may leave less, and the answer ends
    at max_tokens with finish_reason "length")."""
    n = params.max_new_tokens
    budget = params.reasoning_budget if params.reasoning_budget is not None else state.settings.reasoning_budget
    if not state.info.thinking or budget < 0:
        return n
    return max(1, n - budget - CLOSING_TOKENS)


async def constraint_for(state, schema: dict | None, params: SamplingParams):
    """A JSON-schema constraint from the engine (compiled off the event loop: the first costs ~1 s)."""
    return await asyncio.to_thread(state.engine.json_constraint, schema, answer_room(state, params))


class ToolRequest(Protocol):
    """What a dialect's request says about tools (the chat request's Tooling, the Responses request)."""

    parallel_tool_calls: bool | None

    def tool_mode(self) -> str: ...  # none | auto | required | the one function's name

    def forces_tool_call(self) -> bool: ...

    def tool_dicts(self) -> list[dict] | None: ...  # in the chat shape: {"type": "function", "function": {...}}


async def prepare_tools(state, req: GenerationRequest, body: ToolRequest) -> ToolCallSplitter | None:
    """Lists the tools for the model (even with tool_choice none, as OpenAI does); a forced call
    (required, or a named function) constrains decoding to tool calls and nothing else.
    → what finds the calls in the answer (None when none are wanted)."""
    mode, parallel = body.tool_mode(), body.parallel_tool_calls is not False
    req.tools = body.tool_dicts()
    if req.tools:  # whatever the tool_choice, as documented; bounded, and still not for the event loop
        await asyncio.to_thread(check_parameters, req.tools)
    if mode == "none":
        return None
    if body.forces_tool_call():
        only = None if mode == "required" else mode
        schema = await asyncio.to_thread(call_schema, req.tools, only)
        budget = max(1, answer_room(state, req.params) - TAIL_TOKENS)
        req.constraint = await asyncio.to_thread(state.engine.tool_call_constraint, schema, parallel and only is None,
                                                 budget)
    # only a grammar guarantees a block is a call, so only then may its arguments stream before it closes
    return ToolCallSplitter({t["function"]["name"] for t in req.tools}, 64 if parallel else 1,
                            stream_arguments=body.forces_tool_call())

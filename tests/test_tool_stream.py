"""The splitter streams a constrained call's arguments as they are written, whatever the token
boundaries; without a grammar it still gives each call whole when its block closes."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from edgevl.server.openai_api import _fold
from edgevl.server.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    FunctionDelta,
    OpenAIUsage,
    Timings,
    ToolCallDelta,
)
from edgevl.server.tools import CallPiece, ToolCallSplitter

NAMES = {"search", "zoom", "noop"}
ARGUMENTS = [
    '{"query": "weather", "limit": 3}',
    '{"a": {"b": {"c": [1, {"d": {}}]}}}',  # ends in a run of braces: only the last is the call's
    '{"s": "}", "t": "{}}", "u": "\\"}\\"", "v": "line\\nnext\\\\"}',
    '{"city": "Zürich", "note": "漢字 \U0001F600 \\u00e9", "x": -1.5e3}',
    '{}',
    '{"html": "a < b </tool", "pad": "trailing  ", "ok": true, "n": null}',
]


def block(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(splitter: ToolCallSplitter, pieces: list[str]) -> tuple[str, list[CallPiece]]:
    text, out = "", []
    for p in pieces:
        t, c = splitter.feed(p)
        text, out = text + t, out + c
    t, c = splitter.flush()
    return text + t, out + c


def by_call(pieces: list[CallPiece]) -> dict[int, list[CallPiece]]:
    calls: dict[int, list[CallPiece]] = {}
    for p in pieces:
        calls.setdefault(p.index, []).append(p)
    return calls


def check_streamed(pieces: list[CallPiece], expected: list[tuple[str, str]]) -> None:
    """Header first (name, empty arguments), then fragments only; they add up to the arguments."""
    calls = by_call(pieces)
    assert sorted(calls) == list(range(len(expected)))
    assert [p.index for p in pieces] == sorted(p.index for p in pieces)  # one call after the other
    for i, (name, args) in enumerate(expected):
        head, *rest = calls[i]
        assert (head.name, head.arguments) == (name, "")
        assert all(p.name is None and p.arguments for p in rest)
        joined = "".join(p.arguments for p in rest)
        assert joined == args and isinstance(json.loads(joined), dict)


def splits(text: str, n: int = 60) -> list[list[str]]:
    rng = random.Random(text)
    return [list(text), [text]] + [random_pieces(text, rng) for _ in range(n)]


@pytest.mark.parametrize("args", ARGUMENTS)
def test_constrained_arguments_stream_exactly_for_any_split(args):
    text = block("search", args)
    for pieces in splits(text):
        s = ToolCallSplitter(NAMES, stream_arguments=True)
        shown, out = run(s, pieces)
        assert shown == ""
        check_streamed(out, [("search", args)])
        assert [(c.name, c.arguments) for c in s.calls] == [("search", args)]


def test_two_parallel_calls_in_one_answer():
    a, b = ARGUMENTS[2], ARGUMENTS[4]
    text = block("search", a) + "\n" + block("noop", b)
    for pieces in splits(text):
        s = ToolCallSplitter(NAMES, stream_arguments=True)
        shown, out = run(s, pieces)
        assert shown == ""  # the newline between the blocks is no content, however it arrives
        check_streamed(out, [("search", a), ("noop", b)])


@pytest.mark.parametrize("args", ARGUMENTS)
def test_the_header_comes_with_the_name_and_only_the_outer_brace_is_held(args):
    s = ToolCallSplitter(NAMES, stream_arguments=True)
    head = '<tool_call>\n{"name": "zoom", "arguments":'
    assert s.feed(head[:-1]) == ("", [])
    assert s.feed(":") == ("", [CallPiece(0, "", "zoom")])
    sent = "".join(p.arguments for p in s.feed(" " + args)[1])
    assert sent == args[:-1].rstrip()  # its last brace may yet be the call's
    sent += "".join(p.arguments for p in s.feed("}")[1])
    assert sent == args  # a second brace: the first was the arguments'
    assert s.feed("\n</tool_call>") == ("", [])


def test_a_call_cut_short_ends_with_what_was_written():
    text = block("search", ARGUMENTS[0])
    cut = text.index("3}")  # max_tokens reached inside the arguments
    s = ToolCallSplitter(NAMES, stream_arguments=True)
    shown, out = run(s, list(text[:cut]))
    assert shown == "" and "".join(p.arguments for p in out) == '{"query": "weather", "limit":'
    assert s.calls[0].arguments == '{"query": "weather", "limit":'
    whole = ToolCallSplitter(NAMES, stream_arguments=True)  # cut after the arguments closed: complete
    _, out = run(whole, [text[:text.index("\n</tool_call>")] + "\n</tool"])
    assert "".join(p.arguments for p in out) == ARGUMENTS[0]


@pytest.mark.parametrize("cut", ["<tool_call>", '<tool_call>\n{"', '<tool_call>\n{"name": "zo'])
def test_a_constrained_block_cut_before_its_name_shows_no_markup(cut):
    forced = ToolCallSplitter(NAMES, stream_arguments=True)
    assert run(forced, list(cut)) == ("", []) and not forced.calls  # the grammar wrote it: never text
    free = ToolCallSplitter(NAMES)
    assert run(free, list(cut)) == (cut, [])  # the model wrote it unasked: its text, as written


def test_a_constrained_block_naming_no_tool_is_judged_when_it_closes():
    text = block("other", "{}")
    s = ToolCallSplitter(NAMES, stream_arguments=True)
    assert run(s, list(text)) == (text, []) and not s.calls


@pytest.mark.parametrize("args", ARGUMENTS)
def test_auto_mode_still_gives_each_call_whole_when_it_closes(args):
    text = "Let me look.\n" + block("search", args) + "\n" + block("nope", "{}") + " ok"
    normal = json.dumps(json.loads(args), ensure_ascii=False)
    for pieces in splits(text, 20):
        s = ToolCallSplitter(NAMES)
        shown, out = run(s, pieces)
        assert out == [CallPiece(0, normal, "search")]
        assert shown == "Let me look.\n" + block("nope", "{}") + " ok"
        # nothing of the call is shown before its block closes: it might have been text
        partial = ToolCallSplitter(NAMES)
        assert run(partial, [text[:text.index("</tool_call>")]]) == (text[:text.index("</tool_call>")], [])


def test_the_folded_answer_merges_deltas_by_index_and_keeps_the_header_id():
    def chunk(*deltas: ToolCallDelta, finish: str | None = None) -> ChatCompletionChunk:
        timings = Timings(ttft_ms=0, total_ms=0, tokens_per_s=0, preprocess_ms=0, vision_ms=0, prefill_ms=0)
        return ChatCompletionChunk(id="c", created=0, model="m", timings=timings, choices=[
            ChunkChoice(delta=Delta(tool_calls=list(deltas) or None), finish_reason=finish)])

    def header(i: int, name: str) -> ToolCallDelta:
        return ToolCallDelta(index=i, id=f"call_{i}", type="function", function=FunctionDelta(name=name, arguments=""))

    def frag(i: int, text: str) -> ToolCallDelta:
        return ToolCallDelta(index=i, function=FunctionDelta(arguments=text))

    chunks = [chunk(header(0, "search"), frag(0, '{"q"')), chunk(frag(0, ': "}"')), chunk(frag(0, "}")),
              chunk(header(1, "zoom")), chunk(frag(1, "{}"), finish="tool_calls"),
              ChatCompletionChunk(id="c", created=0, model="m", choices=[],
                                  usage=OpenAIUsage(prompt_tokens=1, completion_tokens=2, total_tokens=3))]

    async def fold():
        async def gen():
            for c in chunks:
                yield c
        return await _fold(gen())

    message = asyncio.run(fold()).choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_0", "search", '{"q": "}"}'), ("call_1", "zoom", "{}")]
    assert message.content is None

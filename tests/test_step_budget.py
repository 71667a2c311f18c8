"""The step budget (runtime/step_budget.py): how much of a newcomer's work a step carries, from the
times the loop measured — and that the loop feeds it while answers stream."""

from __future__ import annotations

import threading

import pytest

from edgevl.runtime.engine import OrtEngine
from edgevl.runtime.step_budget import StepBudget
from edgevl.types import EngineOptions, FinishEvent, GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.conftest import make_image


def test_prompt_tokens_follow_the_measured_times():
    b = StepBudget(stretch=1.5, max_tokens=64)
    assert b.prompt_tokens(3) == 61  # nothing timed yet: the cap
    b.observe_decode(3, 0.100)
    assert b.allowance(3) == pytest.approx(0.050)
    assert b.prompt_tokens(3) == 4  # a prompt token not yet timed: guessed at an eighth of the step
    b.observe_mixed(3, 4, 0.110)  # 10 ms more for 4 tokens: 2.5 ms each
    assert b.token_s == pytest.approx(0.0025)
    assert b.prompt_tokens(3) == 20
    assert b.prompt_tokens(2) == 20  # 2 rows never ran alone: 3 rows' step stands in
    b.observe_mixed(3, 10, 0.600)  # a slow step moves the average, not all the way
    assert 0.0025 < b.token_s < 0.050
    assert 1 <= b.prompt_tokens(3) < 20
    assert StepBudget(stretch=1.0, max_tokens=64, decode_s={1: 0.1}).prompt_tokens(1) == 1  # always moves on
    assert StepBudget(stretch=3.0, max_tokens=8, token_s=1e-6, decode_s={1: 0.1}).prompt_tokens(1) == 7  # the cap


def test_a_mixed_step_faster_than_the_plain_one_is_not_a_negative_cost():
    b = StepBudget(stretch=1.4, max_tokens=32, decode_s={4: 0.1})
    b.observe_mixed(4, 8, 0.09)
    assert b.token_s == 0.0
    assert b.prompt_tokens(4) == 28


@pytest.fixture(scope="module")
def sliced(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefix_cache=False, vision_cache_entries=0))
    yield e
    e.close()


def _picture(seed: int) -> GenerationRequest:
    return GenerationRequest([Message("user", [ImagePart(make_image(256, 192, seed=seed)), TextPart("What?")])],
                             SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))


def test_vision_slices_fit_the_time_each_kind_has_taken(sliced):
    patches = sliced.prompts.build(_picture(1)).patches[0]
    n = len(sliced.model.vision_job(patches).costs)
    assert n > 3
    kinds = {"embed", "blocks", "qkv", "rest", "merger"}

    def calls(unit_s: float) -> tuple[int, int]:
        b = StepBudget(stretch=1.5, max_tokens=10**6, decode_s={1: 0.1})
        job, k = sliced.model.vision_job(patches), 0
        while not job.done:
            b.vision_unit_s = dict.fromkeys(kinds, unit_s)  # not what it learns of the tiny model: fast
            b.run_vision(job, rows=1)
            k += 1
        return k, len(job.costs)

    # every slice expected to take far longer than 50 ms: one a step, those over the picture's 192
    # patches cut to their shortest (MIN_CUT_ROWS) first
    k, pieces = calls(1.0)
    assert k == pieces > n
    assert calls(0.0) == (1, n)  # expected to take nothing: all in one step, uncut
    b = StepBudget(stretch=1.5, max_tokens=10**6, decode_s={1: 0.1})
    job = sliced.model.vision_job(patches)
    b.run_vision(job, rows=1)
    assert job.slices_run >= 1 and b.vision_unit_s  # what ran was timed, by kind


def test_the_loop_times_its_steps_while_a_newcomer_joins(sliced):
    """A stream decodes while a newcomer's picture and prompt ride along: the budget has plain steps,
    prompt tokens and vision slices timed, and the newcomer's answer is the one it gets alone."""
    alone = list(sliced.generate(_picture(2)))[-1].text
    stream: list = []
    long = GenerationRequest([Message("user", [TextPart("Count for me.")])],
                             SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True))
    t = threading.Thread(target=lambda: stream.extend(sliced.generate(long)))
    t.start()
    while sum(not isinstance(ev, FinishEvent) for ev in stream) < 3:
        t.join(0.001)
    mixed = sliced.stats["mixed_steps"]
    joined = list(sliced.generate(_picture(2)))
    t.join(60)
    assert joined[-1].text == alone
    assert sliced.stats["mixed_steps"] > mixed
    b = sliced.loop.budget
    assert b.decode_s and b.token_s is not None and b.vision_unit_s
    assert isinstance(stream[-1], FinishEvent) and stream[-1].usage.completion_tokens == 300

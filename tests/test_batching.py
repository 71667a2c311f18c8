"""Continuous batching: sequences decoded together give what each gives alone, and the loop's
limits (KV budget, cancellation mid-prompt) hold."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from edgevl.preprocess.video import VideoConfig, VideoLimits, decode_video
from edgevl.runtime.constrain import Recorder
from edgevl.runtime.engine import OrtEngine
from edgevl.types import (
    EngineOptions,
    FinishEvent,
    GenerationRequest,
    ImagePart,
    InputError,
    Message,
    SamplingParams,
    TextPart,
    TokenEvent,
)
from tests import clips
from tests.conftest import make_image

TOL = 1e-4

# different images, prompts and answer lengths
REQUESTS = [
    ([(96, 64)], "Describe the picture.", 24),
    ([], "Tell me a long story about a lighthouse keeper and the sea.", 40),
    ([(64, 128), (80, 80)], "Compare these two images.", 16),
    ([(160, 96)], "What is in the corner?", 32),
    ("clip", "What moves, and when?", 20),  # a video: its frame groups are placed like images
]


def _request(i: int, **params) -> tuple[GenerationRequest, Recorder]:
    sizes, text, n = REQUESTS[i]
    rec = Recorder()
    if sizes == "clip":
        parts = [decode_video(clips.mp4(n=24, w=128, h=96), VideoConfig(), VideoLimits())]
    else:
        parts = [ImagePart(make_image(w, h, seed=10 * i + j)) for j, (w, h) in enumerate(sizes)]
    p = {"max_new_tokens": n, "ignore_eos": True, "repetition_penalty": 1.2, **params}
    return GenerationRequest([Message("user", [*parts, TextPart(text)])], SamplingParams(**p), constraint=rec), rec


def _tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]


@pytest.fixture(scope="module", params=[(0, "fp32"), (24, "fp32"), (24, "int8")],
                ids=["chunks-alone", "mixed-steps", "mixed-steps-int8-kv"])
def batch_engine(request):
    """step_tokens 0: a newcomer's prompt chunks run on their own; 24: slices of it ride in the decoding
    rows' runs (mixed steps), 24 tokens a run: the time allowance is lifted (step_stretch), so slices
    do not shrink when a busy machine slows the steps and the newcomers still join running streams.
    Prefix reuse off: every run reads its whole prompt, so alone and batched do the same work.
    An int8 KV cache has fixed scales, so a row's cache does not depend on its neighbours either."""
    step_tokens, kv = request.param
    folder = request.getfixturevalue("tiny_onnx" if kv == "fp32" else "tiny_onnx_kv8")
    e = OrtEngine(folder, EngineOptions(max_batch=5, prefill_chunk=32, prefix_cache=False,
                                        step_tokens=step_tokens, step_stretch=1e6))
    yield e
    e.close()


def _run_staggered(engine: OrtEngine, requests: list[GenerationRequest], join_after: int = 3) -> list[list]:
    """Request i+1 joins once request i has streamed `join_after` tokens: each joins a running batch."""
    out: list[list] = [[] for _ in requests]
    started = [threading.Event() for _ in requests]

    def consume(i: int) -> None:
        n = 0
        for ev in engine.generate(requests[i]):
            out[i].append(ev)
            n += isinstance(ev, TokenEvent)
            if n == join_after and i + 1 < len(requests):
                started[i + 1].set()
        if i + 1 < len(requests):
            started[i + 1].set()

    threads = []
    for i in range(len(requests)):
        if i:
            started[i].wait(60)
        t = threading.Thread(target=consume, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(120)
    return out


def test_batched_greedy_equals_alone_with_logits_within_tolerance(batch_engine):
    alone = []
    for i in range(len(REQUESTS)):
        req, rec = _request(i)
        alone.append((_tokens(list(batch_engine.generate(req))), rec.logits))
    before = dict(batch_engine.batch_histograms()["batch_size"])
    mixed_before = batch_engine.stats["mixed_steps"]
    pairs = [_request(i) for i in range(len(REQUESTS))]
    batched = _run_staggered(batch_engine, [r for r, _ in pairs])
    after = batch_engine.batch_histograms()["batch_size"]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert any(n > 0 for k, n in grew.items() if k >= 3), f"never decoded 3+ sequences together: {grew}"
    mixed = batch_engine.stats["mixed_steps"] - mixed_before
    # every newcomer joins running streams: with a step budget, its prompt rides in their runs
    assert (mixed > 0) == (batch_engine.options.step_tokens > 0), mixed
    for i, ((toks_alone, logits_alone), (_, rec)) in enumerate(zip(alone, pairs)):
        toks = _tokens(batched[i])
        assert isinstance(batched[i][-1], FinishEvent) and len(toks) == REQUESTS[i][2]
        for step, (a, b) in enumerate(zip(logits_alone, rec.logits)):
            if toks[step] != toks_alone[step]:  # allowed only where the model itself could not decide
                top2 = np.sort(a)[-2:]
                assert top2[1] - top2[0] < TOL, f"request {i} step {step}: tokens differ with a clear margin"
                break
            diff = float(np.abs(a - b).max())
            assert diff < TOL, f"request {i} step {step}: logits differ by {diff}"
        else:
            assert toks == toks_alone


def test_seeded_sampling_is_reproducible_under_batching(batch_engine):
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 50}
    alone = [_tokens(list(batch_engine.generate(_request(i, seed=100 + i, **params)[0]))) for i in range(3)]
    batched = _run_staggered(batch_engine, [_request(i, seed=100 + i, **params)[0] for i in range(3)], join_after=2)
    assert [_tokens(b) for b in batched] == alone


def test_cancel_during_prefill_stops_between_chunks(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefill_chunk=16, prefix_cache=False))
    try:
        long_prompt = "word " * 600  # ~600 tokens: dozens of 16-token chunks
        req = GenerationRequest([Message("user", [TextPart(long_prompt)])], SamplingParams(max_new_tokens=4))
        events: list = []
        t = threading.Thread(target=lambda: events.extend(e.generate(req)))
        t.start()
        deadline = time.monotonic() + 30
        while sum(e.batch_histograms()["prefill_chunk_tokens"].values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert e.request_states() == {"waiting": 0, "encoding": 0, "prefilling": 1, "decoding": 0}
        req.cancel.set()
        t.join(30)
        chunks = sum(e.batch_histograms()["prefill_chunk_tokens"].values())
        fin = events[-1]
        assert isinstance(fin, FinishEvent) and fin.finish_reason == "cancelled"
        assert fin.usage.completion_tokens == 0
        assert chunks < 600 // 16, f"{chunks} chunks ran: the prefill was not stopped"
        assert not any(e.request_states().values())
        # the engine goes on serving
        ok = list(e.generate(GenerationRequest([Message("user", [TextPart("hi")])],
                                               SamplingParams(max_new_tokens=3, ignore_eos=True))))
        assert ok[-1].usage.completion_tokens == 3
    finally:
        e.close()


def test_kv_budget_admits_only_what_fits(tiny_onnx):
    # tiny model: 1 KiB of KV per token, so 1 MB holds 1024 tokens: one 700-token request at a time
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=4, kv_cache_mb=1, prefix_cache=False))
    try:
        def req(seed: int) -> GenerationRequest:
            return GenerationRequest([Message("user", [TextPart(f"Question {seed}?")])],
                                     SamplingParams(max_new_tokens=680, ignore_eos=True, temperature=0.8, seed=seed))

        results: list = [None, None]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, list(e.generate(req(i)))))
                   for i in range(2)]
        for t in threads:
            t.start()
        seen: set[tuple] = set()  # one decodes while the other waits for its KV memory
        while any(t.is_alive() for t in threads):
            seen.add(tuple(sorted(e.request_states().items())))
            time.sleep(0.002)
        for t in threads:
            t.join(120)
        assert (("decoding", 1), ("encoding", 0), ("prefilling", 0), ("waiting", 1)) in seen, seen
        assert not any(e.request_states().values())
        assert all(r[-1].usage.completion_tokens == 680 for r in results)
        sizes = e.batch_histograms()["batch_size"]
        assert set(sizes) == {1}, f"two sequences shared a KV budget that holds one: {sizes}"
        assert max(r[-1].timings.queue_ms for r in results) > 0
        with pytest.raises(InputError) as err:
            list(e.generate(replace(req(3), params=SamplingParams(max_new_tokens=2000))))
        assert err.value.code == "kv_cache_exceeded"
    finally:
        e.close()


def test_cancel_while_the_image_is_encoded_reads_no_prompt(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefix_cache=False, vision_cache_entries=0))
    try:
        req = GenerationRequest([Message("user", [ImagePart(make_image(1024, 1024, seed=5)), TextPart("What?")])],
                                SamplingParams(max_new_tokens=4))
        events: list = []
        t = threading.Thread(target=lambda: events.extend(e.generate(req)))
        t.start()
        deadline = time.monotonic() + 30
        while e.request_states()["encoding"] < 1 and time.monotonic() < deadline:
            time.sleep(0.0005)  # the image is going through the vision tower's slices
        assert e.request_states() == {"waiting": 0, "encoding": 1, "prefilling": 0, "decoding": 0}
        assert e.stats["vision_cache_misses"] == 1
        req.cancel.set()
        t.join(30)
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"
        assert events[-1].usage.completion_tokens == 0
        assert sum(e.batch_histograms()["prefill_chunk_tokens"].values()) == 0  # the prompt was never read
        ok = list(e.generate(GenerationRequest([Message("user", [ImagePart(make_image(64, 64)), TextPart("hi")])],
                                               SamplingParams(max_new_tokens=2, ignore_eos=True))))
        assert ok[-1].usage.completion_tokens == 2  # the vision tower is free again
    finally:
        e.close()


def _try(fn):
    try:
        return fn()
    except Exception as e:
        return e


def test_a_request_that_breaks_admission_fails_alone_and_the_loop_serves_on(tiny_onnx, monkeypatch):
    """A fault injected into the KV pool for one request: that caller gets the error, its row goes
    back, the requests before and after it are answered (the loop thread must not die)."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefix_cache=False))
    try:
        acquire = e.pool.acquire

        def faulty(keys, needed):
            if needed == 777:  # the one request asking for 777 - prompt tokens
                got = acquire(keys, needed)
                e.pool.release(got[0])
                raise RuntimeError("injected admission fault")
            return acquire(keys, needed)

        monkeypatch.setattr(e.pool, "acquire", faulty)

        def ask(max_new: int) -> list:
            return list(e.generate(GenerationRequest([Message("user", [TextPart("hi")])],
                                                     SamplingParams(max_new_tokens=max_new, ignore_eos=True))))

        def outcome(max_new: int) -> list | BaseException:
            result: list = []  # the loop dying would leave the caller waiting: never wait forever here
            t = threading.Thread(target=lambda: result.append(_try(lambda: ask(max_new))), daemon=True)
            t.start()
            t.join(60)
            assert result, "the caller was left waiting"
            return result[0]

        assert outcome(3)[-1].usage.completion_tokens == 3
        n_prompt = e.count_prompt_tokens(GenerationRequest([Message("user", [TextPart("hi")])]))
        err = outcome(777 - n_prompt)
        assert isinstance(err, RuntimeError) and "injected" in str(err)
        assert outcome(4)[-1].usage.completion_tokens == 4
        assert not any(e.request_states().values())
    finally:
        e.close()


def test_concurrent_conversations_each_keep_their_prefix(tiny_onnx):
    """Four clients ask about four pictures at once, then again: each finds its own cached prompt
    (a row is free before its caller hears the end, and a common template start does not steal it)."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=4))
    try:
        def ask(c: int, n: int) -> GenerationRequest:
            return GenerationRequest([Message("user", [ImagePart(make_image(112, 112, seed=50 + c)),
                                                       TextPart("Describe this picture.")])],
                                     SamplingParams(max_new_tokens=n, ignore_eos=True))

        def together(reqs: list[GenerationRequest]) -> list[FinishEvent]:
            out: list = [None] * len(reqs)
            ts = [threading.Thread(target=lambda i=i: out.__setitem__(i, list(e.generate(reqs[i]))[-1]))
                  for i in range(len(reqs))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            return out

        together([ask(c, 1) for c in range(4)])
        again = together([ask(c, 8) for c in range(4)])
        assert [f.timings.prefix_reused_tokens for f in again] == [f.usage.prompt_tokens - 1 for f in again]
    finally:
        e.close()


def test_cancel_during_a_mixed_slice_frees_the_newcomer_and_the_stream_goes_on(tiny_onnx):
    """A newcomer whose long prompt rides in a running answer's runs, a few tokens a step, is
    cancelled mid-prompt: it ends cancelled with no answer, the running answer ends as it would
    have alone, and the loop is idle afterwards."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefill_chunk=16, prefix_cache=False, step_tokens=8))
    try:
        story = GenerationRequest([Message("user", [TextPart("Tell a story.")])],
                                  SamplingParams(max_new_tokens=300, ignore_eos=True))
        alone = _tokens(list(e.generate(replace(story, cancel=threading.Event()))))
        streamed: list = []
        t_story = threading.Thread(target=lambda: streamed.extend(e.generate(story)))
        t_story.start()
        while not streamed:
            time.sleep(0.001)
        newcomer = GenerationRequest([Message("user", [TextPart("word " * 600)])], SamplingParams(max_new_tokens=4))
        events: list = []
        t_new = threading.Thread(target=lambda: events.extend(e.generate(newcomer)))
        mixed_before = e.stats["mixed_steps"]
        t_new.start()
        deadline = time.monotonic() + 30
        while e.stats["mixed_steps"] - mixed_before < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert e.request_states()["prefilling"] == 1
        newcomer.cancel.set()
        t_new.join(30)
        fin = events[-1]
        assert isinstance(fin, FinishEvent) and fin.finish_reason == "cancelled" and fin.usage.completion_tokens == 0
        t_story.join(60)
        assert _tokens(streamed) == alone
        assert not any(e.request_states().values())
    finally:
        e.close()



def _arrive_together(e: OrtEngine, requests: list[GenerationRequest], when: list[list] | None = None) -> list[list]:
    """Submitted while the test holds the loop's lock, so the loop admits them in one go: they arrive
    together (one by one, the first could be read and streaming before the next is submitted).
    `when`: one list per request, filled with each event's arrival (time.monotonic)."""
    prepared = [e.prepare(r) for r in requests]
    out: list[list] = [[] for _ in requests]
    ended = [threading.Event() for _ in requests]

    def sink(i: int):
        def put(item) -> None:
            if when is not None:
                when[i].append(time.monotonic())
            out[i].append(item)
            if isinstance(item, (FinishEvent, BaseException)):
                ended[i].set()
        return put

    with e.loop._cv:
        for i, p in enumerate(prepared):
            e.submit(p, sink(i))
    for ev in ended:
        assert ev.wait(120)
    return out


@pytest.mark.parametrize("together", [True, False], ids=["start-together", "first-starts-at-once"])
def test_newcomers_arriving_together_start_their_answers_together(tiny_onnx, together):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=4, prefill_chunk=16, prefix_cache=False, step_tokens=8,
                                           start_together=together))
    try:
        requests = [_request(i, max_new_tokens=12)[0] for i in (0, 1, 3)]  # two pictures, one text
        alone = [_tokens(list(e.generate(r))) for r in requests]
        before = dict(e.batch_histograms()["batch_size"])
        together_out = _arrive_together(e, requests)
        after = e.batch_histograms()["batch_size"]
        grew = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
        if together:  # every decode step carried all three: none started before the others were read
            assert grew == {3: 11}, grew
        else:  # the first streamed while the others were read beside it
            assert set(grew) & {1, 2}, grew
        assert [_tokens(x) for x in together_out] == alone
        assert all(x[-1].usage.completion_tokens == 12 for x in together_out)
    finally:
        e.close()


def test_cancel_while_the_first_token_is_held(tiny_onnx):
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefill_chunk=16, prefix_cache=False))
    try:
        # read first (a picture and its prompt), then held: for at most max_batch × its own reading time,
        # a small part of the long one's ~200 chunks
        short = _request(0, max_new_tokens=6)[0]
        long = GenerationRequest([Message("user", [TextPart("word " * 1200)])],
                                 SamplingParams(max_new_tokens=6, ignore_eos=True))
        long_alone = _tokens(list(e.generate(long)))
        result: list[list] = []
        t = threading.Thread(target=lambda: result.extend(_arrive_together(e, [short, long])))
        t.start()
        deadline = time.monotonic() + 30
        while not any(w.held is not None for w in list(e.loop.active)) and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert any(w.held is not None for w in list(e.loop.active)), "the short answer was never held"
        short.cancel.set()
        t.join(60)
        out_short, out_long = result
        assert isinstance(out_short[-1], FinishEvent) and out_short[-1].finish_reason == "cancelled"
        assert out_short[-1].usage.completion_tokens == 0 and not _tokens(out_short)
        assert _tokens(out_long) == long_alone
        assert not any(e.request_states().values())
    finally:
        e.close()


def test_a_short_question_is_not_held_behind_a_long_prompt(tiny_onnx):
    """Held first tokens wait at most max_batch × their own reading time: the short answer, read first,
    starts (and here ends) while the long prompt beside it is still being read."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefill_chunk=16, prefix_cache=False))
    try:
        short = _request(1, max_new_tokens=4)[0]
        long = GenerationRequest([Message("user", [TextPart("word " * 1200)])],
                                 SamplingParams(max_new_tokens=2, ignore_eos=True))
        when: list[list] = [[], []]
        out_short, out_long = _arrive_together(e, [short, long], when)
        first_long = next(t for t, ev in zip(when[1], out_long) if isinstance(ev, TokenEvent))
        assert isinstance(out_short[-1], FinishEvent) and out_short[-1].usage.completion_tokens == 4
        assert when[0][-1] < first_long, "the short answer waited for the long prompt to be read"
    finally:
        e.close()

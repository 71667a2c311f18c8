"""The vision tower in slices (export/vision.py, runtime/vision_job.py) and on the batch loop.

The slices must give the whole tower's numbers (the whole graph is still what exports before slices
run), a job run a step budget at a time the numbers of one run to the end, and the loop must interleave slices with
decoding, count them, and drop a cancelled request's half-encoded picture at once.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgevl.export import export_model
from edgevl.export.manifest import MANIFEST, Manifest
from edgevl.preprocess.video import VideoConfig, VideoLimits, decode_video
from edgevl.runtime.engine import OrtEngine
from edgevl.runtime.step_budget import StepBudget
from edgevl.runtime.vision_job import MIN_CUT_ROWS, decoder_token_flops
from edgevl.types import (
    EngineOptions,
    FinishEvent,
    GenerationRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
)
from tests.clips import mp4
from tests.conftest import make_image
from tests.test_admission import Inbox


def _export(checkpoint: Path, folder: Path, precision: str, per_slice: int, chunk_rows: int) -> Path:
    if not (folder / MANIFEST).is_file():
        export_model(checkpoint, folder, precision, vision_blocks_per_slice=per_slice, vision_chunk_rows=chunk_rows)
    return folder


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """(precision, blocks per slice, chunk rows) → an engine on that export of the tiny checkpoint;
    0 blocks per slice: one whole graph; 0 chunk rows: blocks not split."""
    root = tmp_path_factory.mktemp("vision_slices")
    engines: dict[tuple[str, int, int], OrtEngine] = {}

    def get(precision: str, per_slice: int, chunk_rows: int = 0) -> OrtEngine:
        key = (precision, per_slice, chunk_rows)
        if key not in engines:
            folder = _export(tiny_checkpoint, root / f"{precision}-{per_slice}-{chunk_rows}", precision, per_slice,
                             chunk_rows)
            engines[key] = OrtEngine(folder, EngineOptions(prefix_cache=False, vision_cache_entries=0))
        return engines[key]

    yield get
    for e in engines.values():
        e.close()


def _image_and_clip(engine: OrtEngine):
    prompt = engine.prompts.build(GenerationRequest([Message("user", [
        ImagePart(make_image(200, 150, seed=3)),
        decode_video(mp4(n=30, w=160, h=96), VideoConfig(), VideoLimits()), TextPart("x")])]))
    return prompt.patches


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("precision", ["fp32", "int8", "int8-rowwise"])
@pytest.mark.parametrize(("per_slice", "chunk_rows"), [(1, 0), (3, 0), (1, 16), (1, 1024)])
def test_slices_give_the_whole_towers_features(exports, precision, per_slice, chunk_rows):
    """An image and a clip (frame groups batched) through the slices: the whole graph's numbers.
    3 blocks per slice puts DeepStack outputs inside and at the end of a group. Blocks split over
    chunks of 16 patches (the image: 18 chunks; a clip's batch is never split) give the same numbers at
    fp32 and at int8 with per-row activation scales; at plain int8 each chunk quantizes its own
    activations with one scale, which is as close to fp32 as the whole."""
    sliced, whole = exports(precision, per_slice, chunk_rows), exports(precision, 0)
    m = sliced.manifest
    assert "vision" not in m.graphs and m.vision_slices and whole.manifest.vision_slices is None
    assert m.vision_precision == precision and m.vision_slices["chunk_rows"] == chunk_rows
    depth = sliced.config.vision.depth
    assert [g["blocks"] for g in m.vision_slices["blocks"]] == [
        [i, min(depth, i + per_slice)] for i in range(0, depth, per_slice)]
    assert all(("qkv" in g) == (chunk_rows > 0) for g in m.vision_slices["blocks"])
    assert len(sliced.model.vision_slices) == 2 + -(-depth // per_slice)
    image, clip = _image_and_clip(sliced)
    chunks = -(-image.pixel_values.shape[0] // chunk_rows) if chunk_rows else 0
    pieces = 2 * depth * chunks if chunk_rows else len(m.vision_slices["blocks"])
    assert len(sliced.model.vision_job(image).costs) == 2 + pieces
    for patches in (image, clip):
        a, b = sliced.model.encode_image(patches), whole.model.encode_image(patches)
        assert a.embeds.shape == b.embeds.shape and a.deepstack.shape == b.deepstack.shape
        assert a.deepstack.shape[0] == len(sliced.config.vision.deepstack_visual_indexes)
        if precision == "int8" and patches is image and chunks > 1:
            ref = exports("fp32", 0).model.encode_image(patches)
            assert _rel(a.embeds, b.embeds) > 0  # the chunks' own activation scales
            assert _cos(a.embeds, ref.embeds) >= _cos(b.embeds, ref.embeds) - 1e-4
            assert _cos(a.deepstack, ref.deepstack) >= _cos(b.deepstack, ref.deepstack) - 1e-4
            continue
        tol = 1e-5 if precision == "fp32" else 1e-4  # int8: activations quantized per tensor, the same tensors
        assert _rel(a.embeds, b.embeds) <= tol and _rel(a.deepstack, b.deepstack) <= tol


def test_exports_before_slices_still_serve(exports):
    """A manifest without `vision_slices` runs its whole `vision.onnx`: the same answer as the slices."""
    req = GenerationRequest([Message("user", [ImagePart(make_image(120, 90, seed=9)), TextPart("Describe.")])],
                            SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    answers = []
    for per_slice in (0, 1):
        e = exports("fp32", per_slice)
        fin = list(e.generate(req))[-1]
        answers.append(fin.text)
        assert fin.timings.vision_ms > 0
    assert answers[0] == answers[1]


@pytest.mark.parametrize("chunk_rows", [0, 16])
@pytest.mark.parametrize("budget", [0, 1, 40, 150])
def test_a_budgeted_job_gives_the_features_of_one_run(exports, budget, chunk_rows):
    """int8 with a scale per row: pieces the budget cuts short give the same numbers (plain int8
    quantizes each run's rows together, so its cut pieces move the numbers slightly)."""
    e = exports("int8-rowwise", 1, chunk_rows)
    for patches in _image_and_clip(e):
        full = e.model.encode_image(patches)
        job = e.model.vision_job(patches)
        calls = 0
        while True:
            before, first = job.slices_run, job.next_cost
            StepBudget(1.4, budget).run_vision(job, rows=0)  # no step timed yet: the cap alone binds
            done, ran = job.done, job.slices_run - before
            calls += 1
            assert ran >= 1  # always moves on
            assert ran == 1 or sum(job.costs[before:job.slices_run]) <= budget  # within the budget unless one slice
            assert first > 0
            if done:
                break
        assert job.slices_run == len(job.costs) and calls <= len(job.costs)
        if budget < min(job.costs):
            assert calls == len(job.costs)  # every slice is over the budget: one per call
        f = job.features
        np.testing.assert_array_equal(f.embeds, full.embeds)
        np.testing.assert_array_equal(f.deepstack, full.deepstack)
        assert job.seconds > 0


@pytest.mark.parametrize("precision", ["fp32", "int8-rowwise"])
def test_pieces_cut_to_a_steps_room_give_the_features_of_one_run(exports, precision):
    """A 448² picture (784 patches, one chunk of up to 1,024) against a step with room for a third of
    a piece at most: a block's pieces and the merger are cut to what fits (whole merged tokens, never under
    MIN_CUT_ROWS), every call moves on, and the features are the uncut run's, because rows are
    independent where each is quantized on its own."""
    e = exports(precision, 1, 1024)
    req = GenerationRequest([Message("user", [ImagePart(make_image(448, 448, seed=5)), TextPart("x")])])
    patches = e.prompts.build(req).patches[0]
    n = patches.pixel_values.shape[0]
    assert n == 784
    job = e.model.vision_job(patches)
    job.step()  # the patch embedding: a whole picture's, never cut
    assert job.next_rows == n  # block 0's q/k/v over every patch
    whole = job.next_cost
    job.cut(130)  # → 128 rows, a whole number of 2x2 tokens
    assert job.next_cost == pytest.approx(whole * 128 / n) and job.next_rows == 0
    with pytest.raises(RuntimeError):
        job.cut(64)
    job.step()
    assert job.next_rows == n - 128
    job.cut(10)  # never under MIN_CUT_ROWS
    assert job.next_cost == pytest.approx(whole * MIN_CUT_ROWS / n)

    job = e.model.vision_job(patches)
    uncut = len(job.costs)
    cheapest = min(job.costs[1:])  # of the pieces after the embedding (a block's q/k/v or rest, the merger)
    budget = StepBudget(stretch=1.5, max_tokens=10**6, decode_s={1: 0.1})
    while not job.done:
        before = job.slices_run
        # 50 ms of room; each of those pieces expected at three times that at least, the embedding at
        # nothing (reset each step: the budget learns the tiny model's real times, fast)
        budget.vision_unit_s = {"embed": 0.0, **dict.fromkeys(("qkv", "rest", "merger"), 0.15 / cheapest)}
        budget.run_vision(job, rows=1)
        assert job.slices_run > before
    assert len(job.costs) >= uncut + 2 * (uncut - 1)  # each piece after the embedding ran as three or more
    f, full = job.features, e.model.encode_image(patches)
    tol = 1e-5 if precision == "fp32" else 1e-4
    assert _rel(f.embeds, full.embeds) <= tol and _rel(f.deepstack, full.deepstack) <= tol


def test_slice_costs_follow_the_shapes(exports):
    """Costs in decoder-token equivalents: blocks grow with patches, and more than linearly (attention)."""
    e = exports("fp32", 1)
    cfg = e.config

    def costs(w: int, h: int) -> tuple[int, list[float]]:
        prompt = e.prompts.build(GenerationRequest([Message("user", [ImagePart(make_image(w, h)), TextPart("x")])]))
        return prompt.patches[0].pixel_values.shape[0], e.model.vision_job(prompt.patches[0]).costs

    (n_small, small), (n_big, big) = costs(128, 128), costs(512, 512)
    assert len(small) == len(big) == cfg.vision.depth + 2
    assert all(b > 0 for b in small)
    assert big[1] / small[1] > n_big / n_small >= 4  # the first block: attention grows with patches squared
    assert big[0] / small[0] == pytest.approx(n_big / n_small)  # the patch embedding: linear
    t = cfg.text
    assert decoder_token_flops(cfg) == 2 * t.num_layers * (
        2 * t.hidden_size * t.num_heads * t.head_dim + 2 * t.hidden_size * t.num_kv_heads * t.head_dim
        + 3 * t.hidden_size * t.intermediate_size)


def test_split_blocks_spread_a_large_picture_over_pieces_of_bounded_cost(exports):
    """Chunks of 16 patches: a block's pieces together cost what the whole block does, and a larger
    picture has more pieces, each dearer only by its attention over more keys: linearly, where a
    whole block grows with the square of the patches."""
    whole, split = exports("fp32", 1), exports("fp32", 1, 16)

    def costs(e: OrtEngine, side: int) -> tuple[int, list[float]]:
        req = GenerationRequest([Message("user", [ImagePart(make_image(side, side)), TextPart("x")])])
        patches = e.prompts.build(req).patches[0]
        return patches.pixel_values.shape[0], e.model.vision_job(patches).costs

    for side in (128, 512):
        (_, a), (_, b) = costs(whole, side), costs(split, side)
        assert sum(b) == pytest.approx(sum(a))
        assert max(b[1:-1]) < max(a[1:-1]) / 4
    (n_small, small), (n_big, big) = costs(split, 128), costs(split, 512)
    assert len(big) > 3 * len(small)
    assert max(big[1:-1]) / max(small[1:-1]) <= n_big / n_small


def _collect(e: OrtEngine, req: GenerationRequest, out: list) -> threading.Thread:
    t = threading.Thread(target=lambda: out.extend(e.generate(req)))
    t.start()
    return t


def _wait(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def _long_answer() -> GenerationRequest:
    return GenerationRequest([Message("user", [TextPart("Count for me.")])],
                             SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True))


def _tokens(events: list) -> int:
    return sum(1 for ev in events if not isinstance(ev, FinishEvent))


def test_a_newcomers_picture_is_sliced_between_decode_steps(tiny_onnx):
    """While a stream decodes, the newcomer's picture goes through the tower a slice per step (a
    budget of one token: every slice is over it, and its pieces are cut to their shortest), counted;
    both answers are those they get alone."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=2, prefix_cache=False, vision_cache_entries=0, step_tokens=1))
    try:
        pic = GenerationRequest([Message("user", [ImagePart(make_image(256, 192, seed=21)), TextPart("What?")])],
                                SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
        alone = list(e.generate(pic))
        slices = e.stats["vision_slices"]
        assert slices == len(e.model.vision_job(e.prompts.build(pic).patches[0]).costs) > 3
        long_alone = [ev.token_id for ev in e.generate(_long_answer()) if not isinstance(ev, FinishEvent)]

        streaming: list = []
        t = _collect(e, _long_answer(), streaming)
        _wait(lambda: _tokens(streaming) >= 3, "the stream")
        runs = sum(e.loop.batch_sizes.values())  # decoder runs the loop made (read as it writes them)
        newcomer = list(e.generate(pic))
        during = sum(e.loop.batch_sizes.values()) - runs
        t.join(60)
        sliced = e.stats["vision_slices"] - slices
        assert sliced > slices  # pieces over the picture's patches cut to their shortest: no room in a step
        # one slice per step, each step also decodes the stream: it kept going while the picture was encoded
        assert during >= sliced
        assert newcomer[-1].text == alone[-1].text
        assert [ev.token_id for ev in streaming if not isinstance(ev, FinishEvent)] == long_alone
        assert e.request_states() == {"waiting": 0, "encoding": 0, "prefilling": 0, "decoding": 0}
    finally:
        e.close()


def test_cancel_mid_encode_frees_the_request_at_once(tiny_onnx):
    """A request cancelled while its pictures are half way through the tower (others decoding) ends
    at the next step boundary with nothing read; the stream goes on and the next picture is served."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=3, prefix_cache=False, vision_cache_entries=8, step_tokens=1))
    try:
        streaming: list = []
        t = _collect(e, _long_answer(), streaming)
        _wait(lambda: _tokens(streaming) >= 2, "the stream")
        pics = [ImagePart(make_image(768, 768, seed=s)) for s in range(31, 36)]  # many slices: cancelled mid-way
        req = GenerationRequest([Message("user", [*pics, TextPart("Compare.")])], SamplingParams(max_new_tokens=4))
        per_picture = len(e.model.vision_job(e.prompts.build(req).patches[0]).costs)
        events: list = []
        c = _collect(e, req, events)
        _wait(lambda: e.stats["vision_slices"] >= 1, "a first slice")
        req.cancel.set()
        c.join(30)
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"
        assert events[-1].usage.completion_tokens == 0
        assert e.stats["vision_slices"] < len(pics) * per_picture  # it left mid-encode
        assert len(e.vision_cache) < len(pics)  # the half-encoded picture was dropped, not finished
        assert t.is_alive()  # the stream is still running
        ok = list(e.generate(GenerationRequest([Message("user", [ImagePart(make_image(64, 64, seed=34)),
                                                                 TextPart("hi")])],
                                               SamplingParams(max_new_tokens=2, ignore_eos=True))))
        assert ok[-1].usage.completion_tokens == 2
        t.join(120)
        assert streaming[-1].usage.completion_tokens == 400
    finally:
        e.close()


def test_a_full_queue_does_not_stall_the_picture_being_encoded(tiny_onnx):
    """Regression (CI, 2026-12-02: eight clients with pictures at once all timed out): with every place
    taken by requests still encoding and others queued behind them, the tower gave up its turn to a
    queue that could not be admitted, and nothing moved. Each picture must go on through the tower."""
    e = OrtEngine(tiny_onnx, EngineOptions(max_batch=1, queue_size=3, prefix_cache=False, vision_cache_entries=0))
    try:
        reqs = [GenerationRequest([Message("user", [ImagePart(make_image(512, 512, seed=50 + i)), TextPart("What?")])],
                                  SamplingParams(max_new_tokens=2, ignore_eos=True)) for i in range(3)]
        inboxes = [Inbox() for _ in reqs]
        for r, inbox in zip(reqs, inboxes):  # back to back: the second and third queue behind the first
            e.submit(e.prepare(r), inbox)
        ends = [inbox.end(timeout=60) for inbox in inboxes]  # queue.Empty: a request never ended
        assert all(isinstance(f, FinishEvent) and f.usage.completion_tokens == 2 for f in ends)
    finally:
        e.close()


def test_manifest_records_the_slices(tiny_onnx):
    s = Manifest.read(tiny_onnx).vision_slices
    files = [s["embed"], *(g["graph"] for g in s["blocks"]), s["merger"]]
    assert all((tiny_onnx / f).is_file() and (tiny_onnx / (f + ".data")).is_file() for f in files)
    assert not (tiny_onnx / "vision.onnx").exists()
    ds = [j for g in s["blocks"] for j in g["deepstack"]]
    assert ds == list(range(len(json.loads((tiny_onnx / "config.json").read_text())["vision_config"][
        "deepstack_visual_indexes"])))

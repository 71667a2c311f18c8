"""`python -m edgevl.bench.profile_step` on the tiny export: step times for each batch size, and a
per-operator profile in which the attention and the lm_head show up."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from edgevl.bench.profile_step import DecoderStep


def test_profile_step_times_and_profiles_a_decode_step(tmp_path, tiny_onnx):
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "-m", "edgevl.bench.profile_step", str(tiny_onnx), "--batch", "1,3",
                        "--past", "20", "--rounds", "2", "--steps", "2", "--slices", "4", "--profile", "--json",
                        str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    steps = report["ms_per_step"][str(tiny_onnx)]
    assert set(steps) == {"1", "3", "3+4"} and all(len(v) == 2 and min(v) > 0 for v in steps.values())
    assert "3 rows + a 4-token prompt slice" in r.stdout
    for b in (1, 3):
        table = report["profile"][f"{tiny_onnx} b{b}"]
        assert table["GroupQueryAttention"] > 0
        assert any(k.startswith("lm_head (") for k in table)
        whole = table.pop("(whole run)")
        assert 0 < sum(table.values()) < whole * 1.01  # nothing counted twice (an If and its branch)
        assert "If" not in table and 0 <= table.get("If (own)", 0) < table["GroupQueryAttention"] + whole / 2


def test_a_row_of_a_batched_step_is_that_row_run_alone(tiny_onnx):
    """Rows with the same cache and input give the same logits whatever the batch (the profile's steps
    are real decoder runs over the cache they bind)."""
    step = DecoderStep(tiny_onnx, threads=1)
    one, three = step.step(1, past=12), step.step(3, past=12)
    assert one.shape == (1, step.vocab) and three.shape == (3, step.vocab)
    np.testing.assert_allclose(three[0], one[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(three[1], three[0])


def test_a_mixed_run_leaves_the_decoding_rows_as_they_are(tiny_onnx):
    """A prompt slice riding in the run (group B, its own cache) changes nothing for the decoding rows,
    and its own logits are those of its last token."""
    step = DecoderStep(tiny_onnx, threads=1)
    three, mixed = step.step(3, past=12), step.step(3, past=12, slice_tokens=5)
    assert mixed.shape == (4, step.vocab)
    np.testing.assert_allclose(mixed[:3], three, rtol=1e-4, atol=1e-4)
    assert not np.allclose(mixed[3], three[0])

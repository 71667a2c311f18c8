"""How the exporter stores fp32 weights: bf16 where that is exact, widened just before use.

The numbers themselves are checked against the PyTorch reference in test_parity.py (the tiny
checkpoint is bf16, as Qwen's are, so its fp32 vision tower runs on bf16-stored weights there).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edgevl.export import MANIFEST
from edgevl.export.builder import FLOAT, GraphBuilder
from edgevl.runtime.model import OnnxModel, open_session, session_options
from edgevl.types import EngineOptions, GenerationRequest, ImagePart, Message, TextPart
from tests.conftest import make_image


def _initializer_types(path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_fp32_vision_keeps_the_checkpoints_bf16_weights(tiny_onnx):
    manifest = json.loads((tiny_onnx / MANIFEST).read_text())
    assert manifest["precision"] == "fp32" and manifest["bf16_weight_graphs"] == ["vision"]
    vision = onnx.load(str(tiny_onnx / "vision.onnx"), load_external_data=False).graph
    types = {t.name: t.data_type for t in vision.initializer}
    made_by = {o: n for n in vision.node for o in n.output}
    matmuls = [n for n in vision.node if n.op_type == "MatMul"]
    assert matmuls
    for n in matmuls:  # every weight comes through its Cast from a bf16 initializer
        cast = made_by[n.input[1]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == FLOAT
        stored = made_by[cast.input[0]].input[0]
        assert types[stored] == TensorProto.BFLOAT16
    # decoding meets each weight once per token: the decoder keeps fp32 (prepacked) weights
    assert TensorProto.BFLOAT16 not in _initializer_types(tiny_onnx / "decoder.onnx").values()
    # the token table: rows are gathered, then widened; only the rows a prompt uses are ever read
    assert list(_initializer_types(tiny_onnx / "embed.onnx").values()) == [TensorProto.BFLOAT16]


def _linear_graph(tmp_path, w: np.ndarray) -> tuple[GraphBuilder, ort.InferenceSession]:
    b = GraphBuilder("g", tmp_path, bf16_weights=True)
    x = b.input("x", FLOAT, ["n", w.shape[1]])
    y = b.linear(x, w, None, "/lin")
    y = b.linear(y, w.T.copy(), None, "/lin2")
    b.output(y, "y", FLOAT, ["n", w.shape[1]])
    path = b.save()
    return b, open_session(path, EngineOptions(), bf16_weights=True)


def test_weights_bf16_cannot_hold_stay_fp32(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64), dtype=np.float32)
    exact = ((rng.standard_normal((48, 64), dtype=np.float32).view(np.uint32) >> 16) << 16).view(np.float32)
    b, s = _linear_graph(tmp_path, exact)
    assert b.widened == 2
    np.testing.assert_allclose(s.run(None, {"x": x})[0], x @ exact.T @ exact, rtol=1e-5, atol=1e-4)

    inexact = rng.standard_normal((48, 64), dtype=np.float32)  # an fp32 checkpoint: nothing rounded
    b, s = _linear_graph(tmp_path, inexact)
    assert b.widened == 0
    assert TensorProto.BFLOAT16 not in _initializer_types(tmp_path / "g.onnx").values()
    np.testing.assert_allclose(s.run(None, {"x": x})[0], x @ inexact.T @ inexact, rtol=1e-5, atol=1e-4)


def test_each_weight_is_widened_only_when_its_layer_runs(tiny_onnx, engine, tmp_path):
    """ONNX Runtime runs input-free nodes first: widened up front, all the fp32 copies would be
    alive at once and the saving gone. The profile shows the order the session really ran."""
    so = session_options(EngineOptions())
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "vision")
    session = ort.InferenceSession(str(tiny_onnx / "vision.onnx"), so, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["ConstantFolding"])
    prompt = engine.prompts.build(GenerationRequest([Message("user", [ImagePart(make_image(64, 64)), TextPart("x")])]))
    OnnxModel(engine.config, session, engine.model.embed, engine.model.decoder).encode_image(prompt.patches[0])
    events = json.loads(open(session.end_profiling()).read())
    order = [e["name"][: -len("_kernel_time")] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    block = re.compile(r"/visual/blocks\.(\d+)/")
    seen_block = -1
    for name in order:
        m = block.match(name)
        if not m:
            continue
        i = int(m.group(1))
        if name.endswith(".weight/Cast"):
            assert i <= seen_block, f"{name} ran before its block (newest block run so far: {seen_block})"
        elif not name.split("/")[-2].endswith(".weight"):
            seen_block = max(seen_block, i)

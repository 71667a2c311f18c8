"""How the exporter stores fp32 weights: bf16 where that is exact, widened just before use.

The numbers themselves are checked against the PyTorch reference in test_parity.py (the tiny
checkpoint is bf16, as Qwen's are, so its fp32 vision tower runs on bf16-stored weights there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edgevl.export import export_model
from edgevl.export.builder import FLOAT, GraphBuilder
from edgevl.export.manifest import MANIFEST, Manifest, is_exported
from edgevl.runtime.model import OnnxModel, open_session, session_options
from edgevl.types import EngineOptions, GenerationRequest, ImagePart, Message, TextPart
from tests.conftest import make_image


def _initializer_types(path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_fp32_vision_keeps_the_checkpoints_bf16_weights(tiny_onnx):
    manifest = Manifest.read(tiny_onnx)
    assert manifest.precision == "fp32" and manifest.bf16_weight_graphs == ["vision"]
    s = manifest.vision_slices
    for name in (s["embed"], *(g["graph"] for g in s["blocks"]), s["merger"]):  # the tower's slices
        vision = onnx.load(str(tiny_onnx / name), load_external_data=False).graph
        types = {t.name: t.data_type for t in vision.initializer}
        made_by = {o: n for n in vision.node for o in n.output}
        matmuls = [n for n in vision.node if n.op_type == "MatMul"]
        assert matmuls, name
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


def test_each_weight_is_widened_only_when_its_layer_runs(tiny_checkpoint, engine, tmp_path):
    """ONNX Runtime runs input-free nodes first: widened up front, all the fp32 copies would be
    alive at once and the saving gone. The profile shows the order the session really ran (the whole
    tower in one graph, as exports before slices have it: the slices hold fewer blocks each)."""
    whole = export_model(tiny_checkpoint, tmp_path / "whole", vision_blocks_per_slice=0)
    so = session_options(EngineOptions())
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "vision")
    session = ort.InferenceSession(str(whole / "vision.onnx"), so, providers=["CPUExecutionProvider"],
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


def _projection(tmp_path, name: str, weights: list[np.ndarray], quant) -> np.ndarray:
    """x @ [w1; w2; …].T, as the decoder computes q/k/v or gate/up: one projection split, or one per weight."""
    from edgevl.export.builder import QuantSpec

    spec = {"fp32": None, "int8": QuantSpec("dynamic"), "int4": QuantSpec("nbits", bits=4, block_size=32)}[quant]
    b = GraphBuilder(name, tmp_path, quant=spec)
    x = b.input("x", FLOAT, [1, 3, 64])
    if name.startswith("fused"):
        sizes = [w.shape[0] for w in weights]
        y = b.linear(x, np.concatenate(weights), None, "/proj")
        outs = b.op("Split", [y, b.const(sizes)], "/split", n_out=len(weights), axis=-1)
    else:
        outs = [b.linear(x, w, None, f"/proj{i}") for i, w in enumerate(weights)]
    for i, o in enumerate(outs):
        b.output(o, f"y{i}", FLOAT, [1, 3, weights[i].shape[0]])
    sess = ort.InferenceSession(str(b.save()), providers=["CPUExecutionProvider"])
    feed = np.random.default_rng(1).standard_normal((1, 3, 64)).astype(np.float32)
    return np.concatenate(sess.run(None, {"x": feed}), axis=-1)


def test_one_projection_for_q_k_v_gives_the_numbers_of_three(tmp_path):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((n, 64)).astype(np.float32) * 0.1 for n in (64, 32, 32)]
    for quant in ("fp32", "int8", "int4"):
        fused = _projection(tmp_path, f"fused_{quant}", weights, quant)
        apart = _projection(tmp_path, f"apart_{quant}", weights, quant)
        # int8 quantizes the activation once per tensor and each weight column alone, int4 per block of
        # its column: the same integers either way. fp32 may only differ in summation order.
        np.testing.assert_allclose(fused, apart, rtol=0, atol=0 if quant != "fp32" else 1e-5, err_msg=quant)


def test_the_decoder_has_one_projection_for_q_k_v_and_one_for_gate_up(tiny_onnx):
    cfg = json.loads((tiny_onnx / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    nodes = onnx.load(str(tiny_onnx / "decoder.onnx"), load_external_data=False).graph.node
    names = [n.name for n in nodes if n.op_type == "MatMul"]
    layers = text["num_hidden_layers"]
    assert sum("/attn/qkv_proj/" in n for n in names) == layers
    assert sum("/mlp/gate_up_proj/" in n for n in names) == layers
    assert not any(re.search(r"/(q|k|v|gate|up)_proj/", n) for n in names)


def test_the_manifest_reads_as_it_was_written_and_an_older_one_with_defaults(tiny_onnx, tmp_path):
    import json

    written = Manifest.read(tiny_onnx)
    assert written.vision_runs_frame_groups_together and written.graphs["decoder"] == "decoder.onnx"
    written.write(tmp_path)
    assert Manifest.read(tmp_path) == written
    # an export from before the frame-group flag, the unsigned-weights flag and model_name
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "precision": "int8", "later_field": 1}))
    old = Manifest.read(tmp_path)
    assert old.precision == "int8" and old.model_name == tmp_path.name
    assert not old.vision_runs_frame_groups_together and not old.int8_unsigned_weights and old.bf16_weight_graphs == []


def test_two_processes_exporting_the_same_checkpoint_at_once_both_load_it(tiny_checkpoint, tmp_path):
    """Two servers (or two test workers) started together on a checkpoint: one export wins the
    rename, the other uses it; nothing half-written is left behind."""
    code = ("import sys; from edgevl.runtime.loader import ensure_exported; from edgevl.types import EngineOptions; "
            "print(ensure_exported(sys.argv[1], EngineOptions()))")
    env = {**os.environ, "EDGEVL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_checkpoint)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1 and is_exported(Path(folders.pop()))
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [Path(outs[0][0].strip()).name]

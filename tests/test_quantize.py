"""int8 / int4 / int8-nbits / int8-rowwise exports: the graphs use the integer kernels, stay close to fp32, and
every precision the exporter has is a choice on the command line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgevl.runtime.loader import exported_dir_for, load_engine
from edgevl.types import EngineOptions, GenerationRequest, ImagePart, Message, SamplingParams, TextPart
from tests.conftest import make_image
from tests.test_parity import _prefill_logits


@pytest.fixture(scope="module", params=["int8", "int4", "int8-nbits", "int8-rowwise"])
def quantized(request, tiny_checkpoint):
    opts = EngineOptions(precision=request.param, prefix_cache=False)
    return request.param, load_engine(tiny_checkpoint, opts, warmup=False)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_graphs_use_integer_kernels(quantized, tiny_checkpoint, tiny_onnx):  # tiny_onnx: the fp32 export to compare
    precision, engine = quantized
    folder = exported_dir_for(tiny_checkpoint, precision)
    dec = _ops(folder / "decoder.onnx")
    vis = set().union(*(_ops(f) for f in folder.glob("vision*.onnx")))  # every slice of the tower
    row_wise = precision == "int8-rowwise"  # its vision tower too: one scale per activation row
    assert ("MatMulIntegerToFloat" if row_wise else "DynamicQuantizeMatMul") in vis and "MatMul" not in vis
    if precision == "int8":
        assert "DynamicQuantizeMatMul" in dec and "MatMulNBits" not in dec
    elif row_wise:
        assert "MatMulIntegerToFloat" in dec and "QuantizeLinear" in dec and "DynamicQuantizeMatMul" not in dec
    else:
        assert "MatMulNBits" in dec
    assert "MatMul" not in dec and "Gemm" not in dec  # no fp32 weight matmul left
    fp32_data = (exported_dir_for(tiny_checkpoint, "fp32") / "decoder.onnx.data").stat().st_size
    assert (folder / "decoder.onnx.data").stat().st_size < fp32_data / 3


def test_logits_stay_close_to_fp32(quantized, engine):
    precision, qengine = quantized
    msgs = [Message("user", [ImagePart(make_image(160, 120)), TextPart("Describe the picture.")])]
    ref = _prefill_logits(engine, msgs)
    got = _prefill_logits(qengine, msgs)
    cos = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > (0.999 if precision.startswith("int8") else 0.95), cos  # the tiny model: K=64 is under one int4 block


def test_quantized_generation_runs(quantized):
    precision, qengine = quantized
    req = GenerationRequest([Message("user", [TextPart("Hello")])], SamplingParams(max_new_tokens=8, ignore_eos=True))
    fin = list(qengine.generate(req))[-1]
    assert fin.usage.completion_tokens == 8 and qengine.info().precision == precision


def test_every_export_precision_is_a_command_line_choice():
    from edgevl.cli import build_parser
    from edgevl.export import PRECISIONS

    parser = build_parser()
    for precision in PRECISIONS:
        for argv in (["export", "CK", "OUT", "--precision", precision, "--vision-precision", precision,
                      "--lm-head-precision", precision], ["predict", "hi", "--precision", precision],
                     ["serve", "--precision", precision]):
            assert parser.parse_args(argv).precision == precision


def _int8_projection(tmp_path, x: np.ndarray, w: np.ndarray, unsigned: bool, per_row: bool = False,
                     bias: np.ndarray | None = None) -> np.ndarray:
    import onnxruntime as ort

    from edgevl.export.builder import FLOAT, GraphBuilder, QuantSpec

    name = f"dq_{unsigned}_{per_row}_{bias is not None}_{x.shape[0]}"
    b = GraphBuilder(name, tmp_path, quant=QuantSpec("dynamic", unsigned_weights=unsigned, per_row=per_row))
    b.output(b.linear(b.input("x", FLOAT, ["rows", x.shape[1]]), w, bias, "/proj"), "y", FLOAT,
             ["rows", w.shape[0]])
    return ort.InferenceSession(str(b.save()), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("unsigned", [False, True])
def test_rowwise_int8_rows_do_not_depend_on_the_rows_beside_them(tmp_path, unsigned):
    """int8-rowwise: each row quantized with its own absmax / 127 gives the exact integer products
    (bias added after), and a row's output alone is bit for bit its output beside other rows. Plain
    int8 quantizes the run with one scale: the same row comes out differently next to a large one."""
    from edgevl.export.quantize import quantize_per_channel_int8

    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    x = (rng.standard_normal((3, 64)) * np.array([[100.0], [1.0], [0.01]])).astype(np.float32)
    q, scale = quantize_per_channel_int8(w)
    xs = np.abs(x).max(axis=1, keepdims=True) / 127
    exact = (np.rint(x / xs) @ q.astype(np.float64)) * xs * scale + bias
    got = _int8_projection(tmp_path, x, w, unsigned, per_row=True, bias=bias)
    assert np.all(np.abs(got - exact).max(axis=1) <= 1e-5 * np.abs(exact).max(axis=1))  # each row to its own size
    for r in range(3):
        np.testing.assert_array_equal(_int8_projection(tmp_path, x[r:r + 1], w, unsigned, per_row=True, bias=bias),
                                      got[r:r + 1])
    plain = _int8_projection(tmp_path, x, w, unsigned, bias=bias)
    assert not np.array_equal(_int8_projection(tmp_path, x[1:2], w, unsigned, bias=bias), plain[1:2])


def test_int8_weights_stored_unsigned_give_exact_integer_products(tmp_path):
    """One-sided activations (quantized near 255) against weights near ±127: the case where a u8×s8
    GEMM without VNNI saturates. Stored as uint8 + 128, the product is the exact integer one, on any CPU."""
    from edgevl.export.quantize import quantize_per_channel_int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    x = (np.abs(rng.standard_normal((3, 64))) + 0.5).astype(np.float32)
    q, scale = quantize_per_channel_int8(w)
    xs = x.max() / 255  # DynamicQuantizeLinear: range [0, max], zero point 0
    exact = (np.clip(np.rint(x / xs), 0, 255) @ q.astype(np.float64)) * xs * scale
    got = _int8_projection(tmp_path, x, w, unsigned=True)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


def test_which_cpus_store_int8_weights_unsigned():
    from edgevl.export.quantize import int8_gemm_saturates

    assert int8_gemm_saturates({"avx", "avx2", "fma"})  # AVX2 only: VPMADDUBSW saturates
    assert not int8_gemm_saturates({"avx", "avx2", "avx512f", "avx512_vnni"})
    assert not int8_gemm_saturates({"avx", "avx2", "avx_vnni"})
    assert not int8_gemm_saturates({"asimd", "asimddp"})  # ARM: not this kernel

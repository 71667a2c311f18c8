"""A small ONNX graph builder that writes weights straight to an external-data file.

Graphs are built from the checkpoint's arrays (as onnxruntime-genai's model builder does), so
export needs no torch and a 2B model never has to sit in memory twice: each initializer is
appended to ``<graph>.onnx.data`` as soon as it is made, and the ModelProto stays small.
Node names are deterministic and say where they are: ``/model/layers.3/attn/q_proj/MatMul``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS = "com.microsoft"
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime map the file instead of copying it


@dataclass(frozen=True)
class QuantSpec:
    """How MatMul weights are stored.

    "dynamic": int8 per-output-channel weights, activations quantized on the fly
    (DynamicQuantizeMatMul → integer GEMM with VNNI); the fastest int8 path for prompts and the
    vision tower on CPUs with VNNI. "nbits": block-wise weight-only (MatMulNBits), 4 or 8 bits.
    `per_row` (dynamic): each activation row gets its own scale instead of one per call, so a row's
    numbers do not depend on the rows run beside it (batch invariance), at some cost (quantization in
    separate nodes; docs/quantization.md).
    """

    method: str  # "dynamic" or "nbits"
    bits: int = 8
    block_size: int = 128
    accuracy_level: int = 4  # nbits: int8 activations inside the kernel, uses VNNI/AMX when present
    unsigned_weights: bool = False  # dynamic: int8 values stored as uint8 + 128 (CPUs whose s8 GEMM saturates)
    per_row: bool = False  # dynamic: one activation scale per row, not per call


class GraphBuilder:
    def __init__(self, name: str, out_dir: Path, quant: QuantSpec | None = None, bf16_weights: bool = False):
        """`bf16_weights`: an fp32 MatMul weight that bfloat16 holds exactly (every weight of a bf16
        checkpoint, which is how Qwen ships) is stored as bf16 and widened by a Cast in front of its
        MatMul: the same numbers in half the memory. The Cast runs on every call, so this suits a
        graph whose weights each meet hundreds of rows per run (the vision tower), not decoding."""
        self.name = name
        self.quant = quant
        self.bf16_weights = bf16_weights
        self.widened = 0  # weights stored as bf16
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.data_name = f"{name}.onnx.data"
        self.out_dir = out_dir
        self._data = open(out_dir / self.data_name, "wb")
        self._offset = 0
        self._consts: dict[tuple, str] = {}
        self._row_quantized: dict[str, tuple[str, str]] = {}  # activation → (uint8 values, row scales)

    # ---- values -------------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape: list) -> str:
        if value != name:
            self.op("Identity", [value], f"/output/{name}", out_names=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def init(self, name: str, arr: np.ndarray, elem: int | None = None) -> str:
        """An initializer; `elem` overrides the element type the array's bytes are read as (bf16)."""
        arr = np.require(arr, requirements="C")  # ascontiguousarray would make scalars 1-d
        if arr.nbytes < 1024 and elem is None:
            self.initializers.append(numpy_helper.from_array(arr, name))
            return name
        pad = -self._offset % _ALIGN
        self._data.write(b"\0" * pad)
        self._offset += pad
        self._data.write(arr.tobytes())
        t = TensorProto(name=name, data_type=elem or helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._offset += arr.nbytes
        self.initializers.append(t)
        return name

    def const(self, values: list | np.ndarray, dtype: type = np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"/const/{len(self._consts)}", arr)
        return self._consts[key]

    # ---- nodes --------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
           out_names: list[str] | None = None, **attrs) -> str | list[str]:
        outs = out_names or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str,
               quant: QuantSpec | None | str = "default") -> str:
        """y = x @ w.T + b for a torch-layout weight (out, in); quantized as the graph is, or as told."""
        spec = self.quant if quant == "default" else quant
        if spec is None:
            y = self.op("MatMul", [x, self.fp32_weight(f"{name}.weight", w.T.astype(np.float32), x)], f"{name}/MatMul")
            if b is not None:
                y = self.op("Add", [y, self.init(f"{name}.bias", b.astype(np.float32))], f"{name}/Add")
            return y
        from edgevl.export.quantize import quantize_blockwise, quantize_per_channel_int8

        if spec.method == "dynamic":
            q, scale = quantize_per_channel_int8(w)
            if spec.unsigned_weights:  # the same integers, shifted: see quantize.int8_gemm_saturates
                q, zeros = (q.astype(np.int16) + 128).astype(np.uint8), np.full(scale.shape, 128, np.uint8)
            else:
                zeros = np.zeros_like(scale, dtype=np.int8)
            weights = [self.init(f"{name}.qweight", q), self.init(f"{name}.scales", scale)]
            if spec.per_row:
                xq, x_scale = self.quantize_rows(x, w.shape[1], name)
                ins = [xq, weights[0], x_scale, weights[1], self.const(128, np.uint8)]
                if spec.unsigned_weights:
                    ins.append(self.init(f"{name}.qzeros", zeros))
                y = self.op("MatMulIntegerToFloat", ins, f"{name}/MatMulIntegerToFloat", domain=MS)
                # its own bias input is wrong with per-row scales (ONNX Runtime 1.32: rows scaled away)
                return y if b is None else self.op("Add", [y, self.init(f"{name}.bias", b.astype(np.float32))],
                                                   f"{name}/Add")
            ins = [x, *weights, self.init(f"{name}.qzeros", zeros)]
            if b is not None:
                ins.append(self.init(f"{name}.bias", b.astype(np.float32)))
            return self.op("DynamicQuantizeMatMul", ins, f"{name}/DynamicQuantizeMatMul", domain=MS)
        n, k = w.shape
        packed, scales, zeros = quantize_blockwise(w, spec.bits, spec.block_size)
        ins = [x, self.init(f"{name}.qweight", packed), self.init(f"{name}.scales", scales),
               self.init(f"{name}.qzeros", zeros)]
        if b is not None:
            ins += ["", self.init(f"{name}.bias", b.astype(np.float32))]  # g_idx unused
        return self.op("MatMulNBits", ins, f"{name}/MatMulNBits", domain=MS, K=k, N=n,
                       bits=spec.bits, block_size=spec.block_size, accuracy_level=spec.accuracy_level)

    def quantize_rows(self, x: str, k: int, name: str) -> tuple[str, str]:
        """x (..., k) → uint8 values (zero point 128) and one scale per row (..., 1), absmax / 127: a
        row quantized alone, whatever else the run holds. Once per activation, however many
        projections read it (the lm_head's vocabulary slices)."""
        if x not in self._row_quantized:
            amax = self.op("ReduceMax", [self.op("Abs", [x], f"{name}/RowAbs"), self.const([-1])],
                           f"{name}/RowMax", keepdims=1)
            scale = self.op("Mul", [self.op("Max", [amax, self.const(1e-12, np.float32)], f"{name}/RowMaxFloor"),
                                    self.const(1 / 127, np.float32)], f"{name}/RowScale")
            zero = self.op("Expand", [self.const(128, np.uint8), self.op("Shape", [scale], f"{name}/RowScaleShape")],
                           f"{name}/RowZero")
            # blocked quantization with one block per row: the per-row scale ONNX has
            xq = self.op("QuantizeLinear", [x, scale, zero], f"{name}/QuantizeRows", axis=-1, block_size=k)
            self._row_quantized[x] = (xq, scale)
        return self._row_quantized[x]

    def fp32_weight(self, name: str, w: np.ndarray, x: str) -> str:
        """An fp32 (K, N) weight for `x @ w`, stored as bf16 behind a Cast when the builder keeps bf16
        and that is exact. The Cast must wait for `x`: ONNX Runtime orders nodes without inputs
        first, and every weight widened up front would hold the whole tower in fp32 again. So the
        bf16 weight goes through a Reshape to its own shape computed from x's, which makes it wait."""
        bits = bf16_bits(w) if self.bf16_weights else None
        if bits is None:
            return self.init(name, w)
        self.widened += 1
        # K + 0·x[0] as an int: a data dependency (optimizers merge shape-only ones across layers)
        first = self.op("Slice", [self.reshape(x, [-1], f"{name}/Flat"), self.const([0]), self.const([1])],
                        f"{name}/First")
        zero = self.op("Mul", [self.op("Cast", [first], f"{name}/AsInt", to=INT64), self.const([0])],
                       f"{name}/Zero")
        k = self.op("Add", [zero, self.const([w.shape[0]])], f"{name}/InDim")
        shape = self.op("Concat", [k, self.const([w.shape[1]])], f"{name}/KN", axis=0)
        stored = self.reshape_to(self.init(f"{name}_bf16", bits, BFLOAT16), shape, f"{name}/AfterInput")
        return self.op("Cast", [stored], f"{name}/Cast", to=FLOAT)

    def reshape(self, x: str, shape: list[int], name: str) -> str:
        return self.reshape_to(x, self.const(shape), name)

    def reshape_to(self, x: str, shape: str, name: str) -> str:
        return self.op("Reshape", [x, shape], name)

    def rope_tables(self, cos: str, sin: str, head_dim: int, name: str, batch_shape_of: str | None = None
                    ) -> tuple[str, str, str]:
        """Host tables (N, head_dim) of cat(f, f) → the half-width caches and position ids that
        RotaryEmbedding wants: row i of the cache is token i's own angles (MRoPE or 2-D), so
        position id i just picks it. With `batch_shape_of` (a (B, S, ...) tensor), N = B*S and the
        ids are shaped (B, S); otherwise (1, N)."""
        half = [self.const([0]), self.const([head_dim // 2]), self.const([1])]
        cos_c = self.op("Slice", [cos, *half], f"{name}/cos_cache")
        sin_c = self.op("Slice", [sin, *half], f"{name}/sin_cache")
        n = self.op("Gather", [self.op("Shape", [cos], f"{name}/Shape"), self.const(0)], f"{name}/SeqLen")
        ids = self.op("Range", [self.const(0), n, self.const(1)], f"{name}/Range")
        if batch_shape_of is None:
            return self.op("Unsqueeze", [ids, self.const([0])], f"{name}/position_ids"), cos_c, sin_c
        bs = self.op("Slice", [self.op("Shape", [batch_shape_of], f"{name}/BatchShape"), self.const([0]),
                               self.const([2])], f"{name}/BatchSeq")
        return self.op("Reshape", [ids, bs], f"{name}/position_ids"), cos_c, sin_c

    def rope(self, x: str, tables: tuple[str, str, str], heads: int, name: str) -> str:
        """Fused rotate-half RoPE on (1, S, heads * head_dim)."""
        pos_ids, cos_c, sin_c = tables
        return self.op("RotaryEmbedding", [x, pos_ids, cos_c, sin_c], f"{name}/RotaryEmbedding", domain=MS,
                       num_heads=heads, interleaved=0)

    # ---- output -------------------------------------------------------------------------
    def save(self, doc: str = "") -> Path:
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS, 1)],
                                  producer_name="edgevl", doc_string=doc)
        model.ir_version = 10
        path = self.out_dir / f"{self.name}.onnx"
        onnx.save_model(model, str(path))
        return path


def bf16_bits(w: np.ndarray) -> np.ndarray | None:
    """An fp32 array's bfloat16 bits (uint16), or None when bf16 cannot hold it exactly."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return None if np.any(bits & 0xFFFF) else (bits >> 16).astype(np.uint16)


FLOAT, INT64, INT32, INT8, BFLOAT16 = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.INT8,
                                       TensorProto.BFLOAT16)

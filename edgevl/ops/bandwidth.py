"""This machine's read bandwidth, measured the way a decode step reads its weights.

A decode step is a matrix-vector product over every weight: its speed is bounded by how fast the
cores can stream memory, so tokens/s ≤ bandwidth ÷ bytes read per token. The figure here is an ONNX
Runtime MatMul of one row against a matrix far larger than any cache (the decoder's shape of work,
on the same kernels and threads), best of several runs.
"""

from __future__ import annotations

import time

import numpy as np

_K = 4096


def read_bandwidth_gbs(threads: int = 0, mib: int = 512, runs: int = 6) -> float:
    """GB/s (10⁹ bytes) streamed by a 1×K · K×N fp32 MatMul over `mib` MiB of weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = mib * 2**20 // (4 * _K)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _K]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [_K, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.random((1, _K), dtype=np.float32), "w": rng.random((_K, n), dtype=np.float32)}
    sess.run(None, feeds)  # first touch of the pages is not bandwidth
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return feeds["w"].nbytes / best / 1e9


def decode_ceiling(bandwidth_gbs: float, bytes_per_step: int) -> float:
    """The most decode steps per second the memory allows."""
    return bandwidth_gbs * 1e9 / bytes_per_step

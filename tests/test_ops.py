"""Operations helpers: the memory check refuses before loading; doctor reports the machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgevl.ops.memory import MemoryBudgetError, estimate_bytes
from edgevl.runtime.loader import load_engine
from edgevl.types import EngineOptions


def test_memory_check_refuses_a_model_that_would_not_fit(tiny_checkpoint, tiny_onnx):
    est = estimate_bytes(tiny_onnx, EngineOptions())
    assert est["total"] > est["weights"] > 0
    with pytest.raises(MemoryBudgetError, match="--max-memory"):
        load_engine(tiny_checkpoint, EngineOptions(max_memory_mb=est["total"] // 2**20 - 1), warmup=False)
    engine = load_engine(tiny_checkpoint, EngineOptions(max_memory_mb=est["total"] // 2**20 + 1), warmup=False)
    assert engine.info().backend == "onnxruntime"


def test_memory_estimate_grows_with_context_and_pixels(tiny_onnx):
    small = estimate_bytes(tiny_onnx, EngineOptions(max_context=1024, max_pixels=256 * 256))
    big = estimate_bytes(tiny_onnx, EngineOptions(max_context=8192, max_pixels=1024 * 1024))
    assert big["kv_cache"] == 8 * small["kv_cache"] and big["vision_activations"] > small["vision_activations"]


def test_doctor_reports_the_machine():
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "doctor"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for key in ("cpu", "cores", "features", "memory", "temperature", "RAPL", "onnxruntime", "recommendation"):
        assert key in out.stdout
    assert "--precision int" in out.stdout
    bandwidth = next(line for line in out.stdout.splitlines() if line.startswith("read bandwidth"))
    assert float(bandwidth.split()[2]) > 0.1 and "GB/s" in bandwidth

"""The instruction-set probe that llama.cpp's build for the bench is configured from."""

from __future__ import annotations

import platform

import pytest

from edgevl.bench.isa import GGML_FLAGS, ggml_cmake_flags, working_features

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe runs x86-64 instructions")

# /proc/cpuinfo's flag for each probed feature
_CPUINFO = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2", "avx_vnni": "avx_vnni",
            "avx512": "avx512f", "avx512_vbmi": "avx512vbmi", "avx512_vnni": "avx512_vnni",
            "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16"}


def test_what_runs_is_advertised_and_the_baseline_runs():
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    features = working_features()
    assert features is not None
    # an instruction that ran is one the CPU advertises (a probe that always passed would break this) ...
    assert all(_CPUINFO[f] in flags for f in features), features
    # ... and the everyday x86-64-v3 set runs wherever it is advertised (one that always failed would break this)
    for f in ("avx", "avx2", "fma", "f16c"):
        assert (f in features) == (_CPUINFO[f] in flags), f


def test_cmake_switches_follow_the_probe():
    assert ggml_cmake_flags(None) == ["-DGGML_NATIVE=ON"]
    flags = ggml_cmake_flags({"avx", "avx2", "avx512"})
    assert flags[0] == "-DGGML_NATIVE=OFF" and len(flags) == 1 + len(GGML_FLAGS)
    assert "-DGGML_AVX512=ON" in flags and "-DGGML_AMX_TILE=OFF" in flags and "-DGGML_FMA=OFF" in flags
    # AMX stays off where it runs: llama.cpp's own AMX kernel trapped on a VM whose AMX works
    amx = ggml_cmake_flags({"avx", "avx2", "amx_tile", "amx_int8", "amx_bf16"})
    assert "-DGGML_AVX2=ON" in amx and not any(f.startswith("-DGGML_AMX") and f.endswith("=ON") for f in amx)

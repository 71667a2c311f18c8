"""Which x86 instruction sets really run here, found by running one instruction of each.

CPUID is not enough: a VM may advertise AMX (`amx_tile` in /proc/cpuinfo, and
`arch_prctl(ARCH_REQ_XCOMP_PERM)` succeeds) while the hypervisor leaves it disabled, so the first
`tilezero` dies with "invalid opcode". llama.cpp built with GGML_NATIVE=ON trusts CPUID and crashes
there; `llama_build` builds for what this probe saw run instead.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# feature → (gcc target, a statement using it); each runs in a child process of its own
_TESTS = {
    "avx": ("avx", "__m256 a = _mm256_set1_ps(sink); a = _mm256_add_ps(a, a); sink = _mm256_cvtss_f32(a);"),
    "avx2": ("avx2", "__m256i a = _mm256_set1_epi32((int)sink); a = _mm256_add_epi32(a, a); "
                     "sink = _mm256_extract_epi32(a, 0);"),
    "fma": ("fma", "__m256 a = _mm256_set1_ps(sink); a = _mm256_fmadd_ps(a, a, a); sink = _mm256_cvtss_f32(a);"),
    "f16c": ("f16c", "__m128i h = _mm_set1_epi16(0x3c00); __m256 a = _mm256_cvtph_ps(h); "
                     "sink = _mm256_cvtss_f32(a);"),
    "bmi2": ("bmi2", "sink = (float)_pdep_u32((unsigned)sink + 5u, 0xf0f0u);"),
    "avx_vnni": ("avxvnni", "__m256i a = _mm256_set1_epi32((int)sink); a = _mm256_dpbusd_avx_epi32(a, a, a); "
                            "sink = _mm256_extract_epi32(a, 0);"),
    "avx512": ("avx512f", "__m512 a = _mm512_set1_ps(sink); a = _mm512_add_ps(a, a); "
                          "sink = _mm512_reduce_add_ps(a);"),
    "avx512_vbmi": ("avx512f,avx512vbmi", "__m512i a = _mm512_set1_epi32((int)sink); "
                                          "a = _mm512_permutexvar_epi8(a, a); sink = _mm512_reduce_add_epi32(a);"),
    "avx512_vnni": ("avx512f,avx512vnni", "__m512i a = _mm512_set1_epi32((int)sink); "
                                          "a = _mm512_dpbusd_epi32(a, a, a); sink = _mm512_reduce_add_epi32(a);"),
    "avx512_bf16": ("avx512f,avx512bf16", "__m512 a = _mm512_set1_ps(sink); __m512bh b = _mm512_cvtne2ps_pbh(a, a); "
                                          "a = _mm512_dpbf16_ps(a, b, b); sink = _mm512_reduce_add_ps(a);"),
    "amx_tile": ("amx-tile", "AMX_ON(); _tile_loadconfig(cfg); _tile_zero(0); _tile_release();"),
    "amx_int8": ("amx-tile,amx-int8", "AMX_ON(); _tile_loadconfig(cfg); _tile_zero(0); _tile_zero(1); "
                                      "_tile_zero(2); _tile_dpbssd(0, 1, 2); _tile_release();"),
    "amx_bf16": ("amx-tile,amx-bf16", "AMX_ON(); _tile_loadconfig(cfg); _tile_zero(0); _tile_zero(1); "
                                      "_tile_zero(2); _tile_dpbf16ps(0, 1, 2); _tile_release();"),
}

_PRELUDE = """
#include <immintrin.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
volatile float sink = 1.0f;
/* the tile configuration: palette 1, three 16-row tiles of 64 bytes */
static unsigned char cfg[64] __attribute__((aligned(64))) = {1, 0};
#define AMX_ON() do { syscall(SYS_arch_prctl, 0x1023, 18); cfg[0] = 1; \\
    for (int t = 0; t < 3; t++) { cfg[16 + 2 * t] = 64; cfg[48 + t] = 16; } } while (0)
"""


def _source() -> str:
    funcs, cases = [], []
    for i, (name, (target, body)) in enumerate(_TESTS.items()):
        funcs.append(f'__attribute__((target("{target}"))) static void t{i}(void) {{ {body} }}')
        cases.append(f'    if (!strcmp(argv[1], "{name}")) {{ t{i}(); return 0; }}')
    return (_PRELUDE + "\n".join(funcs) + "\nint main(int argc, char **argv) {\n    if (argc < 2) return 2;\n"
            + "\n".join(cases) + "\n    return 3;\n}\n")


def working_features() -> set[str] | None:
    """The features of `_TESTS` whose instruction ran; None where this cannot be told (not x86-64,
    or no C compiler)."""
    if platform.machine() not in ("x86_64", "AMD64") or not (cc := shutil.which("cc") or shutil.which("gcc")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(_source())
        if subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True).returncode != 0:
            return None
        return {f for f in _TESTS if subprocess.run([str(exe), f], capture_output=True).returncode == 0}


# GGML's CMake switches, by the feature each one needs
GGML_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
              "avx_vnni": "GGML_AVX_VNNI", "avx512": "GGML_AVX512", "avx512_vbmi": "GGML_AVX512_VBMI",
              "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16", "amx_tile": "GGML_AMX_TILE",
              "amx_int8": "GGML_AMX_INT8", "amx_bf16": "GGML_AMX_BF16"}


# Built off even where they run: on an Intel Xeon VM whose AMX runs this probe (and, tried by hand,
# all eight tiles in several threads), llama.cpp 0.3.36's AMX Q8_0 kernel still died on `tilezero
# %tmm4` at its warm-up (a tile its own configuration had not set up): every llama.cpp row was lost.
_NEVER = {"amx_tile", "amx_int8", "amx_bf16"}


def ggml_cmake_flags(features: set[str] | None) -> list[str]:
    """GGML_NATIVE where the probe cannot tell; otherwise each switch on or off by what ran (AMX off)."""
    if features is None:
        return ["-DGGML_NATIVE=ON"]
    on = features - _NEVER
    return ["-DGGML_NATIVE=OFF"] + [f"-D{flag}={'ON' if f in on else 'OFF'}" for f, flag in GGML_FLAGS.items()]

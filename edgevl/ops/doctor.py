"""`edgevl doctor`: what this machine offers, and the threads and precision to use on it."""

from __future__ import annotations

import glob
import os
import platform
from pathlib import Path

import psutil

# CPU flags that decide which ONNX Runtime kernels run: integer dot products make int8 fast
FEATURES = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
    "asimddp": "ARM dot product", "sve": "ARM SVE", "i8mm": "ARM I8MM",
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def temperature_sensors() -> list[tuple[str, float]]:
    out = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        try:
            kind = Path(zone).with_name("type").read_text().strip()
            out.append((kind, int(Path(zone).read_text()) / 1000))
        except (OSError, ValueError):
            continue
    try:
        for name, entries in (psutil.sensors_temperatures() or {}).items():
            out += [(f"{name}/{e.label or 'temp'}", e.current) for e in entries]
    except (AttributeError, OSError):
        pass
    return out


def rapl_domains() -> list[str]:
    return [p for p in sorted(glob.glob("/sys/class/powercap/intel-rapl*/energy_uj")) if os.access(p, os.R_OK)]


def recommend(flags: set[str], physical: int, mem_gb: float) -> tuple[int, str, str]:
    int8_fast = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
    if mem_gb < 4:
        precision = "int4"
    elif int8_fast:
        precision = "int8"
    else:
        precision = "int4"
    why = ("integer dot-product instructions make int8 matmuls fast" if int8_fast and precision == "int8"
           else "4-bit weights read the least memory per token" if precision == "int4" else "")
    if mem_gb < 3:
        why += "; under 3 GB of RAM even int4 of the 2B model is tight"
    return max(1, physical), precision, why


def report(measure_bandwidth: bool = True) -> str:
    import onnxruntime as ort

    from edgevl.ops.bandwidth import read_bandwidth_gbs

    flags = cpu_flags()
    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    vm = psutil.virtual_memory()
    temps = temperature_sensors()
    rapl = rapl_domains()
    threads, precision, why = recommend(flags, physical, vm.total / 2**30)
    have = [name for flag, name in FEATURES.items() if flag in flags]
    bandwidth = (f"{read_bandwidth_gbs(threads):.1f} GB/s with {threads} thread(s) (a one-row MatMul over 512 MiB: "
                 "decode tokens/s ≤ this ÷ the decoder's bytes)" if measure_bandwidth else "not measured")
    lines = [
        f"cpu            {cpu_model()} ({platform.machine()})",
        f"cores          {physical} physical, {logical} logical",
        f"features       {', '.join(have) or 'none of ' + ', '.join(FEATURES.values())}",
        f"memory         {vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available",
        f"read bandwidth {bandwidth}",
        "temperature    " + (", ".join(f"{k} {v:.0f} °C" for k, v in temps[:6]) if temps
                             else "no sensor found (the thermal governor will say so and stay idle)"),
        "energy (RAPL)  " + (", ".join(rapl) if rapl else "not readable (benchmark energy will be n/a)"),
        f"onnxruntime    {ort.__version__}, providers {', '.join(ort.get_available_providers())}",
        "",
        f"recommendation --threads {threads} --precision {precision}" + (f"  ({why})" if why else ""),
        "               threads: one per physical core; more adds contention, not speed",
    ]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0

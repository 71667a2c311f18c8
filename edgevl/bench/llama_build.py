"""llama.cpp for `edgevl bench --llama-cpp auto`, built once into the cache from the source that the
`llama-cpp-python` sdist vendors (the package index is reachable where GitHub may not be).

    pip download --no-deps --no-binary :all: llama-cpp-python==VERSION   →  vendor/llama.cpp
    cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON … -DLLAMA_CURL=OFF, targets llama-mtmd-cli llama-server …

It is built for the instruction sets that really run on this machine (`bench/isa.py` runs one
instruction of each), as edgevl's ONNX Runtime picks its kernels at run time: a fair comparison on the
machine that runs it. GGML_NATIVE would trust CPUID, which on some VMs advertises AMX that traps.
Each set of switches gets a build folder of its own, so a cache carried to another CPU rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgevl.bench.isa import ggml_cmake_flags, working_features
from edgevl.runtime.loader import cache_root

VERSION = "0.3.36"
TARGETS = ("llama-mtmd-cli", "llama-server", "llama-quantize", "llama-bench")
_APT_PACKAGES = ("cmake", "build-essential")


def llama_cpp_root() -> Path:
    return cache_root() / "llama.cpp" / VERSION


def source_dir() -> Path:
    """The llama.cpp checkout inside the unpacked sdist (its converter lives here too)."""
    return llama_cpp_root() / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def build_dir(flags: list[str]) -> Path:
    return source_dir() / ("build-" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:10])


def is_built(flags: list[str] | None = None) -> bool:
    """Built for `flags` (default: for what runs on this machine)."""
    flags = ggml_cmake_flags(working_features()) if flags is None else flags
    return all(os.access(build_dir(flags) / "bin" / t, os.X_OK) for t in TARGETS)


def ensure_llama_cpp() -> Path:
    """The folder of the built binaries; downloads and builds on first use (minutes), under a lock
    so two benches started together build once."""
    flags = ggml_cmake_flags(working_features())
    build = build_dir(flags)
    if is_built(flags):
        return build / "bin"
    root = llama_cpp_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(flags):
            return build / "bin"
        _ensure_tools()
        if not (source_dir() / "CMakeLists.txt").is_file():
            _unpack_sdist(root)
        src = source_dir()
        log(f"building llama.cpp {VERSION} in {build} with {' '.join(flags)} (about 7–10 minutes on 2 cores)")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *flags,
                        "-DLLAMA_CURL=OFF"], check=True, stdout=sys.stderr)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target",
                        *TARGETS], check=True, stdout=sys.stderr)
    return build / "bin"


def _ensure_tools() -> None:
    """cmake and a C++ compiler; installed with apt where we are root on a Debian-like system."""
    if shutil.which("cmake") and shutil.which("c++") and shutil.which("make"):
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *_APT_PACKAGES]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"building llama.cpp needs cmake and a C++ compiler: install them (e.g. `{' '.join(cmd)}`)")
    log(" ".join(cmd))
    subprocess.run(["apt-get", "update"], check=True, stdout=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _unpack_sdist(root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log(f"downloading the llama-cpp-python {VERSION} sdist (it vendors llama.cpp)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", tmp], check=True, stdout=sys.stderr)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            # the "data" filter refuses links and paths that leave the destination
            tar.extractall(root, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)

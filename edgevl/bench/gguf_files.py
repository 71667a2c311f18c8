"""A checkpoint as llama.cpp GGUF files, made once and cached: the text model in F32, Q8_0 and
Q4_K_M, and the vision projector (mmproj) in F16, llama.cpp's usual pairing.

Converted by llama.cpp's own `convert_hf_to_gguf.py` (through `edgevl.bench.gguf_convert`), the
quantized types by its `llama-quantize` from the F32 file.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from edgevl.bench.llama_build import VERSION
from edgevl.runtime.engine import cache_root

TEXT_TYPES = ("F32", "Q8_0", "Q4_K_M")
MMPROJ = "mmproj-F16.gguf"


def gguf_dir_for(checkpoint: Path) -> Path:
    """Keyed by the checkpoint's path, its weights' sizes and mtimes, and the llama.cpp version."""
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(checkpoint.glob("*.safetensors"))]
    h = hashlib.blake2b(f"{checkpoint.resolve()}{st}{VERSION}".encode(), digest_size=6).hexdigest()
    return cache_root() / "gguf" / f"{checkpoint.resolve().name}-{h}"


def ensure_gguf(checkpoint: Path, source: Path, bins: Path, types: tuple[str, ...] = TEXT_TYPES
                ) -> tuple[dict[str, Path], Path]:
    """{type: text model GGUF}, mmproj GGUF; each file is written under a temporary name and renamed
    when complete, so an interrupted run never leaves a truncated file that looks finished."""
    out = gguf_dir_for(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "F32.gguf"
    if not f32.is_file():
        _convert(source, checkpoint, f32, ["--outtype", "f32"])
    mmproj = out / MMPROJ
    if not mmproj.is_file():
        _convert(source, checkpoint, mmproj, ["--outtype", "f16", "--mmproj"])
    files = {}
    for t in types:
        path = out / f"{t}.gguf"
        if not path.is_file():
            _log(f"quantizing {t}")
            tmp = path.with_suffix(".tmp")
            subprocess.run([str(bins / "llama-quantize"), str(f32), str(tmp), t], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(path)
        files[t] = path
    return files, mmproj


def _convert(source: Path, checkpoint: Path, path: Path, args: list[str]) -> None:
    _log(f"converting {checkpoint} → {path}")
    tmp = path.with_suffix(".tmp")
    r = subprocess.run([sys.executable, "-m", "edgevl.bench.gguf_convert", str(source), str(checkpoint),
                        "--outfile", str(tmp), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{r.stderr[-3000:]}")
    tmp.rename(path)


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)

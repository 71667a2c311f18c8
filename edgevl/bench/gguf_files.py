"""A checkpoint as llama.cpp GGUF files, made once and cached: the text model in F32, Q8_0 and
Q4_K_M, and the vision projector (mmproj) in F16 (llama.cpp's usual pairing) or F32.

Converted by llama.cpp's own `convert_hf_to_gguf.py` (through `edgevl.bench.gguf_convert`), the
quantized types by its `llama-quantize` from the F32 file.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from edgevl.bench.llama_build import VERSION, log
from edgevl.runtime.loader import cache_root

TEXT_TYPES = ("F32", "Q8_0", "Q4_K_M")
MMPROJ_TYPES = ("F16", "F32")  # F16 is llama.cpp's usual projector; F32 matches an all-fp32 model


def gguf_dir_for(checkpoint: Path) -> Path:
    """Keyed by the checkpoint's path, its weights' sizes and mtimes, and the llama.cpp version."""
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(checkpoint.glob("*.safetensors"))]
    h = hashlib.blake2b(f"{checkpoint.resolve()}{st}{VERSION}".encode(), digest_size=6).hexdigest()
    return cache_root() / "gguf" / f"{checkpoint.resolve().name}-{h}"


def parse_spec(spec: str) -> tuple[str, str]:
    """`Q8_0` → (Q8_0, F16); `F32:F32` → the F32 text model with an F32 projector."""
    text, _, mmproj = spec.partition(":")
    mmproj = mmproj or "F16"
    if text not in TEXT_TYPES or mmproj not in MMPROJ_TYPES:
        raise SystemExit(f"--gguf {spec}: with --llama-cpp auto give TEXT[:MMPROJ], TEXT one of "
                         f"{', '.join(TEXT_TYPES)}, MMPROJ one of {', '.join(MMPROJ_TYPES)}")
    return text, mmproj


def ensure_gguf(checkpoint: Path, source: Path, bins: Path, specs: tuple[str, ...] = TEXT_TYPES
                ) -> list[tuple[str, Path, Path]]:
    """[(name, text model GGUF, mmproj GGUF)] for specs as `parse_spec` reads them. Each file is
    written under a temporary name and renamed when complete, so an interrupted run never leaves
    a truncated file that looks finished."""
    out = gguf_dir_for(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "F32.gguf"
    if not f32.is_file():
        _convert(source, checkpoint, f32, ["--outtype", "f32"])
    runs = []
    for spec in specs:
        text, mm = parse_spec(spec)
        mmproj = out / f"mmproj-{mm}.gguf"
        if not mmproj.is_file():
            _convert(source, checkpoint, mmproj, ["--outtype", mm.lower(), "--mmproj"])
        path = out / f"{text}.gguf"
        if not path.is_file():
            log(f"quantizing {text}")
            tmp = path.with_suffix(".tmp")
            subprocess.run([str(bins / "llama-quantize"), str(f32), str(tmp), text], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(path)
        runs.append((text if mm == "F16" else f"{text}+mmproj-{mm}", path, mmproj))
    return runs


def _convert(source: Path, checkpoint: Path, path: Path, args: list[str]) -> None:
    log(f"converting {checkpoint} → {path}")
    tmp = path.with_suffix(".tmp")
    r = subprocess.run([sys.executable, "-m", "edgevl.bench.gguf_convert", str(source), str(checkpoint),
                        "--outfile", str(tmp), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{r.stderr[-3000:]}")
    tmp.rename(path)


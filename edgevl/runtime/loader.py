"""From a folder to a running engine: export a checkpoint once (cached), check memory, open sessions."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edgevl.export.manifest import is_exported
from edgevl.export.quantize import int8_gemm_saturates
from edgevl.runtime.engine import OrtEngine
from edgevl.types import EngineOptions


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVL_CACHE", Path.home() / ".cache" / "edgevl"))


def exported_dir_for(checkpoint: Path, precision: str, kv_cache: str = "fp32") -> Path:
    """Where the export of a checkpoint is cached: keyed by its path, its weights' size and mtime,
    the precision, the KV cache's type and the exporter's own source (a changed graph builder never
    reuses old graphs)."""
    st = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(checkpoint.glob("*.safetensors"))]
    h = hashlib.blake2b(f"{checkpoint.resolve()}{st}".encode(), digest_size=6)
    for src in sorted((Path(__file__).parent.parent / "export").glob("*.py")):
        h.update(src.read_bytes())
    h.update(str(int8_gemm_saturates()).encode())  # an export for another CPU's int8 GEMM is not reused
    kv = "" if kv_cache == "fp32" else f"-kv{kv_cache}"
    return cache_root() / "onnx" / f"{checkpoint.name}-{precision}{kv}-{h.hexdigest()}"


def ensure_exported(model_path: str | Path, options: EngineOptions) -> Path:
    """An exported folder as is; a Hugging Face checkpoint exported once into the cache."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if is_exported(path):
        return path
    target = exported_dir_for(path, options.precision, options.kv_cache)
    if not is_exported(target):
        from edgevl.export import export_model  # the exporter (and onnx) only when there is work for it

        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        export_model(path, tmp, options.precision, kv_cache=options.kv_cache)
        try:
            tmp.rename(target)
        except OSError:  # another process (a second server, a test worker) exported it first
            if not is_exported(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_engine(model_path: str | Path, options: EngineOptions | None = None, warmup: bool = True) -> OrtEngine:
    """The ONNX engine on a checkpoint or an exported folder, memory-checked and warmed up."""
    options = options or EngineOptions()
    path = ensure_exported(model_path, options)
    if options.max_memory_mb:
        from edgevl.ops.memory import check_fits

        check_fits(path, options, options.max_memory_mb * 2**20)
    engine = OrtEngine(path, options)
    if warmup:
        engine.warmup()
    return engine

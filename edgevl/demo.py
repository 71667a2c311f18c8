"""The out-of-the-box demo model: the tiny random-weight Qwen3-VL, built on first use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgevl.make_model import make_model
from edgevl.runtime.loader import cache_root

DEMO_NAME = "Qwen3-VL-tiny-random"


def demo_model_dir(variant: str = "instruct") -> Path:
    """The demo checkpoint folder (a Hugging Face layout); made in about two seconds if missing.
    `variant` "thinking": the same weights with Qwen3-VL-*-Thinking's chat template."""
    # keyed by the maker's source: a changed maker never serves a stale demo
    key = hashlib.blake2b(Path(__file__).with_name("make_model.py").read_bytes(), digest_size=6).hexdigest()
    folder = cache_root() / "models" / key / (DEMO_NAME + ("-Thinking" if variant == "thinking" else ""))
    if not (folder / "edgevl_random_weights.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_model("tiny", tmp, seed=0, variant=variant)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder

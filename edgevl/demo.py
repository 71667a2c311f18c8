"""The out-of-the-box demo model: the tiny random-weight Qwen3-VL, built on first use."""

from __future__ import annotations

import os
from pathlib import Path

from edgevl.make_model import make_model
from edgevl.runtime.engine import cache_root

DEMO_NAME = "Qwen3-VL-tiny-random"


def demo_model_dir() -> Path:
    """The demo checkpoint folder (a Hugging Face layout); made in about two seconds if missing."""
    folder = cache_root() / "models" / DEMO_NAME
    if not (folder / "edgevl_random_weights.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_model("tiny", tmp, seed=0)
        tmp.replace(folder) if not folder.exists() else None
    return folder

"""Session fixtures: the tiny real-architecture checkpoint, its export, engines on it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# warnings from transformers about generation flags are noise in test output
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from edgevl.demo import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def thinking_checkpoint() -> Path:
    """The tiny checkpoint's weights with Qwen3-VL-*-Thinking's chat template (made once, cached)."""
    from edgevl.demo import demo_model_dir

    return demo_model_dir("thinking")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path) -> Path:
    from edgevl.runtime.loader import ensure_exported
    from edgevl.types import EngineOptions

    return ensure_exported(tiny_checkpoint, EngineOptions())  # exports once, cached


@pytest.fixture(scope="session")
def tiny_onnx_kv8(tiny_checkpoint: Path) -> Path:
    """The tiny model exported with an int8 KV cache (export/kv_scales.py)."""
    from edgevl.runtime.loader import ensure_exported
    from edgevl.types import EngineOptions

    return ensure_exported(tiny_checkpoint, EngineOptions(kv_cache="int8"))


@pytest.fixture(scope="session")
def engine(tiny_onnx: Path):
    from edgevl.runtime.engine import OrtEngine

    return OrtEngine(tiny_onnx)


@pytest.fixture(scope="session")
def thinking_engine(thinking_checkpoint: Path):
    from edgevl.runtime.loader import load_engine
    from edgevl.types import EngineOptions

    return load_engine(thinking_checkpoint, EngineOptions(), warmup=False)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgevl.runtime.reference import TransformersEngine

    return TransformersEngine(tiny_checkpoint)


def make_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A picture with structure (gradients + noise), so resizing and patch order matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    arr = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


# what an error message must never carry: the server's internals (addresses, paths, tracebacks)
INTERNALS = re.compile(r'0x[0-9a-f]{6,}|/tmp/|/work/|Traceback|File "', re.I)


def assert_public(message: str) -> None:
    assert not INTERNALS.search(message), f"internal state in an error message: {message!r}"

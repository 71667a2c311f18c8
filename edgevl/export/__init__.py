"""Checkpoint folder → ONNX graphs + manifest, ready for the runtime engine (no torch needed).

The exporter (exporter.py) builds graphs with the `onnx` package, whose import takes over a second
(its ml_dtypes extension); a server on an exported folder reads only manifest.py. So `export_model`
and the precision tables load on first use, and starting a server never pays for the exporter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgevl.export.exporter import DEFAULT_VISION_PRECISION, PRECISIONS, export_model

__all__ = ["DEFAULT_VISION_PRECISION", "PRECISIONS", "export_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgevl.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

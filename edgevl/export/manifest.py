"""What an export is: the manifest the exporter writes next to its graphs and the runtime reads back.

One dataclass, written and read here only. A field added later takes a default, which is what an
export made before it is read as; a field this code does not know (a newer export) is ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "edgevl_manifest.json"
FORMAT_VERSION = 1


def _graphs() -> dict[str, str]:
    return {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}


@dataclass
class Manifest:
    format_version: int = FORMAT_VERSION
    model_name: str = ""  # read as the folder's name when empty
    source: str = ""  # the checkpoint folder it was exported from
    precision: str = "fp32"  # the decoder's weights (a types.Precision)
    vision_precision: str = "fp32"
    lm_head_precision: str = "fp32"
    random_weights: bool = False  # made by `edgevl make-model`
    embedding_precision: str = "fp32"
    int8_unsigned_weights: bool = False  # where this CPU's s8 GEMM saturates (quantize.int8_gemm_saturates)
    graphs: dict[str, str] = field(default_factory=_graphs)  # vision, embed, decoder → file in the folder
    # graphs whose weights are stored as bf16 and widened at run time (GraphBuilder.fp32_weight)
    bf16_weight_graphs: list[str] = field(default_factory=list)
    # one vision run takes all of a clip's frame groups (cos/sin of one group, patches of all); older
    # exports run one group at a time
    vision_runs_frame_groups_together: bool = False
    # the vision tower in slices, in run order (None: the whole tower is graphs["vision"]):
    # {"embed": file, "blocks": [{"graph": file, "blocks": [first, end), "deepstack": [j, ...]}], "merger": file,
    #  "chunk_rows": n}; with chunk_rows > 0 each block entry also names its "qkv" graph (export/vision.py)
    vision_slices: dict | None = None
    kv_cache: str = "fp32"  # the KV cache's element type: fp32, or int8 with fixed scales (export/kv_scales.py)
    export_seconds: float = 0.0

    def write(self, folder: str | Path) -> None:
        (Path(folder) / MANIFEST).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        stored = json.loads((folder / MANIFEST).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        m = cls(**{k: v for k, v in stored.items() if k in known})
        m.model_name = m.model_name or folder.name
        return m


def is_exported(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()

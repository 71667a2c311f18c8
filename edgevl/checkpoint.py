"""Read a Hugging Face Qwen3-VL checkpoint folder without torch.

A user's downloaded ``Qwen/Qwen3-VL-2B-Instruct`` and the folders made by ``edgevl make-model``
go through this same code. Every size and token id comes from the folder's files.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    mrope_interleaved: bool
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: frozenset[int]  # what ends an answer (eos_ids_of)

    @classmethod
    def read(cls, folder: str | Path) -> ModelConfig:
        """A checkpoint's (or an export's) config.json, with its generation_config.json when it has one."""
        folder = Path(folder)
        gen = folder / "generation_config.json"
        return cls.from_dict(json.loads((folder / "config.json").read_text()),
                             json.loads(gen.read_text()) if gen.is_file() else {})

    @classmethod
    def from_dict(cls, d: dict, generation: dict | None = None) -> ModelConfig:
        """config.json's contents; `generation`: generation_config.json's, which says what ends an answer."""
        archs = d.get("architectures") or []
        if d.get("model_type") != "qwen3_vl" and "Qwen3VLForConditionalGeneration" not in archs:
            raise ValueError(
                f"not a Qwen3-VL checkpoint (model_type={d.get('model_type')!r}, architectures={archs})"
            )
        t, v = d["text_config"], d["vision_config"]
        # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", t.get("rope_theta", 5_000_000.0)))
        n_heads = int(t["num_attention_heads"])
        head_dim = int(t.get("head_dim") or t["hidden_size"] // n_heads)
        tie = bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        text = TextConfig(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(t.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", (24, 20, 20))),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
            tie_word_embeddings=tie,
        )
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(v["depth"]),
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_heads=int(v["num_heads"]),
            in_channels=int(v.get("in_channels", 3)),
            patch_size=int(v["patch_size"]),
            spatial_merge_size=int(v["spatial_merge_size"]),
            temporal_patch_size=int(v["temporal_patch_size"]),
            out_hidden_size=int(v["out_hidden_size"]),
            num_position_embeddings=int(v["num_position_embeddings"]),
            deepstack_visual_indexes=tuple(int(x) for x in v.get("deepstack_visual_indexes", ())),
            hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        return cls(
            text=text,
            vision=vision,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            eos_token_ids=eos_ids_of(d, generation or {}),
        )


def eos_ids_of(config: dict, generation: dict) -> frozenset[int]:
    """The tokens that end an answer: generation_config's eos_token_id (Qwen's lists both <|im_end|> and
    <|endoftext|>), else the text config's, else the config's, as transformers' generate falls back."""
    for where in (generation, config.get("text_config", {}), config):
        eos = where.get("eos_token_id")
        if eos is not None:
            return frozenset(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return frozenset()


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "U8": np.uint8, "I8": np.int8}


class SafetensorsFile:
    """Memory-mapped reader; BF16 (what Qwen ships) becomes float32 on access."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self._mm[:8])
        header = json.loads(self._mm[8 : 8 + n])
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries: dict[str, dict] = header

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        dt = _DTYPES[e["dtype"]]
        arr = np.frombuffer(self._mm, dtype=dt, count=(end - start) // np.dtype(dt).itemsize,
                            offset=self._base + start).reshape(e["shape"])
        if e["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32, copy=False)

    def close(self) -> None:
        self._mm.close()
        self._f.close()


class Weights:
    """All tensors of a checkpoint, whether in one file or sharded with an index."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {folder}")
        self._files = [SafetensorsFile(f) for f in files]
        self._where = {k: f for f in self._files for k in f.entries}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def close(self) -> None:
        for f in self._files:
            f.close()


@dataclass
class Checkpoint:
    folder: Path
    config: ModelConfig
    preprocessor: dict
    generation: dict
    random_weights: bool  # made by `edgevl make-model`

    @property
    def name(self) -> str:
        return self.folder.name

    def weights(self) -> Weights:
        return Weights(self.folder)


def load_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    pre = folder / "preprocessor_config.json"
    gen = folder / "generation_config.json"
    generation = json.loads(gen.read_text()) if gen.is_file() else {}
    marker = folder / "edgevl_random_weights.json"
    return Checkpoint(
        folder=folder,
        config=ModelConfig.from_dict(json.loads((folder / "config.json").read_text()), generation),
        preprocessor=json.loads(pre.read_text()) if pre.is_file() else {},
        generation=generation,
        random_weights=marker.is_file(),
    )


def read_chat_template(folder: Path) -> str:
    """Where Hugging Face keeps it, newest convention first."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    if "chat_template" not in tc:
        raise ValueError(f"no chat template in {folder}")
    return tc["chat_template"]

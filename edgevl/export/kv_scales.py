"""Scales for an int8 KV cache, measured by running the float-cache decoder over calibration text.

GroupQueryAttention takes a cache's scales as fixed inputs (one per head and channel, here): it
stores round(x / scale) saturated to int8 and attends over the dequantized values. Fixed scales
keep a row's numbers independent of what runs beside it and of how its prompt was cut into
chunks, which per-token scales computed at run time would also do but ONNX Runtime does not offer.
So the range must be known before the first request: the absolute maximum of every channel of K
(after its norm and rotary) and V over a few hundred tokens of text, times a margin for tokens
beyond what calibration saw, which saturate rather than wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevl.checkpoint import ModelConfig, Weights
from edgevl.preprocess import positions as pos

CALIBRATION_TOKENS = 384  # per run
CALIBRATION_RUNS = 2
MARGIN = 1.25  # headroom over the calibrated maximum


@dataclass(frozen=True)
class KVScales:
    """One layer's int8 KV cache scales, each (1, kv_heads, 1, head_dim)."""

    key: np.ndarray
    value: np.ndarray


def calibration_ids(tokenizer_file: Path, runs: int = CALIBRATION_RUNS, n: int = CALIBRATION_TOKENS
                    ) -> list[np.ndarray]:
    """`runs` token sequences of `n`: a chat turn's framing around lines of the tokenizer corpus."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    lines = resources.files("edgevl.data").joinpath("tokenizer_corpus.txt").read_text().splitlines()
    out = []
    for r in range(runs):
        body = " ".join(lines[r * 97:])  # a different stretch of the corpus per run
        text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{body[:4000]}"
                f"<|im_end|>\n<|im_start|>assistant\n{body[4000:8000]}")
        ids = np.asarray(tok.encode(text).ids[:n], np.int64)
        out.append(ids)
    return out


def measure_kv_scales(decoder: Path, cfg: ModelConfig, w: Weights, runs: list[np.ndarray],
                      threads: int = 0) -> list[KVScales]:
    """Per layer, the scales that hold every K and V channel the float-cache `decoder` writes over
    the token sequences `runs` (each one prompt run alone), times MARGIN."""
    t = cfg.text
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(decoder), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    embed = w.get("model.language_model.embed_tokens.weight")
    inv_freq = pos.text_inv_freq(t.head_dim, t.rope_theta)
    n_deep = len(cfg.vision.deepstack_visual_indexes)
    amax = np.zeros((2, t.num_layers, t.num_kv_heads, t.head_dim), np.float32)
    for ids in runs:
        n = len(ids)
        cos, sin = pos.text_cos_sin(np.tile(np.arange(n), (3, 1)), inv_freq, t.mrope_section, t.mrope_interleaved)
        caches = [np.zeros((1, t.num_kv_heads, n, t.head_dim), np.float32) for _ in range(2 * t.num_layers)]
        spare = np.zeros((1, t.num_kv_heads, 1, t.head_dim), np.float32)
        bind = sess.io_binding()
        for i in range(t.num_layers):
            for j, kind in enumerate(("key", "value")):
                ov = ort.OrtValue.ortvalue_from_numpy(caches[2 * i + j])
                bind.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                bind.bind_ortvalue_output(f"present.{i}.{kind}", ov)
                sp = ort.OrtValue.ortvalue_from_numpy(spare.copy())
                bind.bind_ortvalue_input(f"b_key_values.{i}.{kind}", sp)
                bind.bind_ortvalue_output(f"b_present.{i}.{kind}", sp)
        feeds = {"inputs_embeds": embed[ids][None], "cos": cos, "sin": sin, "mixed": np.asarray(False),
                 "a_shape": np.asarray([1, n], np.int64), "seqlens_k": np.asarray([n - 1], np.int32),
                 "total_sequence_length": np.asarray(n, np.int32), "b_seqlens_k": np.zeros(1, np.int32),
                 "b_total_sequence_length": np.asarray(1, np.int32), "visual_idx": np.zeros((0, 2), np.int64),
                 "image_embeds": np.zeros((0, t.hidden_size), np.float32),
                 "deepstack_embeds": np.zeros((n_deep, 0, t.hidden_size), np.float32),
                 "logit_idx": np.asarray([n - 1], np.int64)}
        for k, v in feeds.items():
            if k in names:
                bind.bind_cpu_input(k, np.ascontiguousarray(v))
        bind.bind_output("logits")
        sess.run_with_iobinding(bind)
        for i in range(t.num_layers):
            for j in range(2):
                np.maximum(amax[j, i], np.abs(caches[2 * i + j][0]).max(axis=1), out=amax[j, i])
    scale = np.maximum(amax, 1e-6) * MARGIN / 127
    return [KVScales(scale[0, i][None, :, None, :].copy(), scale[1, i][None, :, None, :].copy())
            for i in range(t.num_layers)]

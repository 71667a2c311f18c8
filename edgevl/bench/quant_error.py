"""Quantization error against fp32: logit cosine similarity and greedy agreement.

The fp32 engine answers greedily; each quantized engine is then teacher-forced along the same
tokens (a Constraint that records the logits and forces the next token), so every step compares
like with like. Free-running greedy agreement (the first diverging token) is reported too.
A precision with "+kv8" (int8+kv8, fp32+kv8) is exported with an int8 KV cache.

    python -m edgevl.bench.quant_error CHECKPOINT [--tokens 64] [--precisions int8,int4,int8+kv8]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image, ImageDraw

from edgevl.runtime.constrain import Recorder
from edgevl.runtime.loader import load_engine
from edgevl.types import (
    EngineOptions,
    GenerationRequest,
    ImagePart,
    Message,
    SamplingParams,
    TextPart,
    TokenEvent,
)


def test_image(size: int = 448) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 240, 245))
    d = ImageDraw.Draw(img)
    for i in range(8):
        d.rectangle([20 + i * 50, size - 40 - i * 40, 50 + i * 50, size - 20], fill=(40 + i * 25, 90, 200 - i * 20))
    d.text((20, 20), "Monthly output, kWh", fill=(0, 0, 0))
    return img


def compare(checkpoint: str, precisions: list[str], n_tokens: int = 64) -> dict:
    msgs = [Message("user", [ImagePart(test_image()), TextPart("Describe this chart and its trend.")])]
    params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    opts = dict(prefix_cache=False, vision_cache_entries=0)
    ref_engine = load_engine(checkpoint, EngineOptions(precision="fp32", **opts), warmup=False)
    rec = Recorder()
    events = list(ref_engine.generate(GenerationRequest(msgs, params, constraint=rec)))
    ref_tokens = [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]
    ref_logits = np.stack(rec.logits)
    del ref_engine
    out: dict = {"checkpoint": checkpoint, "tokens": n_tokens, "precisions": {}}
    for p in precisions:
        precision, kv = p.split("+kv8")[0], "int8" if p.endswith("+kv8") else "fp32"
        eng = load_engine(checkpoint, EngineOptions(precision=precision, kv_cache=kv, **opts), warmup=False)
        forced = Recorder(tokens=ref_tokens)
        list(eng.generate(GenerationRequest(msgs, params, constraint=forced)))
        q = np.stack(forced.logits)[: len(ref_logits)]
        cos = np.sum(q * ref_logits, 1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref_logits, axis=1)
        free = [e.token_id for e in eng.generate(GenerationRequest(msgs, params))
                if isinstance(e, TokenEvent) and e.token_id >= 0]
        first_diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, free)) if a != b), len(ref_tokens))
        out["precisions"][p] = {
            "prefill_logit_cosine": round(float(cos[0]), 6),
            "mean_logit_cosine": round(float(cos.mean()), 6),
            "min_logit_cosine": round(float(cos.min()), 6),
            "teacher_forced_top1_agreement": round(float(np.mean(q.argmax(1) == ref_logits.argmax(1))), 4),
            "greedy_tokens_identical_before_first_divergence": first_diff,
        }
        del eng
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--precisions", default="int8,int4")
    args = ap.parse_args(argv)
    print(json.dumps(compare(args.checkpoint, args.precisions.split(","), args.tokens), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

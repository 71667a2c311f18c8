"""Make Qwen3-VL checkpoints with the real architecture and random (seeded) weights.

No model hub is reachable where edgevl is built and tested, so the project makes its own
folders laid out exactly like a downloaded ``Qwen/Qwen3-VL-2B-Instruct``: same file names,
same config keys, same tensor names, bf16 safetensors, a byte-level BPE tokenizer with the real
special-token ids. Speed depends on shapes, not on weight values, so the ``2b`` folder is a
fair benchmark subject; ``tiny`` has the same structure at toy sizes for tests and the demo.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np

SPECIAL_TOKENS: list[tuple[str, bool]] = [  # from id 151643 on, in order, as in Qwen's tokenizer
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
FIRST_SPECIAL_ID = 151643
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SIZES: dict[str, dict] = {
    # The published Qwen3-VL-2B-Instruct shapes.
    "2b": dict(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  mrope_section=[24, 20, 20]),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304),
        embed_std=0.02,
    ),
    # Same structure at toy sizes: builds in about a second.
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  mrope_section=[4, 2, 2]),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                    deepstack_visual_indexes=[1, 2, 3], num_position_embeddings=2304),
        # rows of equal norm and stronger residual branches: a random model whose greedy output
        # depends on its input instead of repeating one token, so parity tests mean something
        embed_std=0.25, unit_rows=True, out_scale=2.0,
    ),
}
VOCAB_SIZE = 151936

# Qwen ships each size as Instruct and Thinking: the same architecture and tokenizer; the Thinking
# template opens every answer with `<think>\n` (and reads `reasoning_content` back), and its
# generation_config recommends a hotter sampler
VARIANTS: dict[str, dict] = {
    "instruct": dict(template="qwen3_vl_chat_template.jinja", name="Instruct",
                     sampling={"top_k": 20, "top_p": 0.8, "temperature": 0.7}),
    "thinking": dict(template="qwen3_vl_thinking_chat_template.jinja", name="Thinking",
                     sampling={"top_k": 20, "top_p": 0.95, "temperature": 1.0}),
}


def make_config(size: str) -> dict:
    s = SIZES[size]
    t, v = s["text"], s["vision"]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": t["head_dim"],
            "hidden_act": "silu",
            "hidden_size": t["hidden_size"],
            "initializer_range": 0.02,
            "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": t["num_attention_heads"],
            "num_hidden_layers": t["num_hidden_layers"],
            "num_key_value_heads": t["num_key_value_heads"],
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": t["mrope_section"],
                             "rope_type": "default"},
            "rope_theta": 5000000,
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": VOCAB_SIZE,
        },
        "tie_word_embeddings": True,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": v["deepstack_visual_indexes"],
            "depth": v["depth"],
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": v["hidden_size"],
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": v["intermediate_size"],
            "model_type": "qwen3_vl",
            "num_heads": v["num_heads"],
            "num_position_embeddings": v["num_position_embeddings"],
            "out_hidden_size": t["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


def tensor_shapes(cfg: dict) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor, named as in the published checkpoint."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h, hd = t["hidden_size"], t["head_dim"]
    nq, nkv, ff = t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"]
    lm = "model.language_model"
    yield f"{lm}.embed_tokens.weight", (t["vocab_size"], h), "embed"
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,), "norm"
        yield f"{p}.post_attention_layernorm.weight", (h,), "norm"
        yield f"{p}.self_attn.q_proj.weight", (nq * hd, h), "linear"
        yield f"{p}.self_attn.k_proj.weight", (nkv * hd, h), "linear"
        yield f"{p}.self_attn.v_proj.weight", (nkv * hd, h), "linear"
        yield f"{p}.self_attn.o_proj.weight", (h, nq * hd), "out"
        yield f"{p}.self_attn.q_norm.weight", (hd,), "norm"
        yield f"{p}.self_attn.k_norm.weight", (hd,), "norm"
        yield f"{p}.mlp.gate_proj.weight", (ff, h), "linear"
        yield f"{p}.mlp.up_proj.weight", (ff, h), "linear"
        yield f"{p}.mlp.down_proj.weight", (h, ff), "out"
    yield f"{lm}.norm.weight", (h,), "norm"

    vh, vff, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    ps, tps, c = v["patch_size"], v["temporal_patch_size"], v["in_channels"]
    merged = vh * v["spatial_merge_size"] ** 2
    yield "model.visual.patch_embed.proj.weight", (vh, c, tps, ps, ps), "linear"
    yield "model.visual.patch_embed.proj.bias", (vh,), "bias"
    yield "model.visual.pos_embed.weight", (v["num_position_embeddings"], vh), "embed_small"
    for i in range(v["depth"]):
        p = f"model.visual.blocks.{i}"
        for n in ("norm1", "norm2"):
            yield f"{p}.{n}.weight", (vh,), "norm"
            yield f"{p}.{n}.bias", (vh,), "bias"
        yield f"{p}.attn.qkv.weight", (3 * vh, vh), "linear"
        yield f"{p}.attn.qkv.bias", (3 * vh,), "bias"
        yield f"{p}.attn.proj.weight", (vh, vh), "linear"
        yield f"{p}.attn.proj.bias", (vh,), "bias"
        yield f"{p}.mlp.linear_fc1.weight", (vff, vh), "linear"
        yield f"{p}.mlp.linear_fc1.bias", (vff,), "bias"
        yield f"{p}.mlp.linear_fc2.weight", (vh, vff), "linear"
        yield f"{p}.mlp.linear_fc2.bias", (vh,), "bias"
    mergers = ["model.visual.merger"] + [
        f"model.visual.deepstack_merger_list.{j}" for j in range(len(v["deepstack_visual_indexes"]))
    ]
    for j, p in enumerate(mergers):
        norm_dim = vh if j == 0 else merged  # deepstack mergers normalise after the 2x2 shuffle
        yield f"{p}.norm.weight", (norm_dim,), "norm"
        yield f"{p}.norm.bias", (norm_dim,), "bias"
        yield f"{p}.linear_fc1.weight", (merged, merged), "linear"
        yield f"{p}.linear_fc1.bias", (merged,), "bias"
        yield f"{p}.linear_fc2.weight", (out, merged), "linear"
        yield f"{p}.linear_fc2.bias", (out,), "bias"


def _random(rng: np.random.Generator, shape: tuple[int, ...], kind: str, size: dict) -> np.ndarray:
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x = rng.standard_normal(shape, dtype=np.float32)
    if kind == "embed":
        if size.get("unit_rows"):
            x /= np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(shape[1])
        return x * np.float32(size["embed_std"])
    if kind in ("embed_small", "bias"):
        return x * np.float32(0.5 if kind == "embed_small" else 0.02)
    # linear: keep activations O(1) whatever the fan-in
    scale = size.get("out_scale", 1.0) if kind == "out" else 1.0
    return x * np.float32(scale / np.sqrt(np.prod(shape[1:])))


def _to_bf16(x: np.ndarray) -> bytes:
    u = x.astype(np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype(np.uint16).tobytes()


def write_safetensors_bf16(path: Path, specs: list[tuple[str, tuple[int, ...], str]],
                           make: callable) -> None:
    """Stream tensors to disk one at a time: a 2B model never sits in memory whole."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in specs:
            f.write(_to_bf16(make(name, shape, kind)))


def make_tokenizer_json() -> str:
    """A byte-level BPE with Qwen2's pre-tokenizer and the special tokens at Qwen's ids.

    Merges are learnt from a small built-in text; the ids up to the first special token are
    filled with made-up words and CJK characters, so that a random model's output reads as
    words and exercises multi-byte UTF-8 in streaming.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = resources.files("edgevl.data").joinpath("tokenizer_corpus.txt").read_text()
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]

    byte_map = _bytes_to_unicode()
    rng = np.random.default_rng(1234)
    for cp in range(0x4E00, 0x4E00 + 4000):  # common CJK block
        vocab.setdefault("".join(byte_map[b] for b in chr(cp).encode()), len(vocab))
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    syll = [c + v for c in cons for v in vows]
    while len(vocab) < FIRST_SPECIAL_ID:
        n = int(rng.integers(1, 5))
        word = "\u0120" + "".join(syll[int(i)] for i in rng.integers(0, len(syll), n))
        vocab.setdefault(word, len(vocab))
    assert len(vocab) == FIRST_SPECIAL_ID

    spec["added_tokens"] = [
        {"id": FIRST_SPECIAL_ID + i, "content": c, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for i, (c, special) in enumerate(SPECIAL_TOKENS)
    ]
    spec["model"]["dropout"] = None
    spec["model"]["unk_token"] = None
    spec["model"]["byte_fallback"] = False
    Tokenizer.from_str(json.dumps(spec))  # fails loudly if the file would not load
    return json.dumps(spec, ensure_ascii=False)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_model(size: str, out: str | Path, seed: int = 0, variant: str = "instruct") -> Path:
    """`variant`: "instruct" or "thinking" (Qwen3-VL-*-Thinking's chat template and sampling)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(size)
    v = VARIANTS[variant]
    template = resources.files("edgevl.data").joinpath(v["template"]).read_text()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
        "eos_token_id": [151645, 151643], **v["sampling"],
        "repetition_penalty": 1.0, "transformers_version": "4.57.0.dev0",
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
    }, indent=2))
    # as Qwen3-VL-2B-Instruct's video_preprocessor_config.json, with the class defaults spelt out
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "fps": 2, "min_frames": 4, "max_frames": 768,
        "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
    }, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    (out / "tokenizer.json").write_text(make_tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_SPECIAL_ID + i): {"content": c, "lstrip": False, "normalized": False,
                                        "rstrip": False, "single_word": False, "special": s}
            for i, (c, s) in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 262144,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))
    rng = np.random.default_rng(seed)
    specs = list(tensor_shapes(cfg))
    write_safetensors_bf16(out / "model.safetensors", specs,
                           lambda name, shape, kind: _random(rng, shape, kind, SIZES[size]))
    (out / "edgevl_random_weights.json").write_text(json.dumps({
        "random_weights": True, "size": size, "seed": seed, "variant": variant,
        "note": "made by `edgevl make-model`: real Qwen3-VL architecture, random weights; "
                "answers are meaningless",
    }, indent=2))
    return out

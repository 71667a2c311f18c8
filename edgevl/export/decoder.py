"""The Qwen3-VL language model: a token-embedding graph, and a decoder graph with a KV cache and
DeepStack inputs.

    inputs_embeds ─► ScatterND(image_embeds at visual_idx) ─► layer 0 ─► +deepstack[0]
      ─► layer 1 ─► +deepstack[1] ─► … ─► layer L-1 ─► last position ─► RMSNorm ─► lm_head ─► logits

Each layer: RMSNorm → q/k/v (one projection, split) → per-head RMSNorm on q, k → MRoPE (host-made cos/sin) →
GroupQueryAttention over a KV buffer that is shared between past and present (the engine binds
one buffer to both, so nothing is copied per step) → o_proj → residual+RMSNorm (fused) → SwiGLU
(gate and up one projection, split).
Only the last position's logits are computed (the last `num_logits`, for a jump-forward draft): the
prompt's lm_head cost is one row, not S.
The lm_head is cut into vocabulary slices (LM_HEAD_SLICE_ROWS) whose logits are concatenated.
Batched: several sequences decode in one run (batch rows, one token each), each with its own
length in `seqlens_k`; a prompt chunk runs as a batch of one.
"""

from __future__ import annotations

import numpy as np

from edgevl.checkpoint import ModelConfig, Weights
from edgevl.export.builder import BFLOAT16, FLOAT, INT32, INT64, MS, GraphBuilder, QuantSpec, bf16_bits
from edgevl.export.quantize import quantize_per_channel_int8

# ONNX Runtime prepacks a weight while its memory-mapped original is still resident, so for a
# moment it is held twice. The lm_head is by far the largest weight (1.2 GB in fp32 on the 2B,
# the moment that set fp32's peak RSS); in slices of 32768 vocabulary rows (256 MB there) the
# overlap is a fifth of that, and the slices' products are the same numbers.
LM_HEAD_SLICE_ROWS = 32768


def embedding_precision(cfg: ModelConfig, w: Weights, head: QuantSpec | None) -> str:
    """fp32 for fp32 models; int8 rows shared in value with a tied int8 lm_head; else fp16."""
    tied = cfg.text.tie_word_embeddings or "lm_head.weight" not in w
    if head is None:
        return "fp32"
    return "int8" if tied and head.method == "dynamic" else "fp16"


def build_embedding(b: GraphBuilder, cfg: ModelConfig, w: Weights, precision: str) -> None:
    """input_ids → inputs_embeds. Its own graph: a Gather never prepacks, so ONNX Runtime keeps the
    table memory-mapped and only the rows a prompt touches become resident (1.2 GB saved in fp32)."""
    lm = "model.language_model"
    h = cfg.text.hidden_size
    ids = b.input("input_ids", INT64, ["batch", "seq"])
    embed = w.get(f"{lm}.embed_tokens.weight")
    if precision == "int8":
        q, scale = quantize_per_channel_int8(embed)  # the same values the tied int8 lm_head uses
        rows = b.op("Gather", [b.init(f"{lm}.embed_tokens.qweight", np.ascontiguousarray(q.T)), ids],
                    "/model/embed_tokens/Gather")
        row_scale = b.op("Gather", [b.init(f"{lm}.embed_tokens.scales", scale), ids],
                         "/model/embed_tokens/GatherScale")
        x = b.op("Mul", [b.op("Cast", [rows], "/model/embed_tokens/Cast", to=FLOAT),
                         b.op("Unsqueeze", [row_scale, b.const([-1])], "/model/embed_tokens/Unsqueeze")],
                 "/model/embed_tokens/Dequantize")
    elif precision == "fp16" or (bits := bf16_bits(embed)) is not None:
        # a narrow table widened after the lookup: fp16 as asked, or fp32 from a bf16 checkpoint
        # (the same rows, half the file)
        table = (b.init(f"{lm}.embed_tokens.weight_fp16", embed.astype(np.float16)) if precision == "fp16"
                 else b.init(f"{lm}.embed_tokens.weight_bf16", bits, BFLOAT16))
        x = b.op("Cast", [b.op("Gather", [table, ids], "/model/embed_tokens/Gather")], "/model/embed_tokens/Cast",
                 to=FLOAT)
    else:
        x = b.op("Gather", [b.init(f"{lm}.embed_tokens.weight", embed), ids], "/model/embed_tokens/Gather")
    b.output(x, "inputs_embeds", FLOAT, ["batch", "seq", h])


def build_decoder(b: GraphBuilder, cfg: ModelConfig, w: Weights, lm_head: QuantSpec | None | str = "default"
                  ) -> None:
    """`lm_head`: the precision of the output projection."""
    t = cfg.text
    h, hd, nq, nkv = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads
    eps = t.rms_norm_eps
    n_deep = len(cfg.vision.deepstack_visual_indexes)
    lm = "model.language_model"

    x = b.input("inputs_embeds", FLOAT, ["batch", "seq", h])
    cos = b.input("cos", FLOAT, ["rows", hd])  # rows = batch * seq, row-major: each token's own angles
    sin = b.input("sin", FLOAT, ["rows", hd])
    seqlens_k = b.input("seqlens_k", INT32, ["batch"])  # per sequence: its total length - 1
    total_len = b.input("total_sequence_length", INT32, [])  # the longest sequence's total length
    visual_idx = b.input("visual_idx", INT64, ["num_visual", 2])  # (batch row, position) of image tokens
    visual = b.input("image_embeds", FLOAT, ["num_visual", h])
    deep = b.input("deepstack_embeds", FLOAT, [n_deep, "num_visual", h]) if n_deep else None

    embed = w.get(f"{lm}.embed_tokens.weight")
    head_spec = b.quant if lm_head == "default" else lm_head
    tied = t.tie_word_embeddings or "lm_head.weight" not in w
    x = b.op("ScatterND", [x, visual_idx, visual], "/model/embed_tokens/MergeImages")
    rope = b.rope_tables(cos, sin, hd, "/model/rotary", batch_shape_of=x)

    def norm_w(name: str) -> str:
        return b.init(name, w.get(name))

    hn = b.op("SimplifiedLayerNormalization", [x, norm_w(f"{lm}.layers.0.input_layernorm.weight")],
              "/model/layers.0/input_layernorm", axis=-1, epsilon=eps)
    for i in range(t.num_layers):
        p, n = f"{lm}.layers.{i}", f"/model/layers.{i}"
        # q, k and v as one projection (and gate, up below): one larger MatMul instead of three, and
        # at int8 one quantization of the activation; each output column is the same dot product
        qkv_w = np.concatenate([w.get(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"])
        qkv = b.linear(hn, qkv_w, None, f"{n}/attn/qkv_proj")
        q, k, v = b.op("Split", [qkv, b.const([nq * hd, nkv * hd, nkv * hd])], f"{n}/attn/qkv_split", n_out=3,
                       axis=-1)
        q = _head_norm_rope(b, q, nq, hd, norm_w(f"{p}.self_attn.q_norm.weight"), eps, rope, f"{n}/attn/q")
        k = _head_norm_rope(b, k, nkv, hd, norm_w(f"{p}.self_attn.k_norm.weight"), eps, rope, f"{n}/attn/k")
        past_k = b.input(f"past_key_values.{i}.key", FLOAT, ["batch", nkv, "max_len", hd])
        past_v = b.input(f"past_key_values.{i}.value", FLOAT, ["batch", nkv, "max_len", hd])
        a, _, _ = b.op("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total_len],
                         f"{n}/attn/GroupQueryAttention", domain=MS,
                         out_names=[f"{n}/attn/output", f"present.{i}.key", f"present.{i}.value"],
                         num_heads=nq, kv_num_heads=nkv, scale=float(hd**-0.5))
        b.outputs.append(_vi(f"present.{i}.key", ["batch", nkv, "max_len", hd]))
        b.outputs.append(_vi(f"present.{i}.value", ["batch", nkv, "max_len", hd]))
        o = b.linear(a, w.get(f"{p}.self_attn.o_proj.weight"), None, f"{n}/attn/o_proj")
        hn, _, _, x = b.op("SkipSimplifiedLayerNormalization",
                           [x, o, norm_w(f"{p}.post_attention_layernorm.weight")],
                           f"{n}/post_attention_layernorm", n_out=4, domain=MS, epsilon=eps)
        gate_up = b.linear(hn, np.concatenate([w.get(f"{p}.mlp.gate_proj.weight"), w.get(f"{p}.mlp.up_proj.weight")]),
                           None, f"{n}/mlp/gate_up_proj")
        gate, up = b.op("Split", [gate_up], f"{n}/mlp/gate_up_split", n_out=2, axis=-1, num_outputs=2)
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{n}/mlp/Sigmoid")], f"{n}/mlp/SiLU")
        d = b.linear(b.op("Mul", [act, up], f"{n}/mlp/Mul"), w.get(f"{p}.mlp.down_proj.weight"), None,
                     f"{n}/mlp/down_proj")
        if deep is not None and i < n_deep:
            # DeepStack: the vision tower's intermediate features join the first layers' output
            x = b.op("Add", [x, d], f"{n}/residual")
            layer_feat = b.op("Gather", [deep, b.const(i)], f"{n}/deepstack/Gather", axis=0)
            x = b.op("ScatterND", [x, visual_idx, layer_feat], f"{n}/deepstack/ScatterAdd", reduction="add")
            if i + 1 < t.num_layers:
                hn = b.op("SimplifiedLayerNormalization",
                          [x, norm_w(f"{lm}.layers.{i + 1}.input_layernorm.weight")],
                          f"/model/layers.{i + 1}/input_layernorm", axis=-1, epsilon=eps)
            continue
        if i + 1 < t.num_layers:
            nxt = f"{lm}.layers.{i + 1}.input_layernorm.weight"
            hn, _, _, x = b.op("SkipSimplifiedLayerNormalization", [x, d, norm_w(nxt)],
                               f"/model/layers.{i + 1}/input_layernorm", n_out=4, domain=MS, epsilon=eps)
        else:
            x = b.op("Add", [x, d], f"{n}/residual")

    # the last `num_logits` positions of each row (1 but for a jump-forward draft, whose every
    # position is checked against the model's own choice)
    n_logits = b.input("num_logits", INT64, [1])
    last = b.op("Slice", [x, b.op("Neg", [n_logits], "/model/last_positions/Neg"), b.const([np.iinfo(np.int64).max]),
                          b.const([1])], "/model/last_position")
    last = b.op("SimplifiedLayerNormalization", [last, norm_w(f"{lm}.norm.weight")], "/model/norm",
                axis=-1, epsilon=eps)
    last = b.reshape(last, [-1, h], "/lm_head/Flatten")
    head = embed if tied else w.get("lm_head.weight")
    slices = [b.linear(last, head[r:r + LM_HEAD_SLICE_ROWS], None, f"/lm_head/slice{i}", quant=head_spec)
              for i, r in enumerate(range(0, head.shape[0], LM_HEAD_SLICE_ROWS))]
    logits = slices[0] if len(slices) == 1 else b.op("Concat", slices, "/lm_head/Concat", axis=-1)
    b.output(logits, "logits", FLOAT, ["rows", t.vocab_size])  # rows = batch * num_logits, row-major


def _head_norm_rope(b: GraphBuilder, x: str, heads: int, hd: int, gamma: str, eps: float,
                    rope: tuple[str, str, str], name: str) -> str:
    x = b.reshape(x, [0, 0, heads, hd], f"{name}/Reshape")  # 0: keep batch and sequence dims
    x = b.op("SimplifiedLayerNormalization", [x, gamma], f"{name}_norm", axis=-1, epsilon=eps)
    return b.rope(b.reshape(x, [0, 0, heads * hd], f"{name}/Flatten"), rope, heads, f"{name}/rope")


def _vi(name: str, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, FLOAT, shape)

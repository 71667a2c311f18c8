"""The Qwen3-VL language model: a token-embedding graph, and a decoder graph with a KV cache and
DeepStack inputs.

    inputs_embeds ─► ScatterND(image_embeds at visual_idx) ─► layer 0 ─► +deepstack[0]
      ─► layer 1 ─► +deepstack[1] ─► … ─► layer L-1 ─► positions in logit_idx ─► RMSNorm ─► lm_head ─► logits

Each layer: RMSNorm → q/k/v (one projection, split) → per-head RMSNorm on q, k → MRoPE (host-made cos/sin) →
GroupQueryAttention over a KV buffer that is shared between past and present (the engine binds
one buffer to both, so nothing is copied per step) → o_proj → residual+RMSNorm (fused) → SwiGLU
(gate and up one projection, split).
A run's tokens come packed in one row (1, T): group A, rows of the KV pool that each add the same
number of tokens (decoding rows, one each; or one prompt chunk), then, in a mixed run, group B, one
more row with a number of its own (a newcomer's prompt slice beside the decoding rows). Projections
and MLP see all T tokens together; only attention runs per group (see _attention).
Logits are computed only at the positions in `logit_idx` (each decoding row; a prompt's last
position; every position of a jump-forward draft): a prompt's lm_head cost is one row, not T.
The lm_head is cut into vocabulary slices (LM_HEAD_SLICE_ROWS) whose logits are concatenated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from edgevl.checkpoint import ModelConfig, Weights
from edgevl.export.builder import BFLOAT16, FLOAT, INT8, INT32, INT64, MS, GraphBuilder, QuantSpec, bf16_bits
from edgevl.export.kv_scales import KVScales
from edgevl.export.quantize import quantize_per_channel_int8

# ONNX Runtime prepacks a weight while its memory-mapped original is still resident, so for a
# moment it is held twice. The lm_head is by far the largest weight (1.2 GB in fp32 on the 2B,
# the moment that set fp32's peak RSS); in slices of 32768 vocabulary rows (256 MB there) the
# overlap is a fifth of that, and the slices' products are the same numbers.
LM_HEAD_SLICE_ROWS = 32768
BOOL = TensorProto.BOOL


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


def build_decoder(b: GraphBuilder, cfg: ModelConfig, w: Weights, lm_head: QuantSpec | None | str = "default",
                  kv_scales: list[KVScales] | None = None) -> None:
    """`lm_head`: the precision of the output projection. `kv_scales`: one per layer for an int8 KV
    cache (export/kv_scales.py); None keeps it float32."""
    t = cfg.text
    h, hd, nq, nkv = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads
    eps = t.rms_norm_eps
    n_deep = len(cfg.vision.deepstack_visual_indexes)
    lm = "model.language_model"

    # Every token of the run packed in one row: group A's rows × their tokens, row-major, then group
    # B's tokens (see _attention)
    x = b.input("inputs_embeds", FLOAT, [1, "tokens", h])
    cos = b.input("cos", FLOAT, ["tokens", hd])  # each token's own angles
    sin = b.input("sin", FLOAT, ["tokens", hd])
    groups = Groups(
        mixed=b.input("mixed", BOOL, []),
        a_shape=b.input("a_shape", INT64, [2]),  # group A: (rows, new tokens per row)
        seqlens_k=b.input("seqlens_k", INT32, ["batch"]),  # per row of A: its total length - 1
        total_len=b.input("total_sequence_length", INT32, []),  # A's longest total length
        b_seqlens_k=b.input("b_seqlens_k", INT32, [1]),  # group B (one row): its total length - 1
        b_total_len=b.input("b_total_sequence_length", INT32, []))
    visual_idx = b.input("visual_idx", INT64, ["num_visual", 2])  # (0, packed position) of image tokens
    visual = b.input("image_embeds", FLOAT, ["num_visual", h])
    deep = b.input("deepstack_embeds", FLOAT, [n_deep, "num_visual", h]) if n_deep else None

    embed = w.get(f"{lm}.embed_tokens.weight")
    head_spec = b.quant if lm_head == "default" else lm_head
    tied = t.tie_word_embeddings or "lm_head.weight" not in w
    x = b.op("ScatterND", [x, visual_idx, visual], "/model/embed_tokens/MergeImages")
    rope = b.rope_tables(cos, sin, hd, "/model/rotary")
    groups.a_tokens = b.op("ReduceProd", [groups.a_shape], "/model/groups/ATokens", keepdims=1)

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
        a = _attention(b, q, k, v, i, groups, nq, nkv, hd, n, kv_scales[i] if kv_scales else None)
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

    # logits only where a token is chosen: each decoding row's position, the last of a prompt's final
    # chunk, every position of a jump-forward draft (each is checked against the model's own choice)
    logit_idx = b.input("logit_idx", INT64, ["num_logits"])
    last = b.op("Gather", [b.reshape(x, [-1, h], "/model/Unpack"), logit_idx], "/model/logit_positions", axis=0)
    last = b.op("SimplifiedLayerNormalization", [last, norm_w(f"{lm}.norm.weight")], "/model/norm",
                axis=-1, epsilon=eps)
    head = embed if tied else w.get("lm_head.weight")
    slices = [b.linear(last, head[r:r + LM_HEAD_SLICE_ROWS], None, f"/lm_head/slice{i}", quant=head_spec)
              for i, r in enumerate(range(0, head.shape[0], LM_HEAD_SLICE_ROWS))]
    logits = slices[0] if len(slices) == 1 else b.op("Concat", slices, "/lm_head/Concat", axis=-1)
    b.output(logits, "logits", FLOAT, ["num_logits", t.vocab_size])


def _head_norm_rope(b: GraphBuilder, x: str, heads: int, hd: int, gamma: str, eps: float,
                    rope: tuple[str, str, str], name: str) -> str:
    x = b.reshape(x, [0, 0, heads, hd], f"{name}/Reshape")  # 0: keep batch and sequence dims
    x = b.op("SimplifiedLayerNormalization", [x, gamma], f"{name}_norm", axis=-1, epsilon=eps)
    return b.rope(b.reshape(x, [0, 0, heads * hd], f"{name}/Flatten"), rope, heads, f"{name}/rope")


@dataclass
class Groups:
    """The run's two groups of rows (graph inputs): A, rows with the same number of new tokens (decoding
    rows, or one prompt chunk); B, when `mixed`, one more row with its own (a newcomer's prompt slice)."""

    mixed: str
    a_shape: str
    seqlens_k: str
    total_len: str
    b_seqlens_k: str
    b_total_len: str
    a_tokens: str = ""  # rows × tokens of A: where B's tokens start in the packed run


def _attention(b: GraphBuilder, q: str, k: str, v: str, i: int, g: Groups, nq: int, nkv: int, hd: int,
               n: str, scales: KVScales | None) -> str:
    """Attention over the KV pool for packed (1, T, ·) q/k/v.

    GroupQueryAttention takes one new-token count for all its rows, so a run that carries decoding
    rows (one token each) and a prompt slice (many) runs it twice, once per group, each against its
    own rows of the pool: `If(mixed)`. The projections and the MLP around it see all T tokens at
    once, which is what makes the mixed run cheap: the weights are read once for both.
    Group A's KV comes in as past_key_values.{i}.*, B's as b_key_values.{i}.*; the engine binds each
    present output to its past buffer, so GroupQueryAttention writes the new tokens in place (an
    unmixed run binds a one-token spare to B, which the else branch passes through).
    With `scales`, the pool holds int8: GroupQueryAttention stores round(x / scale) per channel,
    saturated, and attends over the dequantized values, for a prompt's own tokens as for the past."""
    shape = [nkv, "max_len", hd]
    kv_type = INT8 if scales is not None else FLOAT
    past = [b.input(f"past_key_values.{i}.{x}", kv_type, ["batch", *shape]) for x in ("key", "value")]
    b_past = [b.input(f"b_key_values.{i}.{x}", kv_type, [1, *shape]) for x in ("key", "value")]
    outs = [f"{n}/attn/output", f"present.{i}.key", f"present.{i}.value", f"b_present.{i}.key",
            f"b_present.{i}.value"]
    b.outputs += [_vi(f"{o}.{i}.{x}", [rows, *shape], kv_type)
                  for o, rows in (("present", "batch"), ("b_present", 1)) for x in ("key", "value")]
    attrs = dict(domain=MS, num_heads=nq, kv_num_heads=nkv, scale=float(hd**-0.5))
    quant: list[str] = []
    if scales is not None:
        attrs.update(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        # inputs 7-11 (rotary caches, position ids, attention bias, head sink) unused
        quant = ["", "", "", "", "", b.init(f"/model/layers.{i}/attn/k_scale", scales.key),
                 b.init(f"/model/layers.{i}/attn/v_scale", scales.value)]

    def gqa(qkv: list[str], kv: list[str], lens: list[str], name: str) -> list[str]:
        return b.op("GroupQueryAttention", [*qkv, *kv, *lens, *quant], name, n_out=3, **attrs)

    def as_rows(x: str, width: int, name: str) -> str:  # packed (1, T_A, w) → (rows, tokens, w)
        return b.reshape_to(x, b.op("Concat", [g.a_shape, b.const([width])], f"{name}/Shape", axis=0), name)

    def packed(x: str, name: str) -> str:  # (rows, tokens, w) → (1, rows·tokens, w)
        return b.reshape(x, [1, -1, nq * hd], name)

    widths = (nq * hd, nkv * hd, nkv * hd)
    kv_outs = {o: kv_type for o in outs[1:]}

    def out_info(names: list[str]) -> list:
        return [_vi(name, None, kv_outs.get(o, FLOAT)) for name, o in zip(names, outs)]

    with _branch(b) as mixed_nodes:
        end = g.a_tokens
        a_part = [as_rows(b.op("Slice", [t, b.const([0]), end, b.const([1])], f"{n}/attn/mixed/A{j}"), w,
                          f"{n}/attn/mixed/A{j}/Rows") for j, (t, w) in enumerate(zip((q, k, v), widths))]
        b_part = [b.op("Slice", [t, end, b.const([np.iinfo(np.int64).max]), b.const([1])], f"{n}/attn/mixed/B{j}")
                  for j, t in enumerate((q, k, v))]
        oa, pka, pva = gqa(a_part, past, [g.seqlens_k, g.total_len], f"{n}/attn/mixed/A")
        ob, pkb, pvb = gqa(b_part, b_past, [g.b_seqlens_k, g.b_total_len], f"{n}/attn/mixed/B")
        o = b.op("Concat", [packed(oa, f"{n}/attn/mixed/A/Packed"), ob], f"{n}/attn/mixed/Concat", axis=1)
        mixed_out = [o, pka, pva, pkb, pvb]
    with _branch(b) as plain_nodes:
        rows = [as_rows(t, w, f"{n}/attn/plain/{j}/Rows") for j, (t, w) in enumerate(zip((q, k, v), widths))]
        oa, pka, pva = gqa(rows, past, [g.seqlens_k, g.total_len], f"{n}/attn/plain/GroupQueryAttention")
        plain_out = [packed(oa, f"{n}/attn/plain/Packed"), pka, pva,
                     *(b.op("Identity", [p], f"{n}/attn/plain/b_pass{j}") for j, p in enumerate(b_past))]
    b.op("If", [g.mixed], f"{n}/attn/If", out_names=outs,
         then_branch=helper.make_graph(mixed_nodes, f"{n}/attn/mixed", [], out_info(mixed_out)),
         else_branch=helper.make_graph(plain_nodes, f"{n}/attn/plain", [], out_info(plain_out)))
    return outs[0]


@contextlib.contextmanager
def _branch(b: GraphBuilder) -> Iterator[list]:
    """Nodes added inside go to a list of their own (an If branch); constants and weights stay outer."""
    outer, b.nodes = b.nodes, []
    try:
        yield b.nodes
    finally:
        b.nodes = outer


def _vi(name: str, shape: list | None = None, elem: int = FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)

"""The Qwen3-VL vision tower as ONNX graphs: patches of one image → embeddings + DeepStack.

New exports write the tower in slices, so the batch loop can run it a few blocks at a time between
decoder steps (runtime/vision_job.py): `vision_embed` (patch embedding + learnt position taps),
one graph per group of consecutive blocks (`vision_blocks.<first>`; a group holding a DeepStack
index also outputs that DeepStack merger's result) and `vision_merger`. Each graph keeps its own
weights, so the tower is stored once.

A block over a large picture costs seconds (attention over 4,096 patches at 1024²), too much for one
step beside running streams, so `chunk_rows` splits each block in two graphs that run over chunks
of the patches: `vision_blocks.<i>.qkv` (norm, q/k/v projections and rotary, row by row) and
`vision_blocks.<i>` (a chunk's queries against every patch's keys and values, the projection and the
MLP). The chunks are fixed by the picture's size alone, never by load, so a picture's features do
not depend on who else is being served. `build_vision` still makes the whole tower as one graph
(exports before slices; tests compare the two).

One image per run, or all frame groups of one clip as a batch: attention is full within an image
(a group), so no cu_seqlens masking is needed, and each image's result can be cached on its own.
Position tables (rotary cos/sin, bilinear taps into the learnt position grid) are computed on the
host (preprocess/positions.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgevl.checkpoint import ModelConfig, Weights
from edgevl.export.builder import FLOAT, INT64, MS, GraphBuilder

P = "model.visual"


def build_vision(b: GraphBuilder, cfg: ModelConfig, w: Weights) -> None:
    """The whole tower as one graph."""
    v = cfg.vision
    x = _embed(b, cfg, w)
    rope, grouped = _rope(b, cfg, x)
    deepstack: list[str] = []
    for i in range(v.depth):
        x = _block(b, cfg, w, i, x, rope, grouped)
        if i in v.deepstack_visual_indexes:
            deepstack.append(_deepstack(b, cfg, w, i, x))
    embeds = _merger(b, cfg, w, f"{P}.merger", x, postshuffle=False, name="/visual/merger")
    b.output(embeds, "image_embeds", FLOAT, ["num_tokens", v.out_hidden_size])
    if deepstack:
        stacked = b.op("Concat", [b.op("Unsqueeze", [d, b.const([0])], f"/visual/deepstack.{j}/Unsqueeze")
                                  for j, d in enumerate(deepstack)], "/visual/deepstack/Concat", axis=0)
        b.output(stacked, "deepstack_embeds", FLOAT,
                 [len(deepstack), "num_tokens", v.out_hidden_size])


def build_vision_slices(out: Path, cfg: ModelConfig, w: Weights,
                        builder: Callable[[str], GraphBuilder], blocks_per_slice: int = 1,
                        chunk_rows: int = 0) -> dict:
    """The tower as slices, each a graph of its own made by `builder(name)`. → the manifest's
    `vision_slices` entry: the graphs in run order, which blocks each holds, which DeepStack
    outputs each gives, and which graphs store bf16 weights. `chunk_rows` > 0: one block per slice,
    each split into a q/k/v graph and a rest-of-block graph run over chunks of that many patches
    (a multiple of the 2x2 merge, so a chunk's DeepStack rows are whole tokens)."""
    if chunk_rows:
        unit = cfg.vision.spatial_merge_size**2
        if chunk_rows % unit:
            raise ValueError(f"chunk_rows must be a multiple of {unit}")
        blocks_per_slice = 1
    v = cfg.vision
    hidden = ["num_patches", v.hidden_size]
    widened: list[str] = []

    def save(b: GraphBuilder, doc: str) -> str:
        b.save(doc)
        if b.widened:
            widened.append(b.name)
        return f"{b.name}.onnx"

    b = builder("vision_embed")
    b.output(_embed(b, cfg, w), "hidden", FLOAT, hidden)
    embed = save(b, "Qwen3-VL vision tower, slice 1: patch embedding and learnt positions")
    blocks = []
    for first in range(0, v.depth, blocks_per_slice):
        last = min(v.depth, first + blocks_per_slice)
        entry: dict = {}
        if chunk_rows:
            b = builder(f"vision_blocks.{first}.qkv")
            x = b.input("hidden_in", FLOAT, hidden)
            rope, grouped = _rope(b, cfg, x)
            for name, t in zip(("q", "k", "v"), _attn_inputs(b, cfg, w, first, x, rope, grouped)):
                b.output(t, name, FLOAT, ["groups", "rows_per_group", v.hidden_size])
            entry["qkv"] = save(b, f"Qwen3-VL vision tower: block {first}'s q, k and v for a chunk of patches")
        b = builder(f"vision_blocks.{first}")
        x = b.input("hidden_in", FLOAT, hidden)
        if chunk_rows:
            qkv = [b.input(name, FLOAT, ["groups", rows, v.hidden_size])
                   for name, rows in (("q", "chunk_rows"), ("k", "rows_per_group"), ("v", "rows_per_group"))]
        else:
            rope, grouped = _rope(b, cfg, x)
        deepstack = []
        for i in range(first, last):
            x = _attn_rest(b, cfg, w, i, x, *qkv) if chunk_rows else _block(b, cfg, w, i, x, rope, grouped)
            if i in v.deepstack_visual_indexes:
                j = v.deepstack_visual_indexes.index(i)
                b.output(_deepstack(b, cfg, w, i, x), f"deepstack.{j}", FLOAT, ["num_tokens", v.out_hidden_size])
                deepstack.append(j)
        b.output(x, "hidden", FLOAT, hidden)
        blocks.append({"graph": save(b, f"Qwen3-VL vision tower: blocks {first}..{last - 1}"),
                       "blocks": [first, last], "deepstack": deepstack, **entry})
    b = builder("vision_merger")
    x = b.input("hidden_in", FLOAT, hidden)
    b.output(_merger(b, cfg, w, f"{P}.merger", x, postshuffle=False, name="/visual/merger"),
             "image_embeds", FLOAT, ["num_tokens", v.out_hidden_size])
    merger = save(b, "Qwen3-VL vision tower, last slice: the 2x2 merger")
    return {"embed": embed, "blocks": blocks, "merger": merger, "bf16_weight_graphs": widened,
            "chunk_rows": chunk_rows}


def _embed(b: GraphBuilder, cfg: ModelConfig, w: Weights) -> str:
    """Conv3d patch embedding + the learnt position grid's bilinear taps → (num_patches, hidden)."""
    v = cfg.vision
    vh = v.hidden_size
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = b.input("pixel_values", FLOAT, ["num_patches", patch_dim])
    pos_idx = b.input("pos_idx", INT64, ["num_patches", 4])
    pos_w = b.input("pos_weights", FLOAT, ["num_patches", 4])
    # Conv3d with kernel == stride is a matmul over the flattened patch
    x = b.linear(pixels, w.get(f"{P}.patch_embed.proj.weight").reshape(vh, -1),
                 w.get(f"{P}.patch_embed.proj.bias"), "/visual/patch_embed")
    taps = b.op("Gather", [b.init(f"{P}.pos_embed.weight", w.get(f"{P}.pos_embed.weight")), pos_idx],
                "/visual/pos_embed/Gather")
    taps = b.op("Mul", [taps, b.op("Unsqueeze", [pos_w, b.const([-1])], "/visual/pos_embed/Unsqueeze")],
                "/visual/pos_embed/Mul")
    pos = b.op("ReduceSum", [taps, b.const([1])], "/visual/pos_embed/ReduceSum", keepdims=0)
    return b.op("Add", [x, pos], "/visual/pos_embed/Add")


def _rope(b: GraphBuilder, cfg: ModelConfig, x: str) -> tuple[tuple[str, str, str], str]:
    """The rotary tables and the (groups, rows per group, hidden) shape attention works in.

    A clip's frame groups run as one batch, attention within each group: `cos`/`sin` hold one
    group's rows (P), `x` all groups' (G·P), so G = rows / P."""
    v = cfg.vision
    hd = v.hidden_size // v.num_heads
    cos = b.input("cos", FLOAT, ["rows_per_group", hd])
    sin = b.input("sin", FLOAT, ["rows_per_group", hd])
    ids, cos_c, sin_c = b.rope_tables(cos, sin, hd, "/visual/rotary")
    per_group = b.op("Shape", [cos], "/visual/groups/Rows", start=0, end=1)
    n_groups = b.op("Div", [b.op("Shape", [x], "/visual/groups/Patches", start=0, end=1), per_group],
                    "/visual/groups/Count")
    rope = (b.op("Expand", [ids, b.op("Concat", [n_groups, per_group], "/visual/groups/IdsShape", axis=0)],
                 "/visual/groups/position_ids"), cos_c, sin_c)
    grouped = b.op("Concat", [n_groups, per_group, b.const([v.hidden_size])], "/visual/groups/Shape", axis=0)
    return rope, grouped


def _block(b: GraphBuilder, cfg: ModelConfig, w: Weights, i: int, x: str, rope: tuple[str, str, str],
           grouped: str) -> str:
    q, k, val = _attn_inputs(b, cfg, w, i, x, rope, grouped)
    return _attn_rest(b, cfg, w, i, x, q, k, val)


def _attn_inputs(b: GraphBuilder, cfg: ModelConfig, w: Weights, i: int, x: str, rope: tuple[str, str, str],
                 grouped: str) -> tuple[str, str, str]:
    """norm1, the q/k/v projection and rotary → q, k, v as (groups, rows per group, hidden)."""
    v = cfg.vision
    vh, heads = v.hidden_size, v.num_heads
    hd = vh // heads
    bp, n = f"{P}.blocks.{i}", f"/visual/blocks.{i}"
    h = b.op("LayerNormalization", [x, b.init(f"{bp}.norm1.weight", w.get(f"{bp}.norm1.weight")),
                                    b.init(f"{bp}.norm1.bias", w.get(f"{bp}.norm1.bias"))],
             f"{n}/norm1", axis=-1, epsilon=1e-6)
    qkv = b.linear(h, w.get(f"{bp}.attn.qkv.weight"), w.get(f"{bp}.attn.qkv.bias"), f"{n}/attn/qkv")
    qkv = b.reshape(qkv, [0, 3, heads, hd], f"{n}/attn/qkv/Reshape")
    q, k, val = b.op("Split", [qkv], f"{n}/attn/Split", n_out=3, axis=1, num_outputs=3)
    q3, k3, v3 = (b.reshape_to(t, grouped, f"{n}/attn/{nm}/Batch")
                  for t, nm in ((q, "q"), (k, "k"), (val, "v")))
    return b.rope(q3, rope, heads, f"{n}/attn/q"), b.rope(k3, rope, heads, f"{n}/attn/k"), v3


def _attn_rest(b: GraphBuilder, cfg: ModelConfig, w: Weights, i: int, x: str, q: str, k: str, val: str) -> str:
    """Attention of the rows of `x` (queries `q`) over keys `k` and values `val`, the projection, the
    residual, norm2 and the MLP → the block's output for the rows of `x`."""
    v = cfg.vision
    vh, heads = v.hidden_size, v.num_heads
    bp, n = f"{P}.blocks.{i}", f"/visual/blocks.{i}"
    a = b.op("MultiHeadAttention", [q, k, val], f"{n}/attn/MultiHeadAttention", domain=MS,
             num_heads=heads, scale=(vh // heads)**-0.5)
    a = b.linear(b.reshape(a, [-1, vh], f"{n}/attn/Unbatch"), w.get(f"{bp}.attn.proj.weight"),
                 w.get(f"{bp}.attn.proj.bias"), f"{n}/attn/proj")
    # residual add fused with the second norm
    h, _, _, x = b.op("SkipLayerNormalization",
                      [x, a, b.init(f"{bp}.norm2.weight", w.get(f"{bp}.norm2.weight")),
                       b.init(f"{bp}.norm2.bias", w.get(f"{bp}.norm2.bias"))],
                      f"{n}/norm2", n_out=4, domain=MS, epsilon=1e-6)
    h = b.linear(h, w.get(f"{bp}.mlp.linear_fc1.weight"), w.get(f"{bp}.mlp.linear_fc1.bias"),
                 f"{n}/mlp/fc1")
    h = _act(b, h, v.hidden_act, f"{n}/mlp/act")
    h = b.linear(h, w.get(f"{bp}.mlp.linear_fc2.weight"), w.get(f"{bp}.mlp.linear_fc2.bias"),
                 f"{n}/mlp/fc2")
    return b.op("Add", [x, h], f"{n}/mlp/residual")


def _deepstack(b: GraphBuilder, cfg: ModelConfig, w: Weights, i: int, x: str) -> str:
    """The DeepStack merger fed by block `i`'s output."""
    j = cfg.vision.deepstack_visual_indexes.index(i)
    return _merger(b, cfg, w, f"{P}.deepstack_merger_list.{j}", x, postshuffle=True, name=f"/visual/deepstack.{j}")


def _merger(b: GraphBuilder, cfg: ModelConfig, w: Weights, p: str, x: str, postshuffle: bool, name: str) -> str:
    """LayerNorm, 2x2 shuffle into one token, MLP. DeepStack mergers normalise after the shuffle."""
    merged = cfg.vision.hidden_size * cfg.vision.spatial_merge_size**2
    gamma, beta = b.init(f"{p}.norm.weight", w.get(f"{p}.norm.weight")), b.init(
        f"{p}.norm.bias", w.get(f"{p}.norm.bias"))
    if postshuffle:
        h = b.op("LayerNormalization", [b.reshape(x, [-1, merged], f"{name}/Shuffle"), gamma, beta],
                 f"{name}/norm", axis=-1, epsilon=1e-6)
    else:
        h = b.reshape(b.op("LayerNormalization", [x, gamma, beta], f"{name}/norm", axis=-1, epsilon=1e-6),
                      [-1, merged], f"{name}/Shuffle")
    h = b.linear(h, w.get(f"{p}.linear_fc1.weight"), w.get(f"{p}.linear_fc1.bias"), f"{name}/fc1")
    h = b.op("Gelu", [h], f"{name}/Gelu", domain=MS)  # nn.GELU(): the exact (erf) form
    return b.linear(h, w.get(f"{p}.linear_fc2.weight"), w.get(f"{p}.linear_fc2.bias"), f"{name}/fc2")


def _act(b: GraphBuilder, x: str, act: str, name: str) -> str:
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return b.op("FastGelu", [x], f"{name}/FastGelu", domain=MS)
    if act == "gelu":
        return b.op("Gelu", [x], f"{name}/Gelu", domain=MS)
    if act == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    raise ValueError(f"unsupported vision activation {act!r}")

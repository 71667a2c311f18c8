"""A picture's (or a clip's) trip through the vision tower, a few slices at a time.

An export writes the tower as slices (export/vision.py: patch embedding, groups of blocks, merger);
a `VisionJob` runs them in order, keeping the hidden state between calls, so the batch loop can
interleave them with decoder steps instead of running the tower on a thread that fights the
decoder for the cores. Each slice has a cost in decoder-token equivalents, worked out from the
shapes (its FLOPs ÷ the FLOPs of one token through the text model's layers), which the loop's step
budget (runtime/step_budget.py) weighs with what each kind of slice has taken. Cancelling is dropping
the job.

A block exported in two graphs (export/vision.py's `chunk_rows`) runs as pieces: its q/k/v graph
over each chunk of a picture's patches, then the rest of the block over each chunk's queries against
all keys and values, so no piece of a 1024² page costs much more than a 448² picture's block. The
loop may cut a piece (or a picture's merger) shorter still (`cut`) when a step's budget has less
room than that: rows are independent in these graphs, so where each row is quantized on its own
(fp32, int8-rowwise) a cut changes no number; plain int8 quantizes a run's rows together, as it
does a batch's.

Exports made before slices have one graph for the whole tower: it is a job of one slice per run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevl.checkpoint import ModelConfig
from edgevl.export.manifest import Manifest
from edgevl.preprocess import positions as pos
from edgevl.preprocess.image import ImagePatches
from edgevl.preprocess.video_patches import VideoPatches
from edgevl.runtime.vision_cache import ImageFeatures
from edgevl.types import EngineError


@dataclass(frozen=True)
class VisionSlice:
    """One graph of the tower. kind: "embed" (patches → hidden), "blocks" (hidden → hidden, after
    blocks [first, end), plus the DeepStack outputs `deepstack` of blocks in it), "merger" (hidden →
    image embeddings) or "whole" (patches → embeddings and every DeepStack output). A "blocks" slice
    with a `qkv` graph is one block split in two, run over chunks of at most `chunk_rows` patches."""

    session: ort.InferenceSession
    kind: str
    blocks: tuple[int, int] = (0, 0)
    deepstack: tuple[int, ...] = ()
    qkv: ort.InferenceSession | None = None
    chunk_rows: int = 0


def open_vision(folder: Path, manifest: Manifest, open_session) -> list[VisionSlice]:
    """The tower's graphs as a manifest lists them: its `vision_slices`, or the whole `vision` graph.
    `open_session(path, sliced)` opens one graph."""
    cfg_slices = manifest.vision_slices
    if not cfg_slices:
        return [VisionSlice(open_session(folder / manifest.graphs["vision"], False), "whole")]
    out = [VisionSlice(open_session(folder / cfg_slices["embed"], True), "embed")]
    chunk_rows = cfg_slices.get("chunk_rows", 0)
    for g in cfg_slices["blocks"]:
        qkv = open_session(folder / g["qkv"], True) if "qkv" in g else None
        out.append(VisionSlice(open_session(folder / g["graph"], True), "blocks", tuple(g["blocks"]),
                               tuple(g["deepstack"]), qkv, chunk_rows if qkv else 0))
    out.append(VisionSlice(open_session(folder / cfg_slices["merger"], True), "merger"))
    return out


# ---- costs in decoder-token equivalents -------------------------------------------------------
def decoder_token_flops(config: ModelConfig) -> float:
    """One token through the text model's layers: 2 FLOPs per non-embedding weight (attention over
    the past is left out: it is small next to the weights at the lengths a step carries)."""
    t = config.text
    per_layer = (t.hidden_size * t.num_heads * t.head_dim * 2  # q, o
                 + t.hidden_size * t.num_kv_heads * t.head_dim * 2  # k, v
                 + 3 * t.hidden_size * t.intermediate_size)  # gate, up, down
    return 2.0 * per_layer * t.num_layers


def slice_flops(config: ModelConfig, s: VisionSlice, rows: int, rows_per_group: int, part: str = "") -> float:
    """FLOPs of one run of a slice over `rows` patches (queries) attending to `rows_per_group` keys
    each (attention is within a group: its score and weighted-sum products grow with the group's
    size). `part` of a split block: "qkv" or "rest"; "": all of the slice."""
    v = config.vision
    vh, ff = v.hidden_size, v.intermediate_size
    merged = vh * v.spatial_merge_size**2
    tokens = rows / v.spatial_merge_size**2
    merger = 2.0 * tokens * (merged * merged + merged * v.out_hidden_size)
    embed = 2.0 * rows * v.in_channels * v.temporal_patch_size * v.patch_size**2 * vh
    qkv = 2.0 * rows * 3 * vh * vh
    rest = 2.0 * rows * (vh * vh + 2 * vh * ff) + 4.0 * rows * rows_per_group * vh
    if s.kind == "embed":
        return embed
    if s.kind == "merger":
        return merger
    if part == "qkv":
        return qkv
    if part == "rest":
        return rest + merger * len(s.deepstack)
    if s.kind == "blocks":
        return (qkv + rest) * (s.blocks[1] - s.blocks[0]) + merger * len(s.deepstack)
    return embed + (qkv + rest) * v.depth + merger * (1 + len(v.deepstack_visual_indexes))


MIN_CUT_ROWS = 128  # patches: a shorter piece would spend more on re-reading all keys and values than on its rows


@dataclass(frozen=True)
class _Piece:
    """One graph run of a job: batch of frame groups `run`, slice `k`, and for a split block its
    `part` ("qkv" or "rest") over patch rows [start, stop) of the batch; a picture's merger also
    runs over rows [start, stop) (stop 0: the whole batch)."""

    run: int
    k: int
    part: str = ""
    start: int = 0
    stop: int = 0


class VisionJob:
    """The tower over one image or clip, resumable between slices. A clip's frame groups run in
    batches of at most `max_run_rows` patches (attention within each group), each batch through
    every slice before the next starts; graphs exported before batches run one group at a time."""

    def __init__(self, config: ModelConfig, slices: list[VisionSlice], patches: ImagePatches | VideoPatches,
                 groups_together: bool, max_run_rows: int):
        v = config.vision
        self.slices = slices
        self.patches = patches
        groups = patches.groups()
        per_group = groups[0].pixel_values.shape[0]
        per_run = max(1, max_run_rows // per_group) if groups_together else 1
        # one group's rotary rows (the graph repeats them); position taps for every patch
        self._cos, self._sin = pos.vision_cos_sin(groups[0].grid_thw, v.hidden_size // v.num_heads, v.rope_theta,
                                                  v.spatial_merge_size)
        self._idx, self._wts = pos.vision_pos_interpolation(patches.grid_thw, v.num_position_embeddings,
                                                            v.spatial_merge_size)
        self._runs = [slice(first * per_group, min(len(groups), first + per_run) * per_group)
                      for first in range(0, len(groups), per_run)]
        self._chunked = len(groups) == 1  # an image: its one group may be split into chunks of patches
        self._config, self._per_group = config, per_group
        self._unit = v.spatial_merge_size**2  # a piece's rows are whole merged tokens (its DeepStack rows)
        self._steps = [p for r in range(len(self._runs)) for k in range(len(slices)) for p in self._pieces(r, k)]
        self.costs = [self._cost(p) for p in self._steps]
        self._next = 0
        self._hidden: np.ndarray | None = None
        self._deep: dict[int, np.ndarray] = {}  # DeepStack outputs of the current batch, by index
        # a split block between its pieces: q/k/v by piece, then all of them (once every row is
        # projected), outputs (hidden, DeepStack) by piece, and the rows those cover
        self._qkv_pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._qkv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._out: list[list[np.ndarray]] = []
        self._rows_out = 0
        self._merged: list[np.ndarray] = []  # the merger's pieces of the current batch
        self._embeds: list[np.ndarray] = []
        self._deeps: list[np.ndarray] = []
        self.seconds = 0.0  # wall time of the slices run so far
        self.slices_run = 0

    def _pieces(self, r: int, k: int) -> list[_Piece]:
        s = self.slices[k]
        n = self._runs[r].stop - self._runs[r].start
        if s.kind == "merger" and self._chunked:
            return [_Piece(r, k, "", 0, n)]
        if s.qkv is None:
            return [_Piece(r, k)]
        step = s.chunk_rows if self._chunked and s.chunk_rows else n
        return [_Piece(r, k, part, a, min(n, a + step)) for part in ("qkv", "rest") for a in range(0, n, step)]

    def _rows(self, p: _Piece) -> int:
        return p.stop - p.start if p.stop else self._runs[p.run].stop - self._runs[p.run].start

    def _cost(self, p: _Piece) -> float:
        return (slice_flops(self._config, self.slices[p.k], self._rows(p), self._per_group, p.part)
                / decoder_token_flops(self._config))

    @property
    def next_rows(self) -> int:
        """Patches in the next piece when `cut` may shorten it (a split block's piece of a picture, or
        its merger), else 0."""
        if self.done:
            return 0
        p = self._steps[self._next]
        return p.stop - p.start if p.stop and self._chunked and p.stop - p.start > MIN_CUT_ROWS else 0

    def cut(self, rows: int) -> None:
        """Shortens the next piece to its first `rows` patches (whole merged tokens, at least
        MIN_CUT_ROWS); the rest becomes the piece after it."""
        if not self.next_rows:
            raise RuntimeError("the next slice cannot be cut")
        p = self._steps[self._next]
        mid = p.start + max(MIN_CUT_ROWS, rows - rows % self._unit)
        if mid >= p.stop:
            return
        head, tail = dataclasses.replace(p, stop=mid), dataclasses.replace(p, start=mid)
        self._steps[self._next:self._next + 1] = [head, tail]
        self.costs[self._next:self._next + 1] = [self._cost(head), self._cost(tail)]

    @property
    def done(self) -> bool:
        return self._next == len(self._steps)

    @property
    def next_cost(self) -> float:
        """The next slice's cost in decoder-token equivalents (0 when done)."""
        return self.costs[self._next] if not self.done else 0.0

    @property
    def next_kind(self) -> str:
        """What the next slice is ("embed", "qkv", "rest", "blocks", "merger", "whole"): slices of one
        kind cost about the same time per unit of cost on a given CPU (runtime/step_budget.py)."""
        p = self._steps[self._next]
        return p.part or self.slices[p.k].kind

    def run(self) -> None:
        """Runs the slices left, to the end."""
        while not self.done:
            self.step()

    def step(self) -> float:
        """Runs the next slice. → its wall time (seconds)."""
        p = self._steps[self._next]
        s, rows = self.slices[p.k], self._runs[p.run]
        t0 = time.perf_counter()
        try:
            if s.kind in ("embed", "whole"):
                feeds = {"pixel_values": self.patches.pixel_values[rows], "pos_idx": self._idx[rows],
                         "pos_weights": self._wts[rows]}
                if s.kind == "whole":
                    outs = s.session.run(None, {**feeds, "cos": self._cos, "sin": self._sin})
                    self._embeds.append(outs[0])
                    self._deeps.append(outs[1] if len(outs) > 1 else np.zeros((0, *outs[0].shape), np.float32))
                else:
                    self._hidden = s.session.run(["hidden"], feeds)[0]
            elif p.part:
                self._run_split_block(s, p.part, slice(p.start, p.stop))
            elif s.kind == "blocks":
                names = ["hidden", *(f"deepstack.{j}" for j in s.deepstack)]
                outs = s.session.run(names, {"hidden_in": self._hidden, "cos": self._cos, "sin": self._sin})
                self._hidden = outs[0]
                self._deep.update(zip(s.deepstack, outs[1:]))
            else:  # the merger, over the batch or a piece of a picture's rows; its last piece ends the batch
                part = slice(p.start, p.stop) if p.stop else slice(None)
                self._merged.append(s.session.run(["image_embeds"], {"hidden_in": self._hidden[part]})[0])
                if not p.stop or p.stop == self._hidden.shape[0]:
                    embeds = self._merged[0] if len(self._merged) == 1 else np.concatenate(self._merged)
                    self._embeds.append(embeds)
                    self._deeps.append(np.stack([self._deep[j] for j in sorted(self._deep)]) if self._deep
                                       else np.zeros((0, *embeds.shape), np.float32))
                    self._hidden, self._deep, self._merged = None, {}, []
        except Exception as e:  # onnxruntime raises its own types; one request fails, not the engine
            raise EngineError(f"vision encoder failed: {e}") from e
        finally:
            took = time.perf_counter() - t0
            self.seconds += took
        self._next += 1
        self.slices_run += 1
        return took

    def _run_split_block(self, s: VisionSlice, part: str, rows: slice) -> None:
        assert self._hidden is not None and s.qkv is not None
        # an image's piece takes its own rows' rotary tables and queries; a clip's batch (one piece),
        # one group's tables (the graph repeats them) and all its queries
        cos, sin = (self._cos[rows], self._sin[rows]) if self._chunked else (self._cos, self._sin)
        if part == "qkv":
            self._qkv_pieces.append(tuple(s.qkv.run(["q", "k", "v"], {"hidden_in": self._hidden[rows],
                                                                     "cos": cos, "sin": sin})))
            return
        if self._qkv is None:  # every row's q, k and v, once all are projected
            q, k, v = (np.concatenate(t, axis=1) for t in zip(*self._qkv_pieces))
            self._qkv, self._qkv_pieces = (q, k, v), []
        q, k, v = self._qkv
        names = ["hidden", *(f"deepstack.{j}" for j in s.deepstack)]
        self._out.append(s.session.run(names, {"hidden_in": self._hidden[rows], "q": q[:, rows] if self._chunked else q,
                                               "k": k, "v": v}))
        self._rows_out += rows.stop - rows.start
        if self._rows_out == self._hidden.shape[0]:  # the block's last piece
            parts = [np.concatenate(c) for c in zip(*self._out)]
            self._hidden = parts[0]
            self._deep.update(zip(s.deepstack, parts[1:]))
            self._qkv, self._out, self._rows_out = None, [], 0

    @property
    def features(self) -> ImageFeatures:
        """The image's (or clip's) features, rows in time order; only once done."""
        if not self.done:
            raise RuntimeError("the vision job has slices left to run")
        if len(self._embeds) == 1:
            return ImageFeatures(self._embeds[0], self._deeps[0])
        return ImageFeatures(np.concatenate(self._embeds), np.concatenate(self._deeps, axis=1))

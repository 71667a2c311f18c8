"""One decode step of an exported decoder, timed and profiled: where the milliseconds go.

    python -m edgevl.bench.profile_step EXPORT [EXPORT ...] [--batch 1,4] [--past 256] [--threads 2]
        [--rounds 7] [--steps 5] [--slices 4,8,32 [--slice-rows 3]] [--profile]

Every step runs the decoder graph alone on synthetic inputs (random embeddings, a KV cache of
`--past` tokens per row, bound in place as the engine binds it), so it measures the graph, not the
scheduler. Timing interleaves the exports and batch sizes (A, B, A, B, …, `--rounds` times) and
reports medians: on a shared machine, load drifts, and interleaving spreads the drift over all
of them. `--slices` also times mixed runs (decoding rows and a newcomer's prompt slice in one
run, as the batch loop makes them): what a prompt token adds to a step on this CPU. `--profile` adds
ONNX Runtime's per-node profile of one step, summed by operator type (the lm_head's nodes are a
row of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevl.checkpoint import ModelConfig
from edgevl.runtime.model import kv_dtype


class DecoderStep:
    """A decoder session and the buffers for steps of `batch` rows with `past` tokens cached."""

    def __init__(self, folder: Path, threads: int, profile: bool = False, spin: bool = True):
        self.folder = Path(folder)
        so = ort.SessionOptions()
        if not spin:  # idle pool threads sleep: the process's CPU time is then the work done
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "step")
        self.session = ort.InferenceSession(str(self.folder / "decoder.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        cfg = json.loads((self.folder / "config.json").read_text()) if (self.folder / "config.json").is_file() \
            else None
        names = {i.name: i for i in self.session.get_inputs()}
        self.n_layers = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
        self.hidden = names["inputs_embeds"].shape[-1]
        self.config = ModelConfig.from_dict(cfg) if cfg else None
        self.vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.n_deep = names["deepstack_embeds"].shape[0] if "deepstack_embeds" in names else 0
        self._bufs: dict[tuple[int, int], list[np.ndarray]] = {}
        self.kv_dtype = kv_dtype(self.session)

    def _kv(self, batch: int, max_len: int) -> list[np.ndarray]:
        key = (batch, max_len)
        if key not in self._bufs:
            past = next(i for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
            heads, hd = past.shape[1], past.shape[3]
            # row r's cache is the same whatever the batch, so batches can be compared row by row
            bufs = [np.stack([np.random.default_rng((j, r)).standard_normal((heads, max_len, hd), dtype=np.float32)
                              for r in range(batch)]) for j in range(2 * self.n_layers)]
            if self.kv_dtype == np.int8:  # an int8 cache holds values at about a fortieth of a unit
                bufs = [np.clip(np.rint(x * 40), -127, 127).astype(np.int8) for x in bufs]
            self._bufs[key] = bufs
        return self._bufs[key]

    def step(self, batch: int, past: int, max_len: int | None = None, slice_tokens: int = 0) -> np.ndarray:
        """One token for each of `batch` rows after `past` cached tokens → logits (batch, vocab). With
        `slice_tokens`, a mixed run: the same rows and one more row taking that many prompt tokens
        (group B, after its own `past`), as the batch loop runs a newcomer's prompt slice beside
        decoding rows → logits (batch + 1, vocab)."""
        max_len = max_len or past + 64
        kv = self._kv(batch, max_len)
        hd = kv[0].shape[3]
        rows = [np.random.default_rng((10**6, r)) for r in range(batch)]  # each row's input: its own stream
        b = self.session.io_binding()
        for i in range(self.n_layers):
            for j, kind in enumerate(("key", "value")):
                ov = ort.OrtValue.ortvalue_from_numpy(kv[2 * i + j])
                b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                b.bind_ortvalue_output(f"present.{i}.{kind}", ov)
        n = slice_tokens
        logits = np.empty((batch + (1 if n else 0), self.vocab), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        embeds = np.stack([g.standard_normal((1, self.hidden), dtype=np.float32) for g in rows])
        ang = np.stack([g.uniform(0, 6.28, hd).astype(np.float32) for g in rows])
        names = {i.name for i in self.session.get_inputs()}
        if n and "mixed" not in names:
            raise SystemExit(f"{self.folder}: the decoder takes no mixed runs (exported before them)")
        if "mixed" in names:  # a graph with mixed runs: tokens packed in one row
            g = np.random.default_rng(10**7)
            embeds = np.concatenate([embeds.reshape(batch, self.hidden),
                                     g.standard_normal((n, self.hidden), dtype=np.float32)])[None]
            ang = np.concatenate([ang, g.uniform(0, 6.28, (n, hd)).astype(np.float32)])
            # group B's cache: the slice's own row, or (no slice) the one-token spare the engine binds
            b_kv = self._kv(1, max_len + n) if n else \
                [np.zeros((1, kv[0].shape[1], 1, hd), self.kv_dtype)] * (2 * self.n_layers)
            for i in range(self.n_layers):
                for j, kind in enumerate(("key", "value")):
                    ov = ort.OrtValue.ortvalue_from_numpy(b_kv[2 * i + j])
                    b.bind_ortvalue_input(f"b_key_values.{i}.{kind}", ov)
                    b.bind_ortvalue_output(f"b_present.{i}.{kind}", ov)
            b.bind_cpu_input("mixed", np.asarray(bool(n)))
            b.bind_cpu_input("a_shape", np.asarray([batch, 1], np.int64))
            b.bind_cpu_input("b_seqlens_k", np.full(1, past + n - 1 if n else 0, np.int32))
            b.bind_cpu_input("b_total_sequence_length", np.asarray(past + n if n else 1, np.int32))
            # each decoding row's token, then the slice's last
            b.bind_cpu_input("logit_idx", np.asarray([*range(batch), *([batch + n - 1] if n else [])], np.int64))
        b.bind_cpu_input("inputs_embeds", embeds)
        b.bind_cpu_input("cos", np.cos(ang))
        b.bind_cpu_input("sin", np.sin(ang))
        # every row at the same length: the new token lands at `past` and the cache never grows
        b.bind_cpu_input("seqlens_k", np.full(batch, past, np.int32))
        b.bind_cpu_input("total_sequence_length", np.asarray(past + 1, np.int32))
        b.bind_cpu_input("visual_idx", np.zeros((0, 2), np.int64))
        b.bind_cpu_input("image_embeds", np.zeros((0, self.hidden), np.float32))
        if self.n_deep:
            b.bind_cpu_input("deepstack_embeds", np.zeros((self.n_deep, 0, self.hidden), np.float32))
        if "num_logits" in names:
            b.bind_cpu_input("num_logits", np.asarray([1], np.int64))
        self.session.run_with_iobinding(b)
        return logits

    def end_profiling(self) -> Path:
        return Path(self.session.end_profiling())


def op_table(profile: Path, skip: int) -> tuple[dict[str, float], int]:
    """ms per step by operator type, over the runs after the first `skip` (warm-up); the lm_head's
    nodes as 'lm_head (<op>)', an `If` by its own time (less its branch's nodes). → (table, runs counted)."""
    events = json.loads(profile.read_text())
    runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in events if ev.get("name") == "model_run")[skip:]
    per: dict[str, float] = defaultdict(float)
    nodes = [ev for ev in events if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time")
             and any(a <= ev["ts"] <= b for a, b in runs)]
    for ev in nodes:
        op = ev["args"].get("op_name", "?")
        dur = ev["dur"]
        if op == "If":  # its time includes its branch's nodes, which are listed on their own too
            op = "If (own)"
            dur -= sum(e["dur"] for e in nodes if e is not ev and e["tid"] == ev["tid"]
                       and ev["ts"] <= e["ts"] and e["ts"] + e["dur"] <= ev["ts"] + ev["dur"])
        key = f"lm_head ({op})" if ev["name"].startswith("/lm_head/") else op
        per[key] += dur / 1000 / max(1, len(runs))
    per["(whole run)"] = sum(b - a for a, b in runs) / 1000 / max(1, len(runs))
    return dict(sorted(per.items(), key=lambda kv: -kv[1])), len(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--past", type=int, default=256, help="tokens already in each row's KV cache")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds over every export and batch")
    ap.add_argument("--steps", type=int, default=5, help="steps per round (the round's median is kept)")
    ap.add_argument("--slices", default="",
                    help="e.g. 4,8,32: also mixed runs of --slice-rows decoding rows and a prompt slice of "
                         "this many tokens (what the step budget lets a step carry)")
    ap.add_argument("--slice-rows", type=int, default=3, help="decoding rows beside a --slices prompt slice")
    ap.add_argument("--profile", action="store_true", help="also a per-operator profile of a few steps")
    ap.add_argument("--no-spin", action="store_true",
                    help="pool threads sleep when idle, so CPU ms per step (also reported) counts work, not "
                         "spinning: steadier than wall time on a loaded machine")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    slices = [int(n) for n in args.slices.split(",") if n]
    cases = [(bs, 0) for bs in batches] + [(args.slice_rows, n) for n in slices]  # (decoding rows, slice)
    steps = {str(f): DecoderStep(f, args.threads, spin=not args.no_spin) for f in args.exports}
    for s in steps.values():  # warm-up: prepacking, first-touch of mapped weights, arena growth
        for rows, n in cases:
            s.step(rows, args.past, slice_tokens=n)
            s.step(rows, args.past, slice_tokens=n)
    times: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    cpu: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = list(steps.items()) if r % 2 == 0 else list(reversed(steps.items()))
        for name, s in order:
            for rows, n in cases:
                one, one_cpu = [], []
                for _ in range(args.steps):
                    c0, t0 = time.process_time(), time.perf_counter()
                    s.step(rows, args.past, slice_tokens=n)
                    one.append(time.perf_counter() - t0)
                    one_cpu.append(time.process_time() - c0)
                times[(name, rows, n)].append(statistics.median(one) * 1000)
                cpu[(name, rows, n)].append(statistics.median(one_cpu) * 1000)
        load.append(os.getloadavg()[0])
    result: dict = {"past": args.past, "threads": args.threads, "load_1min": [round(x, 2) for x in load],
                    "ms_per_step": {}, "cpu_ms_per_step": {}}
    print(f"load average (1 min) during timing: {min(load):.2f}–{max(load):.2f}")
    print(f"{'export':60s} " + " ".join(f"b={bs:<3d} ms (min–max)    " for bs in batches)
          + (f"b{batches[-1]}/b{batches[0]}  " if len(batches) > 1 else "") + "CPU ms (median)")
    for name in steps:
        meds = {bs: statistics.median(times[(name, bs, 0)]) for bs in batches}
        cells = [f"{meds[bs]:7.1f} ({min(times[(name, bs, 0)]):.0f}–{max(times[(name, bs, 0)]):.0f})".ljust(25)
                 for bs in batches]
        ratio = f"{meds[batches[-1]] / meds[batches[0]]:.2f}" if len(batches) > 1 else ""
        cpu_cells = " ".join(f"b={bs}: {statistics.median(cpu[(name, bs, 0)]):.1f}" for bs in batches)
        print(f"{name:60s} " + " ".join(cells) + ratio.ljust(7) + cpu_cells)
        result["ms_per_step"][name] = {str(bs): times[(name, bs, 0)] for bs in batches}
        result["cpu_ms_per_step"][name] = {str(bs): cpu[(name, bs, 0)] for bs in batches}
        for n in slices:
            med = statistics.median(times[(name, args.slice_rows, n)])
            print(f"  {args.slice_rows} rows + a {n}-token prompt slice: {med:7.1f} ms, "
                  f"{med / meds[batches[0]]:.2f}× b={batches[0]}")
            result["ms_per_step"][name][f"{args.slice_rows}+{n}"] = times[(name, args.slice_rows, n)]
    if args.profile:
        del steps
        for f in args.exports:
            for bs in batches:
                s = DecoderStep(f, args.threads, profile=True)
                for _ in range(2 + args.steps):  # the first two warm up (not counted)
                    s.step(bs, args.past)
                table, _ = op_table(s.end_profiling(), skip=2)
                whole = table.pop("(whole run)")
                total = sum(table.values())
                print(f"\n{f} batch {bs}: {whole:.1f} ms per run, {total:.1f} ms of it in kernels")
                for k, v in sorted(table.items(), key=lambda kv: -kv[1]):
                    if v >= 0.05:
                        print(f"  {k:40s} {v:8.2f} ms  {100 * v / total:5.1f}%")
                result.setdefault("profile", {})[f"{f} b{bs}"] = {**table, "(whole run)": whole}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Streaming benchmark: ``model.stream()`` one token at a time, on the CPU.

One process, one run, interleaved rounds: in the push phase every round
pushes one token into each stream (B = 1 and B = 64) and, inside the timing
windows, steps ``torch.nn.LSTM`` once at each batch size, so load from other
processes on a shared machine hits all of them alike; ratios are taken
between figures of the same run.

Setup: the PR-LSTM of ``benchmarks/bench_cpu.py`` with a language-model-like
input: H = 256, num_layers = 2, D = O = 64 (one-hot tokens), float32, the
odd-even pattern, backend ``numba``.  Parts:

* ``push``: ``stream.push(x_t)`` for t = 0, 1, ... up to 65 536 (B = 1) and
  up to ``--max-position-batched`` (B = 64; 16 384 by default, to keep the
  run within ~10-15 minutes on 2 cores), every push timed.  At every
  position t = 2^k (from 64) a record gives the mean time per push over the
  window of the last W = 64 pushes (tokens t-W .. t-1; and over the last
  256), the merges those pushes did, the stream's ``live_states`` and
  ``capacity``, the bytes of its state stores (``capacity x B x H x states x
  4``), of its chunk scratch buffers, and the process RSS.
* ``torch-step``: ``torch.nn.LSTM`` (same H, 2 layers) + the same-shaped
  linear head, under ``torch.no_grad``, stepped one token at a time with its
  ``(h, c)`` carried, W steps per window: the sequential model's per-token
  latency, and a drift reference (its cost does not depend on t).
* ``naive``: what a parallel-scan model does to answer the next position
  without a stream: ``model.forward(x[:, :t])`` on the whole prefix (and
  ``outputs="last"``, the cheapest full re-run), t = 64 ... 4096, rounds
  interleaved.  Its time is that position's per-token cost.  The stream's
  logits at the checkpoints are checked against it.  In the same rounds a
  fresh stream, prefilled to t - W by ``extend``, is timed over its W
  pushes up to t (``stream-interleaved``): the ">= 100x" ratio divides
  figures measured side by side, not minutes apart.
* ``extend``: a long prompt (4096 tokens) in one ``stream.extend`` call on
  a fresh stream against ``model.forward`` on the same tokens, interleaved
  rounds; outputs compared.

Targets (``"kind": "targets"``): per-token cost flat in t (the window mean at
the last checkpoint within 1.5x of that at t = 64), >= 100x faster than
re-running the forward at t = 4096, memory O(log t) (``live_states <=
2 ceil(log2(t+1)) + 2`` after every push, and the store rows -- the most
``capacity`` of any push in the octave ``t/2 < t' <= t`` -- growing from
the first checkpoint to the last by no more than 2x the growth of that
bound: the stores' doubling slack).

Usage::

    python benchmarks/bench_stream.py                    # full run (~10-15 min on 2 cores)
    python benchmarks/bench_stream.py --quick            # tiny sizes, seconds
    python benchmarks/bench_stream.py --out docs/benchmarks/stream_results.json \\
        --plot docs/benchmarks/stream_latency_vs_t.png

stdout: one JSON object per line (one per measurement, then summaries);
stderr: progress.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cpu import Reporter, machine_info  # noqa: E402  (same records, same machine probe)

FULL = dict(hidden=256, features=64, outputs=64, layers=2, batches=(1, 64),
            first=64, max_position=65536, max_position_batched=16384, window=64,
            long_window=256, naive_max=4096, naive_runs=2, extend_length=4096,
            extend_rounds=3, warmup=160)
QUICK = dict(hidden=32, features=8, outputs=8, layers=2, batches=(1, 4),
             first=16, max_position=1024, max_position_batched=512, window=16,
             long_window=64, naive_max=256, naive_runs=2, extend_length=256,
             extend_rounds=2, warmup=40)


# ------------------------------------------------------------------ helpers
def rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/status`` VmRSS)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # peak, as a fallback


def live_bound(position: int) -> int:
    """``2 ceil(log2(t+1)) + 2``: odd-even's frontier bound (treesched.streaming)."""
    return 2 * math.ceil(math.log2(position + 1)) + 2 if position > 0 else 0


def checkpoints(first: int, last: int):
    t = first
    while t <= last:
        yield t
        t *= 2


class Tokens:
    """Random tokens ``(B, T)`` and their one-hot rows, built per step (a
    ``(64, 65536, 64)`` float32 array would take 1 GiB)."""

    def __init__(self, batch, length, features, seed):
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(0, features, (batch, length))
        self.eye = np.eye(features, dtype=np.float32)

    def step(self, t):
        return self.eye[self.ids[:, t]]

    def prefix(self, t0, t1):
        return self.eye[self.ids[:, t0:t1]]


class TorchStepper:
    """``torch.nn.LSTM`` (2 layers, same H) + linear head, one token per call,
    ``(h, c)`` carried; for scale (a sequential LSTM, not the same model)."""

    def __init__(self, cfg, batch, tokens):
        import torch
        torch.manual_seed(0)
        self.torch = torch
        self.lstm = torch.nn.LSTM(cfg["features"], cfg["hidden"], num_layers=cfg["layers"])
        self.head = torch.nn.Linear(cfg["hidden"], cfg["outputs"])
        self.tokens = tokens
        self.state = None
        self.count = 0

    def step(self):
        torch = self.torch
        x = torch.from_numpy(self.tokens.step(self.count % self.tokens.ids.shape[1]))[None]
        with torch.no_grad():
            y, self.state = self.lstm(x, self.state)
            logits = self.head(torch.relu(y[0]))
        self.count += 1
        return logits


# -------------------------------------------------------------------- parts
def push_phase(reporter, cfg, model, tokens, steppers, positions_needed):
    """Every stream pushed one token per round; records at the checkpoints.

    Returns ``({B: {t: logits at position t-1}}, {B: seconds per push})``.
    """
    window, long_window = cfg["window"], cfg["long_window"]
    caps = {B: (cfg["max_position"] if B == 1 else cfg["max_position_batched"])
            for B in cfg["batches"]}
    last = max(caps.values())
    marks = list(checkpoints(cfg["first"], last))
    in_window = np.zeros(last + 1, bool)   # round index -> a torch step this round?
    for t in marks:
        in_window[max(0, t - window):t] = True
    streams = {B: model.stream(batch=B) for B in cfg["batches"]}
    seconds = {B: np.full(caps[B], np.nan) for B in cfg["batches"]}
    merges = {B: np.zeros(caps[B] + 1, np.int64) for B in cfg["batches"]}
    live = {B: np.zeros(caps[B] + 1, np.int64) for B in cfg["batches"]}       # after push t-1
    capacity = {B: np.zeros(caps[B] + 1, np.int64) for B in cfg["batches"]}
    torch_seconds = {B: {} for B in steppers}
    saved = {B: {} for B in cfg["batches"]}
    clock = time.perf_counter
    next_mark = 0
    started = clock()
    gc.collect()
    gc.disable()   # a collection inside one push would land in one window only
    try:
        for t in range(last):
            for B, stream in streams.items():
                if t >= caps[B]:
                    continue
                x_t = tokens[B].step(t)
                start = clock()
                logits = stream.push(x_t)
                seconds[B][t] = clock() - start
                merges[B][t + 1] = stream.merges
                live[B][t + 1] = stream.live_states
                capacity[B][t + 1] = stream.capacity
                if t + 1 in positions_needed:
                    saved[B][t + 1] = np.array(logits)
            if in_window[t]:
                for B, stepper in steppers.items():
                    start = clock()
                    stepper.step()
                    torch_seconds[B][t] = clock() - start
            if next_mark < len(marks) and t + 1 == marks[next_mark]:
                position = marks[next_mark]
                next_mark += 1
                rss = rss_bytes()
                for B, stream in streams.items():
                    if position > caps[B]:
                        continue
                    emit_push_record(reporter, cfg, model, stream, B, position,
                                     seconds[B], merges[B], live[B], capacity[B], rss)
                for B in steppers:
                    values = [torch_seconds[B][r] for r in range(max(0, position - window),
                                                                  position)]
                    reporter.emit({"kind": "torch-step", "B": B, "t": position,
                                   "window": window, "mean_ms": float(np.mean(values)) * 1e3,
                                   "median_ms": float(np.median(values)) * 1e3})
                gc.collect()
                line = ", ".join(
                    f"B={B} {np.mean(seconds[B][position - window:position]) * 1e3:.2f} ms/token "
                    f"live {streams[B].live_states} cap {streams[B].capacity}"
                    for B in streams if position <= caps[B])
                reporter.progress(f"push t={position}: {line} "
                                  f"({clock() - started:.0f} s in the push phase)")
    finally:
        gc.enable()
    for B in cfg["batches"]:
        emit_state_record(reporter, B, seconds[B], live[B], capacity[B])
    return saved, seconds


def emit_state_record(reporter, B, seconds, live, capacity):
    """Every push: the frontier against its bound, and the pushes that
    reallocated the stores (capacity changed) against those that did not."""
    positions = np.arange(1, len(live))
    bounds = 2 * np.ceil(np.log2(positions + 1)).astype(np.int64) + 2
    changed = capacity[1:] != capacity[:-1]
    changed[0] = False   # the first push allocates the stores
    record = {"kind": "push-states", "B": B, "pushes": int(len(positions)),
              "live_over_bound_pushes": int(np.sum(live[1:] > bounds)),
              "max_live_minus_bound": int(np.max(live[1:] - bounds)),
              "max_live_states": int(live.max()), "max_capacity": int(capacity.max()),
              "capacity_changes": int(changed.sum()),
              "capacity_grows": int(np.sum(capacity[1:] > capacity[:-1])),
              "capacity_shrinks": int(np.sum(capacity[1:] < capacity[:-1])),
              "mean_ms_push_with_capacity_change": (
                  float(np.mean(seconds[changed])) * 1e3 if changed.any() else None),
              "mean_ms_push_without": float(np.mean(seconds[~changed])) * 1e3,
              "median_ms_push_with_capacity_change": (
                  float(np.median(seconds[changed])) * 1e3 if changed.any() else None),
              "median_ms_push_without": float(np.median(seconds[~changed])) * 1e3}
    reporter.emit(record)
    reporter.progress(f"B={B}: {record['pushes']} pushes, live above its bound in "
                      f"{record['live_over_bound_pushes']}, max live {record['max_live_states']}, "
                      f"max capacity {record['max_capacity']}, capacity changed "
                      f"{record['capacity_changes']} times")


def emit_push_record(reporter, cfg, model, stream, B, position, seconds, merges, live,
                     capacity, rss):
    window, long_window = cfg["window"], cfg["long_window"]
    recent = seconds[position - window:position]
    octave = slice(position // 2 + 1, position + 1)   # positions t/2+1 .. t
    changed = np.sum(capacity[position - window + 1:position + 1]
                     != capacity[position - window:position])
    states = len(model.cell.state_names)
    itemsize = np.dtype(model.dtype).itemsize
    scratch = getattr(stream, "_buffers", {})   # the chunk workspace's other buffers
    record = {
        "kind": "push", "B": B, "t": position, "window": window,
        "mean_ms": float(np.mean(recent)) * 1e3,
        "median_ms": float(np.median(recent)) * 1e3,
        "max_ms": float(np.max(recent)) * 1e3,
        "merges_per_token": float(merges[position] - merges[position - window]) / window,
        "merges_total": int(stream.merges),
        "live_states": stream.live_states, "live_bound": live_bound(position),
        "max_live_states_octave": int(live[octave].max()),
        "capacity": stream.capacity, "max_capacity_octave": int(capacity[octave].max()),
        "capacity_changes_in_window": int(changed),
        "store_bytes": stream.capacity * B * model.hidden_size * states * itemsize,
        "max_store_bytes_octave": int(capacity[octave].max()) * B * model.hidden_size
        * states * itemsize,
        "max_live_bytes_octave": int(live[octave].max()) * B * model.hidden_size
        * states * itemsize,
        "scratch_bytes": int(sum(int(b.nbytes) for b in scratch.values())),
        "process_rss_bytes": rss,
    }
    if position >= 2 * window:
        # the window before: no torch steps interleaved there (their effect on the stream)
        record["mean_ms_window_before"] = float(np.mean(
            seconds[position - 2 * window:position - window])) * 1e3
    if position >= long_window:
        record["long_window"] = long_window
        record["long_mean_ms"] = float(np.mean(seconds[position - long_window:position])) * 1e3
    reporter.emit(record)


def naive_phase(reporter, cfg, model, tokens, saved, include_last=True):
    """``model.forward`` on the whole prefix (and ``outputs="last"``), rounds
    interleaved over (t, B, variant); checks the stream's saved logits."""
    lengths = list(checkpoints(cfg["first"], cfg["naive_max"]))
    prefixes = {B: tokens[B].prefix(0, cfg["naive_max"]) for B in cfg["batches"]}
    # warm: kernels, workspaces of the largest shape
    for B in cfg["batches"]:
        model.forward(prefixes[B][:, :cfg["first"]])
    times, stream_times = {}, {}
    window = cfg["window"]
    variants = ["all"] + (["last"] if include_last else [])
    for round_index in range(cfg["naive_runs"]):
        for t in lengths:
            for B in cfg["batches"]:
                for variant in variants:
                    x = prefixes[B][:, :t]
                    start = time.perf_counter()
                    y = model.forward(x, outputs=variant)
                    elapsed = time.perf_counter() - start
                    times.setdefault((t, B, variant), []).append(elapsed)
                    if round_index == 0 and variant == "all" and t in saved.get(B, {}):
                        ref = np.asarray(y)[:, -1]
                        got = saved[B][t]
                        reporter.emit({"kind": "check", "what": "push vs forward", "B": B, "t": t,
                                       "max_abs_diff": float(np.abs(got - ref).max()),
                                       "max_abs_logit": float(np.abs(ref).max())})
                    del y
                # the stream at the same position, timed in the same round: a
                # fresh stream prefilled to t - W, then W pushes up to t
                stream = model.stream(batch=B)
                if t > window:
                    stream.extend(prefixes[B][:, :t - window])
                pushes = []
                for position in range(t - window, t):
                    start = time.perf_counter()
                    stream.push(prefixes[B][:, position])
                    pushes.append(time.perf_counter() - start)
                stream_times.setdefault((t, B), []).extend(pushes)
                del stream
            reporter.progress(f"naive round {round_index + 1}/{cfg['naive_runs']}: t={t} "
                              + ", ".join(f"B={B} {np.min(times[(t, B, 'all')]) * 1e3:.1f} ms"
                                          for B in cfg["batches"]))
    medians = {}
    for (t, B, variant), values in sorted(times.items()):
        median = float(np.median(values))
        medians[(t, B, variant)] = median
        reporter.emit({"kind": "naive", "B": B, "t": t, "outputs": variant,
                       "median_ms": median * 1e3, "times_ms": [v * 1e3 for v in values],
                       "per_token_ms": median * 1e3})
    for (t, B), values in sorted(stream_times.items()):
        median = float(np.median(values))
        medians[(t, B, "stream")] = median
        reporter.emit({"kind": "stream-interleaved", "B": B, "t": t, "pushes": len(values),
                       "median_ms": median * 1e3, "mean_ms": float(np.mean(values)) * 1e3})
    return medians


def extend_phase(reporter, cfg, model, tokens):
    """One ``extend`` of a long prompt on a fresh stream vs ``model.forward``."""
    length = cfg["extend_length"]
    results = {}
    for B in cfg["batches"]:
        x = tokens[B].prefix(0, length)
        fns = {"forward": lambda: model.forward(x),
               "extend": lambda: model.stream(batch=B).extend(x)}
        y_forward = np.asarray(fns["forward"]())
        y_extend = np.asarray(fns["extend"]())
        reporter.emit({"kind": "check", "what": "extend vs forward", "B": B, "t": length,
                       "max_abs_diff": float(np.abs(y_extend - y_forward).max()),
                       "max_abs_logit": float(np.abs(y_forward).max())})
        del y_forward, y_extend
        times = {name: [] for name in fns}
        for round_index in range(cfg["extend_rounds"]):
            order = list(fns) if round_index % 2 == 0 else list(fns)[::-1]
            for name in order:
                gc.collect()
                start = time.perf_counter()
                result = fns[name]()
                times[name].append(time.perf_counter() - start)
                del result
        medians = {name: float(np.median(values)) for name, values in times.items()}
        record = {"kind": "extend", "B": B, "length": length,
                  "forward_ms": medians["forward"] * 1e3, "extend_ms": medians["extend"] * 1e3,
                  "extend_over_forward": medians["extend"] / medians["forward"],
                  "extend_tokens_per_s": length * B / medians["extend"],
                  "forward_tokens_per_s": length * B / medians["forward"],
                  "forward_times_ms": [v * 1e3 for v in times["forward"]],
                  "extend_times_ms": [v * 1e3 for v in times["extend"]]}
        reporter.emit(record)
        results[B] = record
        reporter.progress(f"extend B={B} T={length}: extend {record['extend_ms']:.0f} ms, "
                          f"forward {record['forward_ms']:.0f} ms "
                          f"(x{record['extend_over_forward']:.2f})")
    return results


def summarize(reporter, cfg, records, naive):
    """The per-token table and the targets."""
    push = {(r["B"], r["t"]): r for r in records if r.get("kind") == "push"}
    torch_steps = {(r["B"], r["t"]): r for r in records if r.get("kind") == "torch-step"}
    summary = {"kind": "targets"}
    flat, memory = {}, {}
    for B in cfg["batches"]:
        points = sorted(t for (b, t) in push if b == B)
        if not points:
            continue
        first, last = push[(B, points[0])], push[(B, points[-1])]
        ratio = last["mean_ms"] / first["mean_ms"]
        entry = {"t_first": points[0], "t_last": points[-1],
                 "mean_ms_first": first["mean_ms"], "mean_ms_last": last["mean_ms"],
                 "last_over_first": ratio,
                 "median_last_over_first": last["median_ms"] / first["median_ms"],
                 "max_over_checkpoints_over_first": max(push[(B, t)]["mean_ms"]
                                                       for t in points) / first["mean_ms"],
                 "met": ratio <= 1.5}
        if (B, points[0]) in torch_steps and (B, points[-1]) in torch_steps:
            drift = torch_steps[(B, points[-1])]["median_ms"] / torch_steps[(B, points[0])]["median_ms"]
            entry["torch_drift_last_over_first"] = drift
            entry["last_over_first_torch_normalized"] = (
                last["median_ms"] / first["median_ms"]) / drift
        flat[B] = entry
        states = [r for r in records if r.get("kind") == "push-states" and r["B"] == B][0]
        growth = last["max_capacity_octave"] / first["max_capacity_octave"]
        allowed = 2 * last["live_bound"] / first["live_bound"]
        memory[B] = {
            "live_above_bound_pushes": states["live_over_bound_pushes"],
            "max_live_states": states["max_live_states"],
            "max_capacity": states["max_capacity"],
            "capacity_changes": states["capacity_changes"],
            "octave_first": [points[0] // 2 + 1, points[0]],
            "octave_last": [points[-1] // 2 + 1, points[-1]],
            "max_live_first_octave": first["max_live_states_octave"],
            "max_live_last_octave": last["max_live_states_octave"],
            "max_capacity_first_octave": first["max_capacity_octave"],
            "max_capacity_last_octave": last["max_capacity_octave"],
            "capacity_growth": growth, "capacity_growth_allowed": allowed,
            "max_store_bytes_last_octave": last["max_store_bytes_octave"],
            "max_live_bytes_last_octave": last["max_live_bytes_octave"],
            "store_rows_over_live_rows_last_octave": (last["max_capacity_octave"]
                                                      / last["max_live_states_octave"]),
            "scratch_bytes_first": first["scratch_bytes"],
            "scratch_bytes_last": last["scratch_bytes"]}
        memory[B]["met"] = states["live_over_bound_pushes"] == 0 and growth <= allowed
    summary["flat_in_t"] = flat
    summary["memory_log_t"] = memory
    speedup = {}
    for B in cfg["batches"]:
        t = cfg["naive_max"]
        if (t, B, "stream") in naive and (t, B, "all") in naive:
            # both timed in the same rounds (naive_phase); the push phase's
            # window at t, measured minutes earlier, is reported beside it
            stream_ms = naive[(t, B, "stream")] * 1e3
            entry = {"t": t, "stream_ms": stream_ms,
                     "stream_push_phase_mean_ms": push[(B, t)]["mean_ms"] if (B, t) in push
                     else None,
                     "stream_push_phase_median_ms": push[(B, t)]["median_ms"]
                     if (B, t) in push else None,
                     "naive_ms": naive[(t, B, "all")] * 1e3,
                     "naive_over_stream": naive[(t, B, "all")] * 1e3 / stream_ms}
            if (t, B, "last") in naive:
                entry["naive_last_ms"] = naive[(t, B, "last")] * 1e3
                entry["naive_last_over_stream"] = naive[(t, B, "last")] * 1e3 / stream_ms
            entry["met"] = entry["naive_over_stream"] >= 100
            speedup[B] = entry
    summary["vs_naive"] = speedup
    reporter.emit(summary)
    for B, entry in flat.items():
        reporter.progress(f"flat B={B}: t={entry['t_last']} / t={entry['t_first']} = "
                          f"{entry['last_over_first']:.2f} ({'met' if entry['met'] else 'NOT met'})")
    for B, entry in speedup.items():
        reporter.progress(f"vs naive B={B} t={entry['t']}: {entry['naive_over_stream']:.0f}x "
                          f"({'met' if entry['met'] else 'NOT met'})")
    for B, entry in memory.items():
        reporter.progress(f"memory B={B}: max live {entry['max_live_states']}, max capacity "
                          f"{entry['max_capacity']} ({'met' if entry['met'] else 'NOT met'})")
    return summary


# --------------------------------------------------------------------- plot
def plot(records, path, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    colors = {B: f"C{k}" for k, B in enumerate(cfg["batches"])}
    for B in cfg["batches"]:
        push = sorted((r["t"], r["mean_ms"]) for r in records
                      if r.get("kind") == "push" and r["B"] == B)
        if push:
            ax.plot(*zip(*push), "-o", color=colors[B], label=f"stream.push B={B}")
        naive = sorted((r["t"], r["median_ms"]) for r in records
                       if r.get("kind") == "naive" and r["B"] == B and r["outputs"] == "all")
        if naive:
            ax.plot(*zip(*naive), "--s", color=colors[B], label=f"forward(x[:, :t]) B={B}")
        last = sorted((r["t"], r["median_ms"]) for r in records
                      if r.get("kind") == "naive" and r["B"] == B and r["outputs"] == "last")
        if last:
            ax.plot(*zip(*last), ":^", color=colors[B], alpha=0.6,
                    label=f"forward(x[:, :t], outputs='last') B={B}")
        steps = sorted((r["t"], r["median_ms"]) for r in records
                       if r.get("kind") == "torch-step" and r["B"] == B)
        if steps:
            ax.plot(*zip(*steps), "-.x", color=colors[B], alpha=0.7,
                    label=f"torch.nn.LSTM step B={B}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position t (tokens so far)")
    ax.set_ylabel("ms per token")
    ax.set_title(f"per-token latency (mean of last {cfg['window']} pushes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1]
    for B in cfg["batches"]:
        rows = sorted((r["t"], r["max_live_states_octave"], r["max_capacity_octave"],
                       r["live_states"]) for r in records
                      if r.get("kind") == "push" and r["B"] == B)
        if rows:
            ts = [r[0] for r in rows]
            ax.plot(ts, [r[1] for r in rows], "-o", color=colors[B],
                    label=f"live_states B={B} (max over t/2..t)")
            ax.plot(ts, [r[2] for r in rows], "--s", color=colors[B],
                    label=f"capacity B={B} (max over t/2..t)")
            ax.plot(ts, [r[3] for r in rows], ":", color=colors[B], alpha=0.5,
                    label=f"live_states B={B} at t = 2^k")
    bound = sorted({(r["t"], r["live_bound"]) for r in records if r.get("kind") == "push"})
    if bound:
        ax.plot(*zip(*bound), "k:", label="2 ceil(log2(t+1)) + 2")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position t")
    ax.set_ylabel("states (rows of B x H)")
    ax.set_title("stream state: live nodes and store rows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[2]
    mib = 2 ** 20
    for B in cfg["batches"]:
        rows = sorted((r["t"], r["max_store_bytes_octave"], r["max_live_bytes_octave"],
                       r["scratch_bytes"]) for r in records
                      if r.get("kind") == "push" and r["B"] == B)
        if rows:
            ts = [r[0] for r in rows]
            ax.plot(ts, [r[1] / mib for r in rows], "-o", color=colors[B],
                    label=f"state stores B={B} (max over t/2..t)")
            ax.plot(ts, [r[2] / mib for r in rows], ":", color=colors[B],
                    label=f"live states B={B} (max over t/2..t)")
            ax.plot(ts, [r[3] / mib for r in rows], "--s", color=colors[B], alpha=0.6,
                    label=f"chunk scratch B={B} (at t)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position t")
    ax.set_ylabel("MiB")
    ax.set_title("memory")
    ax.grid(True, which="both", alpha=0.3)
    rss = sorted({(r["t"], r["process_rss_bytes"]) for r in records if r.get("kind") == "push"})
    handles, labels = ax.get_legend_handles_labels()
    if rss:
        twin = ax.twinx()
        line, = twin.plot([r[0] for r in rss], [r[1] / mib for r in rss], "k-.")
        twin.set_ylabel("process RSS (MiB)")
        twin.set_ylim(0, max(r[1] for r in rss) / mib * 1.15)
        handles.append(line)
        labels.append("process RSS (right axis)")
    ax.legend(handles, labels, fontsize=7)
    fig.suptitle(f"treesched streaming (numba, odd-even), H={cfg['hidden']}, "
                 f"{cfg['layers']} layers, D=O={cfg['features']}, float32")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------- main
def run(args):
    cfg = dict(QUICK if args.quick else FULL)
    if args.batches:
        cfg["batches"] = tuple(int(v) for v in args.batches.split(","))
    for name in ("max_position", "max_position_batched", "naive_max", "extend_length", "window"):
        value = getattr(args, name)
        if value:
            cfg[name] = value
    cfg["long_window"] = max(cfg["long_window"], cfg["window"])
    cfg["first"] = max(cfg["first"], cfg["window"])
    cfg["naive_max"] = min(cfg["naive_max"], cfg["max_position"])
    reporter = Reporter(args.out)
    reporter.emit({"kind": "machine", **machine_info()})
    reporter.emit({"kind": "config", **cfg, "dtype": "float32", "pattern": "odd-even",
                   "backend": "numba", "quick": args.quick})

    import treesched
    model = treesched.PRLSTM(cfg["features"], cfg["hidden"], cfg["outputs"],
                             num_layers=cfg["layers"], backend="numba", seed=0)
    # (the numba backend sets OMP_WAIT_POLICY=PASSIVE before torch's OpenMP starts)
    have_torch = False
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            have_torch = True
        except ImportError as error:
            reporter.progress(f"torch not installed ({error}): skipping torch.nn.LSTM")
            reporter.emit({"kind": "skipped", "impl": "torch-lstm", "reason": str(error)})

    length = max(cfg["max_position"], cfg["max_position_batched"], cfg["extend_length"])
    tokens = {B: Tokens(B, length, cfg["features"], seed=B) for B in cfg["batches"]}

    # warm-up: kernels (cached on disk, loaded on first call), allocator, torch
    start = time.perf_counter()
    for B in cfg["batches"]:
        warm = model.stream(batch=B)
        for t in range(cfg["warmup"]):
            warm.push(tokens[B].step(t))
        warm.extend(tokens[B].prefix(0, cfg["window"]))
        model.forward(tokens[B].prefix(0, cfg["window"]))
        del warm
    steppers = {}
    if have_torch:
        steppers = {B: TorchStepper(cfg, B, tokens[B]) for B in cfg["batches"]}
        for stepper in steppers.values():
            for _ in range(cfg["warmup"]):
                stepper.step()
    reporter.progress(f"warm-up {time.perf_counter() - start:.1f} s")

    needed = set(checkpoints(cfg["first"], cfg["naive_max"]))
    saved, _ = push_phase(reporter, cfg, model, tokens, steppers, needed)
    gc.collect()
    naive = {} if args.no_naive else naive_phase(reporter, cfg, model, tokens, saved,
                                                 include_last=not args.no_naive_last)
    if not args.no_extend:
        extend_phase(reporter, cfg, model, tokens)
    summarize(reporter, cfg, reporter.records, naive)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "records": reporter.records}, handle, indent=1)
        reporter.progress(f"wrote {args.out}")
    if args.plot:
        plot(reporter.records, args.plot, cfg)
        reporter.progress(f"wrote {args.plot}")
    reporter.progress("done")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a few seconds, without torch (add --frameworks)")
    parser.add_argument("--frameworks", action="store_true", help="--quick: also torch.nn.LSTM")
    parser.add_argument("--out", help="write every record (and the command) to this JSON file")
    parser.add_argument("--plot", help="write the latency and memory plots to this PNG")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--max-position", type=int, help="last position pushed at B = 1")
    parser.add_argument("--max-position-batched", type=int,
                        help="last position pushed at B > 1 (default 16384)")
    parser.add_argument("--window", type=int, help="pushes per timing window (default 64)")
    parser.add_argument("--naive-max", type=int, help="longest prefix re-run (default 4096)")
    parser.add_argument("--extend-length", type=int, help="prompt length for extend (default 4096)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-naive", action="store_true", help="skip re-running the forward")
    parser.add_argument("--no-naive-last", action="store_true",
                        help="skip the outputs='last' re-run")
    parser.add_argument("--no-extend", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.no_torch = args.no_torch or not args.frameworks
    run(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Data-parallel training with MPI: steps per second on 1 and 2 ranks, the
bytes exchanged per step, and a projection to 64 nodes.

Setup: the paper's training step (``treesched.training.train_step``:
parity_check, lengths drawn uniformly from 1..40, global batch 128, Adam
with clipping) with hidden ``H`` (64 with ``--quick``, 256 otherwise), 2
layers, float32, the numba backend (numpy where numba cannot run), one
thread per rank (``NUMBA_NUM_THREADS=1``, ``OMP_NUM_THREADS=1``).  Parts:

* ``ranks``: ``mpiexec -n 1`` and ``mpiexec -n 2`` run the same steps (the
  same seed, so the same lengths); after ``warmup`` steps, rank 0 times
  ``steps`` steps between two barriers, and then times the gradient
  exchange alone (``ProcessGroup.allreduce_grads`` on a gradient-sized
  dict, repeated).
* ``compute``: in this process (no MPI), one step's parts at the per-rank
  batch of N ranks, ``128 / N`` rows for N = 1, 2, 4, …, 64: drawing the
  global batch (every rank draws all of it), ``loss_and_grads`` on the
  rows, the optimizer step.
* ``projection`` (on paper): the step time of N nodes, one rank each, as
  ``draw + compute(128 / N) + optimizer + exchange(N)`` with the exchange
  of this module (an all-to-all reduce-scatter, then an all-gather: each
  rank sends and receives ``2 (N-1)/N`` gradient vectors, in ``2 (N-1)``
  messages) priced at a stated network bandwidth and latency.  It assumes
  the compute of a node is this machine's core; it ignores contention and
  stragglers, so it is an upper bound on the speed-up.

Usage::

    python benchmarks/bench_mpi.py --quick --out docs/benchmarks/mpi_results.json
    python benchmarks/bench_mpi.py                    # hidden 256 (minutes on 2 cores)

stdout: one JSON object (every record); stderr: progress.  Needs
``pip install 'treesched[mpi]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# one thread per rank, set before numba or a BLAS is loaded
for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402

GLOBAL_BATCH = 128
MAX_LENGTH = 40
#: the networks the projection is priced on: (name, bytes/s one way per node, latency s)
NETWORKS = (("InfiniBand HDR 200 Gb/s (~20 GB/s achieved)", 20e9, 2e-6),
            ("100 Gb/s Ethernet (~10 GB/s achieved)", 10e9, 10e-6),
            ("10 Gb/s Ethernet (~1.1 GB/s achieved)", 1.1e9, 30e-6))
PROJECTED_NODES = (1, 2, 4, 8, 16, 32, 64)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def backend_name() -> str:
    from treesched.backends import why_unavailable
    return "numba" if why_unavailable("numba") is None else "numpy"


def build(hidden: int, backend: str):
    from treesched.model import PRLSTM
    from treesched.optim import Adam
    from treesched.training_data import FormalTaskData
    data = FormalTaskData("parity_check", MAX_LENGTH)
    model = PRLSTM(data.input_size, hidden, data.output_size, backend=backend, seed=0)
    optimizer = Adam(lr=1e-3, clip=1.0)
    optimizer.init(model.params)
    return data, model, optimizer


# ------------------------------------------------------------- under mpiexec
def worker(args) -> None:
    from treesched.distributed import world
    from treesched.training import train_step

    group = world()
    data, model, optimizer = build(args.hidden, args.backend)
    rng = np.random.default_rng(0)
    for step in range(args.warmup):   # numba compiles on the first calls
        train_step(model, optimizer, data.draw(rng, GLOBAL_BATCH), step + 1, group)
    group.agree()   # a barrier
    started = time.perf_counter()
    for step in range(args.steps):
        train_step(model, optimizer, data.draw(rng, GLOBAL_BATCH), step + 1, group)
    group.agree()
    elapsed = time.perf_counter() - started

    grads = {name: np.ones_like(value) for name, value in model.params.numpy().items()}
    repeats = 50
    group.agree()
    started = time.perf_counter()
    for _ in range(repeats):
        group.allreduce_grads(grads)
    group.agree()
    exchange = (time.perf_counter() - started) / repeats
    if group.is_root:
        count = sum(value.size for value in grads.values())
        print(json.dumps({"kind": "ranks", "ranks": group.size, "hidden": args.hidden,
                          "backend": args.backend, "steps": args.steps,
                          "seconds": elapsed, "steps_per_second": args.steps / elapsed,
                          "step_seconds": elapsed / args.steps,
                          "parameters": int(count), "gradient_bytes": int(count * 4),
                          "exchange_seconds": exchange}), flush=True)


# ------------------------------------------------------------------- driver
def mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if found is None:
        sys.exit("bench_mpi: no mpiexec (pip install 'treesched[mpi]')")
    return found


def run_ranks(ranks: int, args) -> dict:
    command = [mpiexec(), "-n", str(ranks), sys.executable, __file__, "--worker",
               "--hidden", str(args.hidden), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--backend", args.backend]
    log(f"bench_mpi: {' '.join(command[:3])} … (hidden {args.hidden}, {args.steps} steps)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"bench_mpi: {ranks} ranks failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compute_parts(args) -> list[dict]:
    """Draw, loss_and_grads at 128/N rows, optimizer step: medians over the same draws."""
    data, model, optimizer = build(args.hidden, args.backend)
    records = []
    for nodes in PROJECTED_NODES:
        rows = GLOBAL_BATCH // nodes
        rng = np.random.default_rng(0)
        draws, computes, updates = [], [], []
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            batch = data.draw(rng, GLOBAL_BATCH)
            drawn = time.perf_counter()
            _, grads, _ = model.loss_and_grads(batch.x[:rows], batch.targets[:rows])
            computed = time.perf_counter()
            optimizer.step(model.params, grads)
            updated = time.perf_counter()
            if step >= args.warmup:
                draws.append(drawn - started)
                computes.append(computed - drawn)
                updates.append(updated - computed)
        records.append({"kind": "compute", "nodes": nodes, "rows_per_rank": rows,
                        "draw_seconds": float(np.mean(draws)),
                        "compute_seconds": float(np.mean(computes)),
                        "optimizer_seconds": float(np.mean(updates))})
        log(f"bench_mpi: compute at {rows} rows: {np.mean(computes) * 1e3:.2f} ms")
    return records


def projection(parts: list[dict], gradient_bytes: int) -> list[dict]:
    records = []
    single = next(p for p in parts if p["nodes"] == 1)
    one_node = single["draw_seconds"] + single["compute_seconds"] + single["optimizer_seconds"]
    for network, bandwidth, latency in NETWORKS:
        rows = []
        for part in parts:
            nodes = part["nodes"]
            moved = 2 * (nodes - 1) / nodes * gradient_bytes
            exchange = moved / bandwidth + 2 * (nodes - 1) * latency
            step = (part["draw_seconds"] + part["compute_seconds"] + part["optimizer_seconds"]
                    + exchange)
            rows.append({"nodes": nodes, "rows_per_rank": part["rows_per_rank"],
                         "bytes_sent_per_rank": int(moved),
                         "exchange_seconds": exchange, "step_seconds": step,
                         "steps_per_second": 1 / step, "speedup": one_node / step,
                         "efficiency": one_node / step / nodes})
        records.append({"kind": "projection", "network": network,
                        "bandwidth_bytes_per_second": bandwidth, "latency_seconds": latency,
                        "rows": rows})
    return records


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__}
    try:
        from mpi4py import MPI
        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
        import mpi4py
        info["mpi4py"] = mpi4py.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 64, 20 steps")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hidden = args.hidden or (64 if args.quick else 256)
    args.steps = args.steps or (20 if args.quick else 50)
    args.backend = args.backend or backend_name()
    if args.worker:
        worker(args)
        return

    load_before = os.getloadavg()
    ranks = [run_ranks(n, args) for n in (1, 2)]
    gradient_bytes = ranks[0]["gradient_bytes"]
    parts = compute_parts(args)
    one, two = ranks
    result = {
        "benchmark": "bench_mpi", "command": " ".join(sys.argv), "machine": machine(),
        # other processes share this machine: its load says how much of a core a rank had
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "config": {"task": "parity_check", "lengths": f"1..{MAX_LENGTH}",
                   "global_batch": GLOBAL_BATCH, "hidden": args.hidden, "num_layers": 2,
                   "dtype": "float32", "backend": args.backend, "threads_per_rank": 1,
                   "steps": args.steps, "warmup": args.warmup, "quick": args.quick},
        "ranks": ranks,
        "speedup_2_ranks": two["steps_per_second"] / one["steps_per_second"],
        "bytes_per_step": {
            "gradient_vector": gradient_bytes,
            "sent_per_rank_2_ranks": gradient_bytes,   # 2 (N-1)/N vectors, N = 2
            "note": "each rank sends and receives 2 (N-1)/N gradient vectors per step "
                    "(all-to-all reduce-scatter + all-gather), plus N losses (8 bytes each) "
                    "and its rows' logits to rank 0"},
        "compute": parts,
        "projection": projection(parts, gradient_bytes),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

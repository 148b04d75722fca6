#!/usr/bin/env python
"""GPU benchmark: treesched (CuPy backend) vs the paper's JAX model vs cuDNN LSTM.

For batch B = 128, hidden H = 256 and T in 40, 128, 512, 2048, times

* ``treesched-cupy``: ``PRLSTM(..., backend="cupy")`` — ``forward`` and
  ``forward_backward`` through the public model API (input checks included);
* ``treesched-encoder``: the CuPy backend's encoder alone (``encode`` /
  ``encode_backward``, no head, no input checks) — the kernel pipeline;
* ``jax-scan``: the paper's formulation, ``jax.lax.associative_scan`` of the
  SPEC §1 merge cell (leaf encoder, merge + unary layers, head;
  ``treesched.jax_reference``), ``jax.jit`` on the GPU; forward+backward
  is ``jax.value_and_grad`` of ``sum(y * dy)``;
* ``torch-cudnn``: ``torch.nn.LSTM`` (cuDNN) with the same hidden size plus a
  linear head; forward+backward is ``backward()`` of ``sum(y * dy)``;

all in one run, on one GPU, in float32, TF32 off everywhere unless
``--tf32``.  treesched and torch are timed with CUDA events, JAX with a wall
clock around ``block_until_ready`` (it has no event API); every timing is
after warm-up (which also lets treesched capture its CUDA graphs).  Before
timing, the JAX model is run on treesched's parameters and their logits are
compared (same function: odd-even = JAX's associative_scan recursion).

Output: one JSON object per line on stdout (progress on stderr), the whole
run as JSON with ``--out``, and a plot with ``--plot``.

    python benchmarks/bench_gpu.py --out bench_gpu.json --plot bench_gpu.png
    python benchmarks/bench_gpu.py --quick

Needs a CUDA GPU, CuPy (``pip install 'treesched[gpu]'``), and for the
baselines a CUDA build of JAX and of PyTorch; a missing baseline is reported
as skipped, a missing GPU ends the run with a message and status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import numpy as np

FULL_LENGTHS = (40, 128, 512, 2048)
QUICK_LENGTHS = (40, 128)
IMPLS = ("treesched-cupy", "treesched-encoder", "jax-scan", "torch-cudnn")
MODES = ("forward", "forward_backward")


def log(message: str) -> None:
    print(f"[bench_gpu] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Time treesched-cupy vs JAX associative_scan vs cuDNN LSTM on one GPU.")
    parser.add_argument("--quick", action="store_true",
                        help="T in 40, 128 only, fewer repetitions (a smoke run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths T (default 40 128 512 2048)")
    parser.add_argument("--batch", type=int, default=128, help="batch size B (default 128)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    parser.add_argument("--vocab", type=int, default=8,
                        help="one-hot input size and number of logits (default 8)")
    parser.add_argument("--num-layers", type=int, default=2,
                        help="PR-LSTM layers per merge (default 2, the paper's model)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="implementations to time (default all)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 5; 2 quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs (default 20; 5 quick)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 in every implementation (default: off everywhere)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="run treesched without CUDA graphs (eager launches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="FILE", help="write all results as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a plot")
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if args.repeat is None:
        args.repeat = 5 if args.quick else 20
    for name in ("batch", "hidden", "vocab", "num_layers", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or any(t < 1 for t in args.lengths):
        parser.error("--warmup must be >= 0 and lengths positive")
    return args


def gpu_problem() -> str | None:
    """None if CuPy sees a GPU, else why not."""
    from treesched.backends import why_unavailable
    return why_unavailable("cupy")


# ----------------------------------------------------------------- timing
def summarize(times_ms):
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms),
            "std_ms": statistics.pstdev(times_ms) if len(times_ms) > 1 else 0.0,
            "repeat": len(times_ms)}


def time_cupy(run, warmup, repeat):
    import cupy
    for _ in range(warmup):
        run()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(repeat):
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return summarize(times), "cuda-events"


def time_torch(run, warmup, repeat):
    import torch
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return summarize(times), "cuda-events"


def time_jax(run, warmup, repeat):
    import jax
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        jax.block_until_ready(run())
        times.append((time.perf_counter() - began) * 1e3)
    return summarize(times), "wall-clock+block_until_ready"


# ----------------------------------------------------------- implementations
def make_problem(args, length, rng):
    tokens = rng.integers(0, args.vocab, size=(args.batch, length))
    x = np.eye(args.vocab, dtype=np.float32)[tokens]
    dy = rng.standard_normal((args.batch, length, args.vocab)).astype(np.float32)
    return x, dy


def treesched_model(args):
    import treesched
    from treesched.backends.cupy_backend import CupyBackend
    model = treesched.PRLSTM(args.vocab, args.hidden, args.vocab, num_layers=args.num_layers,
                             backend="cupy", seed=args.seed)
    # this run's TF32 / graph settings (the shared instance follows the environment)
    model.backend = CupyBackend(allow_tf32=args.tf32, use_graphs=not args.no_graphs)
    return model


def bench_treesched(model, x, dy, mode, args):
    import cupy
    xd, dyd = cupy.asarray(x), cupy.asarray(dy)
    if mode == "forward":
        run = lambda: model.forward(xd)  # noqa: E731
    else:
        run = lambda: model.forward_backward(xd, dyd)  # noqa: E731
    return time_cupy(run, args.warmup, args.repeat)


def bench_encoder(model, x, dy, mode, args):
    import cupy
    backend, cell, params = model.backend, model.cell, model.params
    xd = cupy.asarray(x)
    schedule = model.schedule(x.shape[1])
    dh = cupy.asarray(np.random.default_rng(1).standard_normal(
        (x.shape[0], x.shape[1], args.hidden)).astype(np.float32))
    if mode == "forward":
        run = lambda: backend.encode(cell, params, xd, schedule, False)  # noqa: E731
    else:
        def run():
            _, tape = backend.encode(cell, params, xd, schedule, True)
            return backend.encode_backward(cell, params, tape, (dh, None))
    return time_cupy(run, args.warmup, args.repeat)


def jax_setup(args):
    import jax
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"jax runs on {jax.default_backend()}, not a GPU "
                           "(install a CUDA build: pip install 'jax[cuda12]')")
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "float32")
    return jax


def bench_jax(params_np, x, dy, mode, args):
    jax = jax_setup(args)
    from treesched import jax_reference as reference
    params = {k: jax.device_put(v) for k, v in params_np.items()}
    xd, dyd = jax.device_put(x), jax.device_put(dy)
    if mode == "forward":
        step = reference.jitted(reference.logits, "lstm", args.num_layers)
        run = lambda: step(params, xd)  # noqa: E731
    else:
        step = reference.jitted(reference.dot_value_and_grad, "lstm", args.num_layers)
        run = lambda: step(params, xd, dyd)  # noqa: E731
    return time_jax(run, args.warmup, args.repeat)


def bench_torch(x, dy, mode, args):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device (install a CUDA build of PyTorch)")
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    lstm = torch.nn.LSTM(args.vocab, args.hidden, batch_first=True).cuda()
    head = torch.nn.Linear(args.hidden, args.vocab).cuda()
    xd = torch.from_numpy(x).cuda()
    dyd = torch.from_numpy(dy).cuda()
    if mode == "forward":
        def run():
            with torch.no_grad():
                return head(lstm(xd)[0])
    else:
        def run():
            lstm.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            (head(lstm(xd)[0]) * dyd).sum().backward()
    return time_torch(run, args.warmup, args.repeat)


def check_against_jax(model, args, rng):
    """Relative error of treesched's logits vs the JAX model's on the same weights."""
    import cupy
    jax_setup(args)
    from treesched import jax_reference as reference
    x, _ = make_problem(args, 40, rng)
    forward = reference.jitted(reference.logits, "lstm", args.num_layers)
    want = np.asarray(forward(model.params.numpy(), x))
    got = cupy.asnumpy(model.forward(cupy.asarray(x)))
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ------------------------------------------------------------------ reports
def device_info():
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props.get("name", b"?")
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return {"gpu": name.rstrip("\x00"), "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "compute_capability": f"{props.get('major')}.{props.get('minor')}",
            "cupy": cupy.__version__}


def targets(results):
    """The issue's performance targets, evaluated on this run's medians."""
    def median(impl, mode, length):
        for r in results:
            if (r.get("impl"), r.get("mode"), r.get("T")) == (impl, mode, length) \
                    and "median_ms" in r:
                return r["median_ms"]
        return None

    checks = []
    for length in sorted({r["T"] for r in results if "T" in r}):
        ours, jax_ms = (median("treesched-cupy", "forward_backward", length),
                        median("jax-scan", "forward_backward", length))
        if length >= 512 and ours and jax_ms:
            checks.append({"target": f"forward+backward >= 1.5x faster than JAX at T={length}",
                           "speedup": jax_ms / ours, "met": jax_ms / ours >= 1.5})
    ours, cudnn = median("treesched-cupy", "forward", 2048), median("torch-cudnn", "forward", 2048)
    if ours and cudnn:
        checks.append({"target": "forward latency below cuDNN LSTM at T=2048",
                       "ratio": ours / cudnn, "met": ours < cudnn})
    return checks


def plot(results, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.2))
    for ax, mode in zip(np.atleast_1d(axes), MODES):
        for impl in IMPLS:
            points = sorted((r["T"], r["median_ms"]) for r in results
                            if r.get("impl") == impl and r.get("mode") == mode and "median_ms" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(mode.replace("_", "+"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta.get('gpu', 'GPU')}: B={meta['batch']}, H={meta['hidden']}, float32, "
                 f"TF32 {'on' if meta['tf32'] else 'off'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"bench_gpu: no usable CUDA GPU here ({problem}). This benchmark needs an NVIDIA "
              "GPU with CuPy; see docs/gpu.md for the commands to run on a GPU machine.",
              file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    meta = {"batch": args.batch, "hidden": args.hidden, "vocab": args.vocab,
            "num_layers": args.num_layers, "dtype": "float32", "tf32": args.tf32,
            "graphs": not args.no_graphs, "lengths": args.lengths, "warmup": args.warmup,
            "repeat": args.repeat, "python": platform.python_version(), **device_info()}
    log(f"device {meta['gpu']} (cc {meta['compute_capability']}), B={args.batch}, "
        f"H={args.hidden}, T={args.lengths}")
    model = treesched_model(args)
    params_np = model.params.numpy()
    results = []

    def emit(record):
        record = {**record, "B": args.batch, "H": args.hidden, "tf32": args.tf32}
        results.append(record)
        print(json.dumps(record), flush=True)

    if "jax-scan" in args.impls:
        try:
            error = check_against_jax(model, args, rng)
            emit({"check": "treesched-vs-jax logits (T=40)", "rel_error": error,
                  "ok": error < (2e-2 if args.tf32 else 1e-4)})
            log(f"treesched vs JAX logits: relative error {error:.2e}")
        except Exception as exc:  # noqa: BLE001 - report and go on
            emit({"check": "treesched-vs-jax logits (T=40)", "skipped": str(exc)})

    for length in args.lengths:
        x, dy = make_problem(args, length, rng)
        for mode in args.modes:
            for impl in args.impls:
                log(f"T={length} {mode} {impl} ...")
                record = {"impl": impl, "mode": mode, "T": length}
                try:
                    if impl == "treesched-cupy":
                        stats, timer = bench_treesched(model, x, dy, mode, args)
                    elif impl == "treesched-encoder":
                        stats, timer = bench_encoder(model, x, dy, mode, args)
                    elif impl == "jax-scan":
                        stats, timer = bench_jax(params_np, x, dy, mode, args)
                    else:
                        stats, timer = bench_torch(x, dy, mode, args)
                except ImportError as exc:
                    record["skipped"] = f"{exc.name or exc} is not installed"
                except Exception as exc:  # noqa: BLE001 - OOM, no GPU build, ...
                    record["skipped"] = f"{type(exc).__name__}: {exc}"
                else:
                    record.update(stats, timer=timer)
                emit(record)
                if "median_ms" in record:
                    log(f"  median {record['median_ms']:.3f} ms")
                else:
                    log(f"  skipped: {record['skipped']}")
    checks = targets(results)
    for check in checks:
        log(f"target: {check['target']}: {'met' if check['met'] else 'NOT met'} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in check.items() if isinstance(v, float))})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"meta": meta, "results": results, "targets": checks}, handle, indent=2,
                      default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
            handle.write("\n")
        log(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot, meta)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

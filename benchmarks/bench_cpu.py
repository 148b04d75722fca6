#!/usr/bin/env python
"""CPU benchmark: treesched (numpy, numba backends) against the paper's model in JAX.

One process, one run, interleaved rounds: every implementation is timed
once per round, round after round, so load from other processes on a
shared machine hits all of them alike; reported figures are medians over
rounds and ratios are taken between figures of the same run.

Setup (SPEC §1, the paper's PR-LSTM): B = 128, H = 256, D = 4, O = 3,
num_layers = 2, float32, the odd-even schedule, every position read; T in
40, 128, 512.  Two modes:

* ``fwd``:    logits for every position (inference);
* ``fwdbwd``: softmax cross-entropy over every position and its gradient
  with respect to every parameter.

Implementations:

* ``treesched-numba`` / ``treesched-numpy``: ``PRLSTM.forward`` and
  ``PRLSTM.loss_and_grads``;
* ``jax``: the same model written in JAX as the paper does
  (``treesched.jax_reference``: ``jax.lax.associative_scan`` with the merge
  cell, ``jax.jit``, ``jax.value_and_grad``), same weights; its logits are
  checked against treesched's;
* ``torch-lstm``: ``torch.nn.LSTM`` (2 layers, same H) + linear head, for
  scale only (a sequential LSTM, not the same model);
* ``gemm-only``: the bare GEMMs the schedule performs, same shapes and
  count, into preallocated buffers (forward: one per layer per level plus
  the leaf GEMM; fwdbwd: each also gets its weight-gradient and
  input-gradient GEMM, as the numba backend issues them).  ``numba /
  gemm-only`` is the roofline ratio.

Peak memory of forward+backward (``--memory``, on by default in a full
run) is measured in a fresh subprocess per (implementation, T): the child
builds the model and inputs, compiles (Numba kernels on a tiny problem,
JAX ahead of time for the real shapes), then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs`` ← 5), runs one forward+backward and
reports ``VmHWM - VmRSS_before``: every byte the step itself touched
(workspaces, activations, gradients, outputs, allocator slack), whatever
allocated it (tracemalloc would miss XLA's and BLAS's allocations).

Before and after (``--baseline DIR``): another checkout of treesched (say
the last release, ``git worktree add /tmp/before v0.1.0``) runs in a child
process that serves one timed call at a time, and ``baseline-numba`` joins
every round next to ``treesched-numba``: both versions are timed in the same
rounds, so the ratio ``baseline-numba / treesched-numba`` is immune to the
machine's drift.  The child imports the other checkout's package from a
copy laid out as ``pip install`` would (``ops``, ``backends`` and ``cli``
under ``treesched``).

Also: per-level Python/dispatch overhead of the numba backend at T = 4096
(the schedule run at B = 1, H = 8, where the arithmetic is negligible)
against the GEMM time per level of the real shapes.

Usage::

    python benchmarks/bench_cpu.py                      # full run (~10 min on 2 cores)
    python benchmarks/bench_cpu.py --quick              # tiny sizes, seconds
    python benchmarks/bench_cpu.py --out docs/benchmarks/cpu_results.json \\
        --plot docs/benchmarks/cpu_time_vs_T.png

stdout: one JSON object per line (one per measurement, then summaries);
stderr: progress.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = dict(batch=128, hidden=256, features=4, outputs=3, layers=2, lengths=(40, 128, 512),
            overhead_length=4096)
QUICK = dict(batch=8, hidden=32, features=4, outputs=3, layers=2, lengths=(8, 24),
             overhead_length=256)


# ----------------------------------------------------------------- output
class Reporter:
    def __init__(self, out_path=None):
        self.records = []
        self.out_path = out_path
        self.start = time.perf_counter()

    def emit(self, record: dict):
        self.records.append(record)
        print(json.dumps(record), flush=True)

    def progress(self, message: str):
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ machine
def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                               "L2 cache", "L3 cache", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "fma")))
                info[f"lscpu {key.strip()}"] = value
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
        info["numpy_blas_config"] = blas.get("openblas configuration", "")
    except Exception:  # noqa: BLE001 - older numpy: best effort
        pass
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        pass
    for name in ("jax", "torch"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except ImportError:
            info[name] = None
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    return info


# ------------------------------------------------------------- the models
def make_data(cfg, length, seed=0):
    rng = np.random.default_rng(seed)
    B, D, O = cfg["batch"], cfg["features"], cfg["outputs"]
    x = np.eye(D, dtype=np.float32)[rng.integers(0, D, (B, length))]
    targets = np.eye(O, dtype=np.float32)[rng.integers(0, O, (B, length))]
    return x, targets


def treesched_model(cfg, backend):
    import treesched
    return treesched.PRLSTM(cfg["features"], cfg["hidden"], cfg["outputs"],
                            num_layers=cfg["layers"], backend=backend, seed=0)


def jax_functions(num_layers):
    """The paper's formulation (``treesched.jax_reference``): jitted logits and
    ``value_and_grad`` of the loss (mean over batch and positions, as
    ``PRLSTM.loss_and_grads``)."""
    from treesched import jax_reference as reference
    return (reference.jitted(reference.logits, "lstm", num_layers),
            reference.jitted(reference.loss_value_and_grad, "lstm", num_layers))


class TorchLSTM:
    """torch.nn.LSTM of the same hidden size, for scale (not the same model)."""

    def __init__(self, cfg):
        import torch
        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.lstm = torch.nn.LSTM(cfg["features"], cfg["hidden"], num_layers=cfg["layers"],
                                  batch_first=True)
        self.head = torch.nn.Linear(cfg["hidden"], cfg["outputs"])
        self.params = list(self.lstm.parameters()) + list(self.head.parameters())

    def inputs(self, x, targets):
        t = self.torch
        return t.from_numpy(x), t.from_numpy(targets.argmax(-1).reshape(-1))

    def forward(self, x):
        with self.torch.no_grad():
            return self.head(self.torch.relu(self.lstm(x)[0]))

    def forward_backward(self, x, labels):
        for p in self.params:
            p.grad = None
        y = self.head(self.torch.relu(self.lstm(x)[0]))
        loss = self.torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), labels)
        loss.backward()
        return loss


class GemmOnly:
    """The bare GEMMs the numba backend issues for a schedule, same shapes and count."""

    def __init__(self, cfg, length, params):
        import treesched
        schedule = treesched.compile(length)
        B, H, D = cfg["batch"], cfg["hidden"], cfg["features"]
        self.rows = [int(w) * B for w in schedule.widths]
        self.leaf_rows = length * B
        rng = np.random.default_rng(1)
        rmax = max(max(self.rows, default=0), 1)
        f32 = np.float32
        self.W0 = params["merge/w"]
        self.U = [params[f"unary_{k}/w"] for k in range(1, cfg["layers"])]
        self.Wl = params["leaf/w"]
        self.X = rng.random((rmax, 2 * H), f32)
        self.Xu = rng.random((rmax, H), f32)
        self.A = rng.random(max(rmax * 5 * H, self.leaf_rows * 3 * H), f32)
        self.xl = rng.random((self.leaf_rows, D), f32)
        self.dW0 = np.empty(self.W0.shape[::-1], f32)
        self.dU = np.empty((4 * H, H), f32)
        self.dWl = np.empty(self.Wl.shape[::-1], f32)
        self.depth = schedule.depth
        self.flops_fwd = 2 * (self.leaf_rows * D * 3 * H + sum(self.rows) * (
            2 * H * 5 * H + len(self.U) * H * 4 * H))

    def _a(self, rows, cols):
        return self.A[:rows * cols].reshape(rows, cols)

    def forward(self):
        np.matmul(self.xl, self.Wl, out=self._a(self.leaf_rows, self.Wl.shape[1]))
        for R in self.rows:
            np.matmul(self.X[:R], self.W0, out=self._a(R, self.W0.shape[1]))
            for U in self.U:
                np.matmul(self.Xu[:R], U, out=self._a(R, U.shape[1]))

    def forward_backward(self):
        self.forward()
        for R in self.rows:
            for U in self.U:
                dA = self._a(R, U.shape[1])
                np.matmul(dA.T, self.Xu[:R], out=self.dU)
                np.matmul(dA, U.T, out=self.Xu[:R])
            dA = self._a(R, self.W0.shape[1])
            np.matmul(dA.T, self.X[:R], out=self.dW0)
            np.matmul(dA, self.W0.T, out=self.X[:R])
        dA = self._a(self.leaf_rows, self.Wl.shape[1])
        np.matmul(dA.T, self.xl, out=self.dWl)


# ----------------------------------------------------------------- timing
def timed(fn):
    """Seconds one call of ``fn`` takes (a :class:`BaselineCall` times itself)."""
    if isinstance(fn, BaselineCall):
        return fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------ the baseline
def _install_copy(source: str, target: str) -> None:
    """Lay a checkout out as ``pip install`` does: ops, backends, cli under treesched."""
    import shutil
    package = os.path.join(target, "treesched")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(source, "treesched"), package, ignore=ignore)
    for name in ("ops", "backends", "cli"):
        shutil.copytree(os.path.join(source, name), os.path.join(package, name), ignore=ignore)


def serve_baseline(source: str, quick: bool) -> None:
    """Child process: time one call per request line ``MODE T``, reply seconds."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="treesched-baseline-")
    _install_copy(source, folder)
    sys.path.insert(0, folder)
    for name in [m for m in sys.modules if m == "treesched" or m.startswith("treesched.")]:
        del sys.modules[name]
    import treesched
    assert treesched.__file__.startswith(folder), treesched.__file__
    cfg = QUICK if quick else FULL
    model = treesched_model(cfg, "numba")
    data = {}
    print("ready", flush=True)
    for line in sys.stdin:
        mode, length = line.split()
        length = int(length)
        if length not in data:
            data[length] = make_data(cfg, length)
        x, targets = data[length]
        call = (lambda: model.forward(x)) if mode == "fwd" else \
            (lambda: model.loss_and_grads(x, targets))
        start = time.perf_counter()
        call()
        print(f"{time.perf_counter() - start:.9f}", flush=True)


class BaselineCall:
    """One timed call in the baseline child: ``fn()`` returns its seconds."""

    def __init__(self, child, mode, length):
        self.child, self.mode, self.length = child, mode, length

    def __call__(self) -> float:
        self.child.stdin.write(f"{self.mode} {self.length}\n")
        self.child.stdin.flush()
        reply = self.child.stdout.readline()
        if not reply:
            raise RuntimeError("the baseline process ended (see its stderr above)")
        return float(reply)


def paired(args) -> None:
    """Before and after, call by call: this checkout and ``--baseline`` each in
    a child process (the same loader for both), calls alternating (old, new,
    new, old, ...), ``--paired`` calls each per (T, mode).  Records the
    per-pair ratios new/old: their median is robust to a machine whose speed
    drifts within a run."""
    cfg = QUICK if args.quick else FULL
    reporter = Reporter(args.out)
    reporter.emit({"kind": "machine", **machine_info()})
    here = os.path.dirname(HERE)
    children = {"new": start_baseline(here, args.quick),
                "old": start_baseline(args.baseline, args.quick)}
    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else cfg["lengths"]
    for length in lengths:
        for mode in ("fwd", "fwdbwd"):
            calls = {name: BaselineCall(child, mode, length) for name, child in children.items()}
            for call in calls.values():
                call()  # warm-up: kernels, workspaces
            seconds = {"old": [], "new": []}
            for index in range(args.paired):
                for name in (("old", "new") if index % 2 == 0 else ("new", "old")):
                    seconds[name].append(calls[name]())
            ratios = [new / old for old, new in zip(seconds["old"], seconds["new"])]
            record = {"kind": "paired", "T": length, "mode": mode, "calls": args.paired,
                      "old_median_ms": float(np.median(seconds["old"])) * 1e3,
                      "new_median_ms": float(np.median(seconds["new"])) * 1e3,
                      "new_over_old_median_of_pairs": float(np.median(ratios)),
                      "new_over_old_quartiles": [float(np.percentile(ratios, 25)),
                                                 float(np.percentile(ratios, 75))],
                      "old_ms": [v * 1e3 for v in seconds["old"]],
                      "new_ms": [v * 1e3 for v in seconds["new"]]}
            reporter.emit(record)
            reporter.progress(f"T={length} {mode}: new/old {record['new_over_old_median_of_pairs']:.3f} "
                              f"(quartiles {record['new_over_old_quartiles'][0]:.3f}..."
                              f"{record['new_over_old_quartiles'][1]:.3f}) over {args.paired} pairs")
    for child in children.values():
        child.stdin.close()
        child.wait()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "records": reporter.records}, handle, indent=1)


def start_baseline(source: str, quick: bool):
    command = [sys.executable, os.path.abspath(__file__), "--serve-baseline", source]
    if quick:
        command.append("--quick")
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if child.stdout.readline().strip() != "ready":
        raise SystemExit(f"the baseline checkout {source} did not start")
    return child


def interleaved(reporter, label, fns: dict, rounds: int, warmup=1, max_rounds=None) -> dict:
    """Time each callable once per round, rounds interleaved; returns {name: [s]}.

    ``warmup``: runs before timing, an int or {name: int}; ``max_rounds``:
    {name: n} for implementations too slow to repeat every round.
    """
    max_rounds = max_rounds or {}
    for name, fn in fns.items():
        for _ in range(warmup.get(name, 1) if isinstance(warmup, dict) else warmup):
            seconds = timed(fn)
            reporter.progress(f"{label}: warm-up {name} {seconds:.3f} s")
    times = {name: [] for name in fns}
    for index in range(rounds):
        for name, fn in fns.items():
            if index < max_rounds.get(name, rounds):
                times[name].append(timed(fn))
        summary = ", ".join(f"{n} {t[-1]:.3f}" for n, t in times.items() if t)
        reporter.progress(f"{label}: round {index + 1}/{rounds}: {summary} s")
    return times


def rounds_for(cfg, length, quick):
    if quick:
        return 2
    return 5 if length <= 128 else 3


# --------------------------------------------------------------- memory
def _status(key):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def memory_child(impl, length, quick):
    """Run in a fresh process: peak RSS growth of one forward+backward."""
    cfg = QUICK if quick else FULL
    x, targets = make_data(cfg, length)
    if impl == "treesched-numba":
        model = treesched_model(cfg, "numba")
        small_x, small_t = make_data(cfg, 4)
        model.loss_and_grads(small_x, small_t)       # load/compile the kernels
        model.backend.workspaces.clear()
        step = lambda: model.loss_and_grads(x, targets)  # noqa: E731
    elif impl == "jax":
        import jax
        import jax.numpy as jnp
        model = treesched_model(cfg, "numpy")
        params = {k: jnp.asarray(v) for k, v in model.params.items()}
        jx, jt = jnp.asarray(x), jnp.asarray(targets)
        _, value_and_grad = jax_functions(cfg["layers"])
        compiled = value_and_grad.lower(params, jx, jt).compile()
        step = lambda: jax.block_until_ready(compiled(params, jx, jt))  # noqa: E731
    else:
        raise SystemExit(f"unknown implementation {impl}")
    gc.collect()
    before = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    result = step()
    peak = _status("VmHWM:")
    extra = {}
    if impl == "treesched-numba":
        extra["workspace_bytes"] = model.backend.workspaces.nbytes
    del result
    print(json.dumps({"impl": impl, "T": length, "peak_bytes": peak - before,
                      "rss_before_bytes": before, **extra}))


def measure_memory(reporter, impl, length, quick):
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, str(length)]
    if quick:
        command.append("--quick")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        reporter.progress(f"memory {impl} T={length} failed: {done.stderr.strip()[-500:]}")
        return None
    record = json.loads(done.stdout.strip().splitlines()[-1])
    reporter.progress(f"memory {impl} T={length}: peak {record['peak_bytes'] / 2**20:.0f} MiB "
                      f"({time.perf_counter() - start:.0f} s)")
    return record


# ------------------------------------------------------------------- main
def run(args):
    cfg = dict(QUICK if args.quick else FULL)
    if args.lengths:
        cfg["lengths"] = tuple(int(v) for v in args.lengths.split(","))
    reporter = Reporter(args.out)
    info = machine_info()
    reporter.emit({"kind": "machine", **info})
    reporter.emit({"kind": "config", **{k: v for k, v in cfg.items()}, "dtype": "float32",
                   "pattern": "odd-even", "quick": args.quick})

    import treesched  # (after the machine probe: the numba backend sets OMP_WAIT_POLICY)

    have_jax = have_torch = False
    if not args.no_jax:
        # one persistent compilation cache for this run and its memory children,
        # so a child loads the executables the parent compiled
        import tempfile
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                              tempfile.mkdtemp(prefix="bench_cpu_jax_cache_"))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        try:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            import jax  # noqa: F401
            have_jax = True
        except ImportError as error:
            reporter.progress(f"JAX not installed ({error}): skipping the JAX model")
            reporter.emit({"kind": "skipped", "impl": "jax", "reason": str(error)})
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            have_torch = True
        except ImportError as error:
            reporter.progress(f"torch not installed ({error}): skipping torch.nn.LSTM")
            reporter.emit({"kind": "skipped", "impl": "torch-lstm", "reason": str(error)})

    baseline = start_baseline(args.baseline, args.quick) if args.baseline else None
    numba_model = treesched_model(cfg, "numba")
    numpy_model = treesched_model(cfg, "numpy")
    params = numba_model.params.numpy()
    torch_model = TorchLSTM(cfg) if have_torch else None
    if have_jax:
        import jax
        import jax.numpy as jnp
        jax_fwd, jax_vg = jax_functions(cfg["layers"])
        jax_params = {k: jnp.asarray(v) for k, v in params.items()}

    medians = {}
    for length in cfg["lengths"]:
        x, targets = make_data(cfg, length)
        gemm = GemmOnly(cfg, length, params)
        schedule = treesched.compile(length)
        backend, cell, model_params = numba_model.backend, numba_model.cell, numba_model.params
        dh = np.full((cfg["batch"], length, cfg["hidden"]), 1e-3, np.float32)

        def encoder_fwd():
            return backend.encode(cell, model_params, x, schedule, False)

        def encoder_fwdbwd():
            _, tape = backend.encode(cell, model_params, x, schedule, True)
            return backend.encode_backward(cell, model_params, tape, (dh, None))

        fwd = {"treesched-numba": lambda: numba_model.forward(x),
               "numba-encoder": encoder_fwd,
               "treesched-numpy": lambda: numpy_model.forward(x),
               "gemm-only": gemm.forward}
        fwdbwd = {"treesched-numba": lambda: numba_model.loss_and_grads(x, targets),
                  "numba-encoder": encoder_fwdbwd,
                  "treesched-numpy": lambda: numpy_model.loss_and_grads(x, targets),
                  "gemm-only": gemm.forward_backward}
        if have_jax:
            jx, jt = jnp.asarray(x), jnp.asarray(targets)
            start = time.perf_counter()
            y_jax = np.asarray(jax.block_until_ready(jax_fwd(jax_params, jx)))
            compile_fwd = time.perf_counter() - start
            start = time.perf_counter()
            loss_jax, grads_jax = jax.block_until_ready(jax_vg(jax_params, jx, jt))
            compile_vg = time.perf_counter() - start
            y_ts = numba_model.forward(x)
            loss_ts, grads_ts, _ = numba_model.loss_and_grads(x, targets)
            scale = lambda a: max(float(np.abs(a).max()), 1e-30)  # noqa: E731
            check = {
                "kind": "check", "T": length, "jax_compile_fwd_s": compile_fwd,
                "jax_compile_fwdbwd_s": compile_vg,
                "logits_max_rel_diff": float(np.abs(y_jax - y_ts).max() / scale(y_ts)),
                "loss_jax": float(loss_jax), "loss_treesched": float(loss_ts),
                "grads_max_rel_diff": max(
                    float(np.abs(np.asarray(grads_jax[k]) - grads_ts[k]).max() / scale(grads_ts[k]))
                    for k in grads_ts)}
            reporter.emit(check)
            reporter.progress(f"T={length}: JAX compiled ({compile_fwd:.1f} s + {compile_vg:.1f} s); "
                              f"logits agree to {check['logits_max_rel_diff']:.1e}, "
                              f"grads to {check['grads_max_rel_diff']:.1e}")
            fwd["jax"] = lambda: jax.block_until_ready(jax_fwd(jax_params, jx))
            fwdbwd["jax"] = lambda: jax.block_until_ready(jax_vg(jax_params, jx, jt))
        if baseline is not None:
            fwd["baseline-numba"] = BaselineCall(baseline, "fwd", length)
            fwdbwd["baseline-numba"] = BaselineCall(baseline, "fwdbwd", length)
        if torch_model is not None:
            tx, tlabels = torch_model.inputs(x, targets)
            fwd["torch-lstm"] = lambda: torch_model.forward(tx)
            fwdbwd["torch-lstm"] = lambda: torch_model.forward_backward(tx, tlabels)
        for mode, fns in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            if args.skip_numpy_above and length > args.skip_numpy_above:
                fns.pop("treesched-numpy", None)
            # The check above already ran JAX (compiled) and treesched-numba
            # (kernels loaded, workspaces allocated) at this T; the numpy
            # backend has nothing to warm and is slow: fewer rounds at large T.
            warm = {"jax": 0, "treesched-numpy": 0, "treesched-numba": 0 if have_jax else 1,
                    "numba-encoder": 1, "baseline-numba": 1}
            slow = {"treesched-numpy": 2} if length >= 512 and not args.quick else {}
            times = interleaved(reporter, f"T={length} {mode}", fns,
                                rounds_for(cfg, length, args.quick), warm, slow)
            for impl, values in times.items():
                median = float(np.median(values))
                medians[(impl, mode, length)] = median
                reporter.emit({"kind": "time", "impl": impl, "mode": mode, "T": length,
                               "B": cfg["batch"], "H": cfg["hidden"], "median_ms": median * 1e3,
                               "times_ms": [v * 1e3 for v in values]})
            base = medians[("treesched-numba", mode, length)]
            ratios = {f"{impl}/numba": medians[(impl, mode, length)] / base
                      for impl in times if impl != "treesched-numba"}
            gemm_time = medians[("gemm-only", mode, length)]
            ratios["numba/gemm-only"] = base / gemm_time  # model call vs. its bare GEMMs
            ratios["numba-encoder/gemm-only"] = medians[("numba-encoder", mode, length)] / gemm_time
            reporter.emit({"kind": "ratios", "mode": mode, "T": length, **ratios})
        del gemm
        gc.collect()

    if not args.no_memory:
        for length in cfg["lengths"]:
            for impl in ["treesched-numba"] + (["jax"] if have_jax else []):
                record = measure_memory(reporter, impl, length, args.quick)
                if record is not None:
                    reporter.emit({"kind": "memory", "mode": "fwdbwd", **record})

    if not args.no_overhead:
        overhead(reporter, cfg, args.quick)

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


def overhead(reporter, cfg, quick):
    """Per-level host overhead of the numba backend vs. GEMM time per level."""
    import treesched
    length = cfg["overhead_length"]
    schedule = treesched.compile(length)
    tiny = dict(cfg, batch=1, hidden=8)
    model = treesched_model(tiny, "numba")
    x, targets = make_data(tiny, length)
    fwd = lambda: model.forward(x)  # noqa: E731
    fwdbwd = lambda: model.loss_and_grads(x, targets)  # noqa: E731
    times = interleaved(reporter, f"overhead T={length} (B=1, H=8)",
                        {"fwd": fwd, "fwdbwd": fwdbwd}, 3 if quick else 7)
    per_level = {mode: float(np.median(v)) / schedule.depth for mode, v in times.items()}
    # GEMM time per level at the real shapes: the forward GEMMs of this schedule.
    real = treesched_model(cfg, "numba")
    gemm = GemmOnly(cfg, length, real.params.numpy())
    gemm_times = interleaved(reporter, f"gemm-only fwd T={length}", {"gemm-only": gemm.forward},
                             1 if not quick else 2, warmup=0 if not quick else 1)
    gemm_fwd = float(np.median(gemm_times["gemm-only"]))
    record = {"kind": "overhead", "T": length, "depth": schedule.depth,
              "host_per_level_fwd_us": per_level["fwd"] * 1e6,
              "host_per_level_fwdbwd_us": per_level["fwdbwd"] * 1e6,
              "gemm_fwd_per_level_ms": gemm_fwd / schedule.depth * 1e3,
              "gemm_fwdbwd_per_level_ms_est": 3 * gemm_fwd / schedule.depth * 1e3,
              "gemm_fwd_gflops": gemm.flops_fwd / gemm_fwd / 1e9,
              "overhead_fraction_fwd": per_level["fwd"] / (gemm_fwd / schedule.depth),
              "overhead_fraction_fwdbwd": per_level["fwdbwd"] / (3 * gemm_fwd / schedule.depth)}
    reporter.emit(record)
    reporter.progress(
        f"overhead T={length}: {record['host_per_level_fwd_us']:.0f} µs/level fwd, "
        f"{record['host_per_level_fwdbwd_us']:.0f} µs/level fwd+bwd, vs GEMM "
        f"{record['gemm_fwd_per_level_ms']:.1f} ms/level fwd")


def plot(records, path, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [r for r in records if r.get("kind") == "time"]
    impls = sorted({r["impl"] for r in times}, key=lambda n: (n != "treesched-numba", n))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for impl in impls:
            points = sorted((r["T"], r["median_ms"]) for r in times
                            if r["impl"] == impl and r["mode"] == mode)
            if not points:
                continue
            style = "--" if impl == "gemm-only" else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{title}: B={cfg['batch']}, H={cfg['hidden']}, {cfg['layers']} layers, float32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a few seconds: treesched and gemm-only only "
                             "(add --frameworks for JAX/torch, --memory for the memory probe)")
    parser.add_argument("--frameworks", action="store_true", help="--quick: also JAX and torch")
    parser.add_argument("--memory", action="store_true", help="--quick: also the memory probe")
    parser.add_argument("--out", help="write every record to this JSON file")
    parser.add_argument("--plot", help="write time-vs-T plots to this PNG")
    parser.add_argument("--lengths", help="comma-separated T values (default 40,128,512)")
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-overhead", action="store_true", help="skip the T=4096 overhead probe")
    parser.add_argument("--skip-numpy-above", type=int, default=0,
                        help="do not time the numpy backend for T above this")
    parser.add_argument("--baseline", metavar="DIR",
                        help="another checkout of treesched to time next to this one "
                             "(baseline-numba, same rounds)")
    parser.add_argument("--paired", type=int, metavar="CALLS",
                        help="with --baseline: only the before/after comparison, CALLS "
                             "alternating calls of each version per (T, mode)")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        if "jax" in args.memory_child[0]:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.quick)
        return
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.quick)
        return
    if args.paired:
        if not args.baseline:
            parser.error("--paired needs --baseline DIR")
        paired(args)
        return
    if args.quick:
        args.no_jax = args.no_jax or not args.frameworks
        args.no_torch = args.no_torch or not args.frameworks
        args.no_memory = args.no_memory or not args.memory
    run(args)


if __name__ == "__main__":
    main()

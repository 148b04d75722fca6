"""The CuPy backend.

Two halves:

* **GPU tests** (``@pytest.mark.gpu``): the real backend on a real GPU —
  parity with the NumPy reference (treesched.parity), determinism, CUDA graph
  replay, TF32.  Skipped, with the reason, where CuPy or a GPU is missing.
* **Emulation tests** (always run): the backend's *host* code — workspace
  layout, schedule indexing, the CSR accumulation order, slot reuse, graph
  capture / replay, input staging — runs unchanged against a NumPy emulation
  of every CUDA kernel and of cuBLAS (``EmulatedLauncher``), and must match
  the NumPy reference executor.  Each emulated kernel is an independent
  transcription of its ``.cu`` source with the same parameter list; it
  checks every pointer access against the buffer it was given and that no
  element read by one thread is written by another (so in-place and slot
  reuse are race-free as launched), and each GEMM goes through the same
  cuBLAS column-major argument mapping (``gemm_plan``) the GPU path uses.
  Graph capture is emulated by recording the launches and replaying them
  against the same buffers, which is what a CUDA graph does with pointers.

What the emulation cannot show: that the CUDA C computes what its
transcription does, launch configurations, cuBLAS itself, real capture.
Those are the GPU tests.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import treesched
from treesched.backends import cuda_source
from treesched.backends.cupy_backend import (
    CUBLAS_OP_N,
    CupyBackend,
    CupyTape,
    check_gemm_operands,
    gemm_plan,
)
from treesched.backends.numpy_backend import NumpyBackend
from treesched.errors import TreeschedError
from treesched.ops import LSTMCell, RNNCell

PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")

_GPU_REASON = CupyBackend.why_unavailable()
gpu = pytest.mark.skipif(_GPU_REASON is not None,
                         reason=f"needs CuPy and a CUDA GPU: {_GPU_REASON}")


# =================================================================== emulator
class Hazard(AssertionError):
    """An emulated kernel touched memory it must not (out of bounds, NULL, race)."""


def _itemsize_check(array, dtype, what):
    if array.dtype != dtype:
        raise Hazard(f"{what}: dtype {array.dtype}, expected {dtype}")


class _Memory:
    """Reads and writes of one emulated launch, by absolute address and thread.

    A CUDA thread here is one element of the grid-stride loop.  The launch is
    race-free iff no address is written by two threads and no address written
    by one thread is read by another.  Stores are applied after every load
    (each of our kernels reads an element before it writes it), which is
    exact for a race-free launch.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.reads, self.writes, self.stores = [], [], []

    @staticmethod
    def _flat(array, positions, what):
        if array is None:
            raise Hazard(f"{what}: NULL pointer dereferenced")
        flat = array.reshape(-1)
        if not np.shares_memory(flat, array):  # pragma: no cover - contiguity is checked
            raise Hazard(f"{what}: not a view")
        if positions.size and (positions.min() < 0 or positions.max() >= flat.size):
            raise Hazard(f"{what}: access [{positions.min()}, {positions.max()}] outside a "
                         f"buffer of {flat.size} elements")
        return flat

    @staticmethod
    def _address(flat, positions):
        return flat.__array_interface__["data"][0] + positions.astype(np.int64) * flat.itemsize

    def load(self, array, positions, threads, what):
        flat = self._flat(array, positions, f"{self.kernel}({what})")
        if flat.dtype.kind == "f":
            self.reads.append((self._address(flat, positions), threads))
        return flat[positions]

    def store(self, array, positions, threads, values, what):
        flat = self._flat(array, positions, f"{self.kernel}({what})")
        self.writes.append((self._address(flat, positions), threads))
        self.stores.append((flat, positions, values))

    def commit(self):
        if self.writes:
            wa = np.concatenate([a for a, _ in self.writes])
            wt = np.concatenate([t for _, t in self.writes])
            order = np.argsort(wa, kind="stable")
            wa, wt = wa[order], wt[order]
            same = wa[1:] == wa[:-1]
            if np.any(same):
                raise Hazard(f"{self.kernel}: an address is written twice")
            if self.reads:
                ra = np.concatenate([a for a, _ in self.reads])
                rt = np.concatenate([t for _, t in self.reads])
                hit = np.searchsorted(wa, ra)
                hit = np.minimum(hit, len(wa) - 1)
                clash = (wa[hit] == ra) & (wt[hit] != rt)
                if np.any(clash):
                    raise Hazard(f"{self.kernel}: {int(clash.sum())} element(s) read by one "
                                 f"thread are written by another (race)")
        for flat, positions, values in self.stores:
            flat[positions] = values


def _sigmoid(x):
    return np.tanh(x * x.dtype.type(0.5)) * x.dtype.type(0.5) + x.dtype.type(0.5)


def _ints(mem, array, positions, what):
    if array is None:
        raise Hazard(f"{mem.kernel}({what}): NULL index array")
    return mem.load(array, positions, None, what).astype(np.int64)


def _row(mem, idx, r, m, b, batch, what):
    """ts_row: idx[m] * batch + b, or r."""
    if idx is None:
        return r
    rows = _ints(mem, idx, m, what)
    if rows.size and rows.min() < 0:
        raise Hazard(f"{mem.kernel}({what}): negative index")
    return rows * batch + b


def _node_grad(mem, node, b, j, e, batch, hidden, csr_ptr, csr_slot, dop, ext_idx, dext,
               num_answers, what, dtype):
    """ts_node_grad: external gradient, then the consumers in CSR order."""
    g = np.zeros(node.shape, dtype)
    if ext_idx is not None and dext is not None:
        k = _ints(mem, ext_idx, node, "ext_idx")
        has = k >= 0
        g[has] = mem.load(dext, (b[has] * num_answers + k[has]) * hidden + j[has], e[has],
                          f"dext_{what}")
    start = _ints(mem, csr_ptr, node, "csr_ptr")
    stop = _ints(mem, csr_ptr, node + 1, "csr_ptr")
    for t in range(int((stop - start).max(initial=0))):
        live = start + t < stop
        s = _ints(mem, csr_slot, start[live] + t, "csr_slot")
        merge_row = (s >> 1) * batch + b[live]
        g[live] += mem.load(dop, (merge_row * 2 + (s & 1)) * hidden + j[live], e[live],
                            f"dop_{what}")
    return g


def ts_gather_pairs(src, left, right, X, width, batch, hidden):
    mem = _Memory("ts_gather_pairs")
    W, B, H = int(width), int(batch), int(hidden)
    e = np.arange(W * B * 2 * H)
    r, col = e // (2 * H), e % (2 * H)
    m, b = r // B, r % B
    side = (col >= H).astype(np.int64)
    j = col - side * H
    node = np.where(side == 1, _ints(mem, right, m, "right"), _ints(mem, left, m, "left"))
    values = mem.load(src, (node * B + b) * H + j, e, "src")
    mem.store(X, e, e, values, "X")
    mem.commit()


def ts_lstm_gates_fwd(act, bias, rows, batch, hidden, num_prev, c0_src, c0_idx, c1_src, c1_idx,
                      h_out, c_out, out_idx, ans_h, ans_c, ans_idx, num_answers):
    mem = _Memory("ts_lstm_gates_fwd")
    R, B, H, N, K = int(rows), int(batch), int(hidden), int(num_prev), int(num_answers)
    e = np.arange(R * H)
    r, j = e // H, e % H
    m, b = r // B, r % B
    base = r * (3 + N) * H

    def gate(g):
        return (mem.load(act, base + g * H + j, e, "act")
                + mem.load(bias, g * H + j, e, "bias"))

    i, g_, o = _sigmoid(gate(0)), np.tanh(gate(1)), _sigmoid(gate(2))
    for block, value in enumerate((i, g_, o)):
        mem.store(act, base + block * H + j, e, value, "act")
    c = i * g_
    for k, (src, idx) in enumerate(((c0_src, c0_idx), (c1_src, c1_idx))[:N]):
        f = _sigmoid(gate(3 + k))
        mem.store(act, base + (3 + k) * H + j, e, f, "act")
        c = c + f * mem.load(src, _row(mem, idx, r, m, b, B, f"c{k}_idx") * H + j, e, f"c{k}_src")
    h = o * np.tanh(c)
    out_row = _row(mem, out_idx, r, m, b, B, "out_idx")
    if h_out is not None:
        mem.store(h_out, out_row * H + j, e, h, "h_out")
    if c_out is not None:
        mem.store(c_out, out_row * H + j, e, c, "c_out")
    if ans_idx is not None:
        k = _ints(mem, ans_idx, m, "ans_idx")
        has = k >= 0
        at = (b[has] * K + k[has]) * H + j[has]
        if ans_h is not None:
            mem.store(ans_h, at, e[has], h[has], "ans_h")
        if ans_c is not None:
            mem.store(ans_c, at, e[has], c[has], "ans_c")
    mem.commit()


def ts_rnn_act_fwd(a, bias, rows, batch, hidden, relu, h_out, out_idx, ans_h, ans_idx,
                   num_answers):
    mem = _Memory("ts_rnn_act_fwd")
    R, B, H, K = int(rows), int(batch), int(hidden), int(num_answers)
    e = np.arange(R * H)
    r, j = e // H, e % H
    m, b = r // B, r % B
    v = mem.load(a, e, e, "a") + mem.load(bias, j, e, "bias")
    if int(relu):
        v = np.where(v < 0, v.dtype.type(0), v)
    mem.store(a, e, e, v, "a")
    if h_out is not None:
        mem.store(h_out, _row(mem, out_idx, r, m, b, B, "out_idx") * H + j, e, v, "h_out")
    if ans_idx is not None:
        k = _ints(mem, ans_idx, m, "ans_idx")
        has = (k >= 0) & (ans_h is not None)
        if has.any():
            mem.store(ans_h, (b[has] * K + k[has]) * H + j[has], e[has], v[has], "ans_h")
    mem.commit()


def ts_gather_answers(store, nodes, num_answers, batch, hidden, out):
    mem = _Memory("ts_gather_answers")
    K, B, H = int(num_answers), int(batch), int(hidden)
    e = np.arange(B * K * H)
    bk, j = e // H, e % H
    b, k = bk // K, bk % K
    node = _ints(mem, nodes, k, "nodes")
    mem.store(out, e, e, mem.load(store, (node * B + b) * H + j, e, "store"), "out")
    mem.commit()


def ts_lstm_gates_bwd(act, c_cur, rows, batch, hidden, num_prev, c0_src, c0_idx, c1_src, c1_idx,
                      dh_in, dc_in, node_base, csr_ptr, csr_slot, dop_h, dop_c,
                      ext_idx, dext_h, dext_c, num_answers, dcs_out, dcs_stride):
    mem = _Memory("ts_lstm_gates_bwd")
    R, B, H, N = int(rows), int(batch), int(hidden), int(num_prev)
    K, stride = int(num_answers), int(dcs_stride)
    e = np.arange(R * H)
    r, j = e // H, e % H
    m, b = r // B, r % B
    base = r * (3 + N) * H
    dtype = act.dtype
    if csr_ptr is not None:
        node = int(node_base) + m
        dh = _node_grad(mem, node, b, j, e, B, H, csr_ptr, csr_slot, dop_h, ext_idx, dext_h,
                        K, "h", dtype)
        dc = (_node_grad(mem, node, b, j, e, B, H, csr_ptr, csr_slot, dop_c, ext_idx, dext_c,
                         K, "c", dtype) if dop_c is not None else np.zeros(R * H, dtype))
    else:
        dh = mem.load(dh_in, e, e, "dh_in")
        dc = mem.load(dc_in, e, e, "dc_in") if dc_in is not None else np.zeros(R * H, dtype)
    one = dtype.type(1)
    i = mem.load(act, base + j, e, "act")
    g = mem.load(act, base + H + j, e, "act")
    o = mem.load(act, base + 2 * H + j, e, "act")
    tc = np.tanh(mem.load(c_cur, e, e, "c_cur"))
    da_o = dh * tc * (o * (one - o))
    dct = dh * o * (one - tc * tc) + dc
    mem.store(act, base + j, e, dct * g * (i * (one - i)), "act")
    mem.store(act, base + H + j, e, dct * i * (one - g * g), "act")
    mem.store(act, base + 2 * H + j, e, da_o, "act")
    for k, (src, idx) in enumerate(((c0_src, c0_idx), (c1_src, c1_idx))[:N]):
        f = mem.load(act, base + (3 + k) * H + j, e, "act")
        ck = mem.load(src, _row(mem, idx, r, m, b, B, f"c{k}_idx") * H + j, e, f"c{k}_src")
        mem.store(act, base + (3 + k) * H + j, e, dct * ck * (f * (one - f)), "act")
        mem.store(dcs_out, r * stride + k * H + j, e, dct * f, "dcs_out")
    mem.commit()


def ts_rnn_act_bwd(dA, h_cur, rows, batch, hidden, dh_in, node_base, csr_ptr, csr_slot, dop_h,
                   ext_idx, dext_h, num_answers):
    mem = _Memory("ts_rnn_act_bwd")
    R, B, H, K = int(rows), int(batch), int(hidden), int(num_answers)
    e = np.arange(R * H)
    r, j = e // H, e % H
    m, b = r // B, r % B
    if csr_ptr is not None:
        dh = _node_grad(mem, int(node_base) + m, b, j, e, B, H, csr_ptr, csr_slot, dop_h,
                        ext_idx, dext_h, K, "h", dA.dtype)
    else:
        dh = mem.load(dh_in, e, e, "dh_in")
    if h_cur is not None:
        dh = np.where(mem.load(h_cur, e, e, "h_cur") > 0, dh, dA.dtype.type(0))
    mem.store(dA, e, e, dh, "dA")
    mem.commit()


KERNELS = {f.__name__: f for f in (ts_gather_pairs, ts_lstm_gates_fwd, ts_rnn_act_fwd,
                                   ts_gather_answers, ts_lstm_gates_bwd, ts_rnn_act_bwd)}


def colmajor_gemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc):
    """Reference BLAS gemm over flat column-major buffers (alpha = 1, beta = 0)."""
    i, j, p = np.arange(m), np.arange(n), np.arange(k)
    if transa == CUBLAS_OP_N:
        assert lda >= max(1, m)
        op_a = A[i[:, None] + p[None, :] * lda]
    else:
        assert lda >= max(1, k)
        op_a = A[p[None, :] + i[:, None] * lda]
    if transb == CUBLAS_OP_N:
        assert ldb >= max(1, k)
        op_b = B[p[:, None] + j[None, :] * ldb]
    else:
        assert ldb >= max(1, n)
        op_b = B[j[None, :] + p[:, None] * ldb]
    assert ldc >= max(1, m)
    C[i[:, None] + j[None, :] * ldc] = op_a @ op_b


class EmulatedLauncher:
    """The launcher interface of CudaLauncher, over NumPy arrays."""

    def __init__(self):
        self.recording = None
        self.executed = 0      # launches run outside a graph replay
        self.replaying = False

    @staticmethod
    def is_array(value):
        return isinstance(value, np.ndarray)

    def _issue(self, op):
        if self.recording is not None:
            self.recording.append(op)
        else:
            if not self.replaying:
                self.executed += 1
            op()

    def kernel(self, name, dtype, total, args):
        if total <= 0:
            return
        cuda_source.check_arguments(name, args, dtype, self.is_array)
        self._issue(lambda: KERNELS[name](*args))

    def gemm(self, a, b, out, trans_a=False, trans_b=False):
        transa, transb, m, n, k, lda, ldb, ldc = check_gemm_operands(a, b, out, trans_a, trans_b)
        for operand in (a, b):
            if np.shares_memory(out, operand):
                raise Hazard("gemm output overlaps an operand")

        def run():
            colmajor_gemm(transa, transb, m, n, k, b.reshape(-1), lda, a.reshape(-1), ldb,
                          out.reshape(-1), ldc)
        self._issue(run)


class RecordingGraphs:
    """Graph capture as CUDA does it: record the launches, replay them later."""

    def __init__(self, launcher, fail=False):
        self.launcher, self.fail = launcher, fail
        self.captures = self.launches = 0

    def capture(self, body):
        if self.fail:
            raise RuntimeError("stream capture is not supported here")
        self.launcher.recording = []
        try:
            body()
        finally:
            ops, self.launcher.recording = self.launcher.recording, None
        self.captures += 1
        return ops

    def launch(self, graph):
        self.launches += 1
        self.launcher.replaying = True
        try:
            for op in graph:
                op()
        finally:
            self.launcher.replaying = False


def emulated_backend(use_graphs=True, fail=False, **kwargs):
    launcher = EmulatedLauncher()
    graphs = RecordingGraphs(launcher, fail=fail)
    return CupyBackend(use_graphs=use_graphs, xp=np, launcher=launcher, graphs=graphs, **kwargs)


# ==================================================================== helpers
def make_params(cell, inputs, hidden, rng, dtype):
    return {name: (0.5 * rng.standard_normal(shape)).astype(dtype)
            for name, shape in cell.param_shapes(inputs, hidden).items()}


def make_case(cell_name, layers, pattern, length, batch=3, inputs=3, hidden=4, dtype=np.float64,
              seed=0, outputs=None):
    rng = np.random.default_rng(seed)
    cell = LSTMCell(layers) if cell_name == "lstm" else RNNCell(layers)
    params = make_params(cell, inputs, hidden, rng, dtype)
    x = rng.standard_normal((batch, length, inputs)).astype(dtype)
    if outputs is None:
        outputs = "last" if pattern == "reduce" else "all"
    schedule = treesched.compile(length, pattern, outputs)
    return cell, params, x, schedule, rng


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = rel(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def compare_once(backend, reference, cell, params, x, schedule, rng, tol, need_dx=True):
    """Forward (both plans) and backward of ``backend`` against ``reference``."""
    want_inf, _ = reference.encode(cell, params, x, schedule, need_grad=False)
    got_inf, _ = backend.encode(cell, params, x, schedule, need_grad=False)
    for index, (g, w) in enumerate(zip(got_inf, want_inf)):
        assert_close(g, w, tol, f"inference state {index}")
    want, want_tape = reference.encode(cell, params, x, schedule, need_grad=True)
    got, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, f"training state {index}")
    dstates = tuple(rng.standard_normal(w.shape).astype(x.dtype) for w in want)
    want_grads, want_dx = reference.encode_backward(cell, params, want_tape, dstates, need_dx)
    got_grads, got_dx = backend.encode_backward(cell, params, tape, dstates, need_dx)
    for name, value in want_grads.items():
        assert_close(got_grads[name], value, tol, f"grad {name}")
    for name, value in got_grads.items():
        if name not in want_grads:  # the reference leaves out params no level touched
            assert not np.any(value), name
    if need_dx:
        assert_close(got_dx, want_dx, tol, "dx")
    return got_grads


# ============================================================ emulation tests
def test_emulator_matches_kernel_signatures():
    signatures = cuda_source.kernel_signatures()
    assert set(KERNELS) == set(signatures)
    for name, function in KERNELS.items():
        params = list(inspect.signature(function).parameters)
        assert params == [p.name for p in signatures[name]], name


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_plan_is_the_row_major_product(trans_a, trans_b):
    rng = np.random.default_rng(1)
    m, k, n = 5, 3, 4
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    out = np.full((m, n), np.nan)
    transa, transb, mm, nn, kk, lda, ldb, ldc = gemm_plan(a.shape, b.shape, out.shape,
                                                          trans_a, trans_b)
    colmajor_gemm(transa, transb, mm, nn, kk, b.reshape(-1), lda, a.reshape(-1), ldb,
                  out.reshape(-1), ldc)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_gemm_plan_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        gemm_plan((2, 3), (4, 5), (2, 5))
    with pytest.raises(ValueError, match="empty"):
        check_gemm_operands(np.zeros((0, 3)), np.zeros((3, 2)), np.zeros((0, 2)), False, False)
    with pytest.raises(TypeError, match="C-contiguous"):
        check_gemm_operands(np.zeros((3, 3)).T[:, :2], np.zeros((2, 2)), np.zeros((3, 2)),
                            False, False)


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_emulated_backend_matches_reference_float64(cell_name, pattern):
    cell, params, x, schedule, rng = make_case(cell_name, 2, pattern, length=11)
    backend = emulated_backend()
    compare_once(backend, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
@pytest.mark.parametrize("layers", [1, 3])
def test_emulated_backend_num_layers(cell_name, layers):
    cell, params, x, schedule, rng = make_case(cell_name, layers, "odd-even", length=9, seed=2)
    compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-12)


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_emulated_backend_float32_and_pruned_outputs(cell_name):
    for outputs in ("last", 3):
        cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=13,
                                                   dtype=np.float32, seed=3, outputs=outputs)
        compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-5)


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_length_one_has_no_merges(cell_name):
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=1)
    grads = compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    assert not np.any(grads["merge/w"]) and not np.any(grads["unary_1/b"])


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_graph_capture_and_replay_with_new_inputs(cell_name):
    """Call 1 runs eagerly, call 2 captures, call 3+ replay; every call's inputs,
    parameters and output gradients are new and every result must follow them."""
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=10)
    backend = emulated_backend()
    reference = NumpyBackend()
    for call in range(4):
        params = make_params(cell, x.shape[2], 4, rng, x.dtype)
        x = rng.standard_normal(x.shape)
        compare_once(backend, reference, cell, params, x, schedule, rng, 1e-12)
    graphs, launcher = backend.graphs, backend.launcher
    # forward (train), forward (infer), backward: each captured once
    assert graphs.captures == 3
    assert graphs.launches == 3 * 3
    # after capture, nothing but the answer gather runs outside the graphs
    before = launcher.executed
    compare_once(backend, reference, cell, params, x, schedule, rng, 1e-12)
    assert launcher.executed - before == len(cell.state_names)
    stats = backend.stats()
    assert stats["graphs"] == 3 and stats["workspaces"] == 2


def test_graphs_disabled_and_failed_capture_fall_back_to_eager():
    cell, params, x, schedule, rng = make_case("lstm", 2, "sklansky", length=7)
    off = emulated_backend(use_graphs=False)
    for _ in range(3):
        compare_once(off, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    assert off.graphs.captures == 0 and off.graphs.launches == 0

    broken = emulated_backend(fail=True)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(3):
            compare_once(broken, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    assert broken.graph_error and not broken.graphs_active


def test_tf32_and_graphs_follow_the_environment(monkeypatch):
    monkeypatch.setenv("TREESCHED_TF32", "1")
    monkeypatch.setenv("TREESCHED_CUDA_GRAPHS", "0")
    backend = CupyBackend(xp=np, launcher=EmulatedLauncher(), graphs=None)
    assert backend.allow_tf32 and not backend.use_graphs
    monkeypatch.setenv("TREESCHED_TF32", "maybe")
    with pytest.raises(TreeschedError, match="TREESCHED_TF32"):
        CupyBackend(xp=np, launcher=EmulatedLauncher())
    monkeypatch.delenv("TREESCHED_TF32")
    monkeypatch.delenv("TREESCHED_CUDA_GRAPHS")
    default = CupyBackend(xp=np, launcher=EmulatedLauncher(), graphs=RecordingGraphs(None))
    assert not default.allow_tf32 and default.use_graphs


def test_workspaces_are_reused_and_live_tapes_are_protected():
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=8)
    backend = emulated_backend()
    _, tape1 = backend.encode(cell, params, x, schedule, need_grad=True)
    ws = tape1.workspace
    # a second forward while tape1 is alive must not overwrite tape1's caches
    x2 = rng.standard_normal(x.shape)
    _, tape2 = backend.encode(cell, params, x2, schedule, need_grad=True)
    assert tape2.workspace is not ws
    reference = NumpyBackend()
    _, ref_tape = reference.encode(cell, params, x, schedule, need_grad=True)
    dstates = (rng.standard_normal((3, 8, 4)), None)
    want, _ = reference.encode_backward(cell, params, ref_tape, dstates)
    got, _ = backend.encode_backward(cell, params, tape1, dstates)
    for name in want:
        assert_close(got[name], want[name], 1e-12, name)
    # once the tapes are gone, the workspace is reused (no new allocation)
    del tape1, tape2
    _, tape3 = backend.encode(cell, params, x, schedule, need_grad=True)
    assert tape3.workspace is ws
    # a stale tape (its workspace ran another forward) is refused
    stale = CupyTape.__new__(CupyTape)
    stale.__dict__.update(tape3.__dict__, generation=tape3.generation - 1)
    with pytest.raises(TreeschedError, match="stale"):
        backend.encode_backward(cell, params, stale, dstates)


def test_workspace_cache_is_bounded():
    backend = emulated_backend(max_workspaces=2)
    cell = LSTMCell(2)
    rng = np.random.default_rng(0)
    params = make_params(cell, 3, 4, rng, np.float64)
    for length in (3, 4, 5, 6):
        x = rng.standard_normal((2, length, 3))
        backend.encode(cell, params, x, treesched.compile(length), need_grad=False)
    assert backend.stats()["workspaces"] == 2
    backend.clear()
    assert backend.stats()["workspaces"] == 0


def test_inputs_are_validated():
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=5)
    backend = emulated_backend()
    with pytest.raises(TreeschedError, match="length"):
        backend.encode(cell, params, x[:, :4], schedule, need_grad=False)
    bad = dict(params, **{"merge/w": params["merge/w"].astype(np.float32)})
    with pytest.raises(TreeschedError, match="dtype"):
        backend.encode(cell, bad, x, schedule, need_grad=False)
    bad = dict(params, **{"unary_2/w": params["unary_1/w"]})
    with pytest.raises(TreeschedError, match="num_layers"):
        backend.encode(cell, bad, x, schedule, need_grad=False)
    _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    with pytest.raises(TreeschedError, match="shape"):
        backend.encode_backward(cell, params, tape, (np.zeros((1, 2, 3)), None))
    with pytest.raises(TreeschedError, match="tuple of 2"):
        backend.encode_backward(cell, params, tape, (np.zeros((3, 5, 4)),))
    with pytest.raises(TreeschedError, match="recorded for a lstm"):
        backend.encode_backward(RNNCell(2), params, tape, (np.zeros((3, 5, 4)),))


def test_non_contiguous_inputs_and_dc_gradient():
    cell, params, x, schedule, rng = make_case("lstm", 2, "kogge-stone", length=9)
    backend = emulated_backend()
    reference = NumpyBackend()
    wide = rng.standard_normal((3, 9, 6))[:, :, ::2]  # strided features
    for _ in range(3):
        want, want_tape = reference.encode(cell, params, wide, schedule, need_grad=True)
        got, tape = backend.encode(cell, params, wide, schedule, need_grad=True)
        dstates = tuple(rng.standard_normal(w.shape)[:, ::-1] for w in want)  # both h and c
        dstates = tuple(np.ascontiguousarray(d)[:, ::-1] for d in dstates)
        w_grads, w_dx = reference.encode_backward(cell, params, want_tape, dstates, True)
        g_grads, g_dx = backend.encode_backward(cell, params, tape, dstates, True)
        for name in w_grads:
            assert_close(g_grads[name], w_grads[name], 1e-12, name)
        assert_close(g_dx, w_dx, 1e-12, "dx")


def test_backward_is_deterministic():
    cell, params, x, schedule, rng = make_case("lstm", 2, "kogge-stone", length=12)
    backend = emulated_backend()
    dstates = (rng.standard_normal((3, 12, 4)), None)
    results = []
    for _ in range(3):
        _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
        grads, _ = backend.encode_backward(cell, params, tape, dstates)
        results.append(grads)
    for grads in results[1:]:
        for name in grads:
            assert np.array_equal(grads[name], results[0][name]), name


def test_unknown_cells_run_on_the_reference_code():
    class Twin(LSTMCell):
        name = "twin"

    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=6)
    backend = emulated_backend()
    twin = Twin(2)
    got, tape = backend.encode(twin, params, x, schedule, need_grad=True)
    want, _ = NumpyBackend().encode(twin, params, x, schedule, need_grad=True)
    assert_close(got[0], want[0], 0, "h")
    grads, _ = backend.encode_backward(twin, params, tape, (np.ones_like(got[0]), None))
    assert backend.launcher.executed == 0 and "merge/w" in grads


def test_emulator_catches_races_and_out_of_bounds():
    # the emulator is not vacuous: a launch that writes another thread's
    # operand, or reads past a buffer, fails
    H, B = 2, 1
    store = np.zeros((3 * B, H))
    act = np.zeros((2 * B, 5 * H))
    bias = np.zeros(5 * H)
    idx = np.array([0, 1], np.int32)
    with pytest.raises(Hazard, match="race"):
        # merge 0 writes slot 1 while merge 1 reads slot 1 as its operand
        ts_lstm_gates_fwd(act, bias, np.int32(2 * B), np.int32(B), np.int32(H), np.int32(2),
                          store, idx, store, idx, None, store, np.array([1, 2], np.int32),
                          None, None, None, np.int32(0))
    with pytest.raises(Hazard, match="outside"):
        ts_gather_pairs(store, np.array([5], np.int32), np.array([0], np.int32),
                        np.zeros((B, 2 * H)), np.int32(1), np.int32(B), np.int32(H))
    with pytest.raises(TypeError, match="int32"):
        EmulatedLauncher().kernel("ts_gather_pairs", np.float64, 4,
                                  (store, idx, idx, store, 1, np.int32(1), np.int32(2)))


# ================================================== parity module, CLI, registry
def test_parity_report_on_the_emulated_backend():
    from treesched.parity import run_parity
    report = run_parity(emulated_backend(), dtype="float64", length=9, batch=3, hidden=4,
                        patterns=("odd-even", "reduce"), seed=1)
    assert report.passed, report.format_table()
    cases = {(c.cell, c.pattern, c.num_layers) for c in report.cases}
    assert ("lstm", "reduce", 2) in cases and ("rnn", "odd-even", 1) in cases
    names = {c.quantity for c in report.cases}
    assert {"logits", "state h", "state c", "grad merge/w", "grad head/w",
            "grad unary_1/b"} <= names
    text = report.format_table(verbose=True)
    assert "PASS" in text and "merge/w" in text
    assert "PASS" in report.format_table()
    assert report.to_dict()["passed"] is True


def test_parity_detects_a_wrong_backend():
    from treesched.parity import run_parity

    class Broken(NumpyBackend):
        name = "broken"

        def encode_backward(self, cell, params, tape, dstates, need_dx=False):
            grads, dx = super().encode_backward(cell, params, tape, dstates, need_dx)
            grads["merge/b"] = grads["merge/b"] * 1.01
            return grads, dx

    report = run_parity(Broken(), dtype="float64", length=6, batch=2, hidden=3,
                        patterns=("odd-even",), cells=("lstm",), layers=(2,))
    assert not report.passed
    failed = {c.quantity for c in report.cases if not c.passed}
    assert failed == {"grad merge/b"}
    assert "FAIL" in report.format_table()


def test_registry_reports_why_cupy_is_unavailable():
    from treesched.backends import availability
    reason = availability()["cupy"]
    assert (reason is None) == (_GPU_REASON is None)
    if reason is not None:
        assert "cupy" in reason.lower() or "cuda" in reason.lower()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "treesched.cli.main", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_info_lists_backends():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert "numpy" in result.stdout and "cupy" in result.stdout
    if _GPU_REASON is not None:
        assert "not available" in result.stdout


@pytest.mark.skipif(_GPU_REASON is None, reason="checks the no-GPU error path")
def test_cli_parity_without_a_gpu_is_a_one_line_error():
    result = _cli("parity", "--backend", "cupy")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


def test_cli_parity_rejects_bad_options():
    result = _cli("parity", "--backend", "cupy", "--length", "0")
    assert result.returncode in (1, 2) and "length" in result.stderr
    result = _cli("parity", "--backend", "numpy", "--dtype", "float16")
    assert result.returncode in (1, 2) and "float16" in result.stderr


def test_cli_parity_numpy_against_itself_passes():
    result = _cli("parity", "--backend", "numpy", "--length", "5", "--batch", "2",
                  "--hidden", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_benchmark_script_is_import_safe_and_has_help():
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout
    if _GPU_REASON is not None:
        result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and "no usable CUDA GPU" in result.stderr


# ================================================================= GPU tests
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_parity_with_numpy(dtype):
    from treesched.parity import run_parity
    report = run_parity("cupy", dtype=dtype, length=41, batch=4, hidden=16, seed=0)
    assert report.passed, report.format_table()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_gpu_direct_parity_graphs_and_eager(cell_name):
    import cupy
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=37, batch=5,
                                               hidden=8)
    for use_graphs in (True, False):
        backend = CupyBackend(use_graphs=use_graphs)
        reference = NumpyBackend()
        for _ in range(4):  # eager, capture, replay, replay
            params = make_params(cell, 3, 8, rng, np.float64)
            x = rng.standard_normal(x.shape)
            d_params = {k: cupy.asarray(v) for k, v in params.items()}
            want, want_tape = reference.encode(cell, params, x, schedule, True)
            got, tape = backend.encode(cell, d_params, cupy.asarray(x), schedule, True)
            for g, w in zip(got, want):
                assert_close(cupy.asnumpy(g), w, 1e-10, "state")
            dstates = tuple(rng.standard_normal(w.shape) for w in want)
            w_grads, w_dx = reference.encode_backward(cell, params, want_tape, dstates, True)
            g_grads, g_dx = backend.encode_backward(
                cell, d_params, tape, tuple(cupy.asarray(d) for d in dstates), True)
            for name in w_grads:
                assert_close(cupy.asnumpy(g_grads[name]), w_grads[name], 1e-10, name)
            assert_close(cupy.asnumpy(g_dx), w_dx, 1e-10, "dx")
        if use_graphs:
            assert backend.stats()["graphs"] == 2, backend.stats()


@gpu
@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    import cupy
    model = treesched.PRLSTM(5, 64, 5, backend="cupy", seed=0)
    rng = np.random.default_rng(0)
    x = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (16, 300))]
    dy = rng.standard_normal((16, 300, 5)).astype(np.float32)
    first = None
    for _ in range(3):
        _, grads = model.forward_backward(x, dy)
        grads = {k: cupy.asnumpy(v) for k, v in grads.items()}
        if first is None:
            first = grads
        for name in grads:
            assert np.array_equal(grads[name], first[name]), name


@gpu
@pytest.mark.gpu
def test_gpu_tf32_option_stays_close():
    import cupy
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=64, batch=8,
                                               hidden=64, dtype=np.float32)
    d_params = {k: cupy.asarray(v) for k, v in params.items()}
    exact, _ = CupyBackend(allow_tf32=False).encode(cell, d_params, cupy.asarray(x), schedule,
                                                     False)
    fast, _ = CupyBackend(allow_tf32=True).encode(cell, d_params, cupy.asarray(x), schedule,
                                                   False)
    assert rel(cupy.asnumpy(fast[0]), cupy.asnumpy(exact[0])) < 2e-2

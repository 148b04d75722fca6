"""NumPy transcriptions of the CUDA kernels and of cuBLAS, with memory checks.

The CuPy backend's *host* code (workspace layout, schedule indexing, the CSR
accumulation order, slot reuse, graph capture / replay, input staging) can
run unchanged against these instead of a GPU (``EmulatedLauncher``).  Each
emulated kernel is an independent transcription of its ``.cu`` source with
the same parameter list; it checks every pointer access against the buffer
it was given and that no element read by one thread is written by another
(so in-place and slot reuse are race-free as launched), and each GEMM goes
through the same cuBLAS column-major argument mapping (``gemm_plan``) the GPU
path uses.  Graph capture is emulated by recording the launches and replaying
them against the same buffers, which is what a CUDA graph does with pointers.

``tests/test_cuda_on_cpu.py`` runs the real CUDA C (compiled by g++) next to
these transcriptions on identical memory; ``set_tanh`` lets a transcription
use the kernels' own ``tanh`` so that the two agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from treesched.backends import cuda_source
from treesched.backends.cupy_backend import CUBLAS_OP_N, CupyBackend, check_gemm_operands

#: The tanh the transcriptions use (NumPy's unless set_tanh replaced it).
_tanh = np.tanh


def set_tanh(function) -> None:
    """Make every transcription use ``function`` as tanh (None: NumPy's)."""
    global _tanh
    _tanh = np.tanh if function is None else function


def tanh(x):
    return _tanh(x)


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
    return tanh(x * x.dtype.type(0.5)) * x.dtype.type(0.5) + x.dtype.type(0.5)


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

    i, g_, o = _sigmoid(gate(0)), tanh(gate(1)), _sigmoid(gate(2))
    for block, value in enumerate((i, g_, o)):
        mem.store(act, base + block * H + j, e, value, "act")
    c = i * g_
    for k, (src, idx) in enumerate(((c0_src, c0_idx), (c1_src, c1_idx))[:N]):
        f = _sigmoid(gate(3 + k))
        mem.store(act, base + (3 + k) * H + j, e, f, "act")
        c = c + f * mem.load(src, _row(mem, idx, r, m, b, B, f"c{k}_idx") * H + j, e, f"c{k}_src")
    h = o * tanh(c)
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
    tc = tanh(mem.load(c_cur, e, e, "c_cur"))
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


__all__ = ["Hazard", "KERNELS", "EmulatedLauncher", "RecordingGraphs", "emulated_backend",
           "colmajor_gemm", "set_tanh", "tanh"] + list(KERNELS)

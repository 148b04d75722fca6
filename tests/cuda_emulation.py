"""NumPy transcriptions of the CUDA kernels and of cuBLAS, with memory checks.

The CuPy backend (its primitives as the executor calls them: the arguments
each kernel gets, the in-place and aliasing patterns the plan produces; and
its launch logic: staging, graph capture / replay) can run unchanged
against these instead of a GPU (``EmulatedLauncher``).  Each
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

from collections import Counter

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
            if self.reads and wa.size:
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


def _coords(total, width, minors):
    """ts_coords_of for every element of a launch: (e, row, major, minor, col)."""
    e = np.arange(int(total), dtype=np.int64)
    row, col = e // width, e % width
    return e, row, row // minors, row % minors, col


def _row(mem, index, row, major, minor, batch, what):
    """ts_row: index[major] * batch + minor, or the launch's own row."""
    if index is None:
        return row
    locations = _ints(mem, index, major, what)
    if locations.size and locations.min() < 0:
        raise Hazard(f"{mem.kernel}({what}): negative index")
    return locations * batch + minor


def _gated_cell(mem, i, g, forgets, sources, e, row, major, minor, col, batch, hidden):
    """ts_gated_cell: c = i * g, then + f_k * c_k in order."""
    c = i * g
    for k, (f, (src, index)) in enumerate(zip(forgets, sources)):
        location = _row(mem, index, row, major, minor, batch, f"c{k}_idx")
        c = c + f * mem.load(src, location * hidden + col, e, f"c{k}_src")
    return c


def _write_answer(mem, answers, answer_index, e, major, minor, col, num_answers, hidden,
                  values, what):
    """ts_write_answer: answers[b, k] = value where answer_index[m] >= 0."""
    k = _ints(mem, answer_index, major, "ans_idx")
    has = (k >= 0) & (answers is not None)
    if has.any():
        mem.store(answers, (minor[has] * num_answers + k[has]) * hidden + col[has], e[has],
                  values[has], what)


def _answer_launch(kernel, locations, num_answers, batch, hidden):
    """(memory, every element e of the (batch, K, hidden) answers, e's offset in a
    store: ts_answer_in_store)."""
    mem = _Memory(kernel)
    K, B, H = int(num_answers), int(batch), int(hidden)
    e = np.arange(B * K * H, dtype=np.int64)
    b, k, col = e // H // K, e // H % K, e % H
    return mem, e, (_ints(mem, locations, k, "locations") * B + b) * H + col


# ============================================================ forward.cu
def ts_gather_pairs(store, left, right, out, width, batch, hidden):
    mem = _Memory("ts_gather_pairs")
    B, H = int(batch), int(hidden)
    e, _, m, b, col = _coords(int(width) * B * 2 * H, 2 * H, B)
    side = (col >= H).astype(np.int64)
    location = np.where(side == 1, _ints(mem, right, m, "right"), _ints(mem, left, m, "left"))
    values = mem.load(store, (location * B + b) * H + col - side * H, e, "store")
    mem.store(out, e, e, values, "out")
    mem.commit()


def ts_gated_forward(act, bias, rows, batch, hidden, num_prev, c0_src, c0_idx, c1_src, c1_idx,
                     h_out, c_out, out_idx, ans_h, ans_c, ans_idx, num_answers):
    mem = _Memory("ts_gated_forward")
    B, H, N, K = int(batch), int(hidden), int(num_prev), int(num_answers)
    e, r, m, b, j = _coords(int(rows) * H, H, B)
    base = r * (3 + N) * H
    gates = []
    for block in range(3 + N):
        a = (mem.load(act, base + block * H + j, e, "act")
             + mem.load(bias, block * H + j, e, "bias"))
        gates.append(tanh(a) if block == 1 else _sigmoid(a))
        mem.store(act, base + block * H + j, e, gates[-1], "act")
    sources = ((c0_src, c0_idx), (c1_src, c1_idx))[:N]
    c = _gated_cell(mem, gates[0], gates[1], gates[3:], sources, e, r, m, b, j, B, H)
    h = gates[2] * tanh(c)
    out = _row(mem, out_idx, r, m, b, B, "out_idx") * H + j
    if h_out is not None:
        mem.store(h_out, out, e, h, "h_out")
    if c_out is not None:
        mem.store(c_out, out, e, c, "c_out")
    if ans_idx is not None:
        _write_answer(mem, ans_h, ans_idx, e, m, b, j, K, H, h, "ans_h")
        _write_answer(mem, ans_c, ans_idx, e, m, b, j, K, H, c, "ans_c")
    mem.commit()


def ts_affine_forward(out, bias, rows, batch, hidden, relu, h_out, out_idx, ans_h, ans_idx,
                      num_answers):
    mem = _Memory("ts_affine_forward")
    B, H, K = int(batch), int(hidden), int(num_answers)
    e, r, m, b, j = _coords(int(rows) * H, H, B)
    h = mem.load(out, e, e, "out") + mem.load(bias, j, e, "bias")
    if int(relu):
        h = np.where(h < 0, h.dtype.type(0), h)
    mem.store(out, e, e, h, "out")
    if h_out is not None:
        mem.store(h_out, _row(mem, out_idx, r, m, b, B, "out_idx") * H + j, e, h, "h_out")
    if ans_idx is not None:
        _write_answer(mem, ans_h, ans_idx, e, m, b, j, K, H, h, "ans_h")
    mem.commit()


def ts_copy_answers(store, locations, num_answers, batch, hidden, out):
    mem, e, place = _answer_launch("ts_copy_answers", locations, num_answers, batch, hidden)
    mem.store(out, e, e, mem.load(store, place, e, "store"), "out")
    mem.commit()


# =========================================================== backward.cu
def ts_scatter_answers(values, locations, num_answers, batch, hidden, store):
    mem, e, place = _answer_launch("ts_scatter_answers", locations, num_answers, batch, hidden)
    moved = (np.zeros(e.shape, store.dtype) if values is None
             else mem.load(values, e, e, "values"))
    mem.store(store, place, e, moved, "store")
    mem.commit()


def ts_zero_locations(store, locations, count, size):
    mem = _Memory("ts_zero_locations")
    size = int(size)
    e = np.arange(int(count) * size, dtype=np.int64)
    k = e // size
    location = k if locations is None else _ints(mem, locations, k, "locations")
    mem.store(store, location * size + (e - k * size), e, np.zeros(e.shape, store.dtype),
              "store")
    mem.commit()


def ts_gated_cells(act, rows, batch, hidden, num_prev, c0_src, c0_idx, c1_src, c1_idx, c_out):
    mem = _Memory("ts_gated_cells")
    B, H, N = int(batch), int(hidden), int(num_prev)
    e, r, m, b, j = _coords(int(rows) * H, H, B)
    base = r * (3 + N) * H

    def gate(block):
        return mem.load(act, base + block * H + j, e, "act")

    sources = ((c0_src, c0_idx), (c1_src, c1_idx))[:N]
    forgets = [gate(3 + k) for k in range(N)]
    c = _gated_cell(mem, gate(0), gate(1), forgets, sources, e, r, m, b, j, B, H)
    mem.store(c_out, e, e, c, "c_out")
    mem.commit()


def ts_hidden_from_cells(act, c, rows, hidden, num_prev, h_out):
    mem = _Memory("ts_hidden_from_cells")
    H, N = int(hidden), int(num_prev)
    e = np.arange(int(rows) * H, dtype=np.int64)
    r, j = e // H, e % H
    o = mem.load(act, (r * (3 + N) + 2) * H + j, e, "act")
    mem.store(h_out, e, e, o * tanh(mem.load(c, e, e, "c")), "h_out")
    mem.commit()


def ts_gated_backward(act, c, rows, batch, hidden, num_prev, c0_src, c0_idx, c1_src, c1_idx,
                      dh, dc, dc0_out, dc1_out):
    mem = _Memory("ts_gated_backward")
    B, H, N = int(batch), int(hidden), int(num_prev)
    e, r, m, b, j = _coords(int(rows) * H, H, B)
    base = r * (3 + N) * H
    one = act.dtype.type(1)
    i = mem.load(act, base + j, e, "act")
    g = mem.load(act, base + H + j, e, "act")
    o = mem.load(act, base + 2 * H + j, e, "act")
    tc = tanh(mem.load(c, e, e, "c"))
    dh_value = mem.load(dh, e, e, "dh")
    dct = dh_value * o * (one - tc * tc)
    if dc is not None:
        dct = dct + mem.load(dc, e, e, "dc")
    mem.store(act, base + 2 * H + j, e, dh_value * tc * (o * (one - o)), "act")
    mem.store(act, base + j, e, dct * g * (i * (one - i)), "act")
    mem.store(act, base + H + j, e, dct * i * (one - g * g), "act")
    outputs = (dc0_out, dc1_out)
    for k, (src, index) in enumerate(((c0_src, c0_idx), (c1_src, c1_idx))[:N]):
        f = mem.load(act, base + (3 + k) * H + j, e, "act")
        ck = mem.load(src, _row(mem, index, r, m, b, B, f"c{k}_idx") * H + j, e, f"c{k}_src")
        mem.store(act, base + (3 + k) * H + j, e, dct * ck * (f * (one - f)), "act")
        mem.store(outputs[k], e, e, dct * f, f"dc{k}_out")
    mem.commit()


def ts_relu_backward(dh, h, rows, hidden):
    mem = _Memory("ts_relu_backward")
    e = np.arange(int(rows) * int(hidden), dtype=np.int64)
    off = ~(mem.load(h, e, e, "h") > 0)
    mem.store(dh, e[off], e[off], np.zeros(int(off.sum()), dh.dtype), "dh")
    mem.commit()


def ts_accumulate_operands(targets, consumer_ptr, consumers, first_gradient, num_targets, batch,
                           hidden, d_pair, dh_store, dc_left, dc_right, dc_store):
    mem = _Memory("ts_accumulate_operands")
    B, H = int(batch), int(hidden)
    e, _, t, b, j = _coords(int(num_targets) * B * H, H, B)
    dtype = dh_store.dtype
    dh = np.zeros(e.shape, dtype)
    dc = np.zeros(e.shape, dtype)
    start = _ints(mem, consumer_ptr, t, "consumer_ptr")
    stop = _ints(mem, consumer_ptr, t + 1, "consumer_ptr")
    for step in range(int((stop - start).max(initial=0))):
        live = start + step < stop
        code = _ints(mem, consumers, start[live] + step, "consumers")
        side, row = code & 1, (code >> 1) * B + b[live]
        dh[live] += mem.load(d_pair, (row * 2 + side) * H + j[live], e[live], "d_pair")
        if dc_left is not None:
            for which, source in ((0, dc_left), (1, dc_right)):
                pick = side == which
                lanes = np.flatnonzero(live)[pick]
                dc[lanes] += mem.load(source, row[pick] * H + j[lanes], e[lanes],
                                      "dc_right" if which else "dc_left")
    node = (_ints(mem, targets, t, "targets") * B + b) * H + j
    first = _ints(mem, first_gradient, t, "first_gradient") != 0
    for store, value, what in ((dh_store, dh, "dh_store"), (dc_store, dc, "dc_store")):
        if store is None:
            continue
        later = ~first
        value = value.copy()
        value[later] = mem.load(store, node[later], e[later], what) + value[later]
        mem.store(store, node, e, value, what)
    mem.commit()


KERNELS = {f.__name__: f for f in (
    ts_gather_pairs, ts_gated_forward, ts_affine_forward, ts_copy_answers,
    ts_scatter_answers, ts_zero_locations, ts_gated_cells, ts_hidden_from_cells,
    ts_gated_backward, ts_relu_backward, ts_accumulate_operands)}


def colmajor_gemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc, beta=0):
    """Reference BLAS gemm over flat column-major buffers (alpha = 1; beta 0 or 1,
    and with beta = 0 C is not read, as in BLAS)."""
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
    where = i[:, None] + j[None, :] * ldc
    C[where] = op_a @ op_b if beta == 0 else op_a @ op_b + C[where]


class EmulatedLauncher:
    """The launcher interface of CudaLauncher, over NumPy arrays."""

    def __init__(self):
        self.recording = None
        self.executed = 0      # launches run outside a graph replay
        self.replaying = False
        self.launched = Counter()   # kernel name -> launches issued (eager or captured)

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
        self.launched[name] += 1
        self._issue(lambda: KERNELS[name](*args))

    def gemm(self, a, b, out, trans_a=False, trans_b=False, accumulate=False):
        transa, transb, m, n, k, lda, ldb, ldc = check_gemm_operands(a, b, out, trans_a, trans_b)
        for operand in (a, b):
            if np.shares_memory(out, operand):
                raise Hazard("gemm output overlaps an operand")

        def run():
            colmajor_gemm(transa, transb, m, n, k, b.reshape(-1), lda, a.reshape(-1), ldb,
                          out.reshape(-1), ldc, beta=1 if accumulate else 0)
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

"""The ``numba`` backend: BLAS GEMMs plus fused, parallel Numba kernels (CPU).

Same contract as the reference :class:`~treesched.backends.numpy_backend.NumpyBackend`
(``encode`` / ``encode_backward``), same results to float tolerance, a
fraction of the time and memory.  Per merge level of ``R = width * B`` rows:

forward (LSTM cell)
    1. ``gather_pair``: ``X = [h_l, h_r]`` into a preallocated ``(R, 2H)``
       buffer (one pass, parallel over rows);
    2. one GEMM ``X @ merge/w`` straight into the level's slice of the
       activation cache (training) or a level scratch (inference);
    3. ``lstm_merge_fwd``: bias, the five gate nonlinearities, the gather of
       ``c_l, c_r``, the cell update and the scatter of ``(h, c)`` (and, in
       inference, of the answers), one fused kernel;
    4. per unary layer: one GEMM, one fused kernel.
    The leaf encoder (``x @ leaf/w`` with D ≤ 16 features) runs inside its
    gate kernel: no GEMM, no (T·B, 3H) buffer.

backward, levels in reverse
    per layer (top first) one fused kernel turns the cached activations into
    ``dA`` *in place* and writes the cell gradients; the weight gradient is
    one GEMM per level over all rows (``dA^T X``, with the bias sum riding
    along), the input gradient one GEMM (``dA W^T``).  ``h_l, h_r, c_l, c_r``,
    the cells between layers, each unary layer's input ``h`` and the leaf
    gates are gathered / recomputed, not cached.  The operand gradients of a
    level (``R`` rows) are summed into the node gradients by
    ``accumulate_*``, which loops over the level's distinct *target nodes*
    with a precomputed CSR of (consumer merge, side): no atomics, no races,
    a fixed summation order, bitwise reproducible.

GEMMs, two paths.  *Numba-threaded*: the GEMMs run on Numba's own threads,
one single-threaded BLAS call per row block (``numba_kernels.gemm_*``), with
the BLAS libraries limited to one thread during a pass (:class:`BlasThreads`,
threadpoolctl), and the weight gradient's K axis split in a fixed number of
blocks (``gemm_tn_acc``, the bias sum riding along).  Left to its own
threads, OpenBLAS's idle workers spin after each call and take the cores the
next gate kernel needs: the forward pass at T = 512 ran 2.0x the bare-GEMM
time that way, 1.2x this way (same run, 2 cores).  *NumPy*: ``np.matmul``
(BLAS's own threads), the bias gradient a column sum (``np.add.reduce``).
``NumbaBackend(gemm="auto")`` (the default) takes the Numba-threaded path in
float32 where threadpoolctl and scipy are installed and NumPy's otherwise
(always in float64, the gradient-checking precision); ``gemm="numba"`` or
``"numpy"`` forces one path in every dtype (the tests run both).

Memory.  Per merge the training cache keeps only the gate activations
(``5H`` + ``4H`` per unary layer); node states ``(h, c)`` and node gradients
live in node-major stores.  Node gradients are never zero-filled: a node's
first gradient is assigned, later ones added (the schedule says which is
first).  All of it lives in a *workspace* allocated once per (schedule,
batch, dtype, cell, sizes) and reused by later calls
(``NumbaBackend.workspaces``, an LRU bounded in entries and bytes).  A tape
holds its workspace until its backward has run; a second forward on the same
workspace before that gets a fresh one, so tapes never see each other's
data; a tape's backward runs once (it consumes the cache in place).
Inference runs on the slot plan of ``treesched.lowering`` (only the live
frontier is stored).  Result arrays are pooled too, but handed out again
only once nothing references them (see :meth:`Workspace.output`).

Cells without fused kernels (anything but the stock ``LSTMCell`` and
``RNNCell``) run on the generic NumPy path this class inherits.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from treesched.errors import TreeschedError
from treesched.lowering import inference_slots
from treesched.ops._check import param
from treesched.ops.lstm import LSTMCell
from treesched.ops.rnn import RNNCell
from treesched.schedule import Schedule

from .numpy_backend import NumpyBackend

# Numba's default threading layer here is OpenMP (libgomp), whose idle
# workers spin after every parallel region.  This backend alternates short
# Numba kernels with multi-threaded BLAS calls many times per level, and on
# a small or shared machine the spinning workers steal the cores the BLAS
# threads (and the next kernel) need: measured on 2 cores, a 50 µs kernel
# took ~8 ms and the forward pass 1.6-2x longer.  Passive waiting costs a
# futex wake per region (tens of µs).  libgomp reads this once, when Numba
# first loads it, so it must be set before the first parallel kernel runs;
# an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # numba is optional at import time: why_unavailable() reports it
    import numba
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    _NUMBA_ERROR = _error
    K = None
else:
    _NUMBA_ERROR = None
    from . import numba_kernels as K

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

# NumbaBackend(gemm=...): which GEMM path runs (see the module doc)
GEMM_PATHS = ("auto", "numba", "numpy")

# Leaf inputs with at most this many features are encoded inside the leaf
# kernel (x @ leaf/w row by row: D multiply-adds per element, no GEMM and no
# (T*B, 3H) pre-activation buffer); wider inputs go through BLAS.
FUSED_LEAF_MAX_D = 16


# ------------------------------------------------------------------ BLAS
KSPLIT_MAX = 8        # weight-gradient GEMMs: row blocks (K split) ...
KSPLIT_ROWS = 8192    # ... one per this many rows, at least 2 from 512 rows on


def _ksplit(rows: int) -> int:
    """Row blocks of a weight-gradient GEMM: a function of R only, never of the
    thread count, so results do not depend on it either."""
    if rows < 512:
        return 1
    return max(2, min(KSPLIT_MAX, rows // KSPLIT_ROWS))


class BlasThreads:
    """Limit every loaded BLAS library to one thread while a pass runs.

    The GEMMs run as single-threaded BLAS calls on Numba's threads
    (``numba_kernels.gemm_*``).  Re-entrant and shared by threads: the first
    ``__enter__`` limits, the last ``__exit__`` restores the user's settings.
    ``available`` is False without threadpoolctl or scipy's BLAS (which
    Numba's ``np.dot`` calls); the backend then uses NumPy's multi-threaded
    ``matmul`` instead.
    """

    def __init__(self):
        self.available = False
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (loads the library np.dot uses)
            from threadpoolctl import ThreadpoolController
            self._blas = ThreadpoolController().select(user_api="blas")
            self.available = len(self._blas.lib_controllers) > 0
        except Exception:  # noqa: BLE001 - any failure: use the NumPy GEMM path
            self._blas = None

    def __enter__(self):
        with self._lock:
            if self._depth == 0 and self.available:
                self._limiter = self._blas.limit(limits=1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None
        return False


# ------------------------------------------------------------------ plans
@dataclass(frozen=True)
class _LevelPlan:
    first: int            # output ids first .. stop (a contiguous range)
    stop: int
    width: int
    merge0: int           # first - length: index of the level's first merge
    left: np.ndarray      # (width,) int64 operand node ids
    right: np.ndarray
    out: np.ndarray       # (width,) int64 = arange(first, stop)
    targets: np.ndarray   # (u,) distinct operand nodes of the level
    ptr: np.ndarray       # (u + 1,) CSR row pointers into entries
    entries: np.ndarray   # 2 * merge_in_level + side, grouped by target
    first_grad: np.ndarray  # (u,) bool: the node's first gradient (assign)


@dataclass(frozen=True)
class _Plan:
    """Everything the kernels index with, per schedule (batch independent)."""

    levels: tuple
    leaf_ids: np.ndarray       # arange(T)
    local: np.ndarray          # arange(widest)
    output_nodes: np.ndarray   # (K,) int64
    answer_index: np.ndarray   # arange(K)
    no_answers: np.ndarray     # (widest,) -1: "no merge of this level answers"
    never: np.ndarray          # nodes no gradient reaches (zero-filled)
    widest: int


@dataclass(frozen=True)
class _InferencePlan:
    num_slots: int
    leaf_slots: np.ndarray
    leaf_answers: tuple        # (which, slots)
    levels: tuple              # per level: (left_slots, right_slots, out_slots, answer_of_merge)


def _int64(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64)


def _build_plan(schedule: Schedule) -> _Plan:
    length = schedule.length
    outputs = _int64(schedule.output_nodes)
    seen = np.zeros(schedule.num_nodes, bool)
    seen[outputs] = True
    steps = schedule.levels
    built = [None] * len(steps)
    for index in range(len(steps) - 1, -1, -1):  # backward order: who is first
        step = steps[index]
        width = step.width
        operands = np.concatenate([step.left, step.right]).astype(np.int64)
        codes = np.concatenate([2 * np.arange(width), 2 * np.arange(width) + 1])
        order = np.lexsort((codes, operands))  # by node, then (merge, side)
        operands, codes = operands[order], codes[order]
        starts = np.flatnonzero(np.r_[True, operands[1:] != operands[:-1]])
        targets = operands[starts]
        first_grad = ~seen[targets]
        seen[targets] = True
        first = int(step.out[0])
        built[index] = _LevelPlan(
            first=first, stop=first + width, width=width, merge0=first - length,
            left=_int64(step.left), right=_int64(step.right),
            out=np.arange(first, first + width, dtype=np.int64),
            targets=_int64(targets), ptr=_int64(np.r_[starts, len(operands)]),
            entries=_int64(codes), first_grad=np.ascontiguousarray(first_grad))
    return _Plan(levels=tuple(built), leaf_ids=np.arange(length, dtype=np.int64),
                 local=np.arange(max(schedule.widest, 1), dtype=np.int64),
                 output_nodes=outputs, answer_index=np.arange(len(outputs), dtype=np.int64),
                 no_answers=np.full(max(schedule.widest, 1), -1, np.int64),
                 never=_int64(np.flatnonzero(~seen)),
                 widest=schedule.widest)


def _build_inference_plan(schedule: Schedule) -> _InferencePlan:
    slots = inference_slots(schedule)
    slot = slots.slot.astype(np.int64)
    answer_levels = schedule.level[schedule.output_nodes]

    def answers(level):
        which = np.flatnonzero(answer_levels == level)
        return _int64(which), _int64(slot[schedule.output_nodes[which]])

    levels = []
    for index, step in enumerate(schedule.levels, start=1):
        which, _ = answers(index)
        ans = np.full(step.width, -1, np.int64)  # merge j -> output index, or -1
        ans[schedule.output_nodes[which] - int(step.out[0])] = which
        levels.append((_int64(slot[step.left]), _int64(slot[step.right]),
                       _int64(slot[step.out]), ans))
    return _InferencePlan(num_slots=slots.num_slots, leaf_slots=_int64(slot[:schedule.length]),
                          leaf_answers=answers(0), levels=tuple(levels))


# -------------------------------------------------------------- workspaces
def empty_buffer(shape, dtype) -> np.ndarray:
    """Every workspace, result and gradient buffer of this backend comes from
    here: uninitialised memory, which every kernel writes before it reads.
    The tests replace this function with one that fills buffers with a
    poison pattern, so that a read before a write fails deterministically
    instead of depending on what the allocator recycled."""
    return np.empty(shape, dtype)


class Workspace:
    """Preallocated buffers for one (schedule, batch, dtype, cell, sizes, mode)."""

    def __init__(self, key, arrays: dict):
        self.key = key
        self.arrays = arrays
        self.nbytes = sum(a.nbytes for a in arrays.values())
        self.tape_ref = None  # weakref to the tape whose backward is pending

    def __getattr__(self, name):
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None

    def scratch(self, name: str, shape, dtype) -> np.ndarray:
        """A named buffer allocated on first use and kept (e.g. GEMM partials).

        Its contents are undefined, like every workspace buffer's: whatever
        an earlier call (or the allocator) left there.  A caller writes every
        element it reads, and never tests the contents to guess whether they
        are initialised (``np.empty`` may return recycled memory that looks so).
        """
        array = self.arrays.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != dtype:
            if array is not None:
                self.nbytes -= array.nbytes
            array = empty_buffer(shape, dtype)
            self.arrays[name] = array
            self.nbytes += array.nbytes
        return array

    def output(self, index: int, shape, dtype) -> np.ndarray:
        """Result array ``index``: the one handed out last time if nobody holds it any more.

        Results must be fresh to the caller, but allocating them per call is
        slow (first-touch page faults: 0.2 s for a 64 MiB state array on the
        reference machine, more than the copy into it).  CPython's refcount
        says whether the previous result is still referenced anywhere (a
        view holds its base): if not, overwriting it is unobservable and it is
        reused; if so, a new array is allocated and pooled instead.
        """
        pool = self.__dict__.setdefault("outputs", {})
        array = pool.get(index)
        # references: the pool's dict, the local name, getrefcount's argument
        if (array is None or array.shape != tuple(shape) or array.dtype != dtype
                or sys.getrefcount(array) > 3):
            if index in pool:
                self.nbytes -= pool[index].nbytes
            array = empty_buffer(shape, dtype)
            pool[index] = array
            self.nbytes += array.nbytes
        return array

    def busy(self) -> bool:
        ref = self.tape_ref
        tape = ref() if ref is not None else None
        return tape is not None and not tape.consumed


class WorkspaceCache:
    """LRU of workspaces, bounded in entries and bytes (the newest always stays).

    ``allocations`` counts workspaces ever allocated, ``hits`` reuses: a
    steady training loop allocates once per distinct shape and then only hits.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()
        self.allocations = 0
        self.hits = 0
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes for ws in self.entries.values())

    def get(self, key, make):
        with self.lock:
            ws = self.entries.get(key)
            if ws is not None and not ws.busy():
                self.entries.move_to_end(key)
                self.hits += 1
                return ws
            shared = ws is None
        ws = Workspace(key, make())
        with self.lock:
            self.allocations += 1
            if shared:  # a busy entry keeps its place; the extra one is private
                self.entries[key] = ws
                self._evict()
        return ws

    def _evict(self):
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries
                                         or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self):
        with self.lock:
            self.entries.clear()

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes,
                "allocations": self.allocations, "hits": self.hits}


class FusedTape:
    """What ``encode_backward`` needs: the workspace holding the caches."""

    def __init__(self, schedule, batch, kind, num_layers, hidden, workspace, plan):
        self.schedule = schedule
        self.batch = batch
        self.kind = kind
        self.num_layers = num_layers
        self.hidden = hidden
        self.workspace = workspace
        self.plan = plan
        self.consumed = False


# ---------------------------------------------------------------- backend
class NumbaBackend(NumpyBackend):
    """CPU backend: BLAS GEMMs + fused ``numba.prange`` kernels (see module doc)."""

    name = "numba"

    @staticmethod
    def why_unavailable() -> str | None:
        if _NUMBA_ERROR is not None:
            return f"numba is not installed or failed to import ({_NUMBA_ERROR}); pip install numba"
        return None

    def __init__(self, max_workspaces: int = 8, max_workspace_bytes: int = 4 << 30,
                 gemm: str = "auto"):
        """``gemm``: which GEMM path runs (module doc): ``"auto"`` (Numba-threaded
        in float32 where threadpoolctl and scipy are installed, NumPy's
        ``matmul`` otherwise), ``"numba"`` or ``"numpy"`` (that path in every
        dtype: for tests and comparisons)."""
        reason = self.why_unavailable()
        if reason is not None:
            raise TreeschedError(f"backend 'numba' is not available here: {reason}")
        if gemm not in GEMM_PATHS:
            raise TreeschedError(f"gemm must be one of {', '.join(GEMM_PATHS)}, got {gemm!r}")
        super().__init__(np)
        self.workspaces = WorkspaceCache(max_workspaces, max_workspace_bytes)
        self.blas_threads = BlasThreads()
        if gemm == "numba" and not self.blas_threads.available:
            raise TreeschedError("gemm='numba' needs scipy (the BLAS Numba's np.dot calls) and "
                                 "threadpoolctl; pip install scipy threadpoolctl")
        self.gemm = gemm
        self._plans: OrderedDict = OrderedDict()
        self._inference_plans: OrderedDict = OrderedDict()

    @classmethod
    def parity_variants(cls) -> list:
        """``[(label, backend)]``: the code paths ``treesched parity`` checks,
        each GEMM path this machine can run (the default takes one of them
        per dtype)."""
        paths = ("numba", "numpy") if BlasThreads().available else ("numpy",)
        return [(f"{path}-gemm", cls(gemm=path)) for path in paths]

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _kind(cell):
        cls = type(cell)
        if cls is LSTMCell:
            return "lstm"
        if cls is RNNCell:
            return "rnn"
        return None

    def _cached(self, table, schedule, build):
        hit = table.get(schedule)
        if hit is None or hit[0] is not schedule:
            hit = (schedule, build(schedule))
            table[schedule] = hit
            while len(table) > 64:
                table.popitem(last=False)
        else:
            table.move_to_end(schedule)
        return hit[1]

    def plan(self, schedule: Schedule) -> _Plan:
        return self._cached(self._plans, schedule, _build_plan)

    def inference_plan(self, schedule: Schedule) -> _InferencePlan:
        return self._cached(self._inference_plans, schedule, _build_inference_plan)

    @staticmethod
    def _params(kind, cell, params, D, dtype):
        """Checked, contiguous parameters: [(W, b)] for leaf, merge, unary_1..."""
        cell._check_layers(params)
        nb = {"lstm": (3, 5, 4), "rnn": (1, 1, 1)}[kind]
        leaf_w = params.get("leaf/w")
        if leaf_w is None or getattr(leaf_w, "ndim", 0) != 2 or leaf_w.shape[1] % nb[0]:
            shape = getattr(leaf_w, "shape", None)
            raise TreeschedError(f"parameter 'leaf/w' has shape {shape}, expected ({D}, {nb[0]}*H)")
        H = leaf_w.shape[1] // nb[0]
        layers = [("leaf/w", "leaf/b", (D, nb[0] * H)), ("merge/w", "merge/b", (2 * H, nb[1] * H))]
        layers += [(w, b, (H, nb[2] * H)) for w, b in cell._unary_names]
        out = []
        for wn, bn, shape in layers:
            W = param(params, wn, shape, dtype)
            b = np.ascontiguousarray(param(params, bn, (shape[1],), dtype))
            out.append((W, b))
        return H, out

    # ------------------------------------------------------------ forward
    def encode(self, cell, params, x, schedule: Schedule, need_grad: bool):
        kind = self._kind(cell)
        dtype = getattr(x, "dtype", None)
        if kind is None or not isinstance(x, np.ndarray) or dtype not in _FLOATS:
            return super().encode(cell, params, x, schedule, need_grad)
        if x.ndim != 3 or x.shape[1] != schedule.length:
            raise TreeschedError(f"x must have shape (batch, {schedule.length}, D), got {x.shape}")
        batch, length, D = x.shape
        H, layers = self._params(kind, cell, params, D, dtype)
        L = cell.num_layers
        if need_grad:
            with self.blas_threads:
                return self._train_forward(kind, L, H, layers, x, schedule)
        with self.blas_threads:
            return self._infer_forward(kind, L, H, layers, x, schedule), None

    def _train_arrays(self, kind, L, H, D, B, schedule, dtype):
        plan = self.plan(schedule)
        N, T, M = schedule.num_nodes, schedule.length, schedule.num_merges
        rmax = max(plan.widest, 1) * B
        e = lambda *shape: empty_buffer(shape, dtype)  # noqa: E731
        arrays = {"xrows": e(T * B, D), "hs": e(N, B, H), "dhs": e(N, B, H),
                  "X": e(max(rmax, 2 * B), 2 * H), "hbuf": e(rmax, H),
                  "dummy2": e(1, 3 * H), "dummy3": e(1, 1, H)}
        pingpong = 2 if L >= 3 else 1
        for p in range(pingpong):
            arrays[f"dh{p}"] = e(rmax, H)
        if kind == "lstm":
            arrays.update(cs=e(N, B, H), dcs=e(N, B, H), act0=e(M * B, 5 * H),
                          dcl=e(rmax, H), dcr=e(rmax, H))
            if L > 1:
                arrays["c_lvl"] = e(L - 1, rmax, H)  # cells between layers, one level
                arrays["act_u"] = e(L - 1, M * B, 4 * H)
            for p in range(pingpong):
                arrays[f"dc{p}"] = e(rmax, H)
        else:
            if L > 1:
                arrays["h_mid"] = e(L - 1, M * B, H)
        return arrays

    def _train_forward(self, kind, L, H, layers, x, schedule):
        B, T, D = x.shape
        dtype = x.dtype
        key = ("train", schedule, B, dtype.str, kind, L, H, D)
        ws = self.workspaces.get(
            key, lambda: self._train_arrays(kind, L, H, D, B, schedule, dtype))
        plan = self.plan(schedule)
        tape = FusedTape(schedule, B, kind, L, H, ws, plan)
        ws.tape_ref = weakref.ref(tape)
        xr = ws.xrows
        np.copyto(xr.reshape(T, B, D), x.transpose(1, 0, 2))
        (Wl, bl), (W0, b0) = layers[0], layers[1]
        unary = layers[2:]
        hs = ws.hs
        if kind == "lstm":
            cs = ws.cs
            self._lstm_leaves(ws, xr, Wl, bl, hs, cs, plan.leaf_ids, T, B, H)
            none = (plan.no_answers, ws.dummy3, ws.dummy3)
            for lv in plan.levels:
                R, m0 = lv.width * B, lv.merge0 * B
                m1 = m0 + R
                X = ws.X[:R]
                K.gather_pair(hs, lv.left, lv.right, B, X)
                A = ws.act0[m0:m1]
                self._nn(X, W0, A)
                hbuf3 = ws.hbuf[:R].reshape(lv.width, B, H)
                if L == 1:
                    K.lstm_merge_fwd(A, b0, cs, lv.left, lv.right, B, hs, cs, lv.out, True, *none)
                    continue
                K.lstm_merge_fwd(A, b0, cs, lv.left, lv.right, B, hbuf3,
                                 ws.c_lvl[0, :R].reshape(lv.width, B, H), plan.local, True, *none)
                for k, (U, bu) in enumerate(unary, start=1):
                    Ak = ws.act_u[k - 1, m0:m1]
                    self._nn(ws.hbuf[:R], U, Ak)
                    if k == L - 1:
                        out_h, out_c, idx = hs, cs, lv.out
                    else:
                        out_h, out_c = hbuf3, ws.c_lvl[k, :R].reshape(lv.width, B, H)
                        idx = plan.local
                    K.lstm_unary_fwd(Ak, bu, ws.c_lvl[k - 1, :R], B, out_h, out_c, idx, True, *none)
            stores = (hs, cs)
        else:
            leaf = hs[:T].reshape(T * B, H)
            self._nn(xr, Wl, leaf)
            K.bias_act_inplace(leaf, bl, False)
            for lv in plan.levels:
                R, m0 = lv.width * B, lv.merge0 * B
                m1 = m0 + R
                X = ws.X[:R]
                K.gather_pair(hs, lv.left, lv.right, B, X)
                top = hs[lv.first:lv.stop].reshape(R, H)
                out = top if L == 1 else ws.h_mid[0, m0:m1]
                self._nn(X, W0, out)
                K.bias_act_inplace(out, b0, True)
                for k, (U, bu) in enumerate(unary, start=1):
                    nxt = top if k == L - 1 else ws.h_mid[k, m0:m1]
                    self._nn(ws.h_mid[k - 1, m0:m1], U, nxt)
                    K.bias_act_inplace(nxt, bu, True)
            stores = (hs,)
        states = []
        for index, store in enumerate(stores):
            out = ws.output(index, (B, len(plan.output_nodes), H), dtype)
            K.copy_answers(store, plan.output_nodes, plan.answer_index, out)
            states.append(out)
        return tuple(states), tape

    @staticmethod
    def _leaf_chunks(ws, T, B, cols):
        """``(t0, t1, A)``: leaf positions in chunks whose (rows, cols) gate
        block fits the level scratch (leaves are not cached)."""
        flat = ws.X.reshape(-1)
        step = max(1, min(T, flat.size // (cols * B)))
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            yield t0, t1, flat[:(t1 - t0) * B * cols].reshape((t1 - t0) * B, cols)

    def _infer_arrays(self, kind, L, H, D, B, schedule, dtype):
        iplan = self.inference_plan(schedule)
        T, S = schedule.length, iplan.num_slots
        rmax = max(schedule.widest, 1) * B
        e = lambda *shape: empty_buffer(shape, dtype)  # noqa: E731
        # the rnn leaf runs as one GEMM into the scratch; the lstm leaf is fused
        # (or chunked through X), so its scratch holds one level's gates
        scratch = rmax * 5 * H if kind == "lstm" else max(T * B, rmax) * H
        arrays = {"xrows": e(T * B, D), "sh": e(S, B, H), "A": e(scratch),
                  "X": e(max(rmax, 2 * B), 2 * H), "hbuf": e(rmax, H),
                  "dummy2": e(1, 3 * H), "dummy3": e(1, 1, H)}
        if kind == "lstm":
            arrays.update(sc=e(S, B, H), cbuf=e(rmax, H))
        return arrays

    def _infer_forward(self, kind, L, H, layers, x, schedule):
        B, T, D = x.shape
        dtype = x.dtype
        key = ("infer", schedule, B, dtype.str, kind, L, H, D)
        ws = self.workspaces.get(
            key, lambda: self._infer_arrays(kind, L, H, D, B, schedule, dtype))
        iplan = self.inference_plan(schedule)
        plan = self.plan(schedule)
        Kout = len(plan.output_nodes)
        xr = ws.xrows
        np.copyto(xr.reshape(T, B, D), x.transpose(1, 0, 2))
        (Wl, bl), (W0, b0) = layers[0], layers[1]
        unary = layers[2:]
        sh, scratch = ws.sh, ws.arrays.get("A")

        def rows(count, cols):
            return scratch[:count * cols].reshape(count, cols)

        out_h = ws.output(0, (B, Kout, H), dtype)
        if kind == "lstm":
            sc = ws.sc
            out_c = ws.output(1, (B, Kout, H), dtype)
            outs, stores = (out_h, out_c), (sh, sc)
            self._lstm_leaves(ws, xr, Wl, bl, sh, sc, iplan.leaf_slots, T, B, H)
            none = (plan.no_answers, ws.dummy3, ws.dummy3)
        else:
            outs, stores = (out_h,), (sh,)
            A = rows(T * B, H)
            self._nn(xr, Wl, A)
            K.bias_act_rows(A, bl, False, sh, iplan.leaf_slots, B)
        self._answers(stores, outs, *iplan.leaf_answers)
        for lv, (ls, rs, os_, ans) in zip(plan.levels, iplan.levels):
            R = lv.width * B
            X = ws.X[:R]
            K.gather_pair(sh, ls, rs, B, X)
            hbuf3 = ws.hbuf[:R].reshape(lv.width, B, H)
            if kind == "lstm":
                A = rows(R, 5 * H)
                self._nn(X, W0, A)
                cbuf3 = ws.cbuf[:R].reshape(lv.width, B, H)
                if L == 1:
                    K.lstm_merge_fwd(A, b0, sc, ls, rs, B, sh, sc, os_, False, ans, out_h, out_c)
                else:
                    K.lstm_merge_fwd(A, b0, sc, ls, rs, B, hbuf3, cbuf3, plan.local, False, *none)
                    for k, (U, bu) in enumerate(unary, start=1):
                        A = rows(R, 4 * H)
                        self._nn(ws.hbuf[:R], U, A)
                        if k == L - 1:
                            K.lstm_unary_fwd(A, bu, ws.cbuf[:R], B, sh, sc, os_, False,
                                             ans, out_h, out_c)
                        else:  # in place: row r reads and writes only row r
                            K.lstm_unary_fwd(A, bu, ws.cbuf[:R], B, hbuf3, cbuf3, plan.local,
                                             False, *none)
            else:
                A = rows(R, H)
                self._nn(X, W0, A)
                if L == 1:
                    K.bias_act_rows(A, b0, True, sh, os_, B)
                else:
                    K.bias_act_inplace(A, b0, True)
                    src, dst = A, ws.hbuf[:R]
                    for k, (U, bu) in enumerate(unary, start=1):
                        self._nn(src, U, dst)
                        if k == L - 1:
                            K.bias_act_rows(dst, bu, True, sh, os_, B)
                        else:
                            K.bias_act_inplace(dst, bu, True)
                            src, dst = dst, src
                which = ans[ans >= 0]
                if len(which):
                    K.copy_answers(sh, os_[ans >= 0], which, out_h)
        return outs

    def _lstm_leaves(self, ws, xr, Wl, bl, hs, cs, idx, T, B, H):
        """Leaf encoder into node (or slot) ``idx[t]``: fused (no GEMM) for small D."""
        if xr.shape[1] <= FUSED_LEAF_MAX_D:
            K.lstm_leaf_fwd(xr, Wl, bl, ws.dummy2, True, hs, cs, idx, B)
            return
        for t0, t1, A in self._leaf_chunks(ws, T, B, 3 * H):
            self._nn(xr[t0 * B:t1 * B], Wl, A)
            K.lstm_leaf_fwd(xr[t0 * B:t1 * B], Wl, bl, A, False, hs, cs, idx[t0:t1], B)

    @staticmethod
    def _answers(stores, outs, which, slots):
        if len(which):
            for store, out in zip(stores, outs):
                K.copy_answers(store, slots, which, out)

    # ----------------------------------------------------------- backward
    def encode_backward(self, cell, params, tape, dstates, need_dx=False):
        if not isinstance(tape, FusedTape):
            return super().encode_backward(cell, params, tape, dstates, need_dx)
        if tape.consumed:
            raise TreeschedError(
                "this tape's backward has already run: the numba backend computes the "
                "gradients in place in its cached activations; run forward again")
        kind = self._kind(cell)
        if kind != tape.kind or cell.num_layers != tape.num_layers:
            raise TreeschedError(f"tape was recorded with a {tape.kind} cell of "
                                 f"{tape.num_layers} layers, got {cell!r}")
        ws, plan, schedule = tape.workspace, tape.plan, tape.schedule
        B, H, L = tape.batch, tape.hidden, tape.num_layers
        T = schedule.length
        dtype = ws.hs.dtype
        D = ws.xrows.shape[1]
        _, layers = self._params(kind, cell, params, D, dtype)
        nstates = 2 if kind == "lstm" else 1
        if not isinstance(dstates, (tuple, list)) or len(dstates) != nstates:
            raise TreeschedError(f"dstates must be a tuple of {nstates} arrays or None")
        Kout = len(plan.output_nodes)
        stores = (ws.dhs, ws.dcs) if kind == "lstm" else (ws.dhs,)
        for store, grad in zip(stores, dstates):
            if grad is None:
                store[plan.output_nodes] = 0
                continue
            if getattr(grad, "shape", None) != (B, Kout, H) or grad.dtype != dtype:
                raise TreeschedError(
                    f"dstates entries must have shape {(B, Kout, H)} and dtype {dtype}, got "
                    f"{getattr(grad, 'shape', None)} {getattr(grad, 'dtype', None)}")
            K.scatter_nodes(np.ascontiguousarray(grad), plan.output_nodes, store)
        if len(plan.never):
            for store in stores:
                store[plan.never] = 0
        tape.consumed = True
        try:
            if kind == "lstm":
                with self.blas_threads:
                    grads, dx = self._lstm_backward(L, H, layers, ws, plan, B, T, need_dx)
            else:
                with self.blas_threads:
                    grads, dx = self._rnn_backward(L, H, layers, ws, plan, B, T, need_dx)
        finally:
            ws.tape_ref = None
        names = ["leaf", "merge"] + [f"unary_{k}" for k in range(1, L)]
        out = {}
        for name, pair in zip(names, grads):
            if pair is None:  # no level ran this layer (a schedule without merges)
                continue
            dWt, db = pair
            out[f"{name}/w"], out[f"{name}/b"] = np.ascontiguousarray(dWt.T), db
        if dx is not None:
            dx = dx.reshape(T, B, D).transpose(1, 0, 2)
        return out, dx

    # --------------------------------------------------------------- GEMMs
    def _nblk(self, rows):
        return max(1, min(numba.get_num_threads(), rows // 64))

    def _numba_gemm(self, dtype):
        """Whether this dtype's GEMMs run on Numba's threads.  By default only
        float32's: float64 (the gradient-checking precision) takes NumPy's
        matmul and compiles no GEMM kernels unless ``gemm="numba"`` asks."""
        if self.gemm != "auto":
            return self.gemm == "numba"
        return self.blas_threads.available and dtype == np.float32

    def _nn(self, X, W, out):
        """``out = X @ W``."""
        if self._numba_gemm(X.dtype):
            K.gemm_nn(X, W, out, self._nblk(X.shape[0]))
        else:
            np.matmul(X, W, out=out)

    def _nt(self, dA, W, out):
        """``out = dA @ W^T``."""
        if self._numba_gemm(dA.dtype):
            K.gemm_nt(dA, W, out, self._nblk(dA.shape[0]))
        else:
            np.matmul(dA, W.T, out=out)

    def _tn(self, ws, acc, X, dA, accumulate):
        """``acc = (dW^T, db)``: set or add ``dA^T X`` (one GEMM over all rows
        of the level) and ``Σ_r dA``.

        The transposed product is the faster BLAS call here (OpenBLAS runs
        ``X^T dA`` with the long row axis as K at about half the rate), and
        for the leaf (``X`` is (R, D), D tiny) about 15x faster.
        """
        dWt, db = acc
        if self._numba_gemm(dA.dtype):
            nk = _ksplit(dA.shape[0])
            # scratch: gemm_tn_acc writes blocks 0..nk-1 of both before reading them
            partial = ws.scratch(f"partial{dWt.shape}", (KSPLIT_MAX,) + dWt.shape, dWt.dtype)
            colsum = ws.scratch(f"colsum{db.shape}", (KSPLIT_MAX,) + db.shape, db.dtype)
            K.gemm_tn_acc(dA, X, partial, colsum, nk, dWt, db, accumulate)
            return
        # The bias gradient is a column sum of dA, rows added in order (NumPy
        # reduces a C-contiguous axis 0 row by row, single-threaded): no
        # helper "ones" vector that could hold stale memory, and the same
        # bits at any thread count.
        if not accumulate:
            np.matmul(dA.T, X, out=dWt)
            np.add.reduce(dA, axis=0, out=db)
        else:
            dWt += dA.T @ X
            db += np.add.reduce(dA, axis=0)

    @staticmethod
    def _grad_buffers(layers, dtype):
        """Per layer ``(dW^T, db)``, filled by ``_tn``."""
        return [(empty_buffer(W.shape[::-1], dtype), empty_buffer(b.shape, dtype))
                for W, b in layers]

    def _lstm_backward(self, L, H, layers, ws, plan, B, T, need_dx):
        dtype = ws.hs.dtype
        grads = self._grad_buffers(layers, dtype)
        started = [False] * len(layers)

        def add(index, X, dA):
            self._tn(ws, grads[index], X, dA, started[index])
            started[index] = True

        hs, cs, dhs, dcs = ws.hs, ws.cs, ws.dhs, ws.dcs
        W0 = layers[1][0]
        for lv in reversed(plan.levels):
            R, m0 = lv.width * B, lv.merge0 * B
            m1 = m0 + R
            dh = dhs[lv.first:lv.stop].reshape(R, H)
            dc = dcs[lv.first:lv.stop].reshape(R, H)
            c_top = cs[lv.first:lv.stop].reshape(R, H)
            if L > 1:  # the cells between layers are recomputed, not cached
                K.lstm_merge_c(ws.act0[m0:m1], cs, lv.left, lv.right, B, ws.c_lvl[0, :R])
                for k in range(1, L - 1):
                    K.lstm_unary_c(ws.act_u[k - 1, m0:m1], ws.c_lvl[k - 1, :R], ws.c_lvl[k, :R])
            for k in range(L - 1, 0, -1):
                act = ws.act_u[k - 1, m0:m1]
                c_out = c_top if k == L - 1 else ws.c_lvl[k, :R]
                act_prev = ws.act0[m0:m1] if k == 1 else ws.act_u[k - 2, m0:m1]
                slot = (L - 1 - k) % 2
                dc_prev = ws.arrays[f"dc{slot}"][:R]
                h_prev = ws.hbuf[:R]
                K.lstm_unary_bwd(act, c_out, ws.c_lvl[k - 1, :R], act_prev, dh, dc,
                                 dc_prev, h_prev)
                add(k + 1, h_prev, act)
                dh_prev = ws.arrays[f"dh{slot}"][:R]
                self._nt(act, layers[k + 1][0], dh_prev)
                dh, dc = dh_prev, dc_prev
            act = ws.act0[m0:m1]
            c_out = c_top if L == 1 else ws.c_lvl[0, :R]
            X = ws.X[:R]
            dcl, dcr = ws.dcl[:R], ws.dcr[:R]
            K.lstm_merge_bwd(act, c_out, hs, cs, lv.left, lv.right, B, dh, dc, dcl, dcr, X)
            add(1, X, act)
            self._nt(act, W0, X)  # dX = d concat(h_l, h_r), over the gathered X
            K.accumulate_hc(X, dcl, dcr, B, lv.targets, lv.ptr, lv.entries, lv.first_grad,
                            dhs, dcs)
        # Leaves: the gates are recomputed (a GEMM with K = D, a few flops per
        # element) in chunks of the level scratch instead of cached.
        Wl, bl = layers[0]
        xr = ws.xrows
        dx = empty_buffer((T * B, xr.shape[1]), dtype) if need_dx else None
        for t0, t1, A in self._leaf_chunks(ws, T, B, 3 * H):
            r0, r1 = t0 * B, t1 * B
            fused = xr.shape[1] <= FUSED_LEAF_MAX_D
            if not fused:
                self._nn(xr[r0:r1], Wl, A)
            K.lstm_leaf_act(xr[r0:r1], Wl, bl, A, fused)
            K.lstm_leaf_bwd(A, cs[t0:t1].reshape(r1 - r0, H), dhs[t0:t1].reshape(r1 - r0, H),
                            dcs[t0:t1].reshape(r1 - r0, H))
            add(0, xr[r0:r1], A)
            if need_dx:
                self._nt(A, Wl, dx[r0:r1])
        return [g if done else None for g, done in zip(grads, started)], dx

    def _rnn_backward(self, L, H, layers, ws, plan, B, T, need_dx):
        dtype = ws.hs.dtype
        grads = self._grad_buffers(layers, dtype)
        started = [False] * len(layers)

        def add(index, X, dA):
            self._tn(ws, grads[index], X, dA, started[index])
            started[index] = True

        hs, dhs = ws.hs, ws.dhs
        W0 = layers[1][0]
        for lv in reversed(plan.levels):
            R, m0 = lv.width * B, lv.merge0 * B
            m1 = m0 + R
            dh = dhs[lv.first:lv.stop].reshape(R, H)
            top = hs[lv.first:lv.stop].reshape(R, H)
            for k in range(L - 1, 0, -1):
                h_k = top if k == L - 1 else ws.h_mid[k, m0:m1]
                K.relu_mask(dh, h_k)
                add(k + 1, ws.h_mid[k - 1, m0:m1], dh)
                dh_prev = ws.arrays[f"dh{(L - 1 - k) % 2}"][:R]
                self._nt(dh, layers[k + 1][0], dh_prev)
                dh = dh_prev
            h0 = top if L == 1 else ws.h_mid[0, m0:m1]
            X = ws.X[:R]
            K.relu_mask(dh, h0)
            K.gather_pair(hs, lv.left, lv.right, B, X)
            add(1, X, dh)
            self._nt(dh, W0, X)
            K.accumulate_h(X, B, lv.targets, lv.ptr, lv.entries, lv.first_grad, dhs)
        dleaf = dhs[:T].reshape(T * B, H)
        add(0, ws.xrows, dleaf)
        dx = dleaf @ layers[0][0].T if need_dx else None
        return [g if done else None for g, done in zip(grads, started)], dx


__all__ = ["NumbaBackend", "FusedTape", "Workspace", "WorkspaceCache", "GEMM_PATHS"]

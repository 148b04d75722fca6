"""The ``numba`` backend: the executor's primitives as fused, parallel Numba
kernels plus BLAS GEMMs (CPU).

The model lives in ``treesched.executor`` (the level loop, the workspaces,
the result pool, the tapes) and ``treesched.lowering`` (the plan); this
module implements only the primitives of :class:`~treesched.executor.Backend`,
with the same semantics as the reference ``NumpyBackend`` and the same
results to float tolerance, in a fraction of its time and memory.  Any cell
described by ``ops.cell.Layer`` s runs here without a change to this file.

Primitives (kernels in ``numba_kernels.py``; R = a level's rows):

* ``gated_forward``: one GEMM ``X @ W`` into ``act``, then ONE fused kernel
  for any gated layer (``num_prev`` = 0, 1 or 2 gated cells): bias, gate
  nonlinearities, the gather of the gated cells from their stores, the cell
  update, ``h``, the scatter of ``(h, c)`` to their stores and of the answers.
  When the input is narrow (at most ``fused_projection_max_inputs``
  columns: the leaf's few features, the layers of a small hidden size) the
  projection runs inside the kernel, row by row: no GEMM and no
  ``(R, blocks * H)`` buffer.  Without ``keep``
  (inference, and the training leaves) the activations stay in a scratch
  row and ``act`` is only read.
* ``gated_backward``: one kernel turns the activations into ``dA`` in place
  and writes the gated cells' gradients; ``gated_cells`` and
  ``hidden_from_cells`` recompute the cells and hidden states between layers
  (bitwise the forward's), which the training pass does not cache.
* ``affine_forward``: the GEMM, then one kernel for bias, relu, scatter and
  answers; ``relu_backward`` a mask kernel.
* ``accumulate_operands``: loops over the level's distinct operand nodes
  with the plan's consumer CSR: no atomics, a fixed summation order.
* ``input_gradient`` / ``weight_gradient``: GEMMs; the weight gradient is
  one GEMM per level over all its rows, the bias sum riding along.

Every kernel is deterministic and, like the GEMMs' row blocking
(``GEMM_MIN_BLOCK_WORK``), independent of the thread count: the backend is
bitwise reproducible.

GEMMs, two paths.  The BLAS libraries are limited to one thread while a
pass runs (:meth:`launch` wraps each pass in :class:`BlasThreads`,
threadpoolctl): left to its own threads, a BLAS library's idle workers spin
after each call and take the cores the next gate kernel needs.
*Numba-threaded*: the GEMMs run on Numba's own threads, one single-threaded
BLAS call per row block (``numba_kernels.gemm_rows`` / ``gemm_tn_acc``), and the weight
gradient's K axis is split into a fixed number of blocks (``gemm_tn_acc``).
*NumPy*: ``np.matmul`` (one BLAS thread), the bias gradient a column sum.
``NumbaBackend(gemm="auto")`` (the default) takes the Numba-threaded path in
float32 where threadpoolctl and scipy are installed and NumPy's otherwise
(always in float64, the gradient-checking precision); ``gemm="numba"`` or
``"numpy"`` forces one path in every dtype (the tests run both).

Memory: every buffer comes from the executor's workspace (allocated once
per shape and reused); the few this backend needs beyond the layout (the
weight-gradient partials) are its scratch (``Backend.scratch``).  Every
allocation goes through :func:`empty_buffer`.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np

from treesched.errors import TreeschedError
from treesched.executor import Backend

# Numba's default threading layer here is OpenMP (libgomp), whose idle
# workers spin after every parallel region.  This backend alternates short
# Numba kernels with BLAS calls many times per level, and on a small or
# shared machine the spinning workers steal the cores the BLAS threads (and
# the next kernel) need.  Passive waiting costs a futex wake per region.
# libgomp reads this once, when Numba first loads it, so it must be set
# before the first parallel kernel runs; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # numba is optional at import time: why_unavailable() reports it
    import numba
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    _NUMBA_ERROR = _error
    kernels = None
else:
    _NUMBA_ERROR = None
    from . import numba_kernels as kernels

# NumbaBackend(gemm=...): which GEMM path runs (see the module doc)
GEMM_PATHS = ("auto", "numba", "numpy")

# A gated layer whose input has at most this many columns computes its
# projection inside its kernel (columns multiply-adds per element; no GEMM
# and no pre-activation buffer); wider inputs go through BLAS.
FUSED_PROJECTION_MAX_INPUTS = 16

# Forward and input-gradient GEMMs on the Numba path: rows are split into
# one block per thread, but never into blocks smaller than this many
# multiply-adds.  BLAS libraries pick their kernel by problem size (OpenBLAS
# takes small-matrix kernels below about 10^6 multiply-adds) and a row's
# bits depend on the kernel, so blocks that small would make the result
# depend on the thread count; above it a row's result does not depend on
# the blocking.
GEMM_MIN_BLOCK_WORK = 1 << 21

GEMM_MIN_BLOCK_ROWS = 64

# Weight-gradient GEMMs on the Numba path: the row (K) axis is cut into
# blocks, one per this many rows, at least 2 from 512 rows on, at most ...
WEIGHT_GRADIENT_BLOCK_ROWS = 8192
WEIGHT_GRADIENT_MAX_BLOCKS = 8


def weight_gradient_blocks(rows: int) -> int:
    """Row blocks of a weight-gradient GEMM: a function of R only, never of the
    thread count, so results do not depend on it either."""
    if rows < 512:
        return 1
    return max(2, min(WEIGHT_GRADIENT_MAX_BLOCKS, rows // WEIGHT_GRADIENT_BLOCK_ROWS))


class BlasThreads:
    """Limit every loaded BLAS library to one thread while a pass runs.

    The GEMMs run as single-threaded BLAS calls on Numba's threads
    (``numba_kernels.gemm_rows`` / ``gemm_tn_acc``).  Re-entrant and shared by threads: the first
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


_warned_about_gemms = False


def _warn_slower_gemms() -> None:
    """Say once per process that float32 GEMMs take the slower path, and why."""
    global _warned_about_gemms
    if not _warned_about_gemms:
        _warned_about_gemms = True
        warnings.warn("treesched numba backend: scipy or threadpoolctl is not importable, so "
                      "float32 GEMMs run on NumPy's multi-threaded BLAS, whose threads compete "
                      "with the Numba kernels for the cores (slower); pip install scipy "
                      "threadpoolctl", RuntimeWarning, stacklevel=3)


def empty_buffer(shape, dtype) -> np.ndarray:
    """Every buffer this backend allocates (workspaces, results, gradients,
    scratch) comes from here: uninitialised memory, which every kernel
    writes before it reads.  The tests replace this function with one that
    fills buffers with a poison pattern, so that a read before a write fails
    deterministically instead of depending on what the allocator recycled."""
    return np.empty(shape, dtype)


class _Absent:
    """Placeholders passed for an absent optional argument (with its flag
    False): the kernels then keep one type signature per dtype."""

    def __init__(self, dtype):
        self.no_rows = empty_buffer((0, 0), dtype)
        self.no_store = empty_buffer((0, 0, 0), dtype)
        self.no_index = empty_buffer((0,), np.int64)


class NumbaBackend(Backend):
    """CPU backend: the executor's primitives as Numba kernels + BLAS (module doc)."""

    name = "numba"
    xp = np
    #: gated layers with at most this many input columns project inside their
    #: kernel (0: every layer through the GEMM path)
    fused_projection_max_inputs = FUSED_PROJECTION_MAX_INPUTS

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
        super().__init__(max_workspaces, max_workspace_bytes)
        self.blas_threads = BlasThreads()
        if gemm == "numba" and not self.blas_threads.available:
            raise TreeschedError("gemm='numba' needs scipy (the BLAS Numba's np.dot calls) and "
                                 "threadpoolctl; pip install scipy threadpoolctl")
        self.gemm = gemm
        self._absent = {}
        if gemm == "auto" and not self.blas_threads.available:
            _warn_slower_gemms()

    @classmethod
    def parity_variants(cls) -> list:
        """``[(label, backend)]``: the code paths ``treesched parity`` checks,
        each GEMM path this machine can run (the default takes one of them
        per dtype)."""
        paths = ("numba", "numpy") if BlasThreads().available else ("numpy",)
        return [(f"{path}-gemm", cls(gemm=path)) for path in paths]

    # ------------------------------------------------------------ helpers
    def _placeholders(self, dtype) -> _Absent:
        dtype = np.dtype(dtype)
        absent = self._absent.get(dtype)
        if absent is None:
            absent = self._absent[dtype] = _Absent(dtype)
        return absent

    def _numba_gemm(self, dtype) -> bool:
        """Whether this dtype's GEMMs run on Numba's threads.  By default only
        float32's: float64 (the gradient-checking precision) takes NumPy's
        matmul and compiles no GEMM kernels unless ``gemm="numba"`` asks."""
        if self.gemm != "auto":
            return self.gemm == "numba"
        return self.blas_threads.available and dtype == np.float32

    @staticmethod
    def _row_blocks(rows: int, inner: int, columns: int) -> int:
        """Row blocks of a forward or input-gradient GEMM ``(rows, inner) @
        (inner, columns)``: one per thread, none below ``GEMM_MIN_BLOCK_WORK``
        (see there: the result does not depend on the thread count)."""
        return max(1, min(numba.get_num_threads(), rows // GEMM_MIN_BLOCK_ROWS,
                          rows * inner * columns // GEMM_MIN_BLOCK_WORK))

    def _project(self, X, weight, out):
        """``out = X @ weight``."""
        if self._numba_gemm(X.dtype):
            kernels.gemm_rows(X, weight, out, self._row_blocks(*X.shape, weight.shape[1]), False)
        else:
            np.matmul(X, weight, out=out)

    def _cell_sources(self, cells, absent):
        """``(first store, first index, second store, second index)`` of up to two
        gated cells, placeholders for the absent ones."""
        if len(cells) > 2:
            raise TreeschedError(f"the numba backend gates at most 2 previous cells, "
                                 f"got {len(cells)}")
        sources = [(store, index) for store, index in cells]
        sources += [(absent.no_store, absent.no_index)] * (2 - len(sources))
        return sources[0][0], sources[0][1], sources[1][0], sources[1][1]

    @staticmethod
    def _updates_in_place(c_out, out_index, cells) -> bool:
        """Whether a row of ``c_out`` may be a row of a gated cell source (the
        contract allows it row for row: a unary layer updating its cell in
        place); the kernel then builds c in a scratch row first.  A store
        that is both, read and written at distinct locations (a merge level's
        operands and results), is not."""
        for store, index in cells:
            if not np.may_share_memory(c_out, store):
                continue
            same_store = (c_out.__array_interface__["data"][0]
                          == store.__array_interface__["data"][0]
                          and c_out.shape == store.shape and len(out_index) == len(index))
            if not same_store or np.any(out_index == index):
                return True
        return False

    # ----------------------------------------------------- memory, staging
    def empty(self, shape, dtype):
        return empty_buffer(tuple(shape), dtype)

    def index(self, table):
        # a writable contiguous copy: the plan's read-only tables would be
        # another Numba type (and another compiled specialization)
        return np.array(table, copy=True, order="C")

    def load_rows(self, x, rows):
        length, batch = x.shape[1], x.shape[0]
        np.copyto(rows.reshape(length, batch, -1), x.transpose(1, 0, 2))

    def stage(self, workspace, name, value):
        return np.ascontiguousarray(value)

    def projects_in_kernel(self, inputs: int) -> bool:
        return inputs <= self.fused_projection_max_inputs

    def host_compute(self):
        """The model's head and loss run with the BLAS libraries on one thread
        too: a multi-threaded BLAS call there would leave its idle workers
        spinning into the next pass's kernels."""
        return self.blas_threads

    def launch(self, workspace, variant, program):
        """Run a pass with the BLAS libraries pinned to one thread (module doc)."""
        with self.blas_threads:
            program()

    # ------------------------------------------------------------ forward
    def gather_pairs(self, store, left, right, out):
        kernels.gather_pairs(store, left, right, store.shape[1], out)

    def gated_forward(self, X, weight, bias, act, batch, cells, h_out, c_out, out_index,
                      answers=None, keep=True):
        absent = self._placeholders(X.dtype)
        project_here = X.shape[1] <= self.fused_projection_max_inputs
        if not project_here:
            self._project(X, weight, act)
        if out_index is None:
            out_index = absent.no_index
        answer_h, answer_c, answer_index = (answers if answers is not None else
                                            (absent.no_store, absent.no_store, absent.no_index))
        kernels.gated_forward(
            X, weight, project_here, act, bias, keep, batch, len(cells),
            *self._cell_sources(cells, absent),
            absent.no_store if h_out is None else h_out,
            absent.no_store if c_out is None else c_out, out_index,
            h_out is not None, c_out is not None,
            c_out is not None and self._updates_in_place(c_out, out_index, cells),
            answer_h, answer_c, answer_index, answers is not None)

    def affine_forward(self, X, weight, bias, out, batch, relu, h_out=None, out_index=None,
                       answers=None):
        absent = self._placeholders(X.dtype)
        self._project(X, weight, out)
        answer_h, answer_index = (answers if answers is not None
                                  else (absent.no_store, absent.no_index))
        kernels.affine_forward(
            out, bias, relu, batch, absent.no_store if h_out is None else h_out,
            absent.no_index if out_index is None else out_index, h_out is not None,
            answer_h, answer_index, answers is not None)

    def copy_answers(self, store, locations, out):
        kernels.copy_answers(store, locations, out)

    def zero(self, array):
        array[...] = 0

    # ----------------------------------------------------------- backward
    def scatter_answers(self, values, locations, store):
        if values is None:
            kernels.zero_locations(store, locations)
        else:
            kernels.scatter_answers(values, locations, store)

    def zero_locations(self, store, locations):
        kernels.zero_locations(store, locations)

    def gated_cells(self, act, batch, cells, c_out):
        absent = self._placeholders(act.dtype)
        kernels.gated_cells(act, batch, len(cells), *self._cell_sources(cells, absent), c_out,
                            any(np.may_share_memory(c_out, store) for store, _ in cells))

    def hidden_from_cells(self, act, c, h_out):
        kernels.hidden_from_cells(act, c, h_out)

    def gated_backward(self, act, c, batch, cells, dh, dc, dcells):
        absent = self._placeholders(act.dtype)
        outputs = list(dcells) + [absent.no_rows] * (2 - len(dcells))
        kernels.gated_backward(
            act, c, batch, len(cells), *self._cell_sources(cells, absent), dh,
            absent.no_rows if dc is None else dc, dc is not None, outputs[0], outputs[1])

    def relu_backward(self, dh, h):
        kernels.relu_mask(dh, h)

    def input_gradient(self, dA, weight, out):
        if self._numba_gemm(dA.dtype):
            kernels.gemm_rows(dA, weight, out, self._row_blocks(*dA.shape, weight.shape[0]), True)
        else:
            np.matmul(dA, weight.T, out=out)

    def weight_gradient(self, X, dA, grad_weight_t, grad_bias, accumulate):
        """``dA^T X`` (one GEMM over all rows of the level) and ``Σ_r dA``.

        The gradient is kept transposed because ``dA^T X`` is the faster BLAS
        call with the long row axis as K (and far faster than ``X^T dA`` for
        the leaf, whose ``X`` is (R, D) with D tiny).
        """
        dtype = dA.dtype
        if self._numba_gemm(dtype):
            blocks = weight_gradient_blocks(dA.shape[0])
            # gemm_tn_acc writes blocks 0 .. blocks-1 of both before reading them
            partial = self.scratch(f"weight-gradient partials {grad_weight_t.shape}",
                                    (WEIGHT_GRADIENT_MAX_BLOCKS,) + grad_weight_t.shape, dtype)
            column_sums = self.scratch(f"bias-gradient partials {grad_bias.shape}",
                                        (WEIGHT_GRADIENT_MAX_BLOCKS,) + grad_bias.shape, dtype)
            kernels.gemm_tn_acc(dA, X, partial, column_sums, blocks, grad_weight_t, grad_bias,
                                accumulate)
            return
        # The bias gradient is a column sum of dA, rows added in order (NumPy
        # reduces a C-contiguous axis 0 row by row, single-threaded): the same
        # bits at any thread count.
        if not accumulate:
            np.matmul(dA.T, X, out=grad_weight_t)
            np.add.reduce(dA, axis=0, out=grad_bias)
            return
        product = self.scratch(f"weight-gradient product {grad_weight_t.shape}",
                                grad_weight_t.shape, dtype)
        column_sum = self.scratch(f"bias-gradient sum {grad_bias.shape}",
                                   grad_bias.shape, dtype)
        np.matmul(dA.T, X, out=product)
        grad_weight_t += product
        np.add.reduce(dA, axis=0, out=column_sum)
        grad_bias += column_sum

    def accumulate_operands(self, level, d_pair, batch, dh_store, dc_pair=None, dc_store=None):
        absent = self._placeholders(d_pair.dtype)
        dc_left, dc_right = dc_pair if dc_pair is not None else (absent.no_rows, absent.no_rows)
        kernels.accumulate_operands(
            d_pair, batch, level.targets, level.consumer_ptr, level.consumers,
            level.first_gradient, dh_store, dc_store is not None, dc_pair is not None,
            dc_left, dc_right, absent.no_store if dc_store is None else dc_store)


__all__ = [
    "FUSED_PROJECTION_MAX_INPUTS",
    "GEMM_PATHS",
    "BlasThreads",
    "NumbaBackend",
    "empty_buffer",
    "weight_gradient_blocks",
]

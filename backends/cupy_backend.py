"""The CuPy backend: the executor's primitives as CUDA kernels and cuBLAS GEMMs.

This file holds allocation, compilation and launches only.  The level loops
are the executor's (``treesched.executor``), the layer math is the kernels'
(``backends/cuda/*.cu``, transcribed from ``ops.gated`` / ``ops.affine``):
each primitive is one kernel launch, one cuBLAS GEMM, or a GEMM and the
kernel that finishes it:

* ``gather_pairs`` -> ``ts_gather_pairs``; ``gated_forward`` -> GEMM into the
  activations, ``ts_gated_forward``; ``affine_forward`` -> GEMM,
  ``ts_affine_forward``; ``copy_answers`` -> ``ts_copy_answers``;
* ``scatter_answers`` -> ``ts_scatter_answers``; ``zero`` /
  ``zero_locations`` -> ``ts_zero_locations``; ``gated_cells``,
  ``hidden_from_cells``, ``gated_backward``, ``relu_backward``,
  ``accumulate_operands`` -> the kernel of the same name;
* ``input_gradient`` -> one GEMM; ``weight_gradient`` -> one GEMM for the
  weight and one for the bias (``ones^T @ dA``), both with beta = 1 when
  accumulating.

Every cell described by ``ops.cell.Layer`` runs: the kernels take the
number of gated cells (0..2) and the relu flag as arguments.

Launches are replayed as CUDA graphs (``captures = True``): everything a
pass reads lives in workspace buffers with fixed addresses (the executor
stages inputs there), so the launch sequence of a pass is captured once
per workspace and variant and replayed.  The first call of a variant runs
eagerly (it loads the kernel module and warms up cuBLAS; a shape used once
never pays for a capture), the second captures, later calls replay.  If
capture fails the backend warns once and launches eagerly from then on;
``use_graphs=False`` or ``TREESCHED_CUDA_GRAPHS=0`` disables graphs.

GEMMs run in float32 (or float64) by default: TF32 is off unless
``allow_tf32=True`` or ``TREESCHED_TF32=1``.  The backend uses its own cuBLAS
handle and compute type, so CuPy's global ``CUPY_TF32`` setting (which only
affects ``cupy.matmul``) neither changes nor is changed by it.

Kernel launches go through a small launcher interface (``kernel(name,
dtype, total, args)`` and ``gemm(a, b, out, trans_a, trans_b, accumulate)``)
and graph capture through ``capture(body)`` / ``launch(graph)``, so the
tests run this very host code on a machine without a GPU: against the real
CUDA C compiled by g++ (``tests/cuda_on_cpu.py``) or against NumPy
transcriptions of the kernels (``tests/cuda_emulation.py``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from treesched.errors import TreeschedError
from treesched.executor import Backend

from . import cuda_source

ENV_TF32 = "TREESCHED_TF32"
ENV_GRAPHS = "TREESCHED_CUDA_GRAPHS"

#: Threads per block of every kernel (all are grid-stride loops).
BLOCK = 256
#: Grid cap, in blocks per multiprocessor.
BLOCKS_PER_SM = 32

CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
_INT32_MAX = 2**31 - 1

i32 = np.int32


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise TreeschedError(f"environment variable {name} must be 0 or 1, got {value!r}")


def gemm_plan(a_shape, b_shape, out_shape, trans_a=False, trans_b=False):
    """cuBLAS arguments for the row-major ``out = op(a) @ op(b)``.

    cuBLAS is column-major, and a row-major ``(r, c)`` matrix is the
    column-major ``(c, r)`` matrix with leading dimension ``c``.  So the
    row-major product is computed as ``out^T = op(b)^T @ op(a)^T``: the first
    cuBLAS operand is ``b``.  Returns ``(transa, transb, m, n, k, lda, ldb,
    ldc)`` for ``gemm(transa, transb, m, n, k, alpha, b, lda, a, ldb, beta,
    out, ldc)``; all three matrices must be C-contiguous.
    """
    (ar, ac), (br, bc) = a_shape, b_shape
    m, k = (ac, ar) if trans_a else (ar, ac)
    kb, n = (bc, br) if trans_b else (br, bc)
    if k != kb or tuple(out_shape) != (m, n):
        raise ValueError(f"gemm shapes do not match: op(a) {m}x{k}, op(b) {kb}x{n}, "
                         f"out {tuple(out_shape)}")
    return (CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
            n, m, k, bc, ac, n)


def check_gemm_operands(a, b, out, trans_a, trans_b):
    """Shapes, dtypes and layout a launcher's gemm accepts (shared checks)."""
    for what, array in (("a", a), ("b", b), ("out", out)):
        if array.ndim != 2 or not array.flags.c_contiguous:
            raise TypeError(f"gemm {what} must be a C-contiguous matrix, got shape {array.shape}")
    if not (a.dtype == b.dtype == out.dtype) or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm needs one float dtype, got {a.dtype}, {b.dtype}, {out.dtype}")
    plan = gemm_plan(a.shape, b.shape, out.shape, trans_a, trans_b)
    if min(plan[2:5]) < 1:
        raise ValueError(f"empty gemm ({a.shape} x {b.shape}); the caller must skip it")
    if max(plan[2:]) > _INT32_MAX:
        raise ValueError("gemm dimension exceeds 32 bits")
    return plan


def address(array) -> int:
    """The address of ``array``'s first element: a CuPy array's device pointer,
    or, for a NumPy array (the CPU runtime the tests run the kernels on), its
    host address."""
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    return array.data.ptr


# ==================================================================== CUDA
class CudaLauncher:
    """Runs the kernels (``cupy.RawModule``) and GEMMs (cuBLAS) on the current stream.

    Args:
      allow_tf32: float32 GEMMs may use TF32 tensor cores
        (``CUBLAS_COMPUTE_32F_FAST_TF32``); otherwise ``CUBLAS_COMPUTE_32F``.
      validate: check every launch's arguments against the kernel signature
        parsed from the source (a few microseconds; graphs replay without it).
      threads_per_block, blocks_per_sm: the launch shape.  Every kernel is a
        grid-stride loop, so any shape is correct; the grid is
        ``min(ceil(total / threads_per_block), blocks_per_sm * SM count)``.
      cupy, cublas: the runtime modules (default: CuPy and its cuBLAS
        binding).  The tests hand in a CPU runtime that runs the same CUDA C
        compiled by g++ (``tests/cuda_on_cpu.py``).
    """

    def __init__(self, allow_tf32: bool = False, validate: bool = True, *,
                 threads_per_block: int = BLOCK, blocks_per_sm: int = BLOCKS_PER_SM,
                 cupy=None, cublas=None):
        if cupy is None:
            import cupy
        if cublas is None:
            try:
                from cupy_backends.cuda.libs import cublas
            except ImportError:  # pragma: no cover - older layouts
                from cupy.cuda import cublas
        for what, value in (("threads_per_block", threads_per_block),
                            ("blocks_per_sm", blocks_per_sm)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeschedError(f"{what} must be a positive integer, got {value!r}")
        self.cp = cupy
        self.cublas = cublas
        self.allow_tf32 = bool(allow_tf32)
        self.validate = validate
        self.threads_per_block = threads_per_block
        self.blocks_per_sm = blocks_per_sm
        self._modules: dict = {}    # (device, dtype name) -> (RawModule, {name: RawKernel})
        self._handles: dict = {}    # device -> cuBLAS handle (ours, not CuPy's)
        self._max_blocks: dict = {}
        runtime = cupy.cuda.runtime
        self._data_type = {np.dtype(np.float32): getattr(runtime, "CUDA_R_32F", 0),
                           np.dtype(np.float64): getattr(runtime, "CUDA_R_64F", 1)}
        # host scalars for alpha / beta (host pointer mode); kept alive here
        self._one = {np.dtype(np.float32): np.ones((), np.float32),
                     np.dtype(np.float64): np.ones((), np.float64)}
        self._zero = {np.dtype(np.float32): np.zeros((), np.float32),
                      np.dtype(np.float64): np.zeros((), np.float64)}

    # ------------------------------------------------------------ setup
    def _device(self) -> int:
        return self.cp.cuda.runtime.getDevice()

    def _functions(self, dtype) -> dict:
        key = (self._device(), np.dtype(dtype).name)
        hit = self._modules.get(key)
        if hit is None:
            module = self.cp.RawModule(code=cuda_source.module_source(),
                                       options=cuda_source.nvrtc_options(dtype))
            functions = {name: module.get_function(name) for name in cuda_source.kernel_names()}
            hit = self._modules[key] = (module, functions)
        return hit[1]

    def _handle(self) -> int:
        device = self._device()
        handle = self._handles.get(device)
        if handle is None:
            handle = self.cublas.create()
            self.cublas.setMathMode(handle, 0)  # CUBLAS_DEFAULT_MATH: TF32 only via compute type
            self._handles[device] = handle
            props = self.cp.cuda.runtime.getDeviceProperties(device)
            self._max_blocks[device] = self.blocks_per_sm * int(props.get("multiProcessorCount", 132))
        return handle

    def prepare(self, dtype) -> None:
        """Compile/load the kernels and create the cuBLAS handle (before any capture)."""
        self._functions(dtype)
        self._handle()

    def close(self) -> None:
        for handle in self._handles.values():
            try:
                self.cublas.destroy(handle)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._handles.clear()

    def is_array(self, value) -> bool:
        return isinstance(value, self.cp.ndarray)

    # ------------------------------------------------------------ launches
    def kernel(self, name: str, dtype, total: int, args: tuple) -> None:
        """Launch kernel ``name`` (the ``dtype`` instantiation) over ``total`` elements."""
        if total <= 0:
            return
        if self.validate:
            cuda_source.check_arguments(name, args, dtype, self.is_array)
        function = self._functions(dtype)[name]
        self._handle()
        block = self.threads_per_block
        grid = min((int(total) + block - 1) // block, self._max_blocks[self._device()])
        function((grid,), (block,), cuda_source.launch_arguments(args))

    def gemm(self, a, b, out, trans_a: bool = False, trans_b: bool = False,
             accumulate: bool = False) -> None:
        """``out = op(a) @ op(b)`` (``out += ...`` if ``accumulate``: beta = 1) in
        cuBLAS, on the current stream, no allocation."""
        transa, transb, m, n, k, lda, ldb, ldc = check_gemm_operands(a, b, out, trans_a, trans_b)
        dtype = out.dtype
        handle = self._handle()
        cublas = self.cublas
        cublas.setStream(handle, self.cp.cuda.get_current_stream().ptr)
        if dtype == np.float64:
            compute = cublas.CUBLAS_COMPUTE_64F
        elif self.allow_tf32:
            compute = cublas.CUBLAS_COMPUTE_32F_FAST_TF32
        else:
            compute = cublas.CUBLAS_COMPUTE_32F
        data_type = self._data_type[dtype]
        cublas.gemmEx(handle, transa, transb, m, n, k,
                      self._one[dtype].ctypes.data, address(b), data_type, lda,
                      address(a), data_type, ldb,
                      (self._one if accumulate else self._zero)[dtype].ctypes.data,
                      address(out), data_type, ldc,
                      compute, cublas.CUBLAS_GEMM_DEFAULT)


class CudaGraphs:
    """Capture on a private non-blocking stream; replay on the caller's stream."""

    def __init__(self, *, cupy=None):
        if cupy is None:
            import cupy
        self.cp = cupy
        self._streams: dict = {}

    def capture(self, body):
        device = self.cp.cuda.runtime.getDevice()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = self.cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                body()
            except BaseException:
                try:
                    stream.end_capture()
                except Exception:  # noqa: BLE001 - the capture is already broken
                    pass
                raise
            return stream.end_capture()

    def launch(self, graph) -> None:
        graph.launch(stream=self.cp.cuda.get_current_stream())


# ================================================================== backend
def _i32(value) -> np.int32:
    """A kernel's ``int`` argument; sizes beyond 32 bits are refused, not wrapped."""
    value = int(value)
    if not 0 <= value <= _INT32_MAX:
        raise TreeschedError(f"a size of {value} exceeds the kernels' 32-bit range; "
                             "use a smaller batch or a shorter sequence")
    return i32(value)


def _num_prev(act, hidden: int) -> int:
    """Gated cells of the layer whose activations ``act`` (R, (3 + N) H) are."""
    return act.shape[1] // hidden - 3


class CupyBackend(Backend):
    """GPU backend: CUDA kernels + cuBLAS, launch sequences replayed as CUDA graphs.

    Args:
      allow_tf32: let float32 GEMMs use TF32 tensor cores (faster, about
        1e-3 relative error).  Default: ``TREESCHED_TF32`` (off).
      use_graphs: capture and replay CUDA graphs.  Default:
        ``TREESCHED_CUDA_GRAPHS`` (on).
      max_workspaces, max_workspace_bytes: the workspace cache's bounds (a
        workspace holds the buffers and graphs of one shape).
      xp, launcher, graphs: the array module, kernel launcher and graph
        runtime.  Left out they are CuPy, :class:`CudaLauncher` and
        :class:`CudaGraphs`; the tests pass NumPy and CPU stand-ins.
    """

    name = "cupy"
    captures = True

    def __init__(self, allow_tf32: bool | None = None, use_graphs: bool | None = None,
                 max_workspaces: int = 8, max_workspace_bytes: int = 4 << 30, *, xp=None,
                 launcher=None, graphs=None):
        super().__init__(max_workspaces, max_workspace_bytes)
        self.allow_tf32 = _env_flag(ENV_TF32, False) if allow_tf32 is None else bool(allow_tf32)
        self.use_graphs = _env_flag(ENV_GRAPHS, True) if use_graphs is None else bool(use_graphs)
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.launcher = launcher if launcher is not None else CudaLauncher(self.allow_tf32)
        self.graphs = graphs if graphs is not None else (CudaGraphs() if self.use_graphs else None)
        self.graph_error: str | None = None   # why capture was given up, if it was

    # ----------------------------------------------------------- registry
    @staticmethod
    def why_unavailable() -> str | None:
        try:
            import cupy
        except ImportError:
            return "cupy is not installed (pip install 'treesched[gpu]')"
        except Exception as error:  # noqa: BLE001 - a broken install, say why
            return f"cupy failed to import: {error}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - no driver, no device
            return f"no usable CUDA device: {error}"
        if count < 1:
            return "no CUDA GPU is visible"
        try:
            cupy.cuda.nvrtc.getVersion()
        except Exception as error:  # noqa: BLE001 - the kernels are compiled at run time
            return f"CuPy cannot load NVRTC (needed to compile the kernels): {error}"
        try:
            from cupy_backends.cuda.libs import cublas  # noqa: F401
        except Exception as error:  # noqa: BLE001
            return f"CuPy cannot load cuBLAS: {error}"
        return None

    # ------------------------------------------------------------ public
    def to_numpy(self, array):
        get = getattr(array, "get", None)
        return get() if callable(get) and not isinstance(array, np.ndarray) else np.asarray(array)

    @property
    def graphs_active(self) -> bool:
        return self.use_graphs and self.graphs is not None and self.graph_error is None

    def stats(self) -> dict:
        stats = super().stats()
        workspaces = list(self.workspaces.entries.values())
        stats.update(graphs=sum(len(ws.launch_state.get("graphs", {})) for ws in workspaces),
                     device_plans=len(self._device_plans), allow_tf32=self.allow_tf32,
                     use_graphs=self.use_graphs, graph_error=self.graph_error)
        return stats

    def clear(self) -> None:
        """Free every idle workspace with its graphs (live tapes keep theirs)."""
        super().clear()
        self._device_plans.clear()

    # ----------------------------------------------------- memory, staging
    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype)

    def index(self, table):
        table = np.asarray(table)
        if table.size and (table.min() < -1 or table.max() > _INT32_MAX):
            raise TreeschedError(f"a plan index of {int(table.max())} exceeds the kernels' "
                                 "32-bit range")
        return self.xp.asarray(np.ascontiguousarray(table, dtype=np.int32))

    def check_input(self, x):
        if isinstance(x, np.ndarray) and self.xp is not np:
            return self.xp.asarray(x)   # a host array: upload it
        return super().check_input(x)

    def _device_array(self, value):
        """``value`` on the device (a host array is uploaded; a device array stays)."""
        return value if isinstance(value, self.xp.ndarray) else self.xp.asarray(value)

    def load_rows(self, x, rows):
        length, batch = x.shape[1], x.shape[0]
        rows.reshape(length, batch, -1)[...] = x.transpose(1, 0, 2)

    def stage(self, workspace, name, value):
        buffer = workspace.buffer(name, value.shape, value.dtype)
        buffer[...] = self._device_array(value)
        return buffer

    def launch(self, workspace, variant, program):
        """Replay ``program``'s graph, capture it (second call), or run it eagerly."""
        dtype = workspace["x_rows"].dtype
        if hasattr(self.launcher, "prepare"):
            self.launcher.prepare(dtype)   # compile and create handles outside any capture
        if variant is None:   # a one-off program: run it, never record it
            program()
            return
        state = workspace.launch_state
        graphs = state.setdefault("graphs", {})
        eager_runs = state.setdefault("eager_runs", {})
        graph = graphs.get(variant)
        if graph is not None:
            self.graphs.launch(graph)
            return
        if self.graphs_active and eager_runs.get(variant, 0) >= 1:
            graph = self._capture(program)
            if graph is not None:
                graphs[variant] = graph
                self.graphs.launch(graph)
                return
        program()
        eager_runs[variant] = eager_runs.get(variant, 0) + 1

    def _capture(self, program):
        try:
            return self.graphs.capture(program)
        except Exception as error:  # noqa: BLE001 - any capture failure: go eager
            self.graph_error = f"{type(error).__name__}: {error}"
            warnings.warn(f"treesched cupy backend: CUDA graph capture failed "
                          f"({self.graph_error}); running kernels eagerly from now on",
                          RuntimeWarning, stacklevel=4)
            return None

    # ------------------------------------------------------------ launches
    def _kernel(self, name, like, total, *args):
        self.launcher.kernel(name, like.dtype, int(total), args)

    def _gated_sources(self, cells):
        """(c0_src, c0_idx, c1_src, c1_idx) of up to two (store, index) cell sources."""
        sources = [value for pair in cells for value in pair]
        return tuple(sources + [None] * (4 - len(sources)))

    # ------------------------------------------------------------ forward
    def gather_pairs(self, store, left, right, out):
        width, batch, hidden = len(left), store.shape[1], store.shape[2]
        self._kernel("ts_gather_pairs", out, out.size, store, left, right, out, _i32(width),
                     _i32(batch), _i32(hidden))

    def _answer_args(self, answers, num_states):
        """(answer stores..., answer index, K) as the forward kernels take them."""
        if answers is None:
            return (None,) * num_states + (None, i32(0))
        *stores, index = answers
        return (*stores, index, _i32(stores[0].shape[1]))

    def gated_forward(self, X, weight, bias, act, batch, cells, h_out, c_out, out_index,
                      answers=None, keep=True):
        # ``keep`` needs nothing: the kernel leaves the activations in ``act`` anyway
        hidden = weight.shape[1] // (3 + len(cells))
        self.launcher.gemm(X, weight, act)
        self._kernel("ts_gated_forward", act, act.shape[0] * hidden, act, bias,
                     _i32(act.shape[0]), _i32(batch), _i32(hidden), _i32(len(cells)),
                     *self._gated_sources(cells), h_out, c_out, out_index,
                     *self._answer_args(answers, 2))

    def affine_forward(self, X, weight, bias, out, batch, relu, h_out=None, out_index=None,
                       answers=None):
        self.launcher.gemm(X, weight, out)
        self._kernel("ts_affine_forward", out, out.size, out, bias, _i32(out.shape[0]),
                     _i32(batch), _i32(out.shape[1]), i32(bool(relu)), h_out, out_index,
                     *self._answer_args(answers, 1))

    def copy_answers(self, store, locations, out):
        batch, num_answers, hidden = out.shape
        self._kernel("ts_copy_answers", out, out.size, store, locations, _i32(num_answers),
                     _i32(batch), _i32(hidden), out)

    def zero(self, array):
        self._kernel("ts_zero_locations", array, array.size, array, None, i32(1),
                     np.int64(array.size))

    # ----------------------------------------------------------- backward
    def scatter_answers(self, values, locations, store):
        _, batch, hidden = store.shape
        num_answers = len(locations)
        self._kernel("ts_scatter_answers", store, batch * num_answers * hidden, values,
                     locations, _i32(num_answers), _i32(batch), _i32(hidden), store)

    def zero_locations(self, store, locations):
        size = store[0].size   # elements of one location: batch x hidden
        self._kernel("ts_zero_locations", store, len(locations) * size, store, locations,
                     _i32(len(locations)), np.int64(size))

    def gated_cells(self, act, batch, cells, c_out):
        rows, hidden = c_out.shape
        self._kernel("ts_gated_cells", c_out, c_out.size, act, _i32(rows), _i32(batch),
                     _i32(hidden), _i32(len(cells)), *self._gated_sources(cells), c_out)

    def hidden_from_cells(self, act, c, h_out):
        rows, hidden = c.shape
        self._kernel("ts_hidden_from_cells", h_out, h_out.size, act, c, _i32(rows),
                     _i32(hidden), _i32(_num_prev(act, hidden)), h_out)

    def gated_backward(self, act, c, batch, cells, dh, dc, dcells):
        rows, hidden = c.shape
        if len(dcells) != len(cells):
            raise TreeschedError(f"gated_backward: {len(cells)} gated cells but "
                                 f"{len(dcells)} cell gradients")
        outputs = tuple(dcells) + (None,) * (2 - len(dcells))
        self._kernel("ts_gated_backward", c, c.size, act, c, _i32(rows), _i32(batch),
                     _i32(hidden), _i32(len(cells)), *self._gated_sources(cells), dh, dc,
                     *outputs)

    def relu_backward(self, dh, h):
        rows, hidden = dh.shape
        self._kernel("ts_relu_backward", dh, dh.size, dh, h, _i32(rows), _i32(hidden))

    def input_gradient(self, dA, weight, out):
        self.launcher.gemm(dA, weight, out, trans_b=True)

    def weight_gradient(self, X, dA, grad_weight_t, grad_bias, accumulate):
        rows = dA.shape[0]
        # the bias gradient is ones^T @ dA; the ones are scratch of the
        # workspace, made (and filled) on the pass's first, eager run
        ones = self.scratch(f"ones {rows}", (rows,), dA.dtype, fill=1)
        gemm = self.launcher.gemm
        gemm(dA, X, grad_weight_t, trans_a=True, accumulate=accumulate)
        gemm(ones[:rows].reshape(1, rows), dA, grad_bias.reshape(1, -1), accumulate=accumulate)

    def accumulate_operands(self, level, d_pair, batch, dh_store, dc_pair=None, dc_store=None):
        hidden = dh_store.shape[-1]
        targets = len(level.targets)
        dc_left, dc_right = dc_pair if dc_pair is not None else (None, None)
        self._kernel("ts_accumulate_operands", d_pair, targets * batch * hidden, level.targets,
                     level.consumer_ptr, level.consumers, level.first_gradient, _i32(targets),
                     _i32(batch), _i32(hidden), d_pair, dh_store, dc_left, dc_right, dc_store)


__all__ = ["CupyBackend", "CudaLauncher", "CudaGraphs", "gemm_plan", "check_gemm_operands",
           "address", "ENV_TF32", "ENV_GRAPHS"]

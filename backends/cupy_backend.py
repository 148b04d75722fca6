"""The CuPy backend: the schedule's levels on an NVIDIA GPU.

Per merge level (R = level width x batch rows, node-major storage as in the
NumPy reference, ``row = node * batch + b``):

* forward: one gather kernel builds ``X = [h_left | h_right]`` (R, 2H), cuBLAS
  computes ``X @ merge/w`` into a preallocated buffer, one fused kernel adds
  the bias, applies the gate nonlinearities, updates the cell and scatters
  ``(h, c)`` to the level's node rows (or, for inference, to reusable slots
  and straight into the answer buffer); each unary layer is one more GEMM
  plus one fused kernel (``backends/cuda/forward.cu``);
* backward: levels in reverse.  The top layer's kernel first sums, per node
  and in a fixed order, the operand gradients every consuming merge wrote to
  per-row buffers (a CSR over consumers, built once per schedule) plus the
  caller's gradient, then runs the gate backward; one GEMM per layer gives
  ``dA @ W^T``.  No float atomics anywhere, so gradients are bitwise
  reproducible.  The weight gradients do not feed the recursion, so each is
  ONE GEMM over all levels at the end (``X_all^T @ dA_all``, the bias as
  ``ones^T @ dA_all``) (``backends/cuda/backward.cu``).

The whole level sequence of an inference forward, of a training forward and
of a backward is captured once as a CUDA graph per workspace (schedule,
batch, sizes, dtype, cell) and replayed: launch overhead no longer grows with
the depth.  The first call of each sequence runs eagerly (it warms up cuBLAS
and the kernel modules; one-shot shapes never pay for a capture); the second
captures, later calls replay.  Inputs (x, the parameters, the output
gradients) are copied into the workspace's captured buffers before each
launch.  If capture is unsupported the backend falls back to eager launches
(with a warning); ``use_graphs=False`` or ``TREESCHED_CUDA_GRAPHS=0``
disables graphs.

GEMMs run in float32 (or float64) by default: TF32 is off unless
``allow_tf32=True`` or ``TREESCHED_TF32=1``.  The backend uses its own cuBLAS
handle and compute type, so CuPy's global ``CUPY_TF32`` setting (which only
affects ``cupy.matmul``) neither changes nor is changed by it.

Kernel launches go through a small launcher interface (``kernel(name,
dtype, total, args)`` and ``gemm(a, b, out, trans_a, trans_b)``) and graph
capture through ``capture(body)`` / ``launch(graph)``, so the tests can run
this very host code against NumPy emulations of the kernels on a machine
without a GPU (``tests/test_cupy_backend.py``).

Cells other than the built-in ``lstm`` and ``rnn`` run on the NumPy
reference code over CuPy arrays.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections import OrderedDict

import numpy as np

from treesched.errors import TreeschedError
from treesched.lowering import inference_slots
from treesched.ops import LSTMCell, RNNCell

from . import cuda_source
from .numpy_backend import NumpyBackend
from .numpy_backend import Tape as NumpyTape

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

    def gemm(self, a, b, out, trans_a: bool = False, trans_b: bool = False) -> None:
        """``out = op(a) @ op(b)`` in cuBLAS, on the current stream, no allocation."""
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
                      self._zero[dtype].ctypes.data, address(out), data_type, ldc,
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


# ============================================================ host-side state
class _ScheduleIndex:
    """A schedule's index arrays on the device, uploaded once per schedule."""

    def __init__(self, schedule, xp):
        self.schedule = schedule  # keeps id(schedule) valid while cached
        length, nodes = schedule.length, schedule.num_nodes
        merges = nodes - length
        left = np.asarray(schedule.left[length:], np.int64)
        right = np.asarray(schedule.right[length:], np.int64)
        self.levels = tuple((int(schedule.level_offsets[i]), int(schedule.level_offsets[i + 1]))
                            for i in range(1, schedule.depth + 1))
        self.widest = max((stop - first for first, stop in self.levels), default=0)
        self.num_answers = len(schedule.output_nodes)
        # consumers of every node: operand slots s = 2 * merge + side, grouped
        # by node, ascending within a node (the fixed summation order)
        operand_node = np.empty(2 * merges, np.int64)
        operand_node[0::2] = left
        operand_node[1::2] = right
        order = np.argsort(operand_node, kind="stable")
        counts = np.bincount(operand_node, minlength=nodes)
        csr_ptr = np.zeros(nodes + 1, np.int64)
        np.cumsum(counts, out=csr_ptr[1:])
        ext = np.full(nodes, -1, np.int64)
        ext[np.asarray(schedule.output_nodes)] = np.arange(self.num_answers)
        self.host = {"left": left, "right": right, "csr_ptr": csr_ptr, "csr_slot": order,
                     "ext": ext, "output_nodes": np.asarray(schedule.output_nodes)}
        self.xp = xp
        up = lambda a: xp.asarray(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
        self.left, self.right = up(left), up(right)
        self.csr_ptr, self.csr_slot = up(csr_ptr), up(order)
        self.ext = up(ext)
        self.output_nodes = up(self.host["output_nodes"])
        self._slots = None

    @property
    def slots(self):
        """Inference plan: (slot per node, left / right operand slots, number of slots)."""
        if self._slots is None:
            plan = inference_slots(self.schedule)
            slot = np.asarray(plan.slot, np.int64)
            up = lambda a: self.xp.asarray(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
            self._slots = (up(slot), up(slot[self.host["left"]]), up(slot[self.host["right"]]),
                           int(plan.num_slots))
        return self._slots


class _Workspace:
    """Every buffer one (mode, schedule, batch, sizes, dtype, cell) needs, and its graphs."""

    def __init__(self, backend, mode, cell_name, num_layers, index, batch, inputs, hidden,
                 dtype, param_shapes):
        xp = backend.xp
        self.mode, self.cell, self.num_layers = mode, cell_name, num_layers
        self.index, self.batch, self.inputs, self.hidden = index, batch, inputs, hidden
        self.dtype = np.dtype(dtype)
        self.length = index.schedule.length
        self.merges = index.schedule.num_merges
        self.graphs: dict = {}
        self.eager_runs: dict = {}
        self.generation = 0
        self.tape_ref = None
        self.nbytes = 0
        self._xp = xp

        B, H, T, M, L = batch, hidden, self.length, self.merges, num_layers
        TB, MB = T * B, M * B
        lstm = cell_name == "lstm"
        for count in (TB, MB, index.schedule.num_nodes * B, (max(M, T)) * B * 5 * H):
            if count > 2**62:
                raise TreeschedError("schedule x batch x hidden is too large")
        if max(TB, MB, index.schedule.num_nodes * B) > _INT32_MAX:
            raise TreeschedError(
                f"batch {B} x {index.schedule.num_nodes} nodes exceeds 2**31 rows; "
                "use a smaller batch")
        alloc = self._alloc
        self.params = {name: alloc(shape) for name, shape in param_shapes.items()}
        self.x_rows = alloc((TB, inputs))
        gates = 3 if lstm else 1

        if mode == "train":
            self.h = alloc((index.schedule.num_nodes * B, H))
            self.c = alloc((index.schedule.num_nodes * B, H)) if lstm else None
            self.leaf_act = alloc((TB, 3 * H)) if lstm else None
            width = (5 if lstm else 1) * H
            unary_width = (4 if lstm else 1) * H
            # X[k]: input of layer k over all merges; act[k] (lstm): its
            # activations / dA; C[k] (lstm, k >= 1): the c that layer k gates.
            # rnn: A[k] (k < L - 1): layer k's output (= X[k + 1]); the last
            # layer writes the node rows directly; dA[k]: its gradient.
            self.X = [alloc((MB, 2 * H))]
            if lstm:
                self.act = [alloc((MB, width))] + [alloc((MB, unary_width)) for _ in range(1, L)]
                self.X += [alloc((MB, H)) for _ in range(1, L)]
                self.C = [None] + [alloc((MB, H)) for _ in range(1, L)]
            else:
                self.A = [alloc((MB, H)) for _ in range(L - 1)]
                self.dA = [alloc((MB, H)) for _ in range(L)]
                self.dA_leaf = alloc((TB, H))
            rows = index.widest * B
            self.dh_lvl = alloc((rows, H)) if L > 1 else None
            self.dc_lvl = alloc((rows, H)) if lstm and L > 1 else None
            self.dop_h = alloc((MB, 2 * H))
            self.dop_c = alloc((MB, 2 * H)) if lstm else None
            self.dext = [alloc((B, index.num_answers, H)) for _ in range(2 if lstm else 1)]
            self.ones = alloc((max(TB, MB),))
            self.ones.fill(1)
            self.grads = {name: alloc(shape) for name, shape in param_shapes.items()}
            self.dx_rows = None  # allocated on the first need_dx backward
        else:
            slot, _, _, num_slots = index.slots
            rows = index.widest * B
            self.hs = alloc((num_slots * B, H))
            self.cs = alloc((num_slots * B, H)) if lstm else None
            self.leaf_act = alloc((TB, gates * H))
            self.X0 = alloc((rows, 2 * H))
            if lstm:
                self.A0 = alloc((rows, 5 * H))
                self.Xu = alloc((rows, H)) if L > 1 else None
                self.Cu = alloc((rows, H)) if L > 1 else None
                self.Au = alloc((rows, 4 * H)) if L > 1 else None
            else:
                self.Ab = [alloc((rows, H)), alloc((rows, H)) if L > 1 else None]
            self.ans = [alloc((B, index.num_answers, H)) for _ in range(2 if lstm else 1)]

    def _alloc(self, shape):
        array = self._xp.zeros(shape, dtype=self.dtype)
        self.nbytes += array.nbytes
        return array

    def busy(self) -> bool:
        return self.tape_ref is not None and self.tape_ref() is not None


class CupyTape:
    """What ``encode_backward`` needs from one training forward: its workspace."""

    def __init__(self, workspace: _Workspace, schedule):
        workspace.generation += 1
        self.workspace = workspace
        self.generation = workspace.generation
        self.schedule = schedule
        self.batch = workspace.batch
        workspace.tape_ref = weakref.ref(self)


# ================================================================== backend
class CupyBackend:
    """GPU backend: CuPy RawKernels + cuBLAS, replayed as CUDA graphs.

    Args:
      allow_tf32: let float32 GEMMs use TF32 tensor cores (faster, about
        1e-3 relative error).  Default: ``TREESCHED_TF32`` (off).
      use_graphs: capture and replay CUDA graphs.  Default:
        ``TREESCHED_CUDA_GRAPHS`` (on).
      max_workspaces: how many workspaces (buffers + graphs for one schedule,
        batch, sizes, dtype and cell) to keep; the least recently used idle
        one is freed beyond that.
      xp, launcher, graphs: the array module, kernel launcher and graph
        runtime.  Left out they are CuPy, :class:`CudaLauncher` and
        :class:`CudaGraphs`; the tests pass NumPy and emulations.
    """

    name = "cupy"

    def __init__(self, allow_tf32: bool | None = None, use_graphs: bool | None = None,
                 max_workspaces: int = 8, *, xp=None, launcher=None, graphs=None):
        self.allow_tf32 = _env_flag(ENV_TF32, False) if allow_tf32 is None else bool(allow_tf32)
        self.use_graphs = _env_flag(ENV_GRAPHS, True) if use_graphs is None else bool(use_graphs)
        if isinstance(max_workspaces, bool) or not isinstance(max_workspaces, int) \
                or max_workspaces < 1:
            raise TreeschedError(f"max_workspaces must be a positive integer, got {max_workspaces!r}")
        self.max_workspaces = max_workspaces
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.launcher = launcher if launcher is not None else CudaLauncher(self.allow_tf32)
        self.graphs = graphs if graphs is not None else (CudaGraphs() if self.use_graphs else None)
        self.graph_error: str | None = None   # why capture was given up, if it was
        self._indices: OrderedDict = OrderedDict()
        self._pools: OrderedDict = OrderedDict()
        self._fallback = NumpyBackend(xp)

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

    # ------------------------------------------------------------ helpers
    def asarray(self, array, dtype=None):
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array):
        get = getattr(array, "get", None)
        return get() if callable(get) and not isinstance(array, np.ndarray) else np.asarray(array)

    @property
    def graphs_active(self) -> bool:
        return self.use_graphs and self.graphs is not None and self.graph_error is None

    def stats(self) -> dict:
        workspaces = [ws for pool in self._pools.values() for ws in pool]
        return {"workspaces": len(workspaces),
                "workspace_bytes": int(sum(ws.nbytes for ws in workspaces)),
                "graphs": int(sum(len(ws.graphs) for ws in workspaces)),
                "schedules": len(self._indices),
                "allow_tf32": self.allow_tf32, "use_graphs": self.use_graphs,
                "graph_error": self.graph_error}

    def clear(self) -> None:
        """Free every workspace and graph (live tapes keep theirs)."""
        self._pools.clear()
        self._indices.clear()

    def _device(self) -> int:
        runtime = getattr(getattr(self.xp, "cuda", None), "runtime", None)
        return runtime.getDevice() if runtime is not None else 0

    def _index(self, schedule) -> _ScheduleIndex:
        key = (id(schedule), self._device())
        hit = self._indices.get(key)
        if hit is None or hit.schedule is not schedule:
            hit = _ScheduleIndex(schedule, self.xp)
            self._indices[key] = hit
            while len(self._indices) > 256:
                self._indices.popitem(last=False)
        self._indices.move_to_end(key)
        return hit

    def _workspace(self, mode, cell, schedule, batch, inputs, hidden, dtype, param_shapes):
        key = (mode, id(schedule), batch, inputs, hidden, np.dtype(dtype).name, cell.name,
               cell.num_layers, self._device())
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            for ws in pool:
                if ws.index.schedule is schedule and not ws.busy():
                    return ws
        ws = _Workspace(self, mode, cell.name, cell.num_layers, self._index(schedule), batch,
                        inputs, hidden, dtype, param_shapes)
        self._pools.setdefault(key, []).append(ws)
        self._pools.move_to_end(key)
        self._evict(keep=ws)
        return ws

    def _evict(self, keep) -> None:
        total = sum(len(pool) for pool in self._pools.values())
        for key in list(self._pools):
            if total <= self.max_workspaces:
                break
            pool = self._pools[key]
            for ws in list(pool):
                if total <= self.max_workspaces:
                    break
                if ws is not keep and not ws.busy():
                    pool.remove(ws)
                    total -= 1
            if not pool:
                del self._pools[key]

    def _execute(self, ws: _Workspace, variant, program) -> None:
        """Run ``program`` (launcher calls only): replay its graph, capture it, or run it."""
        graph = ws.graphs.get(variant)
        if graph is not None:
            self.graphs.launch(graph)
            return
        if self.graphs_active and ws.eager_runs.get(variant, 0) >= 1:
            try:
                graph = self.graphs.capture(program)
            except Exception as error:  # noqa: BLE001 - any capture failure: go eager
                self.graph_error = f"{type(error).__name__}: {error}"
                warnings.warn(f"treesched cupy backend: CUDA graph capture failed "
                              f"({self.graph_error}); running kernels eagerly from now on",
                              RuntimeWarning, stacklevel=3)
            else:
                ws.graphs[variant] = graph
                self.graphs.launch(graph)
                return
        program()
        ws.eager_runs[variant] = ws.eager_runs.get(variant, 0) + 1

    # -------------------------------------------------------- validation
    def _check(self, cell, params, x, schedule):
        """Validate x against the schedule and the parameters -> sizes and shapes."""
        xp = self.xp
        if isinstance(x, np.ndarray):
            x = xp.asarray(x)  # a host array: upload (the model API passes device arrays)
        if not isinstance(x, xp.ndarray) or x.ndim != 3:
            raise TreeschedError(f"x must be a 3-D {xp.__name__} array (batch, length, features), "
                                 f"got {type(x).__name__} {getattr(x, 'shape', '')}")
        if x.dtype not in (np.float32, np.float64):
            raise TreeschedError(f"x must be float32 or float64, got {x.dtype}")
        batch, length, inputs = x.shape
        if length != schedule.length:
            raise TreeschedError(f"x has length {length} but the schedule is for {schedule.length}")
        if batch < 1 or inputs < 1:
            raise TreeschedError(f"x must hold at least one sequence and one feature, got {x.shape}")
        hidden, shapes = self._check_params(cell, params, inputs, x.dtype)
        return x, batch, inputs, hidden, x.dtype, shapes

    @staticmethod
    def _check_params(cell, params, inputs, dtype):
        """Every parameter of ``cell`` present with its SPEC shape and ``dtype``."""
        leaf = params.get("leaf/w")
        blocks = 3 if cell.name == "lstm" else 1
        if leaf is None or len(leaf.shape) != 2 or leaf.shape[1] % blocks or leaf.shape[1] == 0:
            raise TreeschedError(f"parameter 'leaf/w' must have shape ({inputs}, {blocks}*H), "
                                 f"got {getattr(leaf, 'shape', None)}")
        hidden = leaf.shape[1] // blocks
        shapes = cell.param_shapes(inputs, hidden)
        for name, shape in shapes.items():
            value = params.get(name)
            if value is None:
                raise TreeschedError(f"missing parameter {name!r} (expected shape {shape})")
            if tuple(value.shape) != tuple(shape):
                raise TreeschedError(f"parameter {name!r} has shape {tuple(value.shape)}, "
                                     f"expected {shape}")
            if value.dtype != dtype:
                raise TreeschedError(
                    f"parameter {name!r} has dtype {value.dtype} but the input is {dtype}; "
                    "treesched never mixes precisions silently, cast the parameters or the input")
        extra = f"unary_{cell.num_layers}/w"
        if extra in params:
            raise TreeschedError(f"params contain {extra!r} but this {cell.name} cell has "
                                 f"num_layers={cell.num_layers}")
        return hidden, shapes

    @staticmethod
    def _native(cell) -> bool:
        return type(cell) in (LSTMCell, RNNCell)

    def _stage(self, ws, params, x):
        """Copy this call's inputs into the workspace's (captured) buffers."""
        for name, buffer in ws.params.items():
            buffer[...] = params[name]
        T, B = ws.length, ws.batch
        ws.x_rows.reshape(T, B, ws.inputs)[...] = x.transpose(1, 0, 2)

    # ------------------------------------------------------------ forward
    def encode(self, cell, params, x, schedule, need_grad: bool):
        """Same contract as :meth:`NumpyBackend.encode` (states (B, K, H) each)."""
        if not self._native(cell):
            return self._fallback.encode(cell, params, x, schedule, need_grad)
        x, batch, inputs, hidden, dtype, shapes = self._check(cell, params, x, schedule)
        if hasattr(self.launcher, "prepare"):
            self.launcher.prepare(dtype)
        mode = "train" if need_grad else "infer"
        ws = self._workspace(mode, cell, schedule, batch, inputs, hidden, dtype, shapes)
        self._stage(ws, params, x)
        lstm = cell.name == "lstm"
        if need_grad:
            program = self._lstm_train_forward if lstm else self._rnn_train_forward
            self._execute(ws, "forward", lambda: program(ws))
            tape = CupyTape(ws, schedule)
            stores = (ws.h, ws.c) if lstm else (ws.h,)
            states = []
            K = ws.index.num_answers
            for store in stores:
                out = self.xp.empty((batch, K, hidden), dtype=dtype)
                self.launcher.kernel("ts_gather_answers", dtype, batch * K * hidden,
                                     (store, ws.index.output_nodes, i32(K), i32(batch),
                                      i32(hidden), out))
                states.append(out)
            return tuple(states), tape
        program = self._lstm_infer_forward if lstm else self._rnn_infer_forward
        self._execute(ws, "forward", lambda: program(ws))
        return tuple(answer.copy() for answer in ws.ans), None

    # -- programs: launcher calls only (they are what a graph captures) --
    def _lstm_train_forward(self, ws):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        TB = T * B
        gemm(ws.x_rows, p["leaf/w"], ws.leaf_act)
        kernel("ts_lstm_gates_fwd", dt, TB * H,
               (ws.leaf_act, p["leaf/b"], i32(TB), i32(B), i32(H), i32(0),
                None, None, None, None, ws.h[:TB], ws.c[:TB], None, None, None, None, i32(0)))
        for first, stop in idx.levels:
            width, R = stop - first, (stop - first) * B
            rows = slice((first - T) * B, (stop - T) * B)
            nodes = slice(first * B, stop * B)
            left, right = idx.left[first - T:stop - T], idx.right[first - T:stop - T]
            kernel("ts_gather_pairs", dt, R * 2 * H,
                   (ws.h, left, right, ws.X[0][rows], i32(width), i32(B), i32(H)))
            for k in range(L):
                W, b = _layer_params(k)
                act = ws.act[k][rows]
                gemm(ws.X[k][rows], p[W], act)
                last = k == L - 1
                h_out = ws.h[nodes] if last else ws.X[k + 1][rows]
                c_out = ws.c[nodes] if last else ws.C[k + 1][rows]
                cells = (ws.c, left, ws.c, right) if k == 0 else (ws.C[k][rows], None, None, None)
                kernel("ts_lstm_gates_fwd", dt, R * H,
                       (act, p[b], i32(R), i32(B), i32(H), i32(2 if k == 0 else 1), *cells,
                        h_out, c_out, None, None, None, None, i32(0)))

    def _rnn_train_forward(self, ws):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        TB = T * B
        gemm(ws.x_rows, p["leaf/w"], ws.h[:TB])
        kernel("ts_rnn_act_fwd", dt, TB * H,
               (ws.h[:TB], p["leaf/b"], i32(TB), i32(B), i32(H), i32(0),
                None, None, None, None, i32(0)))
        for first, stop in idx.levels:
            width, R = stop - first, (stop - first) * B
            rows = slice((first - T) * B, (stop - T) * B)
            kernel("ts_gather_pairs", dt, R * 2 * H,
                   (ws.h, idx.left[first - T:stop - T], idx.right[first - T:stop - T],
                    ws.X[0][rows], i32(width), i32(B), i32(H)))
            for k in range(L):
                W, b = _layer_params(k)
                source = ws.X[0][rows] if k == 0 else ws.A[k - 1][rows]
                out = ws.h[first * B:stop * B] if k == L - 1 else ws.A[k][rows]
                gemm(source, p[W], out)
                kernel("ts_rnn_act_fwd", dt, R * H,
                       (out, p[b], i32(R), i32(B), i32(H), i32(1), None, None, None, None, i32(0)))

    def _lstm_infer_forward(self, ws):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        slot, left_slot, right_slot, _ = idx.slots
        K, TB = idx.num_answers, T * B
        ans_h, ans_c = ws.ans
        gemm(ws.x_rows, p["leaf/w"], ws.leaf_act)
        kernel("ts_lstm_gates_fwd", dt, TB * H,
               (ws.leaf_act, p["leaf/b"], i32(TB), i32(B), i32(H), i32(0),
                None, None, None, None, ws.hs, ws.cs, slot[:T], ans_h, ans_c, idx.ext[:T], i32(K)))
        for first, stop in idx.levels:
            width, R = stop - first, (stop - first) * B
            merges = slice(first - T, stop - T)
            lslot, rslot = left_slot[merges], right_slot[merges]
            out_slot, answers = slot[first:stop], idx.ext[first:stop]
            kernel("ts_gather_pairs", dt, R * 2 * H,
                   (ws.hs, lslot, rslot, ws.X0[:R], i32(width), i32(B), i32(H)))
            for k in range(L):
                W, b = _layer_params(k)
                last = k == L - 1
                if k == 0:
                    act, source, cells = ws.A0[:R], ws.X0[:R], (ws.cs, lslot, ws.cs, rslot)
                else:
                    act, source, cells = ws.Au[:R], ws.Xu[:R], (ws.Cu[:R], None, None, None)
                gemm(source, p[W], act)
                if last:
                    outputs = (ws.hs, ws.cs, out_slot, ans_h, ans_c, answers, i32(K))
                else:
                    outputs = (ws.Xu[:R], ws.Cu[:R], None, None, None, None, i32(0))
                kernel("ts_lstm_gates_fwd", dt, R * H,
                       (act, p[b], i32(R), i32(B), i32(H), i32(2 if k == 0 else 1), *cells,
                        *outputs))

    def _rnn_infer_forward(self, ws):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        slot, left_slot, right_slot, _ = idx.slots
        K, TB = idx.num_answers, T * B
        (ans_h,) = ws.ans
        gemm(ws.x_rows, p["leaf/w"], ws.leaf_act)
        kernel("ts_rnn_act_fwd", dt, TB * H,
               (ws.leaf_act, p["leaf/b"], i32(TB), i32(B), i32(H), i32(0),
                ws.hs, slot[:T], ans_h, idx.ext[:T], i32(K)))
        for first, stop in idx.levels:
            width, R = stop - first, (stop - first) * B
            merges = slice(first - T, stop - T)
            kernel("ts_gather_pairs", dt, R * 2 * H,
                   (ws.hs, left_slot[merges], right_slot[merges], ws.X0[:R], i32(width), i32(B),
                    i32(H)))
            source = ws.X0[:R]
            for k in range(L):
                W, b = _layer_params(k)
                out = ws.Ab[k % 2][:R]
                gemm(source, p[W], out)
                if k == L - 1:
                    outputs = (ws.hs, slot[first:stop], ans_h, idx.ext[first:stop], i32(K))
                else:
                    outputs = (None, None, None, None, i32(0))
                kernel("ts_rnn_act_fwd", dt, R * H,
                       (out, p[b], i32(R), i32(B), i32(H), i32(1), *outputs))
                source = out

    # ----------------------------------------------------------- backward
    def encode_backward(self, cell, params, tape, dstates, need_dx=False):
        """Same contract as :meth:`NumpyBackend.encode_backward`."""
        if isinstance(tape, NumpyTape):
            return self._fallback.encode_backward(cell, params, tape, dstates, need_dx)
        if not isinstance(tape, CupyTape):
            raise TreeschedError(f"tape must come from this backend's encode(need_grad=True), "
                                 f"got {type(tape).__name__}")
        ws = tape.workspace
        if ws.generation != tape.generation:
            raise TreeschedError("this tape is stale: its buffers were reused by a later forward")
        if cell.name != ws.cell or cell.num_layers != ws.num_layers:
            raise TreeschedError(f"tape was recorded for a {ws.cell} cell with {ws.num_layers} "
                                 f"layers, not {cell!r}")
        states = 2 if ws.cell == "lstm" else 1
        if not isinstance(dstates, (tuple, list)) or len(dstates) != states:
            raise TreeschedError(f"dstates must be a tuple of {states} arrays or None")
        shape = (ws.batch, ws.index.num_answers, ws.hidden)
        for buffer, grad in zip(ws.dext, dstates):
            if grad is None:
                continue
            if tuple(getattr(grad, "shape", ())) != shape or grad.dtype != ws.dtype:
                raise TreeschedError(f"each dstate must have shape {shape} and dtype {ws.dtype}, "
                                     f"got {getattr(grad, 'shape', None)} "
                                     f"{getattr(grad, 'dtype', None)}")
            buffer[...] = grad
        hidden, _ = self._check_params(cell, params, ws.inputs, ws.dtype)
        if hidden != ws.hidden:
            raise TreeschedError(f"params have hidden size {hidden}, the tape {ws.hidden}")
        if hasattr(self.launcher, "prepare"):
            self.launcher.prepare(ws.dtype)
        for name, buffer in ws.params.items():
            buffer[...] = params[name]
        if need_dx and ws.dx_rows is None:
            ws.dx_rows = ws._alloc((ws.length * ws.batch, ws.inputs))
        has = tuple(d is not None for d in dstates)
        program = self._lstm_backward if ws.cell == "lstm" else self._rnn_backward
        self._execute(ws, ("backward", has, bool(need_dx)),
                      lambda: program(ws, has, bool(need_dx)))
        grads = {name: value.copy() for name, value in ws.grads.items()}
        dx = None
        if need_dx:
            # copy(), not ascontiguousarray(): with batch or length 1 the
            # transposed view is already contiguous, and the caller would get
            # the workspace itself, overwritten by the next backward
            dx = ws.dx_rows.reshape(ws.length, ws.batch, ws.inputs).transpose(1, 0, 2).copy()
        return grads, dx

    def _weight_grads(self, ws, inputs, deltas, leaf_input, leaf_delta, need_dx):
        """Every weight gradient as one GEMM over all levels (deterministic)."""
        gemm = self.launcher.gemm
        p, g = ws.params, ws.grads
        MB, TB = ws.merges * ws.batch, ws.length * ws.batch
        if MB:
            for k, (source, delta) in enumerate(zip(inputs, deltas)):
                W, b = _layer_params(k)
                gemm(source, delta, g[W], trans_a=True)
                gemm(ws.ones[:MB].reshape(1, MB), delta, g[b].reshape(1, -1))
        gemm(leaf_input, leaf_delta, g["leaf/w"], trans_a=True)
        gemm(ws.ones[:TB].reshape(1, TB), leaf_delta, g["leaf/b"].reshape(1, -1))
        if need_dx:
            gemm(leaf_delta, p["leaf/w"], ws.dx_rows, trans_b=True)

    def _lstm_backward(self, ws, has, need_dx):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        K, TB = idx.num_answers, T * B
        dext_h = ws.dext[0] if has[0] else None
        dext_c = ws.dext[1] if has[1] else None

        def accumulate(node_base):
            return (None, None, i32(node_base), idx.csr_ptr, idx.csr_slot, ws.dop_h, ws.dop_c,
                    idx.ext, dext_h, dext_c, i32(K))

        for first, stop in reversed(idx.levels):
            R = (stop - first) * B
            rows = slice((first - T) * B, (stop - T) * B)
            left, right = idx.left[first - T:stop - T], idx.right[first - T:stop - T]
            for k in reversed(range(L)):
                W, _ = _layer_params(k)
                act = ws.act[k][rows]
                c_cur = ws.c[first * B:stop * B] if k == L - 1 else ws.C[k + 1][rows]
                if k == 0:
                    cells = (ws.c, left, ws.c, right)
                    dcs = (ws.dop_c[rows], i32(2 * H))
                else:
                    cells = (ws.C[k][rows], None, None, None)
                    dcs = (ws.dc_lvl[:R], i32(H))
                if k == L - 1:
                    source = accumulate(first)
                else:
                    source = (ws.dh_lvl[:R], ws.dc_lvl[:R], i32(0), None, None, None, None,
                              None, None, None, i32(0))
                kernel("ts_lstm_gates_bwd", dt, R * H,
                       (act, c_cur, i32(R), i32(B), i32(H), i32(2 if k == 0 else 1), *cells,
                        *source, *dcs))
                gemm(act, p[W], ws.dop_h[rows] if k == 0 else ws.dh_lvl[:R], trans_b=True)
        kernel("ts_lstm_gates_bwd", dt, TB * H,
               (ws.leaf_act, ws.c[:TB], i32(TB), i32(B), i32(H), i32(0),
                None, None, None, None, *accumulate(0), None, i32(0)))
        self._weight_grads(ws, ws.X, ws.act, ws.x_rows, ws.leaf_act, need_dx)

    def _rnn_backward(self, ws, has, need_dx):
        kernel, gemm, dt = self.launcher.kernel, self.launcher.gemm, ws.dtype
        B, H, T, L = ws.batch, ws.hidden, ws.length, ws.num_layers
        p, idx = ws.params, ws.index
        K, TB = idx.num_answers, T * B
        dext_h = ws.dext[0] if has[0] else None

        def accumulate(node_base):
            return (None, i32(node_base), idx.csr_ptr, idx.csr_slot, ws.dop_h, idx.ext, dext_h,
                    i32(K))

        for first, stop in reversed(idx.levels):
            R = (stop - first) * B
            rows = slice((first - T) * B, (stop - T) * B)
            for k in reversed(range(L)):
                W, _ = _layer_params(k)
                h_cur = ws.h[first * B:stop * B] if k == L - 1 else ws.A[k][rows]
                source = (accumulate(first) if k == L - 1 else
                          (ws.dh_lvl[:R], i32(0), None, None, None, None, None, i32(0)))
                delta = ws.dA[k][rows]
                kernel("ts_rnn_act_bwd", dt, R * H,
                       (delta, h_cur, i32(R), i32(B), i32(H), *source))
                gemm(delta, p[W], ws.dop_h[rows] if k == 0 else ws.dh_lvl[:R], trans_b=True)
        kernel("ts_rnn_act_bwd", dt, TB * H,
               (ws.dA_leaf, None, i32(TB), i32(B), i32(H), *accumulate(0)))
        inputs = [ws.X[0]] + ws.A
        self._weight_grads(ws, inputs, ws.dA, ws.x_rows, ws.dA_leaf, need_dx)


def _layer_params(k: int):
    """(weight, bias) names of merge layer k: the binary merge, then unary_k."""
    return ("merge/w", "merge/b") if k == 0 else (f"unary_{k}/w", f"unary_{k}/b")


__all__ = ["CupyBackend", "CupyTape", "CudaLauncher", "CudaGraphs", "gemm_plan",
           "check_gemm_operands", "ENV_TF32", "ENV_GRAPHS"]

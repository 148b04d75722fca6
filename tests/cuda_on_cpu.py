"""The real CUDA C of ``backends/cuda``, compiled by g++ and run on the CPU.

Without a GPU, the CuPy backend's kernels would otherwise never execute.  This
module runs the very source that ``cupy.RawModule`` compiles
(``cuda_source.module_source()``, unchanged) on the CPU:

* ``cuda_on_cpu.h`` maps the CUDA qualifiers and ``blockIdx`` / ``threadIdx``
  / ``blockDim`` / ``gridDim`` to C++; it is force-included, so the ``.cu``
  text is not edited.
* :func:`kernel_library` compiles that text, once per element type, together
  with one generated launch wrapper per kernel (parsed from the source's own
  parameter lists) that runs every (block, thread) pair of the requested grid
  in turn: one legal schedule of a launch, since the kernels are grid-stride
  loops with no shared memory, synchronisation or atomics.  ``reverse``
  runs the pairs in the opposite order; a race-free kernel gives the same
  bits either way.  Warnings are errors (``-Wall -Wextra -Werror``) and
  floating-point contraction is off, so the arithmetic is what the source
  says, in the source's order.
* :class:`CpuCuda` stands in for the ``cupy`` module and :class:`CpuCublas`
  for its cuBLAS binding, as far as the backend's :class:`CudaLauncher` and
  :class:`CudaGraphs` use them.  The launcher itself is the production code:
  its kernel arguments reach a kernel the way CuPy packs them (an array as
  its 8-byte device pointer, a NumPy scalar by value at its own width), and
  an argument whose width or kind does not match the kernel's parameter is
  refused, as is ``None`` (CuPy hands it to the kernel as 0xffffffff,
  cupy/cupy#9046).  ``gemmEx`` reads column-major operands from the raw
  pointers, with the leading dimensions the launcher computed, and runs the
  product in NumPy.  Streams record work while capturing, and a captured
  graph replays the recorded launches with the pointers and scalars of the
  capture, as a CUDA graph does.

What this cannot show: the GPU's own math library (``tanhf``, FMA
contraction, ``-ftz``), real concurrency, cuBLAS itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from treesched.backends import cuda_source

SHIM = Path(__file__).resolve().parent / "cuda_on_cpu.h"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror")

_C_TYPES = {"float": ctypes.c_float, "double": ctypes.c_double}
_ARG_TYPES = {"real*": ctypes.c_void_p, "int*": ctypes.c_void_p, "int": ctypes.c_int32,
              "index": ctypes.c_int64}
_DECLARED = {"real*": "real*", "int*": "int*", "int": "int", "index": "index_t"}


def why_unavailable() -> str | None:
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX}) to build the CUDA kernels for the CPU"
    return None


def compile_command(source: Path, output: Path, real: str, extra=()) -> list:
    return [CXX, *CXXFLAGS, "-include", str(SHIM), f"-DTS_REAL={real}", *extra,
            str(source), "-o", str(output)]


def syntax_check(path: Path, real: str, include_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Compile one ``.cu`` file as C++ (no output) with warnings as errors."""
    extra = ["-fsyntax-only", "-x", "c++"]
    if include_dir is not None:
        extra += ["-I", str(include_dir)]
    command = [CXX, *CXXFLAGS, "-include", str(SHIM), f"-DTS_REAL={real}", *extra, str(path)]
    return subprocess.run(command, capture_output=True, text=True)


def _launch_wrappers(signatures: dict) -> str:
    """One ``ts_cpu_launch_<kernel>(grid, block, reverse, <kernel params>)`` per kernel."""
    parts = ["// ---- generated launch wrappers (tests/cuda_on_cpu.py)"]
    for name, params in signatures.items():
        declared = ", ".join(("const " if p.const else "") + f"{_DECLARED[p.kind]} {p.name}"
                             for p in params)
        passed = ", ".join(p.name for p in params)
        parts.append(f"""
extern "C" void ts_cpu_launch_{name}(unsigned int grid, unsigned int block, int reverse,
                                     {declared})
{{
    gridDim = {{grid, 1u, 1u}};
    blockDim = {{block, 1u, 1u}};
    const unsigned long long threads = (unsigned long long)grid * block;
    for (unsigned long long n = 0; n < threads; ++n) {{
        const unsigned long long t = reverse ? threads - 1 - n : n;
        blockIdx = {{(unsigned int)(t / block), 0u, 0u}};
        threadIdx = {{(unsigned int)(t % block), 0u, 0u}};
        {name}({passed});
    }}
}}""")
    parts.append("""
// the kernels' own tanh (ts_tanh), for transcriptions that must agree bitwise
extern "C" void ts_cpu_tanh(const real* x, real* y, long long n)
{
    for (long long i = 0; i < n; ++i) y[i] = ts_tanh(x[i]);
}
""")
    return "\n".join(parts)


class KernelLibrary:
    """One element type's kernels, compiled for the CPU and loaded with ctypes."""

    def __init__(self, path: Path, real: str, signatures: dict):
        self.path, self.real, self.signatures = path, real, signatures
        self.dtype = np.dtype(np.float32 if real == "float" else np.float64)
        self._dll = ctypes.CDLL(str(path))
        self._functions = {}
        for name, params in signatures.items():
            function = getattr(self._dll, f"ts_cpu_launch_{name}")
            function.restype = None
            function.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int,
                                 *(_ARG_TYPES[p.kind] for p in params)]
            self._functions[name] = function
        self._tanh = self._dll.ts_cpu_tanh
        self._tanh.restype = None
        self._tanh.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]

    def launch(self, name: str, grid: int, block: int, values: tuple, reverse: bool = False):
        """Run kernel ``name`` over ``grid`` x ``block`` threads with C values."""
        self._functions[name](grid, block, int(reverse), *values)

    def tanh(self, x: np.ndarray) -> np.ndarray:
        """``ts_tanh`` of the kernels (libm's tanhf / tanh), elementwise."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        y = np.empty_like(x)
        self._tanh(x.ctypes.data, y.ctypes.data, x.size)
        return y


_BUILD_LOCK = threading.Lock()
_LIBRARIES: dict = {}


def kernel_library(real: str, source: str | None = None) -> KernelLibrary:
    """The kernels of ``source`` (default: the backend's module source) for ``real``.

    Built once per (source, type, compiler flags) into a cache folder under the
    temporary directory; a failed build raises ``RuntimeError`` with g++'s log.
    """
    if real not in _C_TYPES:
        raise ValueError(f"real must be 'float' or 'double', got {real!r}")
    source = cuda_source.module_source() if source is None else source
    signatures = cuda_source.parse_signatures(source)
    wrappers = _launch_wrappers(signatures)
    key = hashlib.sha256("\0".join([source, wrappers, SHIM.read_text(), real, CXX,
                                    *CXXFLAGS]).encode()).hexdigest()[:24]
    with _BUILD_LOCK:
        hit = _LIBRARIES.get(key)
        if hit is not None:
            return hit
        folder = Path(tempfile.gettempdir()) / "treesched-cuda-on-cpu" / key
        library = folder / f"kernels_{real}.so"
        if not library.exists():
            folder.mkdir(parents=True, exist_ok=True)
            module = folder / "module.cu"
            module.write_text(source)
            unit = folder / "launch.cpp"
            unit.write_text('#include "module.cu"\n' + wrappers)
            partial = folder / f".kernels_{real}.{os.getpid()}.so"
            build = subprocess.run(compile_command(unit, partial, real, ("-shared",)),
                                   capture_output=True, text=True)
            if build.returncode != 0:
                raise RuntimeError(f"g++ could not build the CUDA kernels ({real}):\n"
                                   f"{build.stderr}")
            os.replace(partial, library)
        hit = _LIBRARIES[key] = KernelLibrary(library, real, signatures)
        return hit


# ============================================================== the runtime
class CudaCallError(TypeError):
    """A launch or cuBLAS call that would misbehave on a real GPU."""


_ids = itertools.count(1)


class CpuStream:
    """A stream: runs work at once, or records it while capturing."""

    def __init__(self, runtime: "CpuCuda", non_blocking: bool = False, null: bool = False):
        self.runtime = runtime
        self.ptr = 0 if null else next(_ids)
        self.non_blocking = non_blocking
        self._recording = None
        runtime._streams[self.ptr] = self

    def __enter__(self):
        self.runtime._current.append(self)
        return self

    def __exit__(self, *exc):
        self.runtime._current.pop()

    @property
    def is_capturing(self) -> bool:
        return self._recording is not None

    def begin_capture(self):
        if self.ptr == 0:
            raise CudaCallError("the legacy default stream cannot be captured")
        if self._recording is not None:
            raise CudaCallError("this stream is already capturing")
        self._recording = []

    def end_capture(self) -> "CpuGraph":
        if self._recording is None:
            raise CudaCallError("end_capture without begin_capture")
        work, self._recording = self._recording, None
        self.runtime.captures += 1
        return CpuGraph(self.runtime, work)

    def submit(self, work) -> None:
        capturing = [s for s in self.runtime._streams.values() if s.is_capturing]
        if self.ptr == 0 and capturing:
            # global capture mode: work on the legacy stream during a capture
            # is an error on a GPU (cudaErrorStreamCaptureImplicit)
            raise CudaCallError("work was issued to the legacy stream while a capture runs")
        if self._recording is not None:
            self._recording.append(work)
        else:
            work()


class CpuGraph:
    """A captured sequence of launches, replayed with the captured arguments."""

    def __init__(self, runtime, work):
        self.runtime, self.work = runtime, tuple(work)

    def launch(self, stream=None):
        stream = stream if stream is not None else self.runtime.get_current_stream()
        if stream.is_capturing:
            raise CudaCallError("graph launch into a capturing stream")
        self.runtime.replays += 1
        for work in self.work:
            work()


class CpuKernel:
    """``RawKernel``: ``kernel((grid,), (block,), args)`` on the current stream."""

    def __init__(self, runtime, library: KernelLibrary, name: str):
        self.runtime, self.library, self.name = runtime, library, name
        self.params = library.signatures[name]

    def _c_value(self, param, value):
        """The value the kernel would read for ``param``, as CuPy packs ``value``."""
        where = f"{self.name}({param.name})"
        if value is None:
            raise CudaCallError(f"{where}: None is not a NULL pointer in CuPy: the kernel "
                                "would read 0xffffffff (cupy/cupy#9046)")
        pointer = param.kind.endswith("*")
        if isinstance(value, np.ndarray):
            if not pointer:
                raise CudaCallError(f"{where}: an array was passed for a {param.kind} scalar")
            want = self.library.dtype if param.kind == "real*" else np.dtype(np.int32)
            if value.dtype != want:
                raise CudaCallError(f"{where}: array of {value.dtype}, the kernel reads {want}")
            if not value.flags.c_contiguous:
                raise CudaCallError(f"{where}: a strided view; the kernel assumes contiguity")
            return value.ctypes.data
        if isinstance(value, np.generic):
            width, kind = value.dtype.itemsize, value.dtype.kind
        elif isinstance(value, bool):
            width, kind = 1, "b"
        elif isinstance(value, int):
            width, kind = 8, "i"          # CuPy packs a Python int as 64 bits
        elif isinstance(value, float):
            width, kind = 8, "f"
        else:
            raise CudaCallError(f"{where}: cannot pass {type(value).__name__} to a kernel")
        if pointer:
            if width != 8 or kind not in "iu" or int(value) != 0:
                raise CudaCallError(f"{where}: a pointer parameter got a {width}-byte "
                                    f"{kind} scalar {value!r} (only a 64-bit zero is NULL)")
            return None
        need = 4 if param.kind == "int" else 8
        if width != need or kind not in "iu":
            raise CudaCallError(f"{where}: the kernel reads a {need}-byte integer, got a "
                                f"{width}-byte {kind} scalar")
        return int(value)

    def __call__(self, grid, block, args, **options):
        if options.get("shared_mem", 0):
            raise CudaCallError(f"{self.name}: the kernels use no dynamic shared memory")
        (grid,), (block,) = tuple(grid), tuple(block)
        if not (1 <= block <= 1024 and grid >= 1):
            raise CudaCallError(f"{self.name}: invalid launch shape grid={grid} block={block}")
        if len(args) != len(self.params):
            raise CudaCallError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = tuple(self._c_value(p, v) for p, v in zip(self.params, args))
        runtime = self.runtime
        reverse = runtime.reverse_threads

        def execute():
            self.library.launch(self.name, grid, block, values, reverse)

        def run():
            runtime.launches.append((self.name, grid, block))
            if runtime.observer is None:
                execute()
            else:
                runtime.observer(self, tuple(args), execute)
        runtime.get_current_stream().submit(run)


class CpuModule:
    """``RawModule(code=..., options=...)`` compiled by g++ for the CPU."""

    def __init__(self, runtime, code: str, options=()):
        reals = [o.split("=", 1)[1] for o in options if o.startswith("-DTS_REAL=")]
        if len(reals) != 1:
            raise CudaCallError(f"expected one -DTS_REAL=... option, got {options!r}")
        self.library = kernel_library(reals[0], code)
        self.runtime = runtime

    def get_function(self, name: str) -> CpuKernel:
        if name not in self.library.signatures:
            raise CudaCallError(f"no kernel named {name!r} in the module")
        return CpuKernel(self.runtime, self.library, name)


class CpuCuda:
    """The part of the ``cupy`` module the CUDA launcher and graph runtime use.

    ``multiprocessors`` sets the reported SM count (the launcher caps the grid
    at ``blocks_per_sm`` times it); ``reverse_threads`` runs every launch's
    threads in the opposite order.  ``launches`` lists ``(kernel, grid,
    block)`` of every executed launch; ``captures`` / ``replays`` count graphs.
    ``observer``, if set, is called as ``observer(kernel, args, execute)``
    instead of running a launch, with the arguments as the launcher passed
    them; it must call ``execute()`` to run the compiled kernel.
    """

    ndarray = np.ndarray

    def __init__(self, multiprocessors: int = 2, reverse_threads: bool = False):
        self.multiprocessors = multiprocessors
        self.reverse_threads = reverse_threads
        self.launches: list = []
        self.captures = self.replays = 0
        self.observer = None
        self._streams: dict = {}
        self._current = [CpuStream(self, null=True)]
        runtime = SimpleNamespace(
            getDevice=lambda: 0,
            getDeviceProperties=lambda device: {"multiProcessorCount": self.multiprocessors,
                                                "name": b"CPU (g++)"},
            CUDA_R_32F=0, CUDA_R_64F=1)

        def stream(non_blocking=False):
            return CpuStream(self, non_blocking=non_blocking)

        self.cuda = SimpleNamespace(runtime=runtime, Stream=stream,
                                    get_current_stream=self.get_current_stream)

    def get_current_stream(self) -> CpuStream:
        return self._current[-1]

    def RawModule(self, code: str, options=()):  # noqa: N802 - CuPy's name
        return CpuModule(self, code, options)


class CpuCublas:
    """cuBLAS's ``gemmEx`` over raw host pointers, computed by NumPy."""

    CUBLAS_COMPUTE_32F = 68
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77
    CUBLAS_COMPUTE_64F = 70
    CUBLAS_GEMM_DEFAULT = -1
    _TYPES = {0: np.float32, 1: np.float64}

    def __init__(self, runtime: CpuCuda):
        self.runtime = runtime
        self._handles: dict = {}
        self.calls: list = []

    def create(self) -> int:
        handle = next(_ids)
        self._handles[handle] = {"stream": 0, "math_mode": 0}
        return handle

    def destroy(self, handle) -> None:
        self._handles.pop(handle)

    def setMathMode(self, handle, mode) -> None:  # noqa: N802 - cuBLAS's name
        self._handles[handle]["math_mode"] = mode

    def setStream(self, handle, stream_ptr) -> None:  # noqa: N802
        if stream_ptr not in self.runtime._streams:
            raise CudaCallError(f"cublasSetStream: unknown stream {stream_ptr}")
        self._handles[handle]["stream"] = stream_ptr

    @staticmethod
    def _column_major(pointer, rows, cols, ld, dtype):
        """The column-major ``rows x cols`` matrix at ``pointer`` with leading dimension ``ld``."""
        if ld < max(1, rows):
            raise CudaCallError(f"leading dimension {ld} < {rows} rows")
        count = ld * (cols - 1) + rows
        buffer = (np.ctypeslib.as_ctypes_type(dtype) * count).from_address(pointer)
        flat = np.ctypeslib.as_array(buffer)
        return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols),
                                               strides=(flat.itemsize, ld * flat.itemsize))

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,  # noqa: N802,N803
               beta, C, Ctype, ldc, compute, algo):
        state = self._handles.get(handle)
        if state is None:
            raise CudaCallError("gemmEx on a destroyed or unknown handle")
        if not (Atype == Btype == Ctype) or Ctype not in self._TYPES:
            raise CudaCallError(f"gemmEx: data types {Atype}, {Btype}, {Ctype}")
        dtype = np.dtype(self._TYPES[Ctype])
        allowed = ({self.CUBLAS_COMPUTE_64F} if dtype == np.float64 else
                   {self.CUBLAS_COMPUTE_32F, self.CUBLAS_COMPUTE_32F_FAST_TF32})
        if compute not in allowed:
            raise CudaCallError(f"gemmEx: compute type {compute} for {dtype}")
        if min(m, n, k) < 1:
            raise CudaCallError(f"gemmEx: empty product m={m} n={n} k={k}")
        # host pointer mode: alpha and beta are read now (and captured by value)
        scalar = np.ctypeslib.as_ctypes_type(dtype)
        alpha_value = dtype.type(scalar.from_address(alpha).value)
        beta_value = dtype.type(scalar.from_address(beta).value)
        op_a = (self._column_major(A, m, k, lda, dtype) if transa == 0
                else self._column_major(A, k, m, lda, dtype).T)
        op_b = (self._column_major(B, k, n, ldb, dtype) if transb == 0
                else self._column_major(B, n, k, ldb, dtype).T)
        out = self._column_major(C, m, n, ldc, dtype)
        self.calls.append((m, n, k, compute))

        def run():
            product = op_a @ op_b
            if alpha_value != 1:
                product = alpha_value * product
            if beta_value == 0:
                out[...] = product      # beta = 0: C is not read (it may hold NaN)
            else:
                out[...] = product + beta_value * out
        self.runtime._streams[state["stream"]].submit(run)


def cpu_launcher(threads_per_block: int = 32, blocks_per_sm: int = 1, multiprocessors: int = 2,
                 reverse_threads: bool = False, allow_tf32: bool = False):
    """The production :class:`CudaLauncher` on the CPU runtime -> (launcher, runtime).

    The default shape caps every grid at 2 blocks of 32 threads, so the
    grid-stride loop of any launch over more than 64 elements wraps.
    """
    from treesched.backends.cupy_backend import CudaLauncher
    runtime = CpuCuda(multiprocessors=multiprocessors, reverse_threads=reverse_threads)
    launcher = CudaLauncher(allow_tf32=allow_tf32, threads_per_block=threads_per_block,
                            blocks_per_sm=blocks_per_sm, cupy=runtime,
                            cublas=CpuCublas(runtime))
    return launcher, runtime


def cpu_backend(use_graphs: bool = True, **launch_shape):
    """A :class:`CupyBackend` over NumPy arrays whose kernels are the real CUDA C."""
    from treesched.backends.cupy_backend import CudaGraphs, CupyBackend
    launcher, runtime = cpu_launcher(**launch_shape)
    graphs = CudaGraphs(cupy=runtime) if use_graphs else None
    backend = CupyBackend(use_graphs=use_graphs, xp=np, launcher=launcher, graphs=graphs)
    return backend, runtime


__all__ = ["KernelLibrary", "kernel_library", "syntax_check", "why_unavailable", "CpuCuda",
           "CpuCublas", "CpuKernel", "CpuGraph", "CpuStream", "CudaCallError", "cpu_launcher",
           "cpu_backend", "SHIM", "CXXFLAGS"]

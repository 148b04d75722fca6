"""The CUDA kernel sources of the CuPy backend, and how they are compiled.

Shared by ``cupy_backend`` (which hands the source to ``cupy.RawModule``)
and by ``tests/test_cuda_kernels.py`` (which compiles the very same text
with NVRTC, without a GPU), so the source, the options and the kernel
signatures the host code launches with cannot drift apart.

* ``module_source()`` is one translation unit: every ``cuda/*.cu`` file in
  ``KERNEL_FILES`` order with ``#include "x.cuh"`` lines replaced by the
  header text (include guards keep each header once).  Inlining, rather than
  passing ``-I``, keeps CuPy's kernel cache honest: its cache key is the
  source text, so editing a header recompiles.
* ``nvrtc_options(dtype)`` are the options for one element type: every
  kernel is compiled twice, ``-DTS_REAL=float`` and ``-DTS_REAL=double``,
  under the same names.  CuPy adds the architecture (and ``-ftz=true``)
  itself; ``CUPY_IMPLICIT_OPTIONS`` lists what it adds so the compile test
  can mirror it.
* ``kernel_signatures()`` parses every ``extern "C" __global__`` kernel's
  parameter list from the source; the launchers check each launch's
  arguments against it (count, pointer vs scalar, element type).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

#: Translation-unit order of the kernel files.
KERNEL_FILES = ("forward.cu", "backward.cu")

#: Options CuPy's NVRTC path appends to every compile (cupy/cuda/compiler.py).
CUPY_IMPLICIT_OPTIONS = ("-ftz=true",)

#: Element types the kernels are instantiated for.
REAL_TYPES = {"float32": "float", "float64": "double"}

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


def read(name: str) -> str:
    """The text of one file in ``backends/cuda``."""
    path = CUDA_DIR / name
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CUDA source {path} is missing: the package was installed without its "
            "package data (backends/cuda/*.cu, *.cuh)") from None


def expand(name: str, _seen: tuple = ()) -> str:
    """``name`` with its local ``#include "…"`` lines replaced by the files."""
    if name in _seen:
        raise ValueError(f"recursive #include of {name}")

    def replace(match):
        included = match.group(1)
        return (f"// ---- begin {included}\n" + expand(included, _seen + (name,))
                + f"\n// ---- end {included}")

    return _INCLUDE.sub(replace, read(name))


@functools.lru_cache(maxsize=None)
def module_source() -> str:
    """All kernels as one translation unit (what ``cupy.RawModule`` compiles)."""
    return "\n".join(f"// ==== {name}\n" + expand(name) for name in KERNEL_FILES)


def real_type(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in REAL_TYPES:
        raise ValueError(f"the CUDA kernels support float32 and float64, not {name}")
    return REAL_TYPES[name]


def nvrtc_options(dtype) -> tuple:
    """NVRTC options for the ``dtype`` instantiation (no architecture flag)."""
    return (f"-DTS_REAL={real_type(dtype)}",)


# ----------------------------------------------------------- signatures
@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``kind`` is "real*", "int*", "int" or "index"."""

    name: str
    kind: str
    const: bool


def _param(text: str) -> Param:
    words = text.replace("*", " * ").split()
    if not words:
        raise ValueError("empty kernel parameter")
    name = words[-1]
    const = "const" in words
    pointer = "*" in words
    base = [w for w in words[:-1] if w not in ("const", "*", "__restrict__")]
    base = " ".join(base)
    if pointer:
        if base not in ("real", "int"):
            raise ValueError(f"unsupported pointer parameter {text!r}")
        return Param(name, base + "*", const)
    if base == "int":
        return Param(name, "int", const)
    if base in ("index_t", "long long"):
        return Param(name, "index", const)
    raise ValueError(f"unsupported scalar parameter {text!r}")


def parse_signatures(source: str) -> dict:
    """``{kernel name: (Param, ...)}`` of every ``extern "C" __global__`` kernel in ``source``."""
    source = re.sub(r"//[^\n]*", "", source)
    signatures = {}
    for match in _KERNEL.finditer(source):
        name, params = match.group(1), match.group(2)
        if name in signatures:
            raise ValueError(f"kernel {name} is defined twice")
        signatures[name] = tuple(_param(p) for p in params.split(",") if p.strip())
    return signatures


@functools.lru_cache(maxsize=None)
def kernel_signatures() -> dict:
    """``{kernel name: (Param, ...)}`` parsed from ``module_source()``."""
    return parse_signatures(module_source())


def kernel_names() -> tuple:
    return tuple(kernel_signatures())


_SCALAR_TYPES = {"int": np.int32, "index": np.int64}

#: What a NULL pointer argument is handed to the driver as: an explicit
#: 64-bit zero.  CuPy does not turn ``None`` into NULL (cupy/cupy#9046: it
#: arrives as 0xffffffff, so every ``if (ptr)`` in a kernel would be true).
NULL = np.uint64(0)


def launch_arguments(args: tuple) -> tuple:
    """``args`` as the driver must receive them: ``None`` (no pointer) as :data:`NULL`."""
    return tuple(NULL if value is None else value for value in args)


def check_arguments(name: str, args: tuple, dtype, is_array) -> None:
    """Raise TypeError unless ``args`` match kernel ``name``'s parameters.

    ``is_array(x)`` tells a device array from anything else; ``None`` stands
    for a NULL pointer.  Pointers to ``real`` must have ``dtype``, pointers to
    ``int`` int32, scalars the exact NumPy type (np.int32 / np.int64), since
    CuPy passes a Python int as 64 bits.
    """
    signature = kernel_signatures().get(name)
    if signature is None:
        raise TypeError(f"no CUDA kernel named {name!r}")
    if len(args) != len(signature):
        raise TypeError(f"{name} takes {len(signature)} arguments "
                        f"({', '.join(p.name for p in signature)}), got {len(args)}")
    want_real = np.dtype(dtype)
    for param, value in zip(signature, args):
        where = f"{name}({param.name})"
        if param.kind.endswith("*"):
            if value is None:
                continue
            if not is_array(value):
                raise TypeError(f"{where} must be a device array or None, got {type(value).__name__}")
            want = want_real if param.kind == "real*" else np.dtype(np.int32)
            if value.dtype != want:
                raise TypeError(f"{where} must hold {want}, got {value.dtype}")
            if not value.flags.c_contiguous:
                raise TypeError(f"{where} must be C-contiguous")
        else:
            want = _SCALAR_TYPES[param.kind]
            if type(value) is not want:
                raise TypeError(f"{where} must be {want.__name__}, got {type(value).__name__}")


__all__ = ["CUDA_DIR", "KERNEL_FILES", "CUPY_IMPLICIT_OPTIONS", "module_source", "expand",
           "nvrtc_options", "real_type", "parse_signatures", "kernel_signatures", "kernel_names",
           "check_arguments", "launch_arguments", "NULL", "Param"]

"""Backends: executors that run a compiled schedule.

* ``numpy`` — the reference (any dtype, used for gradient checks);
* ``numba`` — CPU: BLAS GEMMs plus Numba-parallel fused gate kernels;
* ``cupy``  — NVIDIA GPU: CuPy RawKernels plus cuBLAS, replayed as CUDA graphs.

``get_backend(name)`` returns a shared instance; ``availability()`` says
which can run here and, for each that cannot, why.
"""

from __future__ import annotations

import importlib

from treesched.errors import TreeschedError

# name -> (module, class)
BACKENDS = {
    "numpy": ("treesched.backends.numpy_backend", "NumpyBackend"),
    "numba": ("treesched.backends.numba_backend", "NumbaBackend"),
    "cupy": ("treesched.backends.cupy_backend", "CupyBackend"),
}

_instances: dict = {}


def backend_names() -> list[str]:
    return list(BACKENDS)


def _load(name: str):
    module_name, class_name = BACKENDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def why_unavailable(name: str) -> str | None:
    """None if backend ``name`` can run here, else the reason it cannot."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}"
    try:
        cls = _load(name)
    except ModuleNotFoundError as error:
        return f"{error.name} is not installed"
    except ImportError as error:
        return f"import failed: {error}"
    check = getattr(cls, "why_unavailable", None)
    return check() if check is not None else None


def availability() -> dict:
    """``{name: None or reason}`` for every backend."""
    return {name: why_unavailable(name) for name in BACKENDS}


def get_backend(name: str):
    """The shared instance of backend ``name``; TreeschedError if it cannot run."""
    if name not in BACKENDS:
        raise TreeschedError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    if name not in _instances:
        reason = why_unavailable(name)
        if reason is not None:
            raise TreeschedError(f"backend {name!r} is not available here: {reason}")
        _instances[name] = _load(name)()
    return _instances[name]


__all__ = ["BACKENDS", "backend_names", "availability", "why_unavailable", "get_backend"]

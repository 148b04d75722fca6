"""Arrays in and out: NumPy, CuPy and any DLPack producer (PyTorch, JAX).

Inputs are taken without a host round trip where the data already lives on
the backend's device: a CuPy backend takes CUDA DLPack tensors directly and
a NumPy backend takes CPU ones.  ``to_library`` hands results back in the
caller's array library.
"""

from __future__ import annotations

import sys

import numpy as np

from .errors import TreeschedError


def _module_name(value) -> str:
    return type(value).__module__.split(".")[0]


def to_backend_array(value, backend, what="array"):
    """Any array-like → an array of ``backend.xp`` (no copy when possible)."""
    xp = backend.xp
    if isinstance(value, xp.ndarray):
        return value
    if xp is np:
        if _module_name(value) == "cupy":
            return value.get()  # device → host, explicit: the numpy backend runs on the CPU
        if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
            try:
                return np.from_dlpack(value)
            except (BufferError, RuntimeError, TypeError):
                pass  # e.g. a GPU tensor: fall through to __array__ if it has one
        try:
            return np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TreeschedError(f"{what} is not an array: {error}") from None
    # A device backend (cupy): prefer zero-copy DLPack, else upload.
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        try:
            return xp.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass
    try:
        return xp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TreeschedError(f"{what} is not an array: {error}") from None


def to_library(array, like):
    """Return ``array`` in the array library of ``like`` (numpy, cupy, torch, jax).

    ``like`` may be an array of that library or its module name as a string.
    GPU arrays go through DLPack without a host copy.
    """
    target = like if isinstance(like, str) else _module_name(like)
    source = _module_name(array)
    if target == source:
        return array
    if target == "numpy":
        return array.get() if source == "cupy" else np.asarray(array)
    if target == "cupy":
        import cupy
        return cupy.from_dlpack(array) if source != "numpy" else cupy.asarray(array)
    if target == "torch":
        import torch
        return torch.from_dlpack(array)
    if target in ("jax", "jaxlib"):
        import jax.numpy as jnp
        return jnp.from_dlpack(array) if source != "numpy" else jnp.asarray(array)
    raise TreeschedError(f"unknown array library {target!r}: use numpy, cupy, torch or jax")

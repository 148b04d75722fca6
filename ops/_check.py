"""Cheap shape/dtype checks at the op boundary.

Each check is a few tuple comparisons on metadata; nothing here copies or
touches array data, so the checks stay on the hot path.
"""

import numpy as np

from ..errors import TreeschedError

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(what, a):
    """The compute dtype is the input's; only float32 and float64 are supported."""
    dt = getattr(a, "dtype", None)
    if dt not in _FLOAT_DTYPES:
        raise TreeschedError(f"{what} must be a float32 or float64 array, got dtype {dt}")
    return dt


def check_rows(what, a, cols, dtype, rows=None):
    """``a`` must be a 2-D ``(R, cols)`` array of ``dtype``.

    ``rows`` / ``cols`` None means any size on that axis.
    """
    shape = getattr(a, "shape", None)
    if (
        shape is None
        or len(shape) != 2
        or (cols is not None and shape[1] != cols)
        or (rows is not None and shape[0] != rows)
    ):
        want = f"({'R' if rows is None else rows}, {'n' if cols is None else cols})"
        raise TreeschedError(f"{what} must have shape {want}, got {shape}")
    if a.dtype != dtype:
        raise TreeschedError(
            f"{what} has dtype {a.dtype} but this computation runs in {dtype}; "
            "treesched never mixes precisions silently, cast explicitly"
        )


def param(params, name, shape, dtype):
    """Fetch ``params[name]`` and check its shape and dtype."""
    try:
        p = params[name]
    except KeyError:
        raise TreeschedError(f"missing parameter {name!r} (expected shape {shape})") from None
    got = getattr(p, "shape", None)
    if got != shape:
        raise TreeschedError(f"parameter {name!r} has shape {got}, expected {shape}")
    if p.dtype != dtype:
        raise TreeschedError(
            f"parameter {name!r} has dtype {p.dtype} but the input is {dtype}; "
            "treesched never mixes precisions silently, cast the parameters or the input"
        )
    return p


def blocks_width(params, name, blocks):
    """Hidden size H read off a weight laid out as ``(rows, blocks * H)``."""
    try:
        p = params[name]
    except KeyError:
        raise TreeschedError(f"missing parameter {name!r}") from None
    shape = getattr(p, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] % blocks or shape[1] == 0:
        raise TreeschedError(f"parameter {name!r} has shape {shape}, expected (rows, {blocks}*H) with H >= 1")
    return shape[1] // blocks


def check_state(cell, state, what="dstate"):
    """A (d)state is a tuple with one entry per name in ``cell.state_names``."""
    if not isinstance(state, (tuple, list)) or len(state) != len(cell.state_names):
        got = type(state).__name__
        if isinstance(state, (tuple, list)):
            got += f" of length {len(state)}"
        raise TreeschedError(
            f"{cell.name} {what} must be a tuple of {len(cell.state_names)} arrays "
            f"{cell.state_names}, got {got}"
        )
    return state


def check_cache(what, cache):
    if cache is None:
        raise TreeschedError(f"{what}: no cache (the forward ran with need_cache=False)")

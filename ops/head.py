"""Read-out head (SPEC section 1): y = relu(h) @ head/w + head/b.

``h`` may have any leading shape ``(..., H)`` (rows of a level, or (B, T, H));
``y`` has the same leading shape and last axis O.

Cache: ``r = relu(h)`` (..., H), a fresh array. It gives dW = r^T dy and, since
relu'(h) = [h > 0] = [r > 0], also the mask for dh; h itself is not kept.
"""

from ._check import blocks_width, check_cache, check_dtype, param
from ..errors import TreeschedError
from .xp import array_module


def head_param_shapes(hidden_size, output_size):
    return {"head/w": (hidden_size, output_size), "head/b": (output_size,)}


def head_forward(params, h, need_cache=True, overwrite_input=False):
    """-> ``(y, cache)``; cache is None if not need_cache.

    ``overwrite_input``: ``h`` is the caller's scratch (the model's own states):
    ``relu(h)`` is computed in place instead of into a fresh array.  Every
    leading position is a row of one 2-D GEMM.
    """
    dtype = check_dtype("h", h)
    if h.ndim < 1:
        raise TreeschedError(f"h must have shape (..., H), got {h.shape}")
    H = h.shape[-1]
    O = blocks_width(params, "head/w", 1)
    W = param(params, "head/w", (H, O), dtype)
    b = param(params, "head/b", (O,), dtype)
    xp = array_module(h)
    r = xp.maximum(h, 0, out=h if overwrite_input else None)
    y = r.reshape(-1, H) @ W
    y += b
    return y.reshape(h.shape[:-1] + (O,)), (r if need_cache else None)


#: rows per float64 block of the head's weight gradient: bounds the widened
#: copies at ``ACCUMULATION_ROWS * (H + O)`` float64 values
ACCUMULATION_ROWS = 4096


def _sum_of_outer_products(xp, r2, dy2):
    """``r2.T @ dy2`` accumulated in float64 and returned in ``r2``'s dtype.

    float64 inputs take one GEMM.  float32 rows are widened a block of
    ``ACCUMULATION_ROWS`` at a time, so the extra memory stays bounded; the
    blocks are added in a fixed order (deterministic, no atomics).
    """
    if r2.dtype == xp.float64:
        return r2.T @ dy2
    total = xp.zeros((r2.shape[1], dy2.shape[1]), xp.float64)
    for first in range(0, r2.shape[0], ACCUMULATION_ROWS):
        rows = slice(first, first + ACCUMULATION_ROWS)
        total += r2[rows].astype(xp.float64).T @ dy2[rows].astype(xp.float64)
    return total.astype(r2.dtype)


def head_backward(params, cache, dy, out=None):
    """-> ``(dh, grads)`` with grads for head/w and head/b; ``out`` receives dh if given."""
    check_cache("head_backward", cache)
    r = cache
    H = r.shape[-1]
    O = blocks_width(params, "head/w", 1)
    W = param(params, "head/w", (H, O), r.dtype)
    if getattr(dy, "shape", None) != r.shape[:-1] + (O,) or dy.dtype != r.dtype:
        raise TreeschedError(
            f"dy must have shape {r.shape[:-1] + (O,)} and dtype {r.dtype}, "
            f"got {getattr(dy, 'shape', None)} {getattr(dy, 'dtype', None)}"
        )
    # Every leading position is a row: flatten them (free for the contiguous
    # cache).  dW and db sum over every position (B * K of them, 65 536 at
    # B = 128, T = 512) and are accumulated in float64, then rounded once:
    # a float32 running sum drifts by up to (rows * eps) when the terms
    # share a sign (a class the head over-predicts everywhere), 7e-5
    # relative at 65 536 rows, where float64 stays at float32's rounding.
    r2 = r.reshape(-1, H)
    dy2 = dy.reshape(-1, O)
    xp = array_module(r)
    grads = {"head/w": _sum_of_outer_products(xp, r2, dy2),
             "head/b": dy2.sum(axis=0, dtype=xp.float64).astype(r.dtype)}
    dh = xp.matmul(dy2, W.T, out=None if out is None else out.reshape(-1, H))
    dh *= r2 > 0  # relu' = [h > 0]
    return dh.reshape(r.shape), grads

"""Softmax cross-entropy with per-position weights.

    p     = softmax(logits)                      over the last axis
    xent  = -Σ_o targets[..., o] * log p[..., o]
    loss  = Σ weights * xent                     (a python float)
    dlogits = weights[..., None] * (p - targets)

The weights choose the reduction (mask / B for a masked mean over the batch,
a 0/1 mask for a sum, ...). targets may be one-hot or any distribution; the
formula for dlogits assumes each target row sums to 1 (or to 0 where its
weight is 0), as a distribution does.
"""

from ._check import check_dtype
from ..errors import TreeschedError
from .xp import array_module


def softmax_cross_entropy(logits, targets, weights):
    """-> ``(loss: float, dlogits)``; dlogits has logits' shape and dtype."""
    dtype = check_dtype("logits", logits)
    shape = logits.shape
    if len(shape) < 1:
        raise TreeschedError("logits must have shape (..., O)")
    if getattr(targets, "shape", None) != shape:
        raise TreeschedError(f"targets must have the logits' shape {shape}, got {getattr(targets, 'shape', None)}")
    if getattr(weights, "shape", None) != shape[:-1]:
        raise TreeschedError(f"weights must have shape {shape[:-1]}, got {getattr(weights, 'shape', None)}")
    xp = array_module(logits, targets, weights)
    # Targets / weights may arrive as ints, bools or the other float width:
    # bring them to the logits' dtype (a no-op when they already match), so
    # the result is never silently upcast.
    targets = targets.astype(dtype, copy=False)
    weights = weights.astype(dtype, copy=False)

    # Stable log-softmax: shift by the row max so exp never overflows and the
    # largest term is exp(0) = 1 (the log never sees 0).
    z = logits - logits.max(axis=-1, keepdims=True)
    lse = xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
    logp = z - lse
    xent = -(targets * logp).sum(axis=-1)
    # summed in float64: B * K positions (65 536 at B = 128, T = 512) in a
    # float32 running sum would drift far above float32's rounding
    loss = float((weights * xent).sum(dtype=xp.float64))

    dlogits = xp.exp(logp)  # p = softmax(logits)
    dlogits -= targets
    dlogits *= weights[..., None]
    return loss, dlogits

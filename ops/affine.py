"""The affine layer of the PR-RNN, forward and backward by hand, over rows.

    h = X @ W + b          (the leaf encoder: no nonlinearity)
    h = relu(X @ W + b)    (the merge and the unary layers)

``relu'(a) = [a > 0] = [h > 0]``, so the rectified output stands in for the
pre-activation: the layer keeps only its input and its output.
"""

from __future__ import annotations

from .xp import array_module


def forward(X, W, bias, relu, out=None):
    """``h = X @ W + bias``, rectified if ``relu``; ``out`` receives it if given."""
    xp = array_module(X)
    if out is None:
        h = X @ W
    else:
        h = xp.matmul(X, W, out=out)
    h += bias
    if relu:
        xp.maximum(h, 0, out=h)
    return h


def preactivation_gradient(dh, h, relu, out=None):
    """``dA = dh * [h > 0]`` (``dh`` itself without relu); ``out`` may be ``dh``."""
    xp = array_module(dh)
    if not relu:
        if out is None:
            return dh
        out[...] = dh
        return out
    return xp.multiply(dh, h > 0, out=out)


def backward(W, cache, dh, need_dx=True):
    """Backward of one layer with ``cache = (X, h or None)`` -> ``(dX or None, dW, db)``."""
    X, h = cache
    dA = preactivation_gradient(dh, h, h is not None)
    dW = X.T @ dA  # the sum over the R independent rows is one GEMM
    db = dA.sum(axis=0)
    dX = dA @ W.T if need_dx else None
    return dX, dW, db


__all__ = ["forward", "preactivation_gradient", "backward"]

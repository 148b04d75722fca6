"""The N-ary gated (LSTM) layer, forward and backward by hand, over rows.

One layer gates ``N`` previous cells (``num_prev``; 0 for the leaf encoder,
2 for the binary merge's ``c_l, c_r``, 1 for a unary layer's ``c``)::

    A = X @ W + b                                  W: (in, (3 + N) H)
    [a_i, a_g, a_o, a_f1 .. a_fN] = A              column blocks of width H
    c = σ(a_i) * tanh(a_g) + Σ_k σ(a_fk) * c_k
    h = σ(a_o) * tanh(c)

with ``σ(a) = 0.5 * tanh(a / 2) + 0.5`` (``ops.xp.sigmoid``).  The
*activations* ``act = [σ(a_i), tanh(a_g), σ(a_o), σ(a_f1..N)]`` (same block
layout as ``A``) and ``c`` are all the backward needs besides the gated cells
and the layer input: every local derivative is a function of them
(docs/backward.md, section 2).

The pieces (``activations``, ``cell_state``, ``hidden_state``,
``preactivation_gradient``) are what every backend's gated-layer primitive
computes; ``forward`` and ``backward`` compose them for one layer.
"""

from __future__ import annotations

from .xp import array_module, sigmoid


def activations(A, bias, hidden, out=None):
    """``[σ, tanh, σ, σ..]`` of ``A + bias`` by column block; ``out`` may be ``A``."""
    xp = array_module(A)
    if out is None:
        out = xp.empty_like(A)
    xp.add(A, bias, out=out)
    sigmoid(out[:, :hidden], out=out[:, :hidden])                      # i
    xp.tanh(out[:, hidden:2 * hidden], out=out[:, hidden:2 * hidden])  # g
    sigmoid(out[:, 2 * hidden:], out=out[:, 2 * hidden:])              # o, every forget gate
    return out


def cell_state(act, cells, hidden, out=None):
    """``c = i * g + Σ_k f_k * c_k`` from the activations and the gated cells."""
    xp = array_module(act)
    i, g = act[:, :hidden], act[:, hidden:2 * hidden]
    c = xp.multiply(i, g, out=out)
    for k, c_k in enumerate(cells):
        c += act[:, (3 + k) * hidden:(4 + k) * hidden] * c_k
    return c


def hidden_state(act, c, hidden, out=None):
    """``h = o * tanh(c)``."""
    xp = array_module(act)
    h = xp.tanh(c, out=out)
    h *= act[:, 2 * hidden:3 * hidden]
    return h


def preactivation_gradient(act, c, cells, dh, dc, out=None):
    """``(dA, [dc_k])``: gradients w.r.t. the pre-activations ``A`` and the gated cells.

    ``dh`` (R, H) reaches ``h``; ``dc`` (R, H, or None for zero) reaches ``c``
    from above (the next layer's forget gate, or the caller).  ``out`` may be
    ``act`` itself (the activations are read before each block is written).
    """
    xp = array_module(act)
    hidden = c.shape[1]
    tc = xp.tanh(c)
    i, g = act[:, :hidden], act[:, hidden:2 * hidden]
    o = act[:, 2 * hidden:3 * hidden]
    # Total gradient reaching c: through h (tanh' = 1 - tanh²) plus from above.
    dct = dh * o
    dct *= 1 - tc * tc
    if dc is not None:
        dct += dc
    forget = [act[:, (3 + k) * hidden:(4 + k) * hidden] for k in range(len(cells))]
    # c = ... + f_k * c_k: dL/dc_k = dct * f_k (before f_k is overwritten)
    dcells = [dct * f for f in forget]
    da_o = dh * tc * (o * (1 - o))
    da_i = dct * g * (i * (1 - i))
    da_g = dct * i * (1 - g * g)
    da_f = [dct * c_k * (f * (1 - f)) for f, c_k in zip(forget, cells)]
    dA = xp.empty_like(act) if out is None else out
    dA[:, :hidden] = da_i
    dA[:, hidden:2 * hidden] = da_g
    dA[:, 2 * hidden:3 * hidden] = da_o
    for k, value in enumerate(da_f):
        dA[:, (3 + k) * hidden:(4 + k) * hidden] = value
    return dA, dcells


def forward(X, W, bias, cells, need_cache=True):
    """One gated layer over rows -> ``(h, c, cache)``; ``cache = (X, act, cells, c)``."""
    hidden = W.shape[1] // (3 + len(cells))
    act = activations(X @ W, bias, hidden, out=None)
    c = cell_state(act, cells, hidden)
    h = hidden_state(act, c, hidden)
    return h, c, ((X, act, tuple(cells), c) if need_cache else None)


def backward(W, cache, dh, dc, need_dx=True):
    """Backward of :func:`forward` -> ``(dX or None, [dc_k], dW, db)``.

    ``A = X @ W + b`` over R independent rows: every row contributes to dW, and
    the row sum is one GEMM, ``X^T @ dA``.
    """
    X, act, cells, c = cache
    dA, dcells = preactivation_gradient(act, c, cells, dh, dc)
    dW = X.T @ dA
    db = dA.sum(axis=0)
    dX = dA @ W.T if need_dx else None
    return dX, dcells, dW, db


__all__ = ["activations", "cell_state", "hidden_state", "preactivation_gradient", "forward",
           "backward"]

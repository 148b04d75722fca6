"""The PR-LSTM as the paper computes it, in JAX: the independent reference.

This module is the one JAX formulation of the model of SPEC.md §1 that the
tests (parity of values and gradients) and the benchmarks (the ``jax``
baselines) compare treesched against.  It is written from the formulas, not
from treesched's code: leaf encoder, merge cell with its unary layers,
``jax.lax.associative_scan`` over the positions, read-out head, and the
training loss.

It imports JAX at module import, so only tests and benchmarks import it;
treesched's runtime (``import treesched``, :class:`treesched.PRLSTM`) never
does and needs no JAX.  Whoever imports it sets JAX's configuration first
(``JAX_PLATFORMS``, ``jax_enable_x64`` for float64 parity, matmul
precision): the module changes no global setting.

Parameters are the treesched parameter dict (``PRLSTM.params.numpy()``, or a
dict of ``jax.Array`` of the same keys), keyed as in SPEC §1:

====================  ====================  ===================
name                  lstm cell             rnn cell
====================  ====================  ===================
``leaf/w``            ``(D, 3H)``           ``(D, H)``
``leaf/b``            ``(3H,)``             ``(H,)``
``merge/w``           ``(2H, 5H)``          ``(2H, H)``
``merge/b``           ``(5H,)``             ``(H,)``
``unary_k/w``         ``(H, 4H)``           ``(H, H)``
``unary_k/b``         ``(4H,)``             ``(H,)``
``head/w``            ``(H, O)``            ``(H, O)``
``head/b``            ``(O,)``              ``(O,)``
====================  ====================  ===================

with ``k = 1 … num_layers - 1``.  NumPy arrays are converted with
``jnp.asarray`` (so float64 weights stay float64 only with
``jax_enable_x64``).

Functions: :func:`leaf`, :func:`merge`, :func:`encode` (states of every
prefix), :func:`logits`, :func:`loss`; gradients :func:`logits_and_vjp`
(as ``PRLSTM.forward_backward``), :func:`loss_value_and_grad` (as
``PRLSTM.loss_and_grads``), :func:`dot_value_and_grad`; and :func:`jitted`,
which fixes ``cell`` / ``num_layers`` and applies ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["CELLS", "dot_value_and_grad", "encode", "jitted", "leaf", "logits", "logits_and_vjp",
           "loss", "loss_value_and_grad", "merge"]

CELLS = ("lstm", "rnn")


# --------------------------------------------------------------- parameters
def _params(params, cell, num_layers):
    """``params`` as ``jax.Array`` s, checked against ``cell`` / ``num_layers``.

    ``num_layers=None`` reads it off the ``unary_k/w`` keys.  Raises
    ``ValueError`` on an unknown cell, a missing or unexpected unary layer,
    or a ``merge/w`` whose width is not the cell's (5H for lstm, H for rnn).
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")
    unary = sorted(int(name[len("unary_"):-len("/w")]) for name in params
                   if name.startswith("unary_") and name.endswith("/w"))
    if num_layers is None:
        num_layers = len(unary) + 1
    if unary != list(range(1, num_layers)):
        raise ValueError(f"num_layers={num_layers} needs unary_1 … unary_{num_layers - 1}; "
                         f"params have {[f'unary_{k}' for k in unary]}")
    p = {name: jnp.asarray(value) for name, value in params.items()}
    two_h, width = p["merge/w"].shape
    blocks = 5 if cell == "lstm" else 1
    if width != blocks * (two_h // 2):
        raise ValueError(f"merge/w has shape {(two_h, width)}: not a {cell} merge "
                         f"({two_h // 2} hidden units need {blocks * (two_h // 2)} columns)")
    return p, num_layers


def _affine(p, name, inputs):
    return inputs @ p[f"{name}/w"] + p[f"{name}/b"]


# ------------------------------------------------------------------- cells
def leaf(params, x, cell="lstm"):
    """Leaf encoder of SPEC §1, applied to every position independently.

    For ``cell="lstm"``, with the columns of ``leaf/w`` in gate order i, g, o
    and ``σ = jax.nn.sigmoid`` (the logistic function; treesched evaluates it
    as ``0.5 * (1 + tanh(a / 2))``, the same function)::

      [a_i, a_g, a_o] = x @ leaf/w + leaf/b
      c = σ(a_i) * tanh(a_g)
      h = σ(a_o) * tanh(c)

    For ``cell="rnn"`` (the paper's PR-RNN ablation) the leaf is linear, with
    no nonlinearity: ``h = x @ leaf/w + leaf/b``.

    Args:
      params: the parameter dict (see the module docstring); only ``leaf/*``
        is read.
      x: ``(..., D)`` inputs.
      cell: ``"lstm"`` or ``"rnn"``.

    Returns:
      The state: ``(h, c)`` for lstm, ``(h,)`` for rnn, each ``(..., H)``.
    """
    p = {name: jnp.asarray(params[name]) for name in ("leaf/w", "leaf/b")}
    a = _affine(p, "leaf", x)
    if cell == "rnn":
        return (a,)
    if cell != "lstm":
        raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")
    i, g, o = jnp.split(a, 3, axis=-1)
    c = jax.nn.sigmoid(i) * jnp.tanh(g)
    return (jax.nn.sigmoid(o) * jnp.tanh(c), c)


def merge(params, left, right, cell="lstm", num_layers=None):
    """The merge cell ``m(L, R)`` of SPEC §1, then its unary layers.

    For ``cell="lstm"``, ``L = (h_l, c_l)``, ``R = (h_r, c_r)``, gate columns
    of ``merge/w`` in the order i, g, o, f_l, f_r::

      [a_i, a_g, a_o, a_fl, a_fr] = concat(h_l, h_r) @ merge/w + merge/b
      c = σ(a_i) * tanh(a_g) + σ(a_fl) * c_l + σ(a_fr) * c_r
      h = σ(a_o) * tanh(c)

    then for ``k = 1 … num_layers - 1`` a unary layer on that result, gate
    columns of ``unary_k/w`` in the order i, g, o, f::

      [a_i, a_g, a_o, a_f] = h @ unary_k/w + unary_k/b
      c = σ(a_i) * tanh(a_g) + σ(a_f) * c
      h = σ(a_o) * tanh(c)

    For ``cell="rnn"`` the state is ``(h,)`` and every layer is a rectified
    affine map (``treesched/ops/rnn.py``)::

      h = relu(concat(h_l, h_r) @ merge/w + merge/b)
      h = relu(h @ unary_k/w + unary_k/b)          k = 1 … num_layers - 1

    ``m`` is not associative; the schedule (:func:`encode`) fixes the order.

    Args:
      params: the parameter dict.
      left, right: states as :func:`leaf` returns them, of equal shapes.
      cell: ``"lstm"`` or ``"rnn"``.
      num_layers: layers per merge (1 + the number of unary layers); ``None``
        reads it off the ``unary_k/w`` keys of ``params``.

    Returns:
      The merged state, of the operands' structure and shapes.
    """
    p, num_layers = _params(params, cell, num_layers)
    return _merge(p, left, right, cell, num_layers)


def _merge(p, left, right, cell, num_layers):
    sigmoid = jax.nn.sigmoid
    joined = jnp.concatenate([left[0], right[0]], axis=-1)
    if cell == "rnn":
        h = jax.nn.relu(_affine(p, "merge", joined))
        for k in range(1, num_layers):
            h = jax.nn.relu(_affine(p, f"unary_{k}", h))
        return (h,)
    i, g, o, f_l, f_r = jnp.split(_affine(p, "merge", joined), 5, axis=-1)
    c = sigmoid(i) * jnp.tanh(g) + sigmoid(f_l) * left[1] + sigmoid(f_r) * right[1]
    h = sigmoid(o) * jnp.tanh(c)
    for k in range(1, num_layers):
        i, g, o, f = jnp.split(_affine(p, f"unary_{k}", h), 4, axis=-1)
        c = sigmoid(i) * jnp.tanh(g) + sigmoid(f) * c
        h = sigmoid(o) * jnp.tanh(c)
    return (h, c)


# ------------------------------------------------------------------- model
def _valid(lengths, length, dtype):
    """``(B, T, 1)``: 1 at positions ``t < lengths[b]``, 0 past them."""
    positions = jnp.arange(length)
    return (positions[None, :] < jnp.asarray(lengths)[:, None]).astype(dtype)[..., None]


def encode(params, x, cell="lstm", num_layers=None, *, lengths=None):
    """States of every prefix ``x[:, 0..t]``: the odd-even schedule of SPEC §2.

    Equivalent to::

      leaves = leaf(params, x, cell)
      states = jax.lax.associative_scan(
          lambda l, r: merge(params, l, r, cell, num_layers), leaves, axis=1)

    ``associative_scan``'s recursion *is* the odd-even schedule (for a list
    ``E`` of ``n`` states: ``R[k] = m(E[2k], E[2k+1])``, ``P = scan(R)``,
    ``out[0] = E[0]``, ``out[2k+1] = P[k]``, ``out[2k] = m(P[k-1], E[2k])``),
    with the earlier span always the left operand; position 0's state is its
    leaf state.  The tree of position ``t`` does not depend on ``T``, so right
    padding leaves the real positions' states unchanged.

    Args:
      params: the parameter dict.
      x: ``(B, T, D)`` inputs.
      cell: ``"lstm"`` or ``"rnn"``.
      num_layers: layers per merge; ``None`` reads it off ``params``.
      lengths: optional ``(B,)`` real lengths of a right-padded batch, as in
        ``PRLSTM.encode``: states at positions ``t >= lengths[b]`` are zero.

    Returns:
      ``(h, c)`` (lstm) or ``(h,)`` (rnn), each ``(B, T, H)``, as
      ``PRLSTM.encode`` returns them.
    """
    p, num_layers = _params(params, cell, num_layers)
    states = jax.lax.associative_scan(
        lambda left, right: _merge(p, left, right, cell, num_layers),
        leaf(p, x, cell), axis=1)
    if lengths is not None:
        valid = _valid(lengths, x.shape[1], states[0].dtype)
        states = tuple(s * valid for s in states)
    return tuple(states)


def logits(params, x, cell="lstm", num_layers=None, *, lengths=None):
    """Read-out of every position: ``y_t = relu(h_t) @ head/w + head/b``.

    ``h_t`` is the hidden state that :func:`encode` gives the prefix
    ``x[:, 0..t]``.  This is ``PRLSTM.forward(x, lengths)`` (``outputs="all"``,
    the odd-even pattern).

    Args:
      params: the parameter dict.
      x: ``(B, T, D)`` inputs.
      cell: ``"lstm"`` or ``"rnn"``.
      num_layers: layers per merge; ``None`` reads it off ``params``.
      lengths: optional ``(B,)`` real lengths; logits at padded positions are
        zero.

    Returns:
      ``(B, T, O)`` logits.
    """
    p, num_layers = _params(params, cell, num_layers)
    h = encode(p, x, cell, num_layers)[0]
    y = _affine(p, "head", jax.nn.relu(h))
    if lengths is not None:
        y = y * _valid(lengths, x.shape[1], y.dtype)
    return y


def loss(params, x, targets, mask=None, cell="lstm", num_layers=None, *, lengths=None):
    """Softmax cross-entropy at the last ``K = targets.shape[1]`` positions.

    As ``PRLSTM.loss_and_grads``: with ``y`` the :func:`logits` of those
    positions (each sequence's own last ``K`` when ``lengths`` is given)::

      xent[b, j] = -Σ_o targets[b, j, o] * log_softmax(y[b, j])[o]
      loss = Σ_{b, j} mask[b, j] * xent[b, j] / (B * K)

    i.e. with no mask the mean over batch and output positions.

    Args:
      params: the parameter dict.
      x: ``(B, T, D)`` inputs.
      targets: ``(B, K, O)`` one-hot targets (or distributions), ``K <= T``.
      mask: optional ``(B, K)`` weights, 1 where a position counts.
      cell: ``"lstm"`` or ``"rnn"``.
      num_layers: layers per merge; ``None`` reads it off ``params``.
      lengths: optional ``(B,)`` real lengths, each ``>= K``.

    Returns:
      The scalar loss.
    """
    batch, k = targets.shape[:2]
    y = logits(params, x, cell, num_layers)  # padded positions are never selected
    if lengths is None:
        y = y[:, y.shape[1] - k:]
    else:
        positions = jnp.asarray(lengths)[:, None] - k + jnp.arange(k)[None, :]
        y = jnp.take_along_axis(y, positions[..., None], axis=1)
    xent = -(targets * jax.nn.log_softmax(y, axis=-1)).sum(-1)
    if mask is not None:
        xent = jnp.asarray(mask) * xent
    return xent.sum() / (batch * k)


# ---------------------------------------------------------------- gradients
def logits_and_vjp(params, x, dy, cell="lstm", num_layers=None, *, lengths=None):
    """``(y, grads)``: :func:`logits` and the gradient of ``sum(y * dy)``.

    As ``PRLSTM.forward_backward(x, dy, lengths)``: ``grads`` is the
    ``jax.vjp`` of :func:`logits` with respect to ``params`` at the cotangent
    ``dy`` (``(B, T, O)``), a dict with the keys of ``params``.
    """
    y, vjp = jax.vjp(lambda p: logits(p, x, cell, num_layers, lengths=lengths), params)
    return y, vjp(dy)[0]


def loss_value_and_grad(params, x, targets, mask=None, cell="lstm", num_layers=None, *,
                        lengths=None):
    """``(loss, grads)``: ``jax.value_and_grad`` of :func:`loss` in ``params``.

    The loss and gradients of ``PRLSTM.loss_and_grads(x, targets, mask,
    lengths)`` (which also returns the logits).
    """
    return jax.value_and_grad(
        lambda p: loss(p, x, targets, mask, cell, num_layers, lengths=lengths))(params)


def dot_value_and_grad(params, x, dy, cell="lstm", num_layers=None, *, lengths=None):
    """``(sum(y * dy), grads)``: ``jax.value_and_grad`` of that scalar in
    ``params``, ``y`` the :func:`logits`; the same gradients as
    :func:`logits_and_vjp` without returning ``y``."""
    def dot(p):
        return (logits(p, x, cell, num_layers, lengths=lengths) * dy).sum()

    return jax.value_and_grad(dot)(params)


def jitted(function, cell="lstm", num_layers=None):
    """``jax.jit`` of one of this module's functions with ``cell`` and
    ``num_layers`` fixed (static); the result takes the remaining arguments
    positionally (``lengths`` by keyword), e.g.
    ``jitted(loss_value_and_grad, "lstm", 2)(params, x, targets)``.  Its
    ``.lower(...).compile()`` gives an ahead-of-time executable.
    """
    return jax.jit(functools.partial(function, cell=cell, num_layers=num_layers))

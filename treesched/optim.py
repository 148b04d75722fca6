"""Adam with global-norm gradient clipping, as ``optax`` computes them.

The trainer uses ``optax.chain(optax.clip_by_global_norm(1.0),
optax.adam(1e-3))`` semantics (the public training code of the
formal-language benchmark), on plain arrays of the model's backend:

* clipping: ``g_norm = sqrt(sum over leaves of sum(g**2))``; if
  ``g_norm < max_norm`` the gradients pass unchanged, otherwise every leaf
  becomes ``(g / g_norm) * max_norm``;
* Adam: ``count += 1``; ``mu = (1-b1) g + b1 mu``; ``nu = (1-b2) g² + b2 nu``;
  ``update = -lr * mu_hat / (sqrt(nu_hat) + eps)`` with
  ``mu_hat = mu / (1 - b1**count)``, ``nu_hat = nu / (1 - b2**count)``
  (``eps_root = 0``).  Arithmetic is in the parameters' dtype.

The state (``count``, ``mu``, ``nu``) round-trips exactly through
:meth:`Adam.state_dict` / :meth:`Adam.load_state_dict`, which is what makes a
resumed training run bitwise-identical to an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import DivergenceError, TreeschedError
from .ops import array_module


def global_norm(grads: dict) -> float:
    """``sqrt(sum of squares)`` over every array of ``grads`` (optax.global_norm)."""
    total = 0.0
    for value in grads.values():
        xp = array_module(value)
        total += float(xp.sum(value * value))
    return math.sqrt(total)


def clip_by_global_norm(grads: dict, max_norm: float) -> tuple[dict, float]:
    """``(clipped, norm)``: optax.clip_by_global_norm on a dict of arrays.

    ``max_norm <= 0`` or ``None`` disables clipping (the norm is still returned).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported just below
        norm = global_norm(grads)
    if not math.isfinite(norm):
        raise DivergenceError(f"gradient norm is {norm}: training diverged")
    if max_norm is None or max_norm <= 0 or norm < max_norm:
        return dict(grads), norm
    clipped = {}
    for name, value in grads.items():
        dtype = value.dtype.type
        clipped[name] = (value / dtype(norm)) * dtype(max_norm)
    return clipped, norm


class Adam:
    """Adam (optax.adam semantics) with optional global-norm clipping first.

    Args:
      lr: learning rate (1e-3).
      b1, b2, eps: as optax.adam (0.9, 0.999, 1e-8).
      clip: global-norm clipping threshold applied before Adam (1.0);
        0 or None disables it.

    Usage::

        opt = Adam(lr=1e-3, clip=1.0)
        opt.init(model.params)
        norm = opt.step(model.params, grads)   # updates model.params in place
    """

    STATE_VERSION = 1

    def __init__(self, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8, clip: float | None = 1.0):
        for name, value in (("lr", lr), ("eps", eps)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TreeschedError(f"{name} must be a positive number, got {value!r}")
        for name, value in (("b1", b1), ("b2", b2)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise TreeschedError(f"{name} must be in [0, 1), got {value!r}")
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip)
                                     and clip >= 0):
            raise TreeschedError(f"clip must be a number >= 0, got {clip!r}")
        self.lr, self.b1, self.b2, self.eps = float(lr), float(b1), float(b2), float(eps)
        self.clip = float(clip) if clip else None
        self.count = 0
        self.mu: dict = {}
        self.nu: dict = {}

    def init(self, params) -> None:
        """Zero moments shaped like ``params`` (a dict of arrays)."""
        self.count = 0
        self.mu = {name: array_module(value).zeros_like(value) for name, value in params.items()}
        self.nu = {name: array_module(value).zeros_like(value) for name, value in params.items()}

    def updates(self, grads: dict) -> tuple[dict, float]:
        """``(updates, grad_norm)``: the additive updates for ``grads``,
        advancing the state; ``grad_norm`` is the norm before clipping."""
        if set(grads) != set(self.mu):
            raise TreeschedError(
                f"gradients have names {sorted(grads)}; the optimizer was initialised "
                f"for {sorted(self.mu)}")
        clipped, norm = clip_by_global_norm(grads, self.clip)
        self.count += 1
        out = {}
        for name, g in clipped.items():
            dtype = g.dtype.type
            xp = array_module(g)
            # coefficients as optax forms them: Python floats cast to the dtype
            mu = dtype(1 - self.b1) * g + dtype(self.b1) * self.mu[name]
            nu = dtype(1 - self.b2) * (g * g) + dtype(self.b2) * self.nu[name]
            self.mu[name], self.nu[name] = mu, nu
            # optax raises the decay to an int32 count in the moment's dtype
            count = dtype(self.count)
            mu_hat = mu / (dtype(1) - dtype(self.b1) ** count)
            nu_hat = nu / (dtype(1) - dtype(self.b2) ** count)
            out[name] = dtype(-self.lr) * (mu_hat / (xp.sqrt(nu_hat) + dtype(self.eps)))
        return out, norm

    def step(self, params, grads: dict) -> float:
        """Apply one update to ``params`` in place (``params[name] = p + u``);
        returns the global gradient norm before clipping."""
        # Every new value is computed and checked before any is assigned, so a
        # refused update leaves the parameters as they were.  (The moments
        # have moved by then: a diverged run continues from its checkpoint.)
        with np.errstate(over="ignore", invalid="ignore"):   # checked just below
            updates, norm = self.updates(grads)
            updated = {name: params[name] + update for name, update in updates.items()}
        for name, value in updated.items():
            if not bool(array_module(value).isfinite(value).all()):
                raise DivergenceError(f"the update made parameter {name!r} non-finite "
                                      f"(gradient norm {norm:.4g}): training diverged")
        for name, value in updated.items():
            params[name] = value
        return norm

    # ------------------------------------------------------------------ state
    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "b1": self.b1, "b2": self.b2, "eps": self.eps,
                "clip": self.clip}

    def state_dict(self) -> dict:
        """Host (NumPy) copies: ``{"count": int, "mu": {...}, "nu": {...}}``."""
        def host(value):
            get = getattr(value, "get", None)
            return np.array(get() if callable(get) and not isinstance(value, np.ndarray) else value)
        return {"count": int(self.count),
                "mu": {name: host(value) for name, value in self.mu.items()},
                "nu": {name: host(value) for name, value in self.nu.items()}}

    def load_state_dict(self, state: dict, like: dict | None = None) -> None:
        """Restore :meth:`state_dict` output; ``like`` (the params) fixes the
        names, shapes, dtype and array module the moments must have."""
        try:
            count, mu, nu = int(state["count"]), dict(state["mu"]), dict(state["nu"])
        except (KeyError, TypeError, ValueError) as error:
            raise TreeschedError(f"optimizer state is incomplete: {error}") from None
        if count < 0 or set(mu) != set(nu):
            raise TreeschedError("optimizer state is inconsistent")
        if like is not None:
            if set(mu) != set(like):
                raise TreeschedError(
                    f"optimizer state has parameters {sorted(mu)}, the model {sorted(like)}")
            for name, ref in like.items():
                for which, table in (("mu", mu), ("nu", nu)):
                    value = np.asarray(table[name])
                    if value.shape != tuple(ref.shape) or value.dtype != ref.dtype:
                        raise TreeschedError(
                            f"optimizer state {which}[{name!r}] is {value.dtype}{value.shape}; "
                            f"the parameter is {ref.dtype}{tuple(ref.shape)}")
                    table[name] = array_module(ref).asarray(value)
        self.count, self.mu, self.nu = count, mu, nu

"""The PR-RNN cell: the paper's ablation (pr-lstm, src/pr_lstm/haiku/model.py
and layers.py, ``NaryRNN``), forward and backward by hand.

The state is h alone. Every layer is an affine map, optionally rectified:

    leaf encoder : h = x @ leaf/w + leaf/b                          (no nonlinearity)
    merge        : h = relu(concat(h_l, h_r) @ merge/w + merge/b)
    unary layer k: h = relu(h @ unary_k/w + unary_k/b)

    leaf/w (D, H)   merge/w (2H, H)   unary_k/w (H, H)   biases (H,)

so one pair ``_affine_forward`` / ``_affine_backward`` covers all of them.

Cache of one affine layer (a tuple):
    X    (R, in)   the layer input               -> dW = X^T dA
    h    (R, H)    the rectified output, or None for the leaf (no relu);
                   relu'(a) = [a > 0] = [h > 0], so h stands in for the
                   pre-activation and no extra array is kept
Leaf cache: one layer cache. Merge cache: a tuple of ``num_layers`` layer caches,
the binary merge first (layer k's X is layer k-1's h: the same array, not a copy).
"""

from ._check import blocks_width, check_cache, check_dtype, check_rows, check_state, param
from .cell import Cell
from .xp import array_module


def _affine_forward(X, W, b, relu, need_cache):
    """h = X @ W + b, rectified if ``relu``. Returns (h, cache)."""
    xp = array_module(X)
    h = X @ W
    h += b
    if relu:
        xp.maximum(h, 0, out=h)
    return h, ((X, h if relu else None) if need_cache else None)


def _affine_backward(W, cache, dh, need_dx=True):
    """Backward of ``_affine_forward``. Returns (dX or None, dW, db)."""
    X, h = cache
    # relu' is the step function: pass the gradient where the unit was active.
    dA = dh if h is None else dh * (h > 0)
    dW = X.T @ dA  # sum over the R independent rows = one GEMM
    db = dA.sum(axis=0)
    dX = dA @ W.T if need_dx else None
    return dX, dW, db


class RNNCell(Cell):
    """PR-RNN cell: state (h,); linear leaf, relu merge and unary layers."""

    name = "rnn"
    state_names = ("h",)

    def param_shapes(self, input_size, hidden_size, num_layers=None):
        L = self.num_layers if num_layers is None else num_layers
        D, H = input_size, hidden_size
        shapes = {
            "leaf/w": (D, H),
            "leaf/b": (H,),
            "merge/w": (2 * H, H),
            "merge/b": (H,),
        }
        for k in range(1, L):
            shapes[f"unary_{k}/w"] = (H, H)
            shapes[f"unary_{k}/b"] = (H,)
        return shapes

    # -- leaf encoder ---------------------------------------------------------

    def leaf_forward(self, params, x, need_cache=True):
        dtype = check_dtype("x", x)
        check_rows("x", x, None, dtype)
        H = blocks_width(params, "leaf/w", 1)
        W = param(params, "leaf/w", (x.shape[1], H), dtype)
        b = param(params, "leaf/b", (H,), dtype)
        h, cache = _affine_forward(x, W, b, False, need_cache)
        return (h,), cache

    def leaf_backward(self, params, cache, dstate, need_dx=True):
        check_cache("rnn leaf_backward", cache)
        (dh,) = check_state(self, dstate)
        X = cache[0]
        H = blocks_width(params, "leaf/w", 1)
        W = param(params, "leaf/w", (X.shape[1], H), X.dtype)
        if dh is None:
            dh = array_module(X).zeros((X.shape[0], H), dtype=X.dtype)
        else:
            check_rows("dh", dh, H, X.dtype, X.shape[0])
        dx, dW, db = _affine_backward(W, cache, dh, need_dx)
        return {"leaf/w": dW, "leaf/b": db}, dx

    # -- merge: relu(concat @ W + b), then the unary relu layers -------------

    def merge_forward(self, params, left_state, right_state, need_cache=True):
        self._check_layers(params)
        (h_l,) = check_state(self, left_state, "left state")
        (h_r,) = check_state(self, right_state, "right state")
        dtype = check_dtype("left h", h_l)
        check_rows("left h", h_l, None, dtype)
        R, H = h_l.shape
        check_rows("right h", h_r, H, dtype, R)
        W = param(params, "merge/w", (2 * H, H), dtype)
        b = param(params, "merge/b", (H,), dtype)

        xp = array_module(h_l, h_r)
        X = xp.concatenate((h_l, h_r), axis=1)
        h, layer_cache = _affine_forward(X, W, b, True, need_cache)
        caches = [layer_cache]
        for wn, bn in self._unary_names:
            W = param(params, wn, (H, H), dtype)
            b = param(params, bn, (H,), dtype)
            h, layer_cache = _affine_forward(h, W, b, True, need_cache)
            caches.append(layer_cache)
        return (h,), (tuple(caches) if need_cache else None)

    def merge_backward(self, params, cache, dstate):
        check_cache("rnn merge_backward", cache)
        (dh,) = check_state(self, dstate)
        self._check_layers(params)
        h_out = cache[-1][1]
        R, H = h_out.shape
        dtype = h_out.dtype
        if dh is None:
            dh = array_module(h_out).zeros_like(h_out)
        else:
            check_rows("dh", dh, H, dtype, R)

        grads = {}
        for k in range(self.num_layers - 1, 0, -1):
            wn, bn = self._unary_names[k - 1]
            W = param(params, wn, (H, H), dtype)
            dh, grads[wn], grads[bn] = _affine_backward(W, cache[k], dh)
        W = param(params, "merge/w", (2 * H, H), dtype)
        dX, grads["merge/w"], grads["merge/b"] = _affine_backward(W, cache[0], dh)
        return (dX[:, :H],), (dX[:, H:],), grads

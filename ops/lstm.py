"""The PR-LSTM cell (SPEC section 1), forward and backward by hand.

All three LSTM layers of the model are one N-ary gated layer (as the paper's
``NaryLSTM``), differing only in how many previous cells they gate:

    [a_i, a_g, a_o, a_f1 .. a_fN] = X @ W + b
    c = σ(a_i) * tanh(a_g) + Σ_k σ(a_fk) * c_k
    h = σ(a_o) * tanh(c)

    leaf encoder : N = 0, X = x,                 W = leaf/w    (D, 3H)
    merge        : N = 2, X = concat(h_l, h_r),  W = merge/w   (2H, 5H), c_1 = c_l, c_2 = c_r
    unary layer k: N = 1, X = h,                 W = unary_k/w (H, 4H),  c_1 = c

so the forward and the backward are written once, in ``_gated_forward`` and
``_gated_backward``; docs/backward.md derives the backward.

Cache of one gated layer (a tuple):
    X    (R, in)       the layer input (x, concat(h_l, h_r), or the previous h) -> dW = X^T dA
    act  (R, (3+N)H)   the gate activations [σ(a_i), tanh(a_g), σ(a_o), σ(a_f1..N)]
                       (the pre-activations are overwritten in place; the local
                       derivatives need only the activations)
    cs   N x (R, H)    the gated previous cells (c_l, c_r / c)  -> forget-gate grads
    tc   (R, H)        tanh(c)                                  -> output-gate and dc
Leaf cache: one layer cache. Merge cache: a tuple of ``num_layers`` layer caches,
the binary merge first.
"""

from ._check import blocks_width, check_cache, check_dtype, check_rows, check_state, param
from .cell import Cell
from .xp import array_module, sigmoid


def _gated_forward(X, W, b, cs, need_cache):
    """One N-ary LSTM layer over rows (N = len(cs)). Returns (h, c, cache)."""
    xp = array_module(X)
    H = W.shape[1] // (3 + len(cs))
    # One GEMM for all gates; the result is ours, so the nonlinearities run in
    # place and the same buffer becomes the cached activations.
    act = X @ W
    act += b
    sigmoid(act[:, :H], out=act[:, :H])  # i
    xp.tanh(act[:, H : 2 * H], out=act[:, H : 2 * H])  # g
    sigmoid(act[:, 2 * H :], out=act[:, 2 * H :])  # o and every forget gate
    i, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H]
    c = i * g
    for k, c_k in enumerate(cs):
        c += act[:, (3 + k) * H : (4 + k) * H] * c_k
    tc = xp.tanh(c)
    h = o * tc
    return h, c, ((X, act, tuple(cs), tc) if need_cache else None)


def _gated_backward(W, cache, dh, dc, need_dx=True):
    """Backward of ``_gated_forward``. dh (R, H) is required, dc may be None.

    Returns (dX or None, [dc_k for each gated cell], dW, db).
    """
    X, act, cs, tc = cache
    xp = array_module(X, act)
    H = tc.shape[1]
    i, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H]
    dA = xp.empty_like(act)  # d loss / d pre-activations, same block layout

    # h = o * tanh(c): dL/do = dh * tanh(c); then through σ' = σ(1-σ).
    da_o = dA[:, 2 * H : 3 * H]
    xp.multiply(dh, tc, out=da_o)
    da_o *= o * (1 - o)

    # Total gradient reaching c: through h (tanh' = 1 - tanh²) plus from above.
    dct = dh * o
    dct *= 1 - tc * tc
    if dc is not None:
        dct += dc

    # c = i * g + ...: dL/di = dct * g, dL/dg = dct * i.
    da_i = dA[:, :H]
    xp.multiply(dct, g, out=da_i)
    da_i *= i * (1 - i)
    da_g = dA[:, H : 2 * H]
    xp.multiply(dct, i, out=da_g)
    da_g *= 1 - g * g

    # c = ... + f_k * c_k: dL/df_k = dct * c_k, dL/dc_k = dct * f_k.
    dcs = []
    for k, c_k in enumerate(cs):
        f = act[:, (3 + k) * H : (4 + k) * H]
        da_f = dA[:, (3 + k) * H : (4 + k) * H]
        xp.multiply(dct, c_k, out=da_f)
        da_f *= f * (1 - f)
        dcs.append(dct * f)

    # A = X @ W + b over R rows: every row contributes to dW, and the row sum
    # is one GEMM, X^T @ dA.
    dW = X.T @ dA
    db = dA.sum(axis=0)
    dX = dA @ W.T if need_dx else None
    return dX, dcs, dW, db


class LSTMCell(Cell):
    """PR-LSTM cell: state (h, c); leaf encoder, gated merge, gated unary layers."""

    name = "lstm"
    state_names = ("h", "c")

    def param_shapes(self, input_size, hidden_size, num_layers=None):
        L = self.num_layers if num_layers is None else num_layers
        D, H = input_size, hidden_size
        shapes = {
            "leaf/w": (D, 3 * H),
            "leaf/b": (3 * H,),
            "merge/w": (2 * H, 5 * H),
            "merge/b": (5 * H,),
        }
        for k in range(1, L):
            shapes[f"unary_{k}/w"] = (H, 4 * H)
            shapes[f"unary_{k}/b"] = (4 * H,)
        return shapes

    # -- leaf encoder ---------------------------------------------------------

    def leaf_forward(self, params, x, need_cache=True):
        dtype = check_dtype("x", x)
        H = blocks_width(params, "leaf/w", 3)
        check_rows("x", x, None, dtype)
        D = x.shape[1]
        W = param(params, "leaf/w", (D, 3 * H), dtype)
        b = param(params, "leaf/b", (3 * H,), dtype)
        h, c, cache = _gated_forward(x, W, b, (), need_cache)
        return (h, c), cache

    def leaf_backward(self, params, cache, dstate, need_dx=True):
        check_cache("lstm leaf_backward", cache)
        X, act, _, tc = cache
        R, H = tc.shape
        W = param(params, "leaf/w", (X.shape[1], 3 * H), act.dtype)
        dh, dc = check_state(self, dstate)
        if dh is None:
            dh = array_module(tc).zeros_like(tc)
        else:
            check_rows("dh", dh, H, act.dtype, R)
        if dc is not None:
            check_rows("dc", dc, H, act.dtype, R)
        dx, _, dW, db = _gated_backward(W, cache, dh, dc, need_dx)
        return {"leaf/w": dW, "leaf/b": db}, dx

    # -- merge: binary gated merge, then the unary refinement layers ---------

    def merge_forward(self, params, left_state, right_state, need_cache=True):
        self._check_layers(params)
        h_l, c_l = check_state(self, left_state, "left state")
        h_r, c_r = check_state(self, right_state, "right state")
        dtype = check_dtype("left h", h_l)
        check_rows("left h", h_l, None, dtype)
        R, H = h_l.shape
        check_rows("left c", c_l, H, dtype, R)
        check_rows("right h", h_r, H, dtype, R)
        check_rows("right c", c_r, H, dtype, R)
        W = param(params, "merge/w", (2 * H, 5 * H), dtype)
        b = param(params, "merge/b", (5 * H,), dtype)

        xp = array_module(h_l, h_r)
        X = xp.concatenate((h_l, h_r), axis=1)
        h, c, layer_cache = _gated_forward(X, W, b, (c_l, c_r), need_cache)
        caches = [layer_cache]
        for wn, bn in self._unary_names:
            W = param(params, wn, (H, 4 * H), dtype)
            b = param(params, bn, (4 * H,), dtype)
            h, c, layer_cache = _gated_forward(h, W, b, (c,), need_cache)
            caches.append(layer_cache)
        return (h, c), (tuple(caches) if need_cache else None)

    def merge_backward(self, params, cache, dstate):
        check_cache("lstm merge_backward", cache)
        self._check_layers(params)
        tc = cache[-1][3]
        R, H = tc.shape
        dtype = tc.dtype
        dh, dc = check_state(self, dstate)
        if dh is None:
            dh = array_module(tc).zeros_like(tc)
        else:
            check_rows("dh", dh, H, dtype, R)
        if dc is not None:
            check_rows("dc", dc, H, dtype, R)

        grads = {}
        # Unary layers last-to-first: each hands (dh, dc) to the layer below.
        for k in range(self.num_layers - 1, 0, -1):
            wn, bn = self._unary_names[k - 1]
            W = param(params, wn, (H, 4 * H), dtype)
            dh, (dc,), grads[wn], grads[bn] = _gated_backward(W, cache[k], dh, dc)
        W = param(params, "merge/w", (2 * H, 5 * H), dtype)
        dX, (dc_l, dc_r), grads["merge/w"], grads["merge/b"] = _gated_backward(W, cache[0], dh, dc)
        # dX is d/d concat(h_l, h_r); the halves are views (no copy).
        return (dX[:, :H], dc_l), (dX[:, H:], dc_r), grads

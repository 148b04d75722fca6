"""Tests for treesched.ops: forward against SPEC section 1 written out naively,
every backward against central finite differences in float64, dtypes,
errors and overflow safety. Small shapes: the whole file runs in a few seconds.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from treesched.errors import TreeschedError
from treesched.ops import (
    Cell,
    LSTMCell,
    RNNCell,
    array_module,
    cell_names,
    get_cell,
    head_backward,
    head_forward,
    head_param_shapes,
    sigmoid,
    softmax_cross_entropy,
)

D, H, R, O = 3, 4, 5, 3
EPS = 1e-6
TOL = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def make_params(cell, g, dtype=np.float64, scale=0.6):
    return {k: (scale * g.standard_normal(s)).astype(dtype) for k, s in cell.param_shapes(D, H).items()}


def make_state(cell, g, dtype=np.float64):
    # nonzero c (and h) so the forget-gate paths carry gradient
    return tuple((0.8 * g.standard_normal((R, H))).astype(dtype) for _ in cell.state_names)


def rel_err(a, n):
    a, n = np.asarray(a, np.float64), np.asarray(n, np.float64)
    denom = max(np.linalg.norm(a), np.linalg.norm(n), 1e-12)
    return np.linalg.norm(a - n) / denom


def numeric_grad(f, arr):
    """Central differences of the scalar f() w.r.t. every element of arr (in place)."""
    grad = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = arr[idx]
        arr[idx] = old + EPS
        fp = f()
        arr[idx] = old - EPS
        fm = f()
        arr[idx] = old
        grad[idx] = (fp - fm) / (2 * EPS)
    return grad


def functional(outs, rs):
    """sum(out * r) over every output array: a random linear functional."""
    return float(sum((o * r).sum() for o, r in zip(outs, rs)))


# --- naive forward straight from SPEC section 1 / the paper's NaryRNN ---------

def np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_lstm_leaf(p, x):
    a = x @ p["leaf/w"] + p["leaf/b"]
    ai, ag, ao = np.split(a, 3, axis=-1)
    c = np_sig(ai) * np.tanh(ag)
    return np_sig(ao) * np.tanh(c), c


def ref_lstm_merge(p, L, Rs, num_layers):
    (hl, cl), (hr, cr) = L, Rs
    a = np.concatenate([hl, hr], -1) @ p["merge/w"] + p["merge/b"]
    ai, ag, ao, afl, afr = np.split(a, 5, axis=-1)
    c = np_sig(ai) * np.tanh(ag) + np_sig(afl) * cl + np_sig(afr) * cr
    h = np_sig(ao) * np.tanh(c)
    for k in range(1, num_layers):
        a = h @ p[f"unary_{k}/w"] + p[f"unary_{k}/b"]
        ai, ag, ao, af = np.split(a, 4, axis=-1)
        c = np_sig(ai) * np.tanh(ag) + np_sig(af) * c
        h = np_sig(ao) * np.tanh(c)
    return h, c


def ref_rnn_merge(p, hl, hr, num_layers):
    h = np.maximum(np.concatenate([hl, hr], -1) @ p["merge/w"] + p["merge/b"], 0)
    for k in range(1, num_layers):
        h = np.maximum(h @ p[f"unary_{k}/w"] + p[f"unary_{k}/b"], 0)
    return h


# --- interface / registry ------------------------------------------------------

def test_registry_and_param_names():
    assert set(cell_names()) == {"lstm", "rnn"}
    assert isinstance(get_cell("LSTM", 3), LSTMCell) and get_cell("rnn", 1).num_layers == 1
    assert isinstance(get_cell("lstm", 2), Cell)
    assert get_cell("lstm").num_layers == 2
    with pytest.raises(TreeschedError, match="lstm.*rnn"):
        get_cell("gru", 2)
    with pytest.raises(TreeschedError, match="num_layers"):
        get_cell("lstm", 0)
    assert LSTMCell(3).param_shapes(7, 5) == {
        "leaf/w": (7, 15), "leaf/b": (15,), "merge/w": (10, 25), "merge/b": (25,),
        "unary_1/w": (5, 20), "unary_1/b": (20,), "unary_2/w": (5, 20), "unary_2/b": (20,),
    }
    assert RNNCell(2).param_shapes(7, 5) == {
        "leaf/w": (7, 5), "leaf/b": (5,), "merge/w": (10, 5), "merge/b": (5,),
        "unary_1/w": (5, 5), "unary_1/b": (5,),
    }
    assert list(LSTMCell(1).param_shapes(7, 5, num_layers=2)) == ["leaf/w", "leaf/b", "merge/w", "merge/b", "unary_1/w", "unary_1/b"]
    assert head_param_shapes(5, 2) == {"head/w": (5, 2), "head/b": (2,)}
    assert LSTMCell.state_names == ("h", "c") and RNNCell.state_names == ("h",)


def test_array_module_is_numpy_and_never_imports_cupy():
    assert array_module(np.zeros(2), None, 3.0) is np
    code = (
        "import sys, numpy as np; from treesched.ops import array_module, get_cell;"
        "array_module(np.zeros(2)); assert 'cupy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- forward matches the SPEC formulas -----------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_lstm_forward_matches_spec(num_layers):
    g = rng(1)
    cell = LSTMCell(num_layers)
    p = make_params(cell, g)
    x = g.standard_normal((R, D))
    (h, c), cache = cell.leaf_forward(p, x)
    np.testing.assert_allclose((h, c), ref_lstm_leaf(p, x), rtol=1e-13, atol=1e-14)
    L, Rs = make_state(cell, g), make_state(cell, g)
    (h, c), _ = cell.merge_forward(p, L, Rs)
    np.testing.assert_allclose((h, c), ref_lstm_merge(p, L, Rs, num_layers), rtol=1e-13, atol=1e-14)
    (h2, c2), none = cell.merge_forward(p, L, Rs, need_cache=False)
    assert none is None and np.array_equal(h, h2) and np.array_equal(c, c2)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_rnn_forward_matches_paper(num_layers):
    g = rng(2)
    cell = RNNCell(num_layers)
    p = make_params(cell, g)
    x = g.standard_normal((R, D))
    (h,), _ = cell.leaf_forward(p, x)
    np.testing.assert_allclose(h, x @ p["leaf/w"] + p["leaf/b"], rtol=1e-13)  # no nonlinearity
    hl, hr = g.standard_normal((R, H)), g.standard_normal((R, H))
    (h,), _ = cell.merge_forward(p, (hl,), (hr,))
    np.testing.assert_allclose(h, ref_rnn_merge(p, hl, hr, num_layers), rtol=1e-13, atol=1e-14)


# --- gradients by central finite differences (float64) ------------------------

@pytest.mark.parametrize("cell_cls", [LSTMCell, RNNCell])
def test_leaf_gradients(cell_cls):
    g = rng(3)
    cell = cell_cls(2)
    p = make_params(cell, g)
    x = g.standard_normal((R, D))
    rs = [g.standard_normal((R, H)) for _ in cell.state_names]

    def f():
        return functional(cell.leaf_forward(p, x, need_cache=False)[0], rs)

    _, cache = cell.leaf_forward(p, x)
    grads, dx = cell.leaf_backward(p, cache, tuple(rs))
    assert set(grads) == {"leaf/w", "leaf/b"}
    assert rel_err(dx, numeric_grad(f, x)) < TOL
    for name in grads:
        assert rel_err(grads[name], numeric_grad(f, p[name])) < TOL, name
    assert cell.leaf_backward(p, cache, tuple(rs), need_dx=False)[1] is None


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell_cls", [LSTMCell, RNNCell])
def test_merge_gradients(cell_cls, num_layers):
    g = rng(4 + num_layers)
    cell = cell_cls(num_layers)
    p = {k: v for k, v in make_params(cell, g).items() if not k.startswith("leaf/")}
    L, Rs = make_state(cell, g), make_state(cell, g)
    rs = [g.standard_normal((R, H)) for _ in cell.state_names]

    def f():
        return functional(cell.merge_forward(p, L, Rs, need_cache=False)[0], rs)

    _, cache = cell.merge_forward(p, L, Rs)
    dL, dR, grads = cell.merge_backward(p, cache, tuple(rs))
    assert set(grads) == set(p)
    for name in p:
        assert rel_err(grads[name], numeric_grad(f, p[name])) < TOL, name
    for side, dside in ((L, dL), (Rs, dR)):
        assert len(dside) == len(cell.state_names)
        for arr, darr in zip(side, dside):
            assert rel_err(darr, numeric_grad(f, arr)) < TOL


@pytest.mark.parametrize("cell_cls", [LSTMCell, RNNCell])
def test_none_dstate_entries_mean_zero(cell_cls):
    g = rng(8)
    cell = cell_cls(2)
    p = make_params(cell, g)
    L, Rs = make_state(cell, g), make_state(cell, g)
    _, cache = cell.merge_forward(p, L, Rs)
    zeros = tuple(np.zeros((R, H)) for _ in cell.state_names)
    nones = (None,) * len(cell.state_names)
    a, b = cell.merge_backward(p, cache, zeros), cell.merge_backward(p, cache, nones)
    for k in a[2]:
        assert np.array_equal(a[2][k], b[2][k]) and not a[2][k].any()
    if cell_cls is LSTMCell:  # dc = None vs dc = 0 with a real dh
        dh = g.standard_normal((R, H))
        a = cell.merge_backward(p, cache, (dh, np.zeros((R, H))))
        b = cell.merge_backward(p, cache, (dh, None))
        np.testing.assert_array_equal(a[0][1], b[0][1])
        np.testing.assert_array_equal(a[2]["merge/w"], b[2]["merge/w"])


def test_tree_accumulates_operand_gradients():
    """A node feeding two merges gets the sum of both gradients (y = m(m(a,b),c), out = (m(a,b), y))."""
    g = rng(9)
    cell = LSTMCell(2)
    p = make_params(cell, g)
    xs = g.standard_normal((3, R, D))
    rs = [g.standard_normal((R, H)) for _ in range(4)]

    def f():
        a, b, c = (cell.leaf_forward(p, x, need_cache=False)[0] for x in xs)
        ab, _ = cell.merge_forward(p, a, b, need_cache=False)
        y, _ = cell.merge_forward(p, ab, c, need_cache=False)
        return functional(ab + y, rs)

    (a, ca), (b, cb), (c, cc) = (cell.leaf_forward(p, x) for x in xs)
    ab, c_ab = cell.merge_forward(p, a, b)
    y, c_y = cell.merge_forward(p, ab, c)
    d_ab, d_c, gy = cell.merge_backward(p, c_y, (rs[2], rs[3]))
    d_ab = (d_ab[0] + rs[0], d_ab[1] + rs[1])  # accumulate: ab is read by the loss AND by the merge
    d_a, d_b, gab = cell.merge_backward(p, c_ab, d_ab)
    dxs = [cell.leaf_backward(p, cache, d)[1] for cache, d in ((ca, d_a), (cb, d_b), (cc, d_c))]
    assert rel_err(np.stack(dxs), numeric_grad(f, xs)) < TOL
    assert rel_err(gy["merge/w"] + gab["merge/w"], numeric_grad(f, p["merge/w"])) < TOL


def test_head_gradients():
    g = rng(10)
    p = {k: g.standard_normal(s) for k, s in head_param_shapes(H, O).items()}
    h = g.standard_normal((2, 3, H))  # any leading shape, both signs (relu kinks)
    r = g.standard_normal((2, 3, O))

    def f():
        return float((head_forward(p, h, need_cache=False)[0] * r).sum())

    y, cache = head_forward(p, h)
    np.testing.assert_allclose(y, np.maximum(h, 0) @ p["head/w"] + p["head/b"], rtol=1e-14)
    dh, grads = head_backward(p, cache, r)
    assert rel_err(dh, numeric_grad(f, h)) < TOL
    for name in p:
        assert rel_err(grads[name], numeric_grad(f, p[name])) < TOL, name


def test_loss_value_and_gradient():
    g = rng(11)
    logits = 3 * g.standard_normal((2, 3, O))
    soft = np.exp(g.standard_normal((2, 3, O)))
    targets = soft / soft.sum(-1, keepdims=True)
    targets[0] = np.eye(O)[g.integers(0, O, size=3)]  # one-hot rows too
    weights = np.array([[0.5, 0.0, 1.5], [0.25, 2.0, 1.0]])

    loss, dlogits = softmax_cross_entropy(logits, targets, weights)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert isinstance(loss, float)
    assert abs(loss - (weights * -(targets * logp).sum(-1)).sum()) < 1e-12
    num = numeric_grad(lambda: softmax_cross_entropy(logits, targets, weights)[0], logits)
    assert rel_err(dlogits, num) < TOL
    assert not dlogits[0, 1].any()  # zero weight, zero gradient


# --- dtypes, errors, overflow ---------------------------------------------------

@pytest.mark.parametrize("cell_cls", [LSTMCell, RNNCell])
def test_float32_stays_float32(cell_cls):
    g = rng(12)
    cell = cell_cls(3)
    p = make_params(cell, g, np.float32)
    x = g.standard_normal((R, D)).astype(np.float32)
    st, cache = cell.leaf_forward(p, x)
    grads, dx = cell.leaf_backward(p, cache, st)
    L, Rs = make_state(cell, g, np.float32), make_state(cell, g, np.float32)
    out, mc = cell.merge_forward(p, L, Rs)
    dL, dR, mg = cell.merge_backward(p, mc, out)
    arrays = [*st, dx, *grads.values(), *out, *dL, *dR, *mg.values()]
    assert all(a.dtype == np.float32 for a in arrays)
    hp = {k: g.standard_normal(s).astype(np.float32) for k, s in head_param_shapes(H, O).items()}
    y, hc = head_forward(hp, out[0])
    dh, hg = head_backward(hp, hc, y)
    _, dlog = softmax_cross_entropy(y, np.full(y.shape, 1.0 / O), np.ones(R))  # f64 targets/weights
    assert all(a.dtype == np.float32 for a in (y, dh, dlog, *hg.values()))
    assert sigmoid(np.zeros(3, np.float32)).dtype == np.float32


def test_bad_inputs_raise():
    g = rng(13)
    cell = LSTMCell(2)
    p = make_params(cell, g)
    x = g.standard_normal((R, D))
    L, Rs = make_state(cell, g), make_state(cell, g)

    bad = dict(p, **{"merge/w": np.zeros((2 * H, 4 * H))})
    with pytest.raises(TreeschedError, match=r"merge/w.*\(8, 16\).*\(8, 20\)"):
        cell.merge_forward(bad, L, Rs)
    bad = dict(p, **{"unary_1/b": np.zeros(3)})
    with pytest.raises(TreeschedError, match=r"unary_1/b.*\(3,\).*\(16,\)"):
        cell.merge_forward(bad, L, Rs)
    with pytest.raises(TreeschedError, match="missing parameter 'unary_1/w'"):
        cell.merge_forward({k: v for k, v in p.items() if not k.startswith("unary")}, L, Rs)
    with pytest.raises(TreeschedError, match="unary_2/w"):
        cell.merge_forward(make_params(LSTMCell(3), g), L, Rs)
    with pytest.raises(TreeschedError, match=r"leaf/w.*\(3, 12\).*\(2, 12\)"):
        cell.leaf_forward(p, g.standard_normal((R, 2)))
    with pytest.raises(TreeschedError, match="dtype"):
        cell.leaf_forward(p, x.astype(np.float32))
    with pytest.raises(TreeschedError, match="float32 or float64"):
        cell.leaf_forward(p, x.astype(np.int64))
    with pytest.raises(TreeschedError, match="right c"):
        cell.merge_forward(p, L, (Rs[0], Rs[1][:2]))
    with pytest.raises(TreeschedError, match="tuple of 2"):
        cell.merge_forward(p, L[0], Rs)
    with pytest.raises(TreeschedError, match="need_cache=False"):
        cell.merge_backward(p, None, L)
    with pytest.raises(TreeschedError, match=r"head/w.*\(4, 2\).*\(5, 2\)"):
        head_forward({"head/w": np.zeros((4, 2)), "head/b": np.zeros(2)}, np.zeros((3, 5)))
    with pytest.raises(TreeschedError, match="weights"):
        softmax_cross_entropy(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_overflow_for_huge_preactivations(dtype):
    g = rng(14)
    big = np.array([-1e4, -800.0, -100.0, 0.0, 100.0, 800.0, 1e4], dtype)
    # Underflow to 0 (exp(-1e4) in the softmax) is the right answer, not an error.
    with np.errstate(all="raise", under="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sigmoid(big)
        assert s.dtype == dtype and s[0] == 0 and s[-1] == 1 and s[3] == 0.5
        np.testing.assert_allclose(sigmoid(np.linspace(-8, 8, 33)), np_sig(np.linspace(-8, 8, 33)), rtol=1e-13, atol=1e-16)
        for cell_cls in (LSTMCell, RNNCell):
            cell = cell_cls(2)
            p = make_params(cell, g, dtype, scale=1.0)
            x = (1e4 * g.standard_normal((R, D))).astype(dtype)  # |pre-activations| ~ 1e4
            st, cache = cell.leaf_forward(p, x)
            cell.leaf_backward(p, cache, st)
            big_state = tuple((1e3 * a).astype(dtype) for a in st)
            out, mc = cell.merge_forward(p, big_state, big_state)
            cell.merge_backward(p, mc, out)
            assert all(np.isfinite(a).all() for a in out)
        logits = (1e4 * g.standard_normal((R, O))).astype(dtype)
        loss, dl = softmax_cross_entropy(logits, np.eye(O, dtype=dtype)[np.arange(R) % O], np.ones(R, dtype))
        assert np.isfinite(loss) and np.isfinite(dl).all()

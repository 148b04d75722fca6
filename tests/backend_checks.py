"""Shared helpers of the backend tests: random cases, comparisons with the
NumPy reference executor, and toy cells described only by their layers."""

from __future__ import annotations

import contextlib

import numpy as np

import treesched
from treesched.ops import Cell, Layer, get_cell, register_cell, unregister_cell


class GateFreeMergeCell(Cell):
    """A toy gated cell no backend knows by name, with its own parameter names:
    the binary merge gates no previous cell (``num_prev=0``, so the operands'
    cells get no gradient), unary layer k gates the cell below for odd k
    only (so a layer may hand no ``dc`` down)."""

    name = "toy-gate-free-merge"
    kind = "gated"

    def build_layers(self, num_layers):
        return (Layer("embed", "gated", "input"),
                Layer("combine", "gated", "pair", num_prev=0),
                *(Layer(f"refine_{k}", "gated", "below", num_prev=k % 2)
                  for k in range(1, num_layers)))


class RectifiedLeafCell(Cell):
    """A toy affine cell: the leaf is rectified, the merge is not."""

    name = "toy-rectified-leaf"
    kind = "affine"

    def build_layers(self, num_layers):
        return (Layer("leaf", "affine", "input", relu=True),
                Layer("merge", "affine", "pair", relu=False),
                *(Layer(f"unary_{k}", "affine", "below", relu=True)
                  for k in range(1, num_layers)))


class FreshUnaryCell(Cell):
    """A toy gated cell whose unary layers start a fresh cell (gate nothing below)."""

    name = "toy-fresh-unary"
    kind = "gated"

    def build_layers(self, num_layers):
        return (Layer("leaf", "gated", "input"),
                Layer("merge", "gated", "pair", num_prev=2),
                *(Layer(f"unary_{k}", "gated", "below", num_prev=0)
                  for k in range(1, num_layers)))


class LinearUnaryCell(Cell):
    """A toy affine cell: rectified merge, unrectified unary layers."""

    name = "toy-linear-unary"
    kind = "affine"

    def build_layers(self, num_layers):
        return (Layer("leaf", "affine", "input"),
                Layer("merge", "affine", "pair", relu=True),
                *(Layer(f"unary_{k}", "affine", "below") for k in range(1, num_layers)))


TOY_CELLS = (GateFreeMergeCell, RectifiedLeafCell, FreshUnaryCell, LinearUnaryCell)


@contextlib.contextmanager
def registered(*cells):
    """``register_cell`` each of ``cells`` for the duration (then unregistered)."""
    try:
        for cls in cells:
            register_cell(cls)
        yield
    finally:
        for cls in cells:
            unregister_cell(cls.name)


def make_params(cell, inputs, hidden, rng, dtype):
    return {name: (0.5 * rng.standard_normal(shape)).astype(dtype)
            for name, shape in cell.param_shapes(inputs, hidden).items()}


def make_case(cell_name, layers, pattern, length, batch=3, inputs=3, hidden=4, dtype=np.float64,
              seed=0, outputs=None):
    rng = np.random.default_rng(seed)
    cell = get_cell(cell_name, layers)
    params = make_params(cell, inputs, hidden, rng, dtype)
    x = rng.standard_normal((batch, length, inputs)).astype(dtype)
    if outputs is None:
        outputs = "last" if pattern == "reduce" else "all"
    schedule = treesched.compile(length, pattern, outputs)
    return cell, params, x, schedule, rng


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if b.size else 0.0


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = rel(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def compare_once(backend, reference, cell, params, x, schedule, rng, tol, need_dx=True):
    """Forward (both plans) and backward of ``backend`` against ``reference``."""
    want_inf, _ = reference.encode(cell, params, x, schedule, need_grad=False)
    got_inf, _ = backend.encode(cell, params, x, schedule, need_grad=False)
    for index, (g, w) in enumerate(zip(got_inf, want_inf)):
        assert_close(g, w, tol, f"inference state {index}")
    want, want_tape = reference.encode(cell, params, x, schedule, need_grad=True)
    got, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, f"training state {index}")
    dstates = tuple(rng.standard_normal(w.shape).astype(x.dtype) for w in want)
    want_grads, want_dx = reference.encode_backward(cell, params, want_tape, dstates, need_dx)
    got_grads, got_dx = backend.encode_backward(cell, params, tape, dstates, need_dx)
    for name, value in want_grads.items():
        assert_close(got_grads[name], value, tol, f"grad {name}")
    for name, value in got_grads.items():
        if name not in want_grads:  # the reference leaves out params no level touched
            assert not np.any(value), name
    if need_dx:
        assert_close(got_dx, want_dx, tol, "dx")
    return got_grads

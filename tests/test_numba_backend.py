"""The Numba backend against the NumPy reference, and its runtime contract."""

import inspect

import numpy as np
import pytest

import treesched
from treesched import PRLSTM
from treesched.backends import why_unavailable

pytestmark = pytest.mark.skipif(why_unavailable("numba") is not None,
                                reason=f"numba backend: {why_unavailable('numba')}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_numpy_every_pattern_cell_and_depth(dtype):
    """Outputs and every gradient, all patterns, both cells, num_layers 1-3,
    with lengths (the parity run pads a batch of mixed lengths)."""
    from treesched.parity import run_parity
    report = run_parity("numba", dtype=dtype, length=23, batch=3, hidden=8, layers=(1, 2, 3))
    tolerance = 1e-5 if dtype == "float32" else 1e-10
    worst = max(case.rel_error for case in report.cases)
    assert report.passed and worst <= tolerance, report.format_table()


def _pair(pattern="odd-even", cell="lstm", num_layers=2, dtype="float32"):
    reference = PRLSTM(5, 16, 3, num_layers=num_layers, cell=cell, pattern=pattern,
                       dtype=dtype, seed=1)
    fast = PRLSTM(5, 16, 3, num_layers=num_layers, cell=cell, pattern=pattern,
                  dtype=dtype, backend="numba", seed=1)
    return reference, fast


def relative(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_padded_batch_and_pruned_outputs(cell):
    rng = np.random.default_rng(0)
    reference, fast = _pair(cell=cell)
    x = rng.standard_normal((4, 40, 5)).astype(np.float32)
    lengths = np.array([40, 3, 17, 33])
    dy = rng.standard_normal((4, 40, 3)).astype(np.float32)
    y_ref, g_ref = reference.forward_backward(x, dy, lengths=lengths)
    y, g = fast.forward_backward(x, dy, lengths=lengths)
    assert relative(y, y_ref) < 1e-5
    for name in g_ref:
        assert relative(g[name], g_ref[name]) < 1e-5, name
    for outputs in ("last", 3):
        assert relative(fast.forward(x, lengths=lengths, outputs=outputs),
                        reference.forward(x, lengths=lengths, outputs=outputs)) < 1e-5


def test_results_are_deterministic_run_to_run():
    rng = np.random.default_rng(1)
    _, fast = _pair("kogge-stone")  # operands shared within a level
    x = rng.standard_normal((8, 50, 5)).astype(np.float32)
    dy = rng.standard_normal((8, 50, 3)).astype(np.float32)
    first = fast.forward_backward(x, dy)
    for _ in range(3):
        again = fast.forward_backward(x, dy)
        np.testing.assert_array_equal(again[0], first[0])
        for name in first[1]:
            np.testing.assert_array_equal(again[1][name], first[1][name])


def test_workspaces_are_reused_across_calls():
    rng = np.random.default_rng(2)
    _, fast = _pair()
    backend = fast.backend
    x = rng.standard_normal((4, 30, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 30, 3)).astype(np.float32)
    fast.forward_backward(x, dy)
    fast.forward(x)
    allocated = backend.workspaces.allocations
    hits = backend.workspaces.hits
    for _ in range(3):
        fast.forward_backward(x, dy)
        fast.forward(x)
    assert backend.workspaces.allocations == allocated
    assert backend.workspaces.hits > hits


def test_kernels_use_the_on_disk_cache():
    from treesched.backends import numba_kernels
    kernels = [obj for _, obj in inspect.getmembers(numba_kernels)
               if hasattr(obj, "targetoptions") and hasattr(obj, "py_func")]
    assert kernels, "no numba kernels found"
    for kernel in kernels:
        assert kernel._cache.__class__.__name__ != "NullCache", kernel.py_func.__name__


def test_numba_is_listed_available():
    assert treesched.backends.availability()["numba"] is None

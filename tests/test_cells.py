"""A cell described by its layers runs on every backend without touching them.

Toy cells no backend knows by name (``tests/backend_checks.py``) are
registered (``register_cell``): a gated cell with its own parameter names
whose binary merge gates no previous cell and whose unary layers gate only
every other layer, a gated cell whose unary layers gate nothing, and affine
cells with a rectified leaf or unrectified unary layers.  Each is
checked against finite differences on the numpy reference (float64) and
against the reference on numba, on the CuPy host code with the real CUDA C
compiled for the CPU, and on the CuPy host code with NumPy transcriptions of
the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_checks import TOY_CELLS, registered
from cuda_emulation import emulated_backend
from cuda_on_cpu import cpu_backend
from cuda_on_cpu import why_unavailable as why_no_compiler

import treesched
from treesched.backends import get_backend, why_unavailable
from treesched.ops import Cell, Layer, get_cell


TOYS = tuple(cls.name for cls in TOY_CELLS)


@pytest.fixture(autouse=True)
def toy_cells():
    """Registered by name, as a user would, for every test (then removed)."""
    with registered(*TOY_CELLS):
        yield
INPUTS, HIDDEN, OUTPUTS = 3, 4, 2


def _backend(name):
    if name == "numba":
        reason = why_unavailable("numba")
        if reason is not None:
            pytest.skip(reason)
        return get_backend("numba")
    if name == "cupy-on-cpu":
        reason = why_no_compiler()
        if reason is not None:
            pytest.skip(reason)
        return cpu_backend()[0]
    return emulated_backend()


def _model(cell, num_layers, dtype, backend=None, seed=0):
    model = treesched.PRLSTM(INPUTS, HIDDEN, OUTPUTS, num_layers=num_layers, cell=cell,
                             dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, value in model.params.numpy().items():  # biases away from zero too
        model.params[name] = (value * 1.5 + 0.1 * rng.standard_normal(value.shape)).astype(dtype)
    if backend is not None:
        model.backend, model.xp = backend, backend.xp
    return model


def test_layers_say_everything_a_backend_needs():
    cell = get_cell("toy-gate-free-merge", 3)
    assert [layer.weight for layer in cell.layers] == ["embed/w", "combine/w", "refine_1/w",
                                                       "refine_2/w"]
    assert [layer.blocks for layer in cell.layers] == [3, 3, 4, 3]
    assert cell.param_shapes(INPUTS, HIDDEN)["combine/w"] == (2 * HIDDEN, 3 * HIDDEN)
    assert cell.state_names == ("h", "c")
    assert get_cell("toy-linear-unary", 2).state_names == ("h",)


def test_a_description_that_cannot_run_is_refused():
    with pytest.raises(treesched.TreeschedError, match="gates"):
        Layer("merge", "gated", "below", num_prev=2)
    with pytest.raises(treesched.TreeschedError, match="relu"):
        Layer("merge", "gated", "pair", num_prev=2, relu=True)

    class Mixed(Cell):
        name = "toy-mixed"
        kind = "gated"

        def build_layers(self, num_layers):
            return (Layer("leaf", "gated", "input"),
                    Layer("merge", "affine", "pair", relu=True))

    with pytest.raises(treesched.TreeschedError, match="must be a gated Layer"):
        Mixed(1)


@pytest.mark.parametrize("cell", TOYS)
def test_reference_gradients_match_finite_differences(cell):
    model = _model(cell, 2, "float64")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, INPUTS))
    dy = rng.standard_normal((2, 7, OUTPUTS))
    _, grads = model.forward_backward(x, dy)
    params = model.params.numpy()
    step = 1e-6
    for name, value in params.items():
        direction = rng.standard_normal(value.shape)
        probe = {}
        for sign in (1, -1):
            model.params[name] = value + sign * step * direction
            probe[sign] = float(np.sum(model.forward(x) * dy))
        model.params[name] = value
        numeric = (probe[1] - probe[-1]) / (2 * step)
        analytic = float(np.sum(grads[name] * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (name, numeric, analytic)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", TOYS)
@pytest.mark.parametrize("backend_name", ["numba", "cupy-on-cpu", "cupy-emulated"])
def test_every_backend_runs_a_registered_cell(backend_name, cell, num_layers):
    backend = _backend(backend_name)
    rng = np.random.default_rng(4)
    for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-4)):
        reference = _model(cell, num_layers, dtype)
        candidate = _model(cell, num_layers, dtype, backend)
        for length, lengths in ((1, None), (9, np.array([9, 4, 1])), (13, None)):
            x = rng.standard_normal((3, length, INPUTS)).astype(dtype)
            targets = np.eye(OUTPUTS, dtype=dtype)[rng.integers(0, OUTPUTS, (3, 1))]
            want_y = reference.forward(x, lengths=lengths)
            got_y = candidate.forward(x, lengths=lengths)
            scale = max(float(np.abs(want_y).max()), 1e-30)
            assert float(np.abs(np.asarray(got_y) - want_y).max()) <= tolerance * scale
            want_loss, want_grads, _ = reference.loss_and_grads(x, targets, lengths=lengths)
            got_loss, got_grads, _ = candidate.loss_and_grads(x, targets, lengths=lengths)
            assert abs(got_loss - want_loss) <= tolerance * max(1.0, abs(want_loss))
            for name, want in want_grads.items():
                got = np.asarray(got_grads[name])
                scale = max(float(np.abs(want).max()), 1e-30)
                error = float(np.abs(got - want).max()) / scale
                assert error <= tolerance, f"{backend_name} {cell} {dtype} T={length} {name}: {error:.2e}"

"""Property-based gradient checks (hypothesis): numba = numpy = finite differences.

Each example draws a model (cell, num_layers, pattern, input and hidden
sizes), a right-padded batch (batch size, padded length, each sequence's
``lengths``, or none), the requested outputs, a dtype, one of the numba
backend's two GEMM paths and where its gated layers project (inside the
gate kernel when the input is narrow, or always through the GEMM path),
then checks

* every gradient (and the logits) of the numba backend against the numpy
  reference: 1e-10 relative in float64, 1e-4 in float32 (relative to the
  largest entry, as ``treesched parity`` measures);
* every gradient of the numpy reference against central finite differences
  in float64, one random direction per parameter array (a directional
  derivative: two extra forward passes per array).

The backends are shared by all examples, as a training loop shares them:
their workspaces see one shape after another, which is where a buffer read
before it is written (stale data from the previous shape) shows.  A bias
gradient once summed rows against such a buffer and was 10-100% off at
batch 3, length 7 while the fixed-shape tests passed.  Whether fresh memory
happens to hold good-looking data is the allocator's luck, so every buffer
the numba backend allocates here starts as a poison pattern instead
(``numba_backend.empty_buffer`` patched for this module): a read before a
write fails every time.

Examples are derandomized (the same ones every run) and kept few and small:
a few seconds once Numba's on-disk kernel cache is warm.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("numba")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import treesched  # noqa: E402
from treesched.backends import numba_backend as numba_module  # noqa: E402
from treesched.backends.numba_backend import BlasThreads, NumbaBackend  # noqa: E402
from treesched.parity import compare  # noqa: E402
from treesched.patterns import PREFIX_STABLE  # noqa: E402

PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
GEMM_PATHS = ("numba", "numpy") if BlasThreads().available else ("numpy",)
# Finite differences (float64): central, step EPS along a unit-RMS direction.
# Truncation error ~EPS^2, rounding ~1e-16 |f| / EPS; a step across a relu
# kink (rnn cell, head) costs ~EPS per crossed unit.  A wrong gradient is off
# by far more than FD_TOLERANCE of the sum of |g_i v_i|.
EPS = 1e-6
FD_TOLERANCE = 1e-5

# 1.0 first (what the old bias-gradient code checked), then NaN and large
# finite values (a NaN can hide behind a comparison such as relu's)
POISON = np.array([1.0, np.nan, -3.5e4, 7.0])

_backends: dict = {}


def poisoned_buffer(shape, dtype):
    array = np.empty(shape, dtype)
    flat = array.reshape(-1)
    flat[:] = POISON[np.arange(flat.size) % len(POISON)]
    return array


@pytest.fixture(scope="module", autouse=True)
def poisoned_allocations():
    """Every buffer the numba backend allocates in this module starts poisoned
    (the backends below are created, and allocate, only inside this fixture)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_module, "empty_buffer", poisoned_buffer)
        yield
    _backends.clear()


def numba_backend(gemm: str, projection: str) -> NumbaBackend:
    """One instance per GEMM path and projection for the whole module
    (workspaces reused)."""
    if (gemm, projection) not in _backends:
        backend = NumbaBackend(gemm=gemm)
        if projection == "gemm":
            backend.fused_projection_max_inputs = 0
        _backends[gemm, projection] = backend
    return _backends[gemm, projection]


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(("lstm", "rnn")))
    pattern = draw(st.sampled_from(PATTERNS))
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 24))
    padded = draw(st.booleans())
    lengths = (np.array(draw(st.lists(st.integers(1, length), min_size=batch,
                                      max_size=batch)), np.int64) if padded else None)
    shortest = int(lengths.min()) if padded else length
    if pattern in PREFIX_STABLE:
        outputs = draw(st.sampled_from(("all", "last", "k")))
        if outputs == "k":
            outputs = draw(st.integers(1, shortest))
    else:
        outputs = "last"  # reduce answers only the last position
    return dict(
        cell=cell, pattern=pattern, num_layers=draw(st.integers(1, 3)),
        batch=batch, length=length, lengths=lengths, outputs=outputs,
        # above 16 input columns a gated layer runs through BLAS instead of
        # projecting inside its kernel (the leaf: features; the merge: 2H)
        input_size=draw(st.sampled_from((1, 2, 3, 5, 17, 20))),
        hidden=draw(st.integers(1, 9)),
        dtype=draw(st.sampled_from(("float64", "float32"))),
        gemm=draw(st.sampled_from(GEMM_PATHS)),
        projection=draw(st.sampled_from(("fused", "gemm"))),
        seed=draw(st.integers(0, 2**32 - 1)))


def build(problem, dtype, backend="numpy"):
    """The drawn model (weights x2 so the gates are not all near 0.5) and its data."""
    rng = np.random.default_rng(problem["seed"])
    model = treesched.PRLSTM(problem["input_size"], problem["hidden"], 3,
                             num_layers=problem["num_layers"], cell=problem["cell"],
                             pattern=problem["pattern"], backend="numpy", dtype=dtype,
                             seed=problem["seed"] % 2**31)
    for name, value in model.params.numpy().items():
        noise = 0.1 * rng.standard_normal(value.shape) if value.ndim == 1 else 0
        model.params[name] = (2 * value + noise).astype(dtype)
    if backend != "numpy":
        model.backend = backend
    batch, length = problem["batch"], problem["length"]
    x = rng.standard_normal((batch, length, problem["input_size"])).astype(dtype)
    outputs = problem["outputs"]
    k = length if outputs == "all" else (1 if outputs == "last" else outputs)
    dy = rng.standard_normal((batch, k, 3)).astype(dtype)
    return model, x, dy


def describe(problem):
    return ", ".join(f"{key}={value!r}" for key, value in problem.items())


@settings(max_examples=150, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_numba_gradients_match_numpy(problem):
    dtype, lengths, outputs = problem["dtype"], problem["lengths"], problem["outputs"]
    reference, x, dy = build(problem, dtype)
    candidate, _, _ = build(problem, dtype,
                            numba_backend(problem["gemm"], problem["projection"]))
    want_y, want = reference.forward_backward(x, dy, lengths, outputs)
    got_y, got = candidate.forward_backward(x, dy, lengths, outputs)
    tol = TOLERANCE[dtype]
    assert set(got) == set(want)
    errors = {name: compare(got[name], want[name])[1] for name in want}
    errors["logits"] = compare(got_y, want_y)[1]
    errors["forward"] = compare(candidate.forward(x, lengths, outputs), want_y)[1]
    bad = {name: error for name, error in errors.items() if not error <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad}\n{describe(problem)}"


@settings(max_examples=60, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_numpy_gradients_match_finite_differences(problem):
    lengths, outputs = problem["lengths"], problem["outputs"]
    model, x, dy = build(problem, "float64")
    _, grads = model.forward_backward(x, dy, lengths, outputs)
    base = model.params.numpy()
    rng = np.random.default_rng(problem["seed"] + 1)

    def objective(name, value):
        model.params[name] = value
        return float(np.sum(model.forward(x, lengths, outputs) * dy))

    for name, value in base.items():
        direction = rng.standard_normal(value.shape)
        numeric = (objective(name, value + EPS * direction)
                   - objective(name, value - EPS * direction)) / (2 * EPS)
        model.params[name] = value
        analytic = float(np.sum(grads[name] * direction))
        scale = float(np.sum(np.abs(grads[name] * direction)))
        assert abs(numeric - analytic) <= FD_TOLERANCE * scale + 1e-8, (
            f"{name}: finite difference {numeric!r}, gradient {analytic!r}\n"
            f"{describe(problem)}")

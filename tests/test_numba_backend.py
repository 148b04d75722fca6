"""The numba backend against the numpy reference, and its machinery.

Parity: outputs and gradients agree with the numpy backend to 1e-5 relative
in float32 and 1e-10 in float64, for every pattern, both cells, 1-3 layers,
odd batch sizes and lengths (1, 2, 3, 5, 7, 13, 41, and one shape past the
512 rows where the weight-gradient GEMM splits its K axis), padded batches
(``lengths``), on *both* GEMM paths (``NumbaBackend(gemm="numba")``, the
Numba-threaded GEMMs, and ``gemm="numpy"``, NumPy's matmul: the default takes
one or the other by dtype and by what is installed), at the backend and at
the model level.  A bias gradient once summed rows against a half-initialised
"ones" buffer: right at some shapes, 10-100% off at others (batch 3, length
7), so the shapes matter, and whether fresh memory happens to look right
is the allocator's luck: in this module every buffer the numba backend
allocates starts as a poison pattern (``numba_backend.empty_buffer``
patched), so a read before a write fails every time.

Gated layers with a narrow input (at most ``fused_projection_max_inputs``
columns: the leaf's features, and at this test's hidden size the merge and
unary layers too) compute their projection inside the gate kernel; the
sweeps also run every gated layer through the GEMM path
(``fused_projection_max_inputs = 0``).

Machinery: workspace reuse (a second call allocates nothing), bitwise
reproducibility, the on-disk kernel cache (a second process compiles
nothing), a clean reason when numba is missing, and cells the backend has
never heard of (described by their layers) running on the same kernels.

Small shapes; the cost is the first JIT compile of the kernels (about a
minute on 2 busy cores when Numba's on-disk cache is cold, seconds after).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from backend_checks import GateFreeMergeCell, registered

import treesched
from treesched.backends import availability, get_backend
from treesched.errors import TreeschedError
from treesched.ops import LSTMCell, get_cell

pytest.importorskip("numba")

from treesched.backends import numba_backend, numba_kernels  # noqa: E402
from treesched.backends.numba_backend import BlasThreads, NumbaBackend  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-10}
PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")
D, H, B = 3, 8, 3
ODD_LENGTHS = (1, 2, 3, 5, 7, 13, 41)
# (batch, length): odd batches by odd lengths, and one shape whose widest
# levels pass 512 rows (kogge-stone: 40 merges x 13; the rnn leaf: 41 x 13)
SHAPES = tuple((b, t) for b in (1, 3) for t in ODD_LENGTHS) + ((13, 41),)
NUMBA_GEMM_AVAILABLE = BlasThreads().available
GEMM = [pytest.param("numba", marks=pytest.mark.skipif(
            not NUMBA_GEMM_AVAILABLE, reason="the Numba-threaded GEMMs need scipy and "
                                             "threadpoolctl")),
        "numpy"]
# where a gated layer's projection runs: inside its kernel when the input is
# narrow (the default), or always through the GEMM path
PROJECTIONS = ("fused", "gemm")


POISONS = {
    # element 0 is 1.0 (what the old "ones" check looked at), then NaN: any
    # read before a write turns a result into NaN ...
    "nan": np.array([1.0, np.nan, np.nan, np.nan]),
    # ... or, finite and large (a NaN can hide behind a comparison: relu)
    "garbage": np.array([1.0, -3.5e4, 2.5e4, 7.0]),
    "mixed": np.array([1.0, np.nan, -3.5e4, 7.0]),
}


def poisoner(pattern):
    """An ``empty_buffer`` whose buffers start as ``pattern``, repeated."""
    def poisoned(shape, dtype):
        array = np.empty(shape, dtype)
        flat = array.reshape(-1)
        flat[:] = pattern[np.arange(flat.size) % len(pattern)]
        return array
    return poisoned


@pytest.fixture(scope="module", autouse=True)
def poisoned_allocations():
    """Every buffer the numba backend allocates in this module starts poisoned."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_backend, "empty_buffer", poisoner(POISONS["mixed"]))
        yield


@pytest.fixture(scope="module")
def nb():
    return get_backend("numba")


@pytest.fixture(scope="module")
def ref():
    return get_backend("numpy")


def numba_backend_for(gemm, projection="fused"):
    """A fresh backend on one GEMM path; ``projection="gemm"`` sends every
    gated layer through the GEMM path (no projection inside the kernel)."""
    backend = NumbaBackend(gemm=gemm)
    if projection == "gemm":
        backend.fused_projection_max_inputs = 0
    return backend


@pytest.fixture(scope="module")
def by_gemm():
    """One backend per GEMM path (and projection), shared by the tests of a
    module run (as the default instance is): their workspaces see many shapes
    one after another."""
    cache = {}

    def get(path, projection="fused"):
        if (path, projection) not in cache:
            cache[path, projection] = numba_backend_for(path, projection)
        return cache[path, projection]

    return get


def close(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def make_params(cell, dtype, seed=0, d=D, h=H):
    g = np.random.default_rng(seed)
    return {k: (0.6 * g.standard_normal(s)).astype(dtype)
            for k, s in cell.param_shapes(d, h).items()}


def run_both(nb, ref, cell, params, x, schedule, need_dx=True, both_dstates=True, seed=1):
    """Forward (training and inference) and backward on both backends."""
    g = np.random.default_rng(seed)
    s_ref, t_ref = ref.encode(cell, params, x, schedule, True)
    s_nb, t_nb = nb.encode(cell, params, x, schedule, True)
    s_inf, _ = nb.encode(cell, params, x, schedule, False)
    dstates = tuple(g.standard_normal(s.shape).astype(x.dtype) if (i == 0 or both_dstates)
                    else None for i, s in enumerate(s_ref))
    g_ref, dx_ref = ref.encode_backward(cell, params, t_ref, dstates, need_dx=need_dx)
    g_nb, dx_nb = nb.encode_backward(cell, params, t_nb, dstates, need_dx=need_dx)
    return (s_ref, s_nb, s_inf, g_ref, g_nb, dx_ref, dx_nb)


def check(results, tol, label):
    s_ref, s_nb, s_inf, g_ref, g_nb, dx_ref, dx_nb = results
    for i, (a, b) in enumerate(zip(s_nb, s_ref)):
        close(a, b, tol, f"{label} train state {i}")
    for i, (a, b) in enumerate(zip(s_inf, s_ref)):
        close(a, b, tol, f"{label} inference state {i}")
    assert set(g_nb) == set(g_ref), label
    for name in g_ref:
        close(g_nb[name], g_ref[name], tol, f"{label} grad {name}")
    if dx_ref is not None:
        close(dx_nb, dx_ref, tol, f"{label} dx")


def sweep(backend, ref, dtype, cell_name, num_layers, shapes=SHAPES, patterns=PATTERNS):
    """Every pattern at every (batch, length), one backend instance throughout."""
    cell = get_cell(cell_name, num_layers)
    params = make_params(cell, dtype, seed=num_layers)
    g = np.random.default_rng(7)
    for batch, length in shapes:
        for pattern in patterns:
            outputs = "last" if pattern == "reduce" else "all"
            schedule = treesched.compile(length, pattern, outputs)
            x = g.standard_normal((batch, length, D)).astype(dtype)
            results = run_both(backend, ref, cell, params, x, schedule,
                               both_dstates=(length % 2 == 1))
            check(results, TOL[dtype],
                  f"{cell_name} L={num_layers} {pattern} B={batch} T={length}")


# ------------------------------------------------------------------- parity
@pytest.mark.parametrize("gemm", GEMM)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell_name,projection", [("lstm", "fused"), ("lstm", "gemm"),
                                                  ("rnn", "gemm")])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_parity_every_pattern_and_odd_shape(by_gemm, ref, gemm, dtype, cell_name, projection,
                                            num_layers):
    sweep(by_gemm(gemm, projection), ref, dtype, cell_name, num_layers)


def test_parity_default_instance(nb, ref):
    """The shared ``get_backend("numba")`` (gemm="auto") at the shape of the bug report."""
    for dtype in (np.float32, np.float64):
        sweep(nb, ref, dtype, "rnn", 3, shapes=((3, 7), (3, 13), (1, 5)))


@pytest.mark.parametrize("gemm", GEMM)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parity_pruned_outputs_and_wide_inputs(by_gemm, ref, gemm, dtype):
    """Last-k outputs (pruned schedules), and D above the fused-leaf limit (BLAS leaf)."""
    g = np.random.default_rng(3)
    for d in (D, 24):
        cell = get_cell("lstm", 2)
        params = make_params(cell, dtype, seed=d, d=d)
        for batch in (1, 3):
            for outputs in ("last", 3):
                schedule = treesched.compile(11, "odd-even", outputs)
                x = g.standard_normal((batch, 11, d)).astype(dtype)
                check(run_both(by_gemm(gemm), ref, cell, params, x, schedule), TOL[dtype],
                      f"d={d} B={batch} outputs={outputs}")


@pytest.mark.parametrize("poison", ["nan", "garbage"])
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("gemm", GEMM)
def test_poisoned_buffers(monkeypatch, ref, gemm, projection, poison):
    """Fresh workspaces (scratch, results, gradients) under each poison alone:
    results must not change."""
    monkeypatch.setattr(numba_backend, "empty_buffer", poisoner(POISONS[poison]))
    backend = numba_backend_for(gemm, projection)  # fresh workspaces, all poisoned
    shapes = ((1, 1), (3, 2), (3, 7), (1, 13), (3, 13), (13, 41))
    for dtype in (np.float32, np.float64):
        for cell_name in ("lstm", "rnn"):
            for num_layers in (1, 2, 3):
                sweep(backend, ref, dtype, cell_name, num_layers, shapes=shapes)
        cell = get_cell("lstm", 3)
        params = make_params(cell, dtype, seed=5, d=24)
        for outputs in ("last", 2):  # pruned schedules, the BLAS leaf
            schedule = treesched.compile(9, "kogge-stone", outputs)
            x = np.random.default_rng(2).standard_normal((3, 9, 24)).astype(dtype)
            check(run_both(backend, ref, cell, params, x, schedule), TOL[dtype],
                  f"poisoned d=24 outputs={outputs}")


def test_the_slower_gemm_path_warns_once_and_says_why(monkeypatch):
    """Without scipy/threadpoolctl the "auto" GEMM path falls back to NumPy's
    BLAS: one RuntimeWarning per process naming the cause, then silence."""
    monkeypatch.setattr(numba_backend, "_warned_about_gemms", False)
    monkeypatch.setattr(BlasThreads, "__init__",
                        lambda self: (setattr(self, "available", False), None)[1])
    with pytest.warns(RuntimeWarning, match="scipy or threadpoolctl"):
        backend = NumbaBackend()
    assert not backend._numba_gemm(np.dtype(np.float32))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NumbaBackend()          # a second backend: no second warning
        NumbaBackend(gemm="numpy")


def test_gemm_path_selection(monkeypatch):
    """``gemm``: "auto" = Numba-threaded in float32 where possible, NumPy's in
    float64; "numba" / "numpy" force one path in every dtype.  (Hidden size
    above the fused-projection limit: the merge and unary layers run GEMMs.)"""
    calls = []
    for name in ("gemm_rows", "gemm_tn_acc"):
        kernel = getattr(numba_kernels, name)
        monkeypatch.setattr(numba_kernels, name,
                            lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    cell = get_cell("lstm", 2)

    wide = numba_backend.FUSED_PROJECTION_MAX_INPUTS + 1

    def used(backend, dtype):
        calls.clear()
        params = make_params(cell, dtype, h=wide)
        x = np.ones((3, 5, D), dtype)
        states, tape = backend.encode(cell, params, x, treesched.compile(5), True)
        backend.encode_backward(cell, params, tape, (np.ones_like(states[0]), None))
        return set(calls)

    every = {"gemm_rows", "gemm_tn_acc"}
    auto = NumbaBackend()
    assert auto.gemm == "auto"
    assert used(auto, np.float64) == set()
    assert used(auto, np.float32) == (every if NUMBA_GEMM_AVAILABLE else set())
    for dtype in (np.float32, np.float64):
        assert used(NumbaBackend(gemm="numpy"), dtype) == set()
        if NUMBA_GEMM_AVAILABLE:
            assert used(NumbaBackend(gemm="numba"), dtype) == every
    with pytest.raises(TreeschedError, match="gemm"):
        NumbaBackend(gemm="blas")
    labels = [label for label, _ in NumbaBackend.parity_variants()]
    assert labels == (["numba-gemm", "numpy-gemm"] if NUMBA_GEMM_AVAILABLE else ["numpy-gemm"])


@pytest.mark.parametrize("gemm", GEMM)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell_name,num_layers", [("lstm", 1), ("lstm", 2), ("lstm", 3),
                                                  ("rnn", 1), ("rnn", 2), ("rnn", 3)])
def test_model_parity_with_lengths(by_gemm, gemm, dtype, cell_name, num_layers):
    """PRLSTM on numba == PRLSTM on numpy on a padded batch (odd batch, mixed lengths)."""
    tol = TOL[np.dtype(dtype).type]
    g = np.random.default_rng(11)
    length, lengths = 13, np.array([13, 4, 7, 2, 1])
    x = g.standard_normal((5, length, D)).astype(dtype)
    for pattern, outputs in (("odd-even", "all"), ("kogge-stone", "last"), ("sequential", 1),
                             ("sklansky", "all")):
        models = [treesched.PRLSTM(D, H, 3, num_layers=num_layers, cell=cell_name,
                                   pattern=pattern, backend="numpy", dtype=dtype, seed=5)
                  for _ in range(2)]
        models[1].backend = by_gemm(gemm)
        y_ref, y_nb = (m.forward(x, lengths=lengths, outputs=outputs) for m in models)
        close(y_nb, y_ref, tol, f"{pattern} forward")
        k = length if outputs == "all" else (1 if outputs == "last" else outputs)
        targets = np.eye(3, dtype=dtype)[g.integers(0, 3, (5, k))]
        (l_ref, g_ref, _), (l_nb, g_nb, _) = (
            m.loss_and_grads(x, targets, lengths=lengths) for m in models)
        assert abs(l_nb - l_ref) <= tol * abs(l_ref)
        for name in g_ref:
            close(g_nb[name], g_ref[name], tol, f"{pattern} grad {name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_report_default_sweep(dtype):
    """The project's parity tool (``treesched parity``) with its default sweep:
    odd batches and lengths, every pattern, cell and depth, both GEMM paths,
    states, logits and every gradient at the backend tests' tolerance."""
    from treesched.parity import BATCHES, LENGTHS, run_parity
    report = run_parity("numba", dtype=dtype, hidden=8)
    assert report.lengths == LENGTHS and report.batches == BATCHES
    assert report.variants == (("numba-gemm", "numpy-gemm") if NUMBA_GEMM_AVAILABLE
                               else ("numpy-gemm",))
    configs = {(c.cell, c.pattern, c.num_layers) for c in report.cases}
    assert len(configs) == 2 * len(PATTERNS) * 3
    tolerance = TOL[np.dtype(dtype).type]
    worst = report.worst()
    assert report.passed and worst.rel_error <= tolerance, report.format_table()


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_forward_backward_padded_batch_and_pruned_outputs(cell_name):
    g = np.random.default_rng(0)
    models = [treesched.PRLSTM(5, 16, 3, cell=cell_name, backend=name, seed=1)
              for name in ("numpy", "numba")]
    x = g.standard_normal((4, 40, 5)).astype(np.float32)
    lengths = np.array([40, 3, 17, 33])
    dy = g.standard_normal((4, 40, 3)).astype(np.float32)
    (y_ref, g_ref), (y_nb, g_nb) = (m.forward_backward(x, dy, lengths=lengths) for m in models)
    close(y_nb, y_ref, 1e-5, "logits")
    for name in g_ref:
        close(g_nb[name], g_ref[name], 1e-5, name)
    for outputs in ("last", 3):
        y_ref, y_nb = (m.forward(x, lengths=lengths, outputs=outputs) for m in models)
        close(y_nb, y_ref, 1e-5, f"outputs={outputs}")


# -------------------------------------------------------------- machinery
def test_workspace_reuse_allocates_nothing(nb):
    cell = get_cell("lstm", 2)
    params = make_params(cell, np.float32)
    x = np.random.default_rng(0).standard_normal((B, 16, D)).astype(np.float32)
    schedule = treesched.compile(16)
    cache = nb.workspaces

    def step():
        states, tape = nb.encode(cell, params, x, schedule, True)
        nb.encode_backward(cell, params, tape, (np.ones_like(states[0]), None))
        return tape.workspace

    first = step()
    nb.encode(cell, params, x, schedule, False)
    before = cache.stats()
    arrays = {name: id(a) for name, a in first.buffers.items()}
    second = step()
    nb.encode(cell, params, x, schedule, False)
    after = cache.stats()
    assert second is first
    assert after["allocations"] == before["allocations"]
    assert after["hits"] == before["hits"] + 2
    assert after["workspace_bytes"] == before["workspace_bytes"]
    assert {name: id(a) for name, a in second.buffers.items()} == arrays


def test_results_are_fresh_and_tapes_never_share(nb):
    cell = get_cell("lstm", 2)
    params = make_params(cell, np.float32)
    g = np.random.default_rng(1)
    x1, x2 = (g.standard_normal((B, 9, D)).astype(np.float32) for _ in range(2))
    schedule = treesched.compile(9)
    held = nb.encode(cell, params, x1, schedule, False)[0]
    copy = [a.copy() for a in held]
    nb.encode(cell, params, x2, schedule, False)  # must not overwrite what we hold
    for a, b in zip(held, copy):
        assert np.array_equal(a, b)
    # a pending tape keeps its workspace: a second forward gets another one
    s1, t1 = nb.encode(cell, params, x1, schedule, True)
    s2, t2 = nb.encode(cell, params, x2, schedule, True)
    assert t1.workspace is not t2.workspace
    dstates = (np.ones_like(s1[0]), None)
    g1, _ = nb.encode_backward(cell, params, t1, dstates)
    g2, _ = nb.encode_backward(cell, params, t2, dstates)
    fresh, _ = nb.encode_backward(cell, params, nb.encode(cell, params, x1, schedule, True)[1],
                                  dstates)
    for name in g1:
        assert np.array_equal(g1[name], fresh[name])
    with pytest.raises(TreeschedError, match="already run"):
        nb.encode_backward(cell, params, t1, dstates)


@pytest.mark.parametrize("gemm", GEMM)
def test_bitwise_deterministic(by_gemm, gemm):
    # kogge-stone: operands shared within a level (the accumulation's hard case)
    for cell_name, pattern in (("lstm", "odd-even"), ("lstm", "kogge-stone"), ("rnn", "odd-even")):
        model = treesched.PRLSTM(D, H, 3, cell=cell_name, pattern=pattern, backend="numpy",
                                 seed=2)
        model.backend = by_gemm(gemm)
        g = np.random.default_rng(4)
        x = g.standard_normal((5, 33, D)).astype(np.float32)
        targets = np.eye(3, dtype=np.float32)[g.integers(0, 3, (5, 33))]
        runs = [model.loss_and_grads(x, targets) for _ in range(3)]
        for loss, grads, logits in runs[1:]:
            assert loss == runs[0][0]
            assert np.array_equal(logits, runs[0][2])
            for name in grads:
                assert np.array_equal(grads[name], runs[0][1][name])
        outs = [model.forward(x) for _ in range(2)]
        assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("gemm", GEMM)
def test_results_do_not_depend_on_the_thread_count(by_gemm, gemm):
    """Bitwise the same with one Numba thread as with all of them: the rows of
    the kernels and of the GEMMs are split among however many there are.
    GEMMs are cut in blocks of at least ``GEMM_MIN_BLOCK_WORK`` multiply-adds
    (below, BLAS switches kernels and a row's bits with them): hidden 20
    stays below (one block), hidden 48 spans several."""
    import numba
    threads = numba.get_num_threads()
    for hidden, batch, length in ((20, 7, 45), (48, 9, 40)):
        model = treesched.PRLSTM(D, hidden, 3, pattern="kogge-stone", backend="numpy", seed=4)
        model.backend = by_gemm(gemm)
        g = np.random.default_rng(6)
        x = g.standard_normal((batch, length, D)).astype(np.float32)
        targets = np.eye(3, dtype=np.float32)[g.integers(0, 3, (batch, length))]
        runs = []
        try:
            for count in (threads, 1):
                numba.set_num_threads(count)
                runs.append((model.forward(x), model.loss_and_grads(x, targets)))
        finally:
            numba.set_num_threads(threads)
        (y0, (loss0, grads0, _)), (y1, (loss1, grads1, _)) = runs
        assert np.array_equal(y0, y1) and loss0 == loss1, hidden
        for name in grads0:
            assert np.array_equal(grads0[name], grads1[name]), (hidden, name)


def test_kernels_use_the_on_disk_cache(nb):
    """Every kernel is cache=True, and a second process loads them instead of compiling."""
    for kernel in numba_kernels.KERNELS:
        assert type(kernel._cache).__name__ == "FunctionCache", kernel.__name__  # cache=True
        assert kernel.targetoptions["parallel"] and not kernel.targetoptions["fastmath"]
    # this process has compiled (and so saved) the float32 lstm kernels: a fresh
    # process running the same step must find every one of them on disk
    model = treesched.PRLSTM(D, H, 3, backend="numba")
    x = np.ones((2, 5, D), np.float32)
    model.loss_and_grads(x, np.ones((2, 5, 3), np.float32) / 3)
    model.forward(x)
    code = (
        "import json, numpy as np, treesched\n"
        "from treesched.backends import numba_kernels as kernels\n"
        f"m = treesched.PRLSTM({D}, {H}, 3, backend='numba')\n"
        f"x = np.ones((2, 5, {D}), np.float32)\n"
        "m.loss_and_grads(x, np.ones((2, 5, 3), np.float32) / 3); m.forward(x)\n"
        "print(json.dumps({k.__name__: [sum(k.stats.cache_hits.values()),"
        " sum(k.stats.cache_misses.values())] for k in kernels.KERNELS}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    used = {name: hm for name, hm in stats.items() if sum(hm)}
    assert used, stats
    assert all(misses == 0 for _, misses in used.values()), used


def test_missing_numba_gives_a_clean_reason():
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # as if not installed\n"
        "from treesched.backends import why_unavailable, get_backend, availability\n"
        "from treesched.backends.numba_backend import NumbaBackend\n"
        "from treesched.errors import TreeschedError\n"
        "reason = why_unavailable('numba')\n"
        "assert reason and 'numba' in reason, reason\n"
        "assert NumbaBackend.why_unavailable() == reason\n"
        "assert availability()['numpy'] is None\n"
        "try:\n"
        "    get_backend('numba')\n"
        "except TreeschedError as error:\n"
        "    assert 'numba' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print(reason)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "numba" in done.stdout
    assert availability()["numba"] is None  # here it is installed


class RenamedLSTM(LSTMCell):
    """The stock LSTM under another class and name: no backend knows it."""

    name = "toy-renamed-lstm"


def count_kernel_calls(monkeypatch):
    """Counts of the numba kernels called from now on, by name."""
    calls = {}
    for kernel in numba_kernels.KERNELS:
        name = kernel.__name__
        monkeypatch.setattr(numba_kernels, name,
                            lambda *a, _k=kernel, _n=name: (calls.__setitem__(
                                _n, calls.get(_n, 0) + 1), _k(*a))[1])
    return calls


def test_other_cells_run_on_the_same_kernels(monkeypatch, nb, ref):
    """A cell the backend has never heard of runs on its kernels (no fallback)."""
    cell = RenamedLSTM(2)
    params = make_params(cell, np.float64)
    x = np.random.default_rng(0).standard_normal((B, 6, D))
    schedule = treesched.compile(6)
    calls = count_kernel_calls(monkeypatch)
    results = run_both(nb, ref, cell, params, x, schedule)
    check(results, 1e-12, "renamed lstm")
    for name in ("gated_forward", "gated_backward", "gated_cells", "accumulate_operands"):
        assert calls.get(name), (name, calls)


@pytest.mark.parametrize("gemm", GEMM)
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_registered_toy_gated_cell(by_gemm, ref, gemm, projection, dtype):
    """A registered toy gated cell (merge gating no cell, renamed layers): the
    executor runs it on this backend's primitives, which match numpy on
    every pattern, odd shapes and 1-3 layers; also through PRLSTM."""
    backend = by_gemm(gemm, projection)
    name = GateFreeMergeCell.name
    with registered(GateFreeMergeCell):
        for num_layers in (1, 2, 3):
            sweep(backend, ref, dtype, name, num_layers,
                  shapes=((1, 1), (3, 2), (3, 7), (1, 13), (13, 41)))
        tol = TOL[dtype]
        models = [treesched.PRLSTM(D, H, 3, num_layers=3, cell=name, backend="numpy",
                                   dtype=np.dtype(dtype).name, seed=3)
                  for _ in range(2)]
        models[1].backend = backend
        g = np.random.default_rng(5)
        x = g.standard_normal((3, 9, D)).astype(dtype)
        dy = g.standard_normal((3, 9, 3)).astype(dtype)
        (y_ref, g_ref), (y_nb, g_nb) = (m.forward_backward(x, dy, lengths=np.array([9, 4, 1]))
                                        for m in models)
        close(y_nb, y_ref, tol, "toy logits")
        assert set(g_nb) == set(g_ref)
        for grad_name in g_ref:
            close(g_nb[grad_name], g_ref[grad_name], tol, f"toy grad {grad_name}")


def test_bad_dstates_are_rejected(nb):
    cell = get_cell("lstm", 2)
    params = make_params(cell, np.float32)
    x = np.ones((B, 4, D), np.float32)
    states, tape = nb.encode(cell, params, x, treesched.compile(4), True)
    with pytest.raises(TreeschedError, match="dstate"):
        nb.encode_backward(cell, params, tape, (np.ones((1, 2, 3), np.float32), None))

"""The CuPy backend.

Two halves:

* **GPU tests** (``@pytest.mark.gpu``): the real backend on a real GPU —
  parity with the NumPy reference (treesched.parity), determinism, CUDA graph
  replay, TF32.  Skipped, with the reason, where CuPy or a GPU is missing.
* **Emulation tests** (always run): the backend (its primitives, as the
  executor calls them, and its launch logic: staging, graph capture /
  replay, the ones vector of the bias gradients) runs unchanged against
  NumPy transcriptions of every CUDA kernel and of cuBLAS that check every
  memory access and every race (``tests/cuda_emulation.py``), and must match
  the NumPy reference backend, for the stock cells and for toy cells
  registered here that no backend knows by name.

The real CUDA C, compiled by g++ and run on the CPU through the production
launcher, is tested in ``tests/test_cuda_on_cpu.py``; what neither can show
(the GPU's math library, real concurrency, cuBLAS, real capture) is left to
the GPU tests.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
from backend_checks import (
    TOY_CELLS,
    assert_close,
    compare_once,
    make_case,
    make_params,
    registered,
    rel,
)
from cuda_emulation import (
    KERNELS,
    EmulatedLauncher,
    Hazard,
    RecordingGraphs,
    colmajor_gemm,
    emulated_backend,
    ts_accumulate_operands,
    ts_gated_forward,
    ts_gather_pairs,
)

import treesched
from treesched.backends import cuda_source
from treesched.backends.cupy_backend import CupyBackend, check_gemm_operands, gemm_plan
from treesched.backends.numpy_backend import NumpyBackend
from treesched.errors import TreeschedError
from treesched.ops import LSTMCell, RNNCell

PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")

_GPU_REASON = CupyBackend.why_unavailable()
gpu = pytest.mark.skipif(_GPU_REASON is not None,
                         reason=f"needs CuPy and a CUDA GPU: {_GPU_REASON}")


# ============================================================ emulation tests
STOCK_CELLS = ("lstm", "rnn")
ALL_CELLS = STOCK_CELLS + tuple(cls.name for cls in TOY_CELLS)


@pytest.fixture(autouse=True)
def toy_cells():
    """The toy cells are registered (by name, as a user would) for every test."""
    with registered(*TOY_CELLS):
        yield


def test_emulator_matches_kernel_signatures():
    signatures = cuda_source.kernel_signatures()
    assert set(KERNELS) == set(signatures)
    for name, function in KERNELS.items():
        params = list(inspect.signature(function).parameters)
        assert params == [p.name for p in signatures[name]], name


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_plan_is_the_row_major_product(trans_a, trans_b, accumulate):
    rng = np.random.default_rng(1)
    m, k, n = 5, 3, 4
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    before = rng.standard_normal((m, n))
    out = before.copy() if accumulate else np.full((m, n), np.nan)
    transa, transb, mm, nn, kk, lda, ldb, ldc = gemm_plan(a.shape, b.shape, out.shape,
                                                          trans_a, trans_b)
    colmajor_gemm(transa, transb, mm, nn, kk, b.reshape(-1), lda, a.reshape(-1), ldb,
                  out.reshape(-1), ldc, beta=1 if accumulate else 0)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    np.testing.assert_allclose(out, want + before if accumulate else want, rtol=1e-12)


def test_gemm_plan_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        gemm_plan((2, 3), (4, 5), (2, 5))
    with pytest.raises(ValueError, match="empty"):
        check_gemm_operands(np.zeros((0, 3)), np.zeros((3, 2)), np.zeros((0, 2)), False, False)
    with pytest.raises(TypeError, match="C-contiguous"):
        check_gemm_operands(np.zeros((3, 3)).T[:, :2], np.zeros((2, 2)), np.zeros((3, 2)),
                            False, False)


@pytest.mark.parametrize("cell_name", ALL_CELLS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_emulated_backend_matches_reference_float64(cell_name, pattern):
    cell, params, x, schedule, rng = make_case(cell_name, 2, pattern, length=11)
    compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-12)


@pytest.mark.parametrize("cell_name", ALL_CELLS)
@pytest.mark.parametrize("layers", [1, 3])
def test_emulated_backend_num_layers(cell_name, layers):
    cell, params, x, schedule, rng = make_case(cell_name, layers, "odd-even", length=9, seed=2)
    compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-12)


@pytest.mark.parametrize("cell_name", ALL_CELLS)
def test_emulated_backend_float32_and_pruned_outputs(cell_name):
    for outputs in ("last", 3):
        cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=13,
                                                   dtype=np.float32, seed=3, outputs=outputs)
        compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-5)


@pytest.mark.parametrize("cell_name", ALL_CELLS)
def test_length_one_has_no_merges(cell_name):
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=1)
    grads = compare_once(emulated_backend(), NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    merge, unary = cell.merge_layers
    assert not np.any(grads[merge.weight]) and not np.any(grads[unary.bias])


def test_registered_toy_cells_run_on_the_kernels():
    """A cell registered by name, described only by its layers (a merge that
    gates no previous cell; an affine cell with a rectified leaf), runs on the
    kernels -- no reference fallback -- and matches the NumPy reference."""
    for cls, own_kernels in ((TOY_CELLS[0], {"ts_gated_forward", "ts_gated_backward"}),
                             (TOY_CELLS[1], {"ts_affine_forward", "ts_relu_backward"})):
        cell = treesched.ops.get_cell(cls.name, 3)
        assert type(cell) is cls
        _, params, x, schedule, rng = make_case(cls.name, 3, "sklansky", length=10, seed=4)
        backend = emulated_backend(use_graphs=False)
        compare_once(backend, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
        assert own_kernels <= set(backend.launcher.launched)
        assert "ts_accumulate_operands" in backend.launcher.launched


@pytest.mark.parametrize("cell_name", ALL_CELLS)
def test_graph_capture_and_replay_with_new_inputs(cell_name):
    """Call 1 runs eagerly, call 2 captures, call 3+ replay; every call's inputs,
    parameters and output gradients are new and every result must follow them."""
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=10)
    backend = emulated_backend()
    reference = NumpyBackend()
    for call in range(4):
        params = make_params(cell, x.shape[2], 4, rng, x.dtype)
        x = rng.standard_normal(x.shape)
        compare_once(backend, reference, cell, params, x, schedule, rng, 1e-12)
    graphs, launcher = backend.graphs, backend.launcher
    # forward (training), forward (inference), backward: each captured once
    assert graphs.captures == 3
    assert graphs.launches == 3 * 3
    # after capture, every launch of a pass is in its graph
    before = launcher.executed
    compare_once(backend, reference, cell, params, x, schedule, rng, 1e-12)
    assert launcher.executed == before
    stats = backend.stats()
    assert stats["graphs"] == 3 and stats["workspaces"] == 2 and stats["allocations"] == 2
    # a backward with other given gradients or need_dx is another variant: captured anew
    for _ in range(2):
        _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
        backend.encode_backward(cell, params, tape, (None,) * len(cell.state_names), False)
    assert backend.stats()["graphs"] == 4


def test_graphs_disabled_and_failed_capture_fall_back_to_eager():
    cell, params, x, schedule, rng = make_case("lstm", 2, "sklansky", length=7)
    off = emulated_backend(use_graphs=False)
    for _ in range(3):
        compare_once(off, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    assert off.graphs.captures == 0 and off.graphs.launches == 0
    assert off.stats()["graphs"] == 0

    broken = emulated_backend(fail=True)
    with pytest.warns(RuntimeWarning, match="capture failed") as warned:
        for _ in range(3):
            compare_once(broken, NumpyBackend(), cell, params, x, schedule, rng, 1e-12)
    assert len(warned) == 1   # once, then eager without trying again
    assert broken.graph_error and not broken.graphs_active
    assert broken.stats()["graph_error"] == broken.graph_error


def test_tf32_and_graphs_follow_the_environment(monkeypatch):
    monkeypatch.setenv("TREESCHED_TF32", "1")
    monkeypatch.setenv("TREESCHED_CUDA_GRAPHS", "0")
    backend = CupyBackend(xp=np, launcher=EmulatedLauncher(), graphs=None)
    assert backend.allow_tf32 and not backend.use_graphs
    monkeypatch.setenv("TREESCHED_TF32", "maybe")
    with pytest.raises(TreeschedError, match="TREESCHED_TF32"):
        CupyBackend(xp=np, launcher=EmulatedLauncher())
    monkeypatch.delenv("TREESCHED_TF32")
    monkeypatch.delenv("TREESCHED_CUDA_GRAPHS")
    default = CupyBackend(xp=np, launcher=EmulatedLauncher(), graphs=RecordingGraphs(None))
    assert not default.allow_tf32 and default.use_graphs


def test_workspaces_are_reused_and_live_tapes_are_protected():
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=8)
    backend = emulated_backend()
    _, tape1 = backend.encode(cell, params, x, schedule, need_grad=True)
    ws = tape1.workspace
    # a second forward while tape1 is alive must not overwrite tape1's caches
    x2 = rng.standard_normal(x.shape)
    _, tape2 = backend.encode(cell, params, x2, schedule, need_grad=True)
    assert tape2.workspace is not ws
    reference = NumpyBackend()
    _, ref_tape = reference.encode(cell, params, x, schedule, need_grad=True)
    dstates = (rng.standard_normal((3, 8, 4)), None)
    want, _ = reference.encode_backward(cell, params, ref_tape, dstates)
    got, _ = backend.encode_backward(cell, params, tape1, dstates)
    for name in want:
        assert_close(got[name], want[name], 1e-12, name)
    # a consumed tape is refused (its activations became gradients in place)
    with pytest.raises(TreeschedError, match="already run"):
        backend.encode_backward(cell, params, tape1, dstates)
    # once its backward ran, the workspace is reused (no new allocation)
    allocations = backend.stats()["allocations"]
    _, tape3 = backend.encode(cell, params, x, schedule, need_grad=True)
    assert tape3.workspace is ws and backend.stats()["allocations"] == allocations
    # a tape of another backend, or of another cell, is refused
    with pytest.raises(TreeschedError, match="another backend"):
        emulated_backend().encode_backward(cell, params, tape3, dstates)
    with pytest.raises(TreeschedError, match="recorded for"):
        backend.encode_backward(RNNCell(2), params, tape3, (np.zeros((3, 8, 4)),))
    del tape2


def test_workspace_cache_is_bounded():
    backend = emulated_backend(max_workspaces=2)
    cell = LSTMCell(2)
    rng = np.random.default_rng(0)
    params = make_params(cell, 3, 4, rng, np.float64)
    for length in (3, 4, 5, 6):
        x = rng.standard_normal((2, length, 3))
        backend.encode(cell, params, x, treesched.compile(length), need_grad=False)
    assert backend.stats()["workspaces"] == 2
    backend.clear()
    stats = backend.stats()
    assert stats["workspaces"] == 0 and stats["graphs"] == 0 and stats["device_plans"] == 0


def test_training_workspaces_hold_the_ones_of_the_bias_gradient():
    cell, params, x, schedule, _ = make_case("rnn", 2, "odd-even", length=6)
    backend = emulated_backend()
    _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    assert not [name for name in tape.workspace.buffers if name.startswith("ones")]
    backend.encode_backward(cell, params, tape, (np.ones((3, 6, 4)),))
    ones = {name: buffer for name, buffer in tape.workspace.buffers.items()
            if name.startswith("ones")}
    # one per row count the bias gradients sum over: the leaves (T * B) and each level
    assert f"ones {6 * 3}" in ones and all(np.all(buffer == 1) for buffer in ones.values())
    backend.encode(cell, params, x, schedule, need_grad=False)
    inference = [ws for ws in backend.workspaces.entries.values() if ws.plan.mode == "inference"]
    assert len(inference) == 1 and not [n for n in inference[0].buffers if n.startswith("ones")]
    with pytest.raises(TreeschedError, match="only while a pass runs"):
        backend.weight_gradient(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), np.ones(2),
                                False)


def test_inputs_are_validated():
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=5)
    backend = emulated_backend()
    with pytest.raises(TreeschedError, match="length"):
        backend.encode(cell, params, x[:, :4], schedule, need_grad=False)
    with pytest.raises(TreeschedError, match="numpy array"):
        backend.encode(cell, params, x.tolist(), schedule, need_grad=False)
    with pytest.raises(TreeschedError, match="float32 or float64"):
        backend.encode(cell, params, x.astype(np.float16), schedule, need_grad=False)
    bad = dict(params, **{"merge/w": params["merge/w"].astype(np.float32)})
    with pytest.raises(TreeschedError, match="dtype"):
        backend.encode(cell, bad, x, schedule, need_grad=False)
    bad = dict(params, **{"unary_2/w": params["unary_1/w"]})
    with pytest.raises(TreeschedError, match="num_layers"):
        backend.encode(cell, bad, x, schedule, need_grad=False)
    _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    with pytest.raises(TreeschedError, match="shape"):
        backend.encode_backward(cell, params, tape, (np.zeros((1, 2, 3)), None))
    with pytest.raises(TreeschedError, match="tuple of 2"):
        backend.encode_backward(cell, params, tape, (np.zeros((3, 5, 4)),))
    # nothing ran on a refused input: the tape is still good
    grads, _ = backend.encode_backward(cell, params, tape, (np.zeros((3, 5, 4)), None))
    assert not np.any(grads["merge/w"])


def test_sizes_beyond_32_bits_are_refused():
    backend = emulated_backend()
    with pytest.raises(TreeschedError, match="32-bit"):
        backend.index(np.array([0, 2**31], np.int64))
    store = np.zeros((1, 1, 1))
    index = backend.index(np.array([0], np.int64))
    assert index.dtype == np.int32
    # a batch of 2**31 (a broadcast view: no memory) does not fit a kernel's int
    huge = np.lib.stride_tricks.as_strided(store, (1, 2**31, 1), (8, 0, 0))
    with pytest.raises(TreeschedError, match="32-bit"):
        backend.gather_pairs(huge, index, index, np.zeros((1, 2)))


def test_non_contiguous_inputs_and_dc_gradient():
    cell, params, x, schedule, rng = make_case("lstm", 2, "kogge-stone", length=9)
    backend = emulated_backend()
    reference = NumpyBackend()
    wide = rng.standard_normal((3, 9, 6))[:, :, ::2]  # strided features
    for _ in range(3):
        want, want_tape = reference.encode(cell, params, wide, schedule, need_grad=True)
        got, tape = backend.encode(cell, params, wide, schedule, need_grad=True)
        for g, w in zip(got, want):
            assert_close(g, w, 1e-12, "state")
        dstates = tuple(rng.standard_normal(w.shape)[:, ::-1] for w in want)  # both h and c
        dstates = tuple(np.ascontiguousarray(d)[:, ::-1] for d in dstates)
        w_grads, w_dx = reference.encode_backward(cell, params, want_tape, dstates, True)
        g_grads, g_dx = backend.encode_backward(cell, params, tape, dstates, True)
        for name in w_grads:
            assert_close(g_grads[name], w_grads[name], 1e-12, name)
        assert_close(g_dx, w_dx, 1e-12, "dx")


@pytest.mark.parametrize("cell_name", ALL_CELLS)
def test_backward_is_deterministic(cell_name):
    cell, params, x, schedule, rng = make_case(cell_name, 2, "kogge-stone", length=12)
    backend = emulated_backend()
    dstates = tuple(rng.standard_normal((3, 12, 4)) for _ in cell.state_names)
    results = []
    for _ in range(3):
        _, tape = backend.encode(cell, params, x, schedule, need_grad=True)
        grads, _ = backend.encode_backward(cell, params, tape, dstates)
        results.append(grads)
    for grads in results[1:]:
        for name in grads:
            assert np.array_equal(grads[name], results[0][name]), name


def test_emulator_catches_races_and_out_of_bounds():
    # the emulator is not vacuous: a launch that writes another thread's
    # operand, or reads past a buffer, fails
    H, B = 2, 1
    store = np.zeros((3, B, H))
    act = np.zeros((2 * B, 5 * H))
    bias = np.zeros(5 * H)
    idx = np.array([0, 1], np.int32)
    with pytest.raises(Hazard, match="race"):
        # merge 0 writes slot 1 while merge 1 reads slot 1 as its operand
        ts_gated_forward(act, bias, np.int32(2 * B), np.int32(B), np.int32(H), np.int32(2),
                         store, idx, store, idx, None, store, np.array([1, 2], np.int32),
                         None, None, None, np.int32(0))
    with pytest.raises(Hazard, match="outside"):
        ts_gather_pairs(store, np.array([5], np.int32), np.array([0], np.int32),
                        np.zeros((B, 2 * H)), np.int32(1), np.int32(B), np.int32(H))
    with pytest.raises(Hazard, match="written twice"):
        # a target listed twice would be summed by two threads
        ts_accumulate_operands(np.array([0, 0], np.int32), np.array([0, 1, 2], np.int32),
                               np.array([0, 1], np.int32), np.array([1, 1], np.int32),
                               np.int32(2), np.int32(B), np.int32(H), np.zeros((B, 2 * H)),
                               store, None, None, None)
    with pytest.raises(TypeError, match="int32"):
        EmulatedLauncher().kernel("ts_gather_pairs", np.float64, 4,
                                  (store, idx, idx, store, 1, np.int32(1), np.int32(2)))


# ================================================== parity module, CLI, registry
def test_parity_report_on_the_emulated_backend():
    from treesched.parity import run_parity
    report = run_parity(emulated_backend(), dtype="float64", length=9, batch=3, hidden=4,
                        patterns=("odd-even", "reduce"), seed=1)
    assert report.passed, report.format_table()
    cases = {(c.cell, c.pattern, c.num_layers) for c in report.cases}
    assert ("lstm", "reduce", 2) in cases and ("rnn", "odd-even", 1) in cases
    names = {c.quantity for c in report.cases}
    assert {"logits", "state h", "state c", "grad merge/w", "grad head/w",
            "grad unary_1/b"} <= names
    text = report.format_table(verbose=True)
    assert "PASS" in text and "merge/w" in text
    assert "PASS" in report.format_table()
    assert report.to_dict()["passed"] is True


def test_parity_detects_a_wrong_backend():
    from treesched.parity import run_parity

    class Broken(NumpyBackend):
        name = "broken"

        def encode_backward(self, cell, params, tape, dstates, need_dx=False):
            grads, dx = super().encode_backward(cell, params, tape, dstates, need_dx)
            grads["merge/b"] = grads["merge/b"] * 1.01
            return grads, dx

    report = run_parity(Broken(), dtype="float64", length=6, batch=2, hidden=3,
                        patterns=("odd-even",), cells=("lstm",), layers=(2,))
    assert not report.passed
    failed = {c.quantity for c in report.cases if not c.passed}
    assert failed == {"grad merge/b"}
    assert "FAIL" in report.format_table()


def test_registry_reports_why_cupy_is_unavailable():
    from treesched.backends import availability
    reason = availability()["cupy"]
    assert (reason is None) == (_GPU_REASON is None)
    if reason is not None:
        assert "cupy" in reason.lower() or "cuda" in reason.lower()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "treesched.cli.main", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_info_lists_backends():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert "numpy" in result.stdout and "cupy" in result.stdout
    if _GPU_REASON is not None:
        assert "not available" in result.stdout


@pytest.mark.skipif(_GPU_REASON is None, reason="checks the no-GPU error path")
def test_cli_parity_without_a_gpu_is_a_one_line_error():
    result = _cli("parity", "--backend", "cupy")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


def test_cli_parity_rejects_bad_options():
    result = _cli("parity", "--backend", "cupy", "--length", "0")
    assert result.returncode in (1, 2) and "length" in result.stderr
    result = _cli("parity", "--backend", "numpy", "--dtype", "float16")
    assert result.returncode in (1, 2) and "float16" in result.stderr


def test_cli_parity_numpy_against_itself_passes():
    result = _cli("parity", "--backend", "numpy", "--length", "5", "--batch", "2",
                  "--hidden", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_benchmark_script_is_import_safe_and_has_help():
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--quick" in result.stdout
    if _GPU_REASON is not None:
        result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and "no usable CUDA GPU" in result.stderr


# ================================================================= GPU tests
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_parity_with_numpy(dtype):
    from treesched.parity import run_parity
    report = run_parity("cupy", dtype=dtype, length=41, batch=4, hidden=16, seed=0)
    assert report.passed, report.format_table()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_gpu_direct_parity_graphs_and_eager(cell_name):
    import cupy
    cell, params, x, schedule, rng = make_case(cell_name, 2, "odd-even", length=37, batch=5,
                                               hidden=8)
    for use_graphs in (True, False):
        backend = CupyBackend(use_graphs=use_graphs)
        reference = NumpyBackend()
        for _ in range(4):  # eager, capture, replay, replay
            params = make_params(cell, 3, 8, rng, np.float64)
            x = rng.standard_normal(x.shape)
            d_params = {k: cupy.asarray(v) for k, v in params.items()}
            want, want_tape = reference.encode(cell, params, x, schedule, True)
            got, tape = backend.encode(cell, d_params, cupy.asarray(x), schedule, True)
            for g, w in zip(got, want):
                assert_close(cupy.asnumpy(g), w, 1e-10, "state")
            dstates = tuple(rng.standard_normal(w.shape) for w in want)
            w_grads, w_dx = reference.encode_backward(cell, params, want_tape, dstates, True)
            g_grads, g_dx = backend.encode_backward(
                cell, d_params, tape, tuple(cupy.asarray(d) for d in dstates), True)
            for name in w_grads:
                assert_close(cupy.asnumpy(g_grads[name]), w_grads[name], 1e-10, name)
            assert_close(cupy.asnumpy(g_dx), w_dx, 1e-10, "dx")
        if use_graphs:
            assert backend.stats()["graphs"] == 2, backend.stats()


@gpu
@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    import cupy
    model = treesched.PRLSTM(5, 64, 5, backend="cupy", seed=0)
    rng = np.random.default_rng(0)
    x = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (16, 300))]
    dy = rng.standard_normal((16, 300, 5)).astype(np.float32)
    first = None
    for _ in range(3):
        _, grads = model.forward_backward(x, dy)
        grads = {k: cupy.asnumpy(v) for k, v in grads.items()}
        if first is None:
            first = grads
        for name in grads:
            assert np.array_equal(grads[name], first[name]), name


@gpu
@pytest.mark.gpu
def test_gpu_tf32_option_stays_close():
    import cupy
    cell, params, x, schedule, rng = make_case("lstm", 2, "odd-even", length=64, batch=8,
                                               hidden=64, dtype=np.float32)
    d_params = {k: cupy.asarray(v) for k, v in params.items()}
    exact, _ = CupyBackend(allow_tf32=False).encode(cell, d_params, cupy.asarray(x), schedule,
                                                     False)
    fast, _ = CupyBackend(allow_tf32=True).encode(cell, d_params, cupy.asarray(x), schedule,
                                                   False)
    assert rel(cupy.asnumpy(fast[0]), cupy.asnumpy(exact[0])) < 2e-2

"""``treesched.parity`` and ``treesched parity``: the sweep and its report.

The parity command once checked one shape (batch 4, length 41) and passed
while the numba backend's bias gradients were 10-100% off at batch 3,
length 7.  Its default now sweeps odd batches and lengths, every pattern,
cell and depth, both dtypes and every code path of the backend; these tests
hold it to that, check that a shape-dependent bug fails the sweep, and check
the command line and the report's format.
"""

import inspect
import json

import numpy as np
import pytest
from click.testing import CliRunner

from treesched.backends.numpy_backend import NumpyBackend
from treesched.cli.main import cli
from treesched.errors import TreeschedError
from treesched.parity import BATCHES, DTYPES, LAYERS, LENGTHS, MAX_FAILURE_LINES, run_parity
from treesched.patterns import PATTERNS


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


class BiasBugAt(NumpyBackend):
    """The reference, with every bias gradient 5% off at one (batch, length):
    what the numba backend's stale-buffer bug looked like."""

    name = "bias-bug"

    def __init__(self, batch, length):
        super().__init__()
        self.where = (batch, length)

    def encode_backward(self, cell, params, tape, dstates, need_dx=False):
        grads, dx = super().encode_backward(cell, params, tape, dstates, need_dx)
        if (tape.batch, tape.schedule.length) == self.where:
            grads = {name: value * 1.05 if name.endswith("/b") else value
                     for name, value in grads.items()}
        return grads, dx


def test_the_default_sweep_covers_odd_shapes_every_config_and_both_dtypes():
    defaults = {name: p.default for name, p in inspect.signature(run_parity).parameters.items()}
    assert defaults["dtype"] == DTYPES == ("float32", "float64")
    assert defaults["length"] == LENGTHS and defaults["batch"] == BATCHES
    assert {1, 2, 3, 7, 13, 41} <= set(LENGTHS) and {1, 3} <= set(BATCHES)
    assert defaults["layers"] == LAYERS == (1, 2, 3)
    assert defaults["patterns"] is None and defaults["cells"] == ("lstm", "rnn")
    report = run_parity(NumpyBackend(), dtype="float64", length=(1, 2), batch=(1, 3),
                        hidden=3, patterns=None)
    configs = {(c.cell, c.pattern, c.num_layers) for c in report.cases}
    assert configs == {(c, p, n) for c in ("lstm", "rnn") for p in PATTERNS for n in (1, 2, 3)}
    assert {(c.batch, c.length) for c in report.cases} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    assert report.passed


def test_the_sweep_catches_a_bug_the_old_single_shape_missed():
    narrow = dict(dtype="float64", hidden=4, patterns=("odd-even",), cells=("rnn",), layers=(1,))
    broken = BiasBugAt(batch=3, length=7)
    assert run_parity(broken, length=41, batch=4, **narrow).passed  # the old default shape
    report = run_parity(broken, **narrow)
    assert not report.passed
    assert {(c.batch, c.length, c.quantity) for c in report.failures} == {
        (3, 7, "grad leaf/b"), (3, 7, "grad merge/b")}
    text = report.format_table()
    assert "FAILED: float64 3x7 rnn odd-even layers=1 grad leaf/b" in text
    assert text.rstrip().splitlines()[-1].startswith("FAIL:")


def test_a_shape_of_the_sweep_reproduces_alone():
    """A shape's data depend on (seed, batch, length) only: ``--batch 3
    --length 7`` reruns exactly that part of the default sweep."""
    narrow = dict(dtype="float64", hidden=4, patterns=("sklansky",), cells=("lstm",),
                  layers=(2,), seed=3)
    broken = BiasBugAt(batch=3, length=7)
    sweep = run_parity(broken, length=(2, 7), batch=(1, 3), **narrow)
    alone = run_parity(broken, length=7, batch=3, **narrow)
    errors = [(c.quantity, c.rel_error) for c in sweep.cases if (c.batch, c.length) == (3, 7)]
    assert errors == [(c.quantity, c.rel_error) for c in alone.cases]
    assert not alone.passed


def test_the_failure_list_is_bounded():
    class AllWrong(NumpyBackend):
        name = "all-wrong"

        def encode_backward(self, cell, params, tape, dstates, need_dx=False):
            grads, dx = super().encode_backward(cell, params, tape, dstates, need_dx)
            return {name: value + 1 for name, value in grads.items()}, dx

    report = run_parity(AllWrong(), dtype="float64", length=(2, 3), batch=(1, 2), hidden=2,
                        cells=("rnn",), patterns=("odd-even",))
    assert len(report.failures) > MAX_FAILURE_LINES
    lines = report.format_table().splitlines()
    assert sum(line.startswith("FAILED:") for line in lines) == MAX_FAILURE_LINES
    assert any(line.startswith(f"... and {len(report.failures) - MAX_FAILURE_LINES} more")
               for line in lines)


def test_report_shapes_and_json():
    report = run_parity(NumpyBackend(), dtype=("float32", "float64"), length=(2, 5), batch=3,
                        hidden=3, patterns=("reduce",), cells=("lstm",), layers=(1,))
    text = report.format_table()
    assert "shapes (batch x length): 3x2 3x5" in text
    assert "float32, tolerance 0.0001: worst" in text and "float64, tolerance 1e-10" in text
    assert "variants" not in text  # a backend instance: one code path, no variant labels
    data = report.to_dict()
    assert data["passed"] is True and data["lengths"] == (2, 5) and data["batches"] == (3,)
    assert set(data["worst"]) == {"float32", "float64"}
    assert {"dtype", "batch", "length", "variant"} <= set(data["cases"][0])
    verbose = report.format_table(verbose=True)
    assert "3x5" in verbose and "grad merge/b" in verbose


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=0), "length"), (dict(batch=(1, -2)), "batch"), (dict(dtype="float16"), "dtype"),
    (dict(length=()), "length"), (dict(seed=-1), "seed"), (dict(layers=(0,)), "layers")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(TreeschedError, match=message):
        run_parity(NumpyBackend(), **kwargs)


def test_cli_defaults_are_the_sweep(monkeypatch):
    from treesched.cli import parity_cmd
    seen = {}

    def fake(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        return run_parity(NumpyBackend(), dtype="float64", length=1, batch=1, hidden=2,
                          patterns=("reduce",), cells=("rnn",), layers=(1,))

    monkeypatch.setattr(parity_cmd, "run_parity", fake)
    result = invoke("parity", "--backend", "numba")
    assert result.exit_code == 0, result.output
    assert seen["dtype"] == DTYPES and seen["length"] == LENGTHS and seen["batch"] == BATCHES
    result = invoke("parity", "--backend", "numba", "--dtype", "float64", "--length", "7,13",
                    "--batch", "3")
    assert result.exit_code == 0, result.output
    assert seen["dtype"] == ("float64",) and seen["length"] == (7, 13) and seen["batch"] == (3,)


@pytest.mark.parametrize("args,message", [
    (("--length", "3,,5"), "length"), (("--batch", "0"), "batch"),
    (("--dtype", "float16"), "float16"), (("--length", "x"), "length")])
def test_cli_rejects_bad_options(args, message):
    result = CliRunner().invoke(cli, ["parity", "--backend", "numpy", *args])
    assert result.exit_code != 0 and message in result.output


def test_cli_numba_at_the_shape_of_the_bug_report(tmp_path):
    """``treesched parity --backend numba --dtype float64 --batch 3 --length 7``:
    the issue's failing command, now passing, both GEMM paths."""
    pytest.importorskip("numba")
    from treesched.backends.numba_backend import BlasThreads
    target = tmp_path / "parity.json"
    result = invoke("parity", "--backend", "numba", "--dtype", "float64", "--batch", "3",
                    "--length", "7", "--json", str(target))
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "float64, tolerance 1e-10: worst" in result.output
    paths = ["numba-gemm", "numpy-gemm"] if BlasThreads().available else ["numpy-gemm"]
    assert f"variants: {', '.join(paths)}" in result.output
    data = json.loads(target.read_text())
    assert data["passed"] and data["variants"] == paths
    assert {case["variant"] for case in data["cases"]} == set(paths)
    assert max(case["rel_error"] for case in data["cases"]) <= 1e-10
    assert np.isfinite(data["worst"]["float64"]["rel_error"])

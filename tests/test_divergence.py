"""Divergence is one clear error naming the step, never NumPy's raw
``RuntimeWarning`` lines, and the checkpoint before it stays."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import treesched
from treesched.errors import DivergenceError, TreeschedError
from treesched.optim import Adam


def test_overflowing_model_returns_without_numpy_warnings():
    model = treesched.PRLSTM(3, 4, 2, dtype="float32")
    for name, value in model.params.numpy().items():
        model.params[name] = np.full(value.shape, 3e38 if name.endswith("/w") else 0.0,
                                     np.float32)
    x = np.eye(3, dtype=np.float32)[[[0, 1, 2, 0, 1]]]
    targets = np.eye(2, dtype=np.float32)[[[0, 1, 0, 1, 0]]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # any warning fails the test
        logits = model.forward(x)
        loss, grads, _ = model.loss_and_grads(x, targets)
    assert not np.all(np.isfinite(logits)) and not np.isfinite(loss)


def test_optimizer_refuses_a_non_finite_gradient_and_changes_no_parameter():
    model = treesched.PRLSTM(3, 4, 2)
    optimizer = Adam(lr=1e-3, clip=1.0)
    optimizer.init(model.params)
    before = model.params.numpy()
    grads = {name: np.zeros_like(value) for name, value in before.items()}
    grads["merge/w"][0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DivergenceError, match="gradient norm is"):
            optimizer.step(model.params, grads)
    # a finite gradient whose update overflows one parameter: none is assigned
    model.params["head/b"] = np.full(2, 3.0e38, np.float32)
    before = model.params.numpy()
    grads = {name: np.full_like(value, -1e-3) for name, value in before.items()}
    large_steps = Adam(lr=1e38, clip=0)
    large_steps.init(model.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DivergenceError, match="'head/b' non-finite"):
            large_steps.step(model.params, grads)
    after = model.params.numpy()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert issubclass(DivergenceError, TreeschedError)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_diverging_run_is_one_error_naming_the_step_and_keeps_the_checkpoint(tmp_path,
                                                                             backend):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "treesched.cli.main", "train", "--task", "parity_check",
         "--steps", "50", "--hidden", "8", "--batch", "8", "--lr", "1e38", "--clip", "0",
         "--backend", backend, "--checkpoint-every", "1", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Warning" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: ") and "diverged" in lines[0]
    step = int(lines[0].split(" at step ")[1].split(":")[0].split()[0])
    meta = json.loads(str(np.load(out / "train_state.npz")["__meta__"]))
    assert meta["step"] == step - 1          # the last good step's checkpoint
    model = treesched.PRLSTM.load(out / "model.npz")
    assert all(np.all(np.isfinite(value)) for value in model.params.numpy().values())

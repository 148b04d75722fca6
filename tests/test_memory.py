"""Memory is checked before a pass allocates: the estimate against the
measured peak, and refusals that give both figures and the largest batch
that fits."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import treesched
from treesched import memory
from treesched.memory import InsufficientMemoryError, largest_fitting_batch, pass_bytes


def measured_peak(model, x, targets, need_grad):
    model.backend.clear()             # no cached workspace: the pass allocates its own
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        if need_grad:
            model.loss_and_grads(x, targets)
        else:
            model.forward(x)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("batch, length, hidden, num_layers, cell, need_grad", [
    (16, 256, 32, 2, "lstm", True),
    (32, 300, 48, 2, "lstm", True),
    (64, 512, 16, 1, "lstm", True),
    (16, 256, 32, 3, "lstm", False),
    (24, 200, 32, 2, "rnn", True),
])
def test_estimate_is_within_25_percent_of_the_measured_peak(batch, length, hidden, num_layers,
                                                            cell, need_grad):
    # numpy's allocations are all visible to tracemalloc: the measured peak is real
    model = treesched.PRLSTM(5, hidden, 3, num_layers=num_layers, cell=cell)
    rng = np.random.default_rng(0)
    x = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (batch, length))]
    targets = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (batch, length))]
    peak = measured_peak(model, x, targets, need_grad)
    estimate = pass_bytes(model, model.schedule(length), batch, need_grad)
    assert 0.75 * peak <= estimate <= 1.25 * peak, (estimate, peak)


def test_a_pass_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    model = treesched.PRLSTM(5, 32, 3)
    schedule = model.schedule(256)
    available = pass_bytes(model, schedule, 10, True) + 1000
    monkeypatch.setattr(memory, "available_host_bytes", lambda: available)
    x = np.eye(5, dtype=np.float32)[np.zeros((64, 256), int)]
    targets = np.eye(3, dtype=np.float32)[np.zeros((64, 256), int)]
    model.backend.clear()
    tracemalloc.start()
    try:
        with pytest.raises(InsufficientMemoryError) as refused:
            model.loss_and_grads(x, targets)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(refused.value)
    fits = largest_fitting_batch(model, schedule, True, available)
    assert fits == 10
    assert "MiB" in message and "only" in message and f"largest batch that fits is {fits}" \
        in message
    assert peak < pass_bytes(model, schedule, 64, True) / 4     # the workspace never came
    model.loss_and_grads(x[:fits], targets[:fits])             # and the advice is right


def test_cli_refuses_a_training_run_that_cannot_fit_with_both_figures(tmp_path):
    # the case: T = 200 000, B = 128, H = 256 is hundreds of GiB
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "treesched.cli.main", "train", "--task", "parity_check",
         "--max-length", "200000", "--batch", "128", "--hidden", "256", "--steps", "1",
         "--backend", "numpy", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "GiB" in lines[0] and "available host memory" in lines[0]
    assert "largest batch that fits is" in lines[0] or "not even a batch of 1" in lines[0]
    assert not out.exists()

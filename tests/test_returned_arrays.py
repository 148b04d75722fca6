"""Arrays handed to a caller belong to the caller.

Every backend reuses workspaces between calls; nothing it returned (states,
logits, gradients, dx) may be a view of one.  Each test keeps a bitwise copy
of everything one round of calls returned, runs every kind of call again
with other inputs (and other shapes, among them batch 1 and length 1, where
a transposed view is already contiguous), and requires the first results to
be unchanged.  Backends: numpy, numba, and cupy with the real CUDA C
compiled for the CPU (``tests/cuda_on_cpu.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_checks import make_params
from cuda_on_cpu import cpu_backend
from cuda_on_cpu import why_unavailable as why_no_cpu_cuda

import treesched
from treesched.backends import get_backend, why_unavailable
from treesched.ops import LSTMCell, RNNCell

SHAPES = ((1, 5), (3, 1), (1, 1), (3, 5))  # (batch, length)
INPUTS, HIDDEN, OUTPUTS = 3, 4, 2


def _backend(name):
    if name == "cupy-on-cpu":
        reason = why_no_cpu_cuda()
        if reason is not None:
            pytest.skip(reason)
        return cpu_backend(use_graphs=True)[0]
    reason = why_unavailable(name)
    if reason is not None:
        pytest.skip(f"backend {name} cannot run here: {reason}")
    return get_backend(name)


BACKENDS = ["numpy", "numba", "cupy-on-cpu"]


def _arrays(result):
    """Every array in a nested result (tuples, lists, dicts)."""
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, dict):
        return [a for key in sorted(result) for a in _arrays(result[key])]
    if isinstance(result, (tuple, list)):
        return [a for item in result for a in _arrays(item)]
    return []


def _backend_round(backend, cell, params, x, seed):
    """One call of every kind at the backend level; returns what the caller got."""
    schedule = treesched.compile(x.shape[1], "odd-even", "all")
    last = treesched.compile(x.shape[1], "odd-even", "last")
    inference, _ = backend.encode(cell, params, x, schedule, need_grad=False)
    inference_last, _ = backend.encode(cell, params, x, last, need_grad=False)
    states, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    rng = np.random.default_rng(seed)
    dstates = tuple(rng.standard_normal(s.shape).astype(x.dtype) for s in states)
    grads, dx = backend.encode_backward(cell, params, tape, dstates, need_dx=True)
    return [inference, inference_last, states, grads, dx]


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_results_survive_later_calls(backend_name, cell_name):
    backend = _backend(backend_name)
    cell = LSTMCell(2) if cell_name == "lstm" else RNNCell(2)
    rng = np.random.default_rng(0)
    params = make_params(cell, INPUTS, HIDDEN, rng, np.float64)
    for batch, length in SHAPES:
        x = rng.standard_normal((batch, length, INPUTS))
        kept = _backend_round(backend, cell, params, x, 1)
        copies = [a.copy() for a in _arrays(kept)]
        # every kind of call again: same shapes, then every other shape
        for other_batch, other_length in [(batch, length), *SHAPES]:
            other = rng.standard_normal((other_batch, other_length, INPUTS))
            _backend_round(backend, cell, params, other, 2)
        for index, (now, then) in enumerate(zip(_arrays(kept), copies)):
            assert now.tobytes() == then.tobytes(), (
                f"{backend_name} {cell_name} B={batch} T={length}: returned array {index} "
                f"(shape {then.shape}) was overwritten by a later call")


def _model(backend_name, cell_name):
    model = treesched.PRLSTM(INPUTS, HIDDEN, OUTPUTS, cell=cell_name, dtype="float64", seed=3)
    if backend_name != "numpy":
        model.backend = _backend(backend_name)   # an instance, as treesched.parity does
        model.xp = model.backend.xp
    return model


def _model_round(model, x, rng):
    batch, length, _ = x.shape
    dy = rng.standard_normal((batch, length, OUTPUTS))
    targets = np.eye(OUTPUTS)[rng.integers(0, OUTPUTS, (batch, 1))]
    lengths = np.maximum(1, length - np.arange(batch) % length)
    return [model.forward(x), model.forward(x, outputs="last"), model.encode(x),
            model.last_state(x), model.forward_backward(x, dy),
            model.forward_backward(x, dy, lengths=lengths),
            model.loss_and_grads(x, targets)]


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_model_results_survive_later_calls(backend_name, cell_name):
    model = _model(backend_name, cell_name)
    rng = np.random.default_rng(1)
    for batch, length in SHAPES:
        x = rng.standard_normal((batch, length, INPUTS))
        kept = _model_round(model, x, rng)
        copies = [a.copy() for a in _arrays(kept)]
        for other_batch, other_length in [(batch, length), *SHAPES]:
            _model_round(model, rng.standard_normal((other_batch, other_length, INPUTS)), rng)
        for index, (now, then) in enumerate(zip(_arrays(kept), copies)):
            assert now.tobytes() == then.tobytes(), (
                f"{backend_name} {cell_name} B={batch} T={length}: returned array {index} "
                f"(shape {then.shape}) was overwritten by a later call")

"""The 15 formal-language tasks of Delétang et al. (ICLR 2023), NumPy only.

Each task follows the public definitions in
google-deepmind/neural_networks_chomsky_hierarchy (``tasks/``): the same
alphabets, input/output sizes, output lengths, sampling distributions and
accuracy masks (the random streams differ: everything here is drawn from the
``numpy.random.Generator`` passed to :meth:`Task.sample`).

Usage::

    task = treesched.tasks.get("binary_addition")
    inputs, targets, mask = task.sample(np.random.default_rng(0), 128, 40)
    tape = treesched.tasks.build_tape(inputs, targets.shape[1])

Model input and readout (the public ``make_model_with_empty_targets`` with
no computation steps): the tape is the one-hot input followed by
``output_length`` blank tokens, the blank being one extra input symbol
(channel ``input_size``); the model's outputs at the last ``output_length``
positions are the logits.  Note that ``output_length`` is a function of the
actual input length (``inputs.shape[1]``): only ``modular_arithmetic`` makes
it differ from the requested length (even lengths lose one symbol).

Loss (how the public training code computes it, and what the trainer here
must do): the pointwise loss is softmax cross-entropy
``-targets * log_softmax(logits)`` of shape ``(B, O, C)``; it is summed over
the class axis only and then AVERAGED over both the batch and the output
positions, ``mean_{b,t} sum_c -y[b,t,c] log softmax(z[b,t])_c`` (for
single-output tasks the position axis is squeezed away, so it is the mean
over the batch).  The accuracy mask is NOT applied to the loss: the ``0``
padding after a termination token is trained on like any other position.
See :data:`LOSS_REDUCTION`, :data:`LOSS_EXPLANATION` and
:func:`cross_entropy_loss`.

Accuracy: see :func:`accuracy` (argmax match, masked, pooled over all
counted positions of the batch).  The public range evaluation samples 512
sequences per test length in sub-batches of 64, computes that pooled
accuracy per sub-batch and averages the 8 sub-batch values; the score is the
mean of the per-length accuracies over the test lengths (the public example
script takes ``accuracies[sequence_length + 1:]`` of a list that starts at
length 1, i.e. lengths ``sequence_length + 2`` and up).

Task API beyond :meth:`Task.sample`: :meth:`Task.sample_tokens` (integer
ids instead of one-hots), :meth:`Task.labels` (the target ids as a function
of any input ids, for hand-made inputs), :meth:`Task.mask_from_labels`,
:meth:`Task.input_length` and :meth:`Task.output_length`.
"""

from __future__ import annotations

import numpy as np

from treesched.errors import TreeschedError
from treesched.tasks.base import Task, one_hot, termination_mask
from treesched.tasks.cs import (BinaryAddition, BinaryMultiplication,
                                BucketSort, ComputeSqrt, DuplicateString,
                                MissingDuplicateString, OddsFirst)
from treesched.tasks.dcf import (ModularArithmeticBrackets, ReverseString,
                                 SolveEquation, StackManipulation)
from treesched.tasks.regular import (CycleNavigation, EvenPairs,
                                     ModularArithmetic, ParityCheck)

__all__ = [
    "LOSS_REDUCTION", "LOSS_EXPLANATION", "PUBLISHED_PR_LSTM_SCORES", "Task", "accuracy", "build_tape",
    "cross_entropy_loss", "get", "names", "one_hot", "termination_mask",
]

LOSS_REDUCTION = "mean_over_batch_and_positions"

#: The paper's published PR-LSTM scores in percent, test lengths 41..500
#: (SPEC.md §4); SPEC gives none for parity_check and the four deterministic
#: context-free tasks.
PUBLISHED_PR_LSTM_SCORES = {
    "bucket_sort": 99.4, "missing_duplicate_string": 100.0, "binary_multiplication": 52.9,
    "compute_sqrt": 56.8, "duplicate_string": 54.7, "odds_first": 55.0,
    "binary_addition": 51.8, "cycle_navigation": 100.0, "even_pairs": 100.0,
    "modular_arithmetic": 36.4,
}

LOSS_EXPLANATION = (
    "Softmax cross-entropy as in the public training code: "
    "loss = mean(sum(-targets * log_softmax(logits), axis=-1)), i.e. the "
    "per-position cross-entropy (summed over classes only) averaged over the "
    "batch AND the output positions together (not summed over positions). "
    "The accuracy mask is not applied to the loss: every output position, "
    "including the 0 padding after a termination token, contributes. For "
    "single-output tasks this is the mean over the batch.")

_TASK_CLASSES = (
    EvenPairs, ModularArithmetic, ParityCheck, CycleNavigation,
    StackManipulation, ReverseString, ModularArithmeticBrackets,
    SolveEquation,
    DuplicateString, MissingDuplicateString, OddsFirst, BinaryAddition,
    BinaryMultiplication, ComputeSqrt, BucketSort,
)

_REGISTRY = {cls.name: cls for cls in _TASK_CLASSES}


def names() -> list[str]:
    """The 15 task names: regular, then dcf, then cs tasks."""
    return [cls.name for cls in _TASK_CLASSES]


def get(name: str) -> Task:
    """A new :class:`Task` for ``name``; unknown names raise
    :class:`TreeschedError` listing the known ones."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise TreeschedError(
            f"unknown task {name!r}; known tasks: {', '.join(names())}")
    return cls()


def build_tape(inputs: np.ndarray, output_length: int) -> np.ndarray:
    """The model's input tape: ``inputs`` then ``output_length`` blanks.

    ``inputs`` is one-hot ``(B, T, I)``; returns float32
    ``(B, T + output_length, I + 1)`` whose first ``I`` channels hold the
    input and whose blank positions have 1.0 in the last channel only.
    """
    inputs = np.asarray(inputs)
    if inputs.ndim != 3:
        raise TreeschedError(
            f"build_tape: inputs must have shape (B, T, input_size), "
            f"got {inputs.shape}")
    if (isinstance(output_length, bool)
            or not isinstance(output_length, (int, np.integer))
            or output_length < 0):
        raise TreeschedError(
            f"build_tape: output_length must be an integer >= 0, "
            f"got {output_length!r}")
    batch, length, size = inputs.shape
    tape = np.zeros((batch, length + int(output_length), size + 1),
                    dtype=np.float32)
    tape[:, :length, :size] = inputs
    tape[:, length:, size] = 1.0
    return tape


def _as_3d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        return array[:, None, :]
    if array.ndim != 3:
        raise TreeschedError(
            f"{what} must have shape (B, O, C) or (B, C), got {array.shape}")
    return array


def accuracy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray
             ) -> tuple[np.ndarray, float]:
    """Masked argmax accuracy, as the public training code computes it.

    Public definition: ``correct = argmax(logits, -1) == argmax(targets, -1)``
    per position, and the batch accuracy is
    ``sum(mask * correct) / sum(mask)`` over ALL positions of ALL sequences
    (pooled: a sequence with more counted positions weighs more; it is not
    the mean of per-sequence accuracies when masks differ in length, which
    only happens for stack_manipulation, binary_addition and
    binary_multiplication).  The returned ``mean`` is exactly that pooled
    value; ``per_sequence`` ``(B,)`` is ``sum_t(mask * correct) /
    sum_t(mask)`` per sequence (NaN for a sequence with an all-zero mask),
    given for diagnostics.  Accepts ``(B, O, C)`` or single-output
    ``(B, C)`` logits/targets (then ``mask`` is ``(B, O)`` or ``(B,)``).
    """
    logits = _as_3d(logits, "logits")
    targets = _as_3d(targets, "targets")
    if logits.shape[:2] != targets.shape[:2]:
        raise TreeschedError(
            f"accuracy: logits {logits.shape} and targets {targets.shape} "
            "differ in batch or output length")
    mask = np.asarray(mask, dtype=np.float64).reshape(targets.shape[:2])
    correct = (np.argmax(logits, axis=-1) == np.argmax(targets, axis=-1))
    hits = (mask * correct).sum(axis=1)
    counts = mask.sum(axis=1)
    per_sequence = np.full(counts.shape, np.nan)
    np.divide(hits, counts, out=per_sequence, where=counts > 0)
    total = counts.sum()
    mean = float(hits.sum() / total) if total > 0 else float("nan")
    return per_sequence, mean


def cross_entropy_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    """The public training loss (see :data:`LOSS_EXPLANATION`): softmax
    cross-entropy summed over classes, averaged over batch and positions,
    without the accuracy mask.  Computed in float64."""
    logits = _as_3d(logits, "logits").astype(np.float64)
    targets = _as_3d(targets, "targets").astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1,
                                                       keepdims=True))
    return float(np.mean(np.sum(-targets * log_softmax, axis=-1)))

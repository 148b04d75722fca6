"""What the trainer trains on: a *training data source*.

:func:`treesched.training.train` is one loop for every kind of run::

    batch = data.draw(rng, batch_size)                 # from the run's data generator
    loss, grads, logits = model.loss_and_grads(batch.x, batch.targets)
    clipped Adam step; log; every so often data.held_out_metrics(model); checkpoint

A source fixes everything the loop does not: the model's input and output
sizes, how a batch is drawn (its targets cover the last ``K`` positions of
``x``, ``K = targets.shape[1]``), what the log line says about a batch, the
held-out metrics (if the source has held-out data), and what the run folder
records about the data so that a resumed run is known to train on the same
data.  Two sources exist:

* :class:`FormalTaskData` (here): a task of the formal-language benchmark
  with the SPEC §4 curriculum;
* :class:`treesched.language_model.NextCharacterData`: next-character
  prediction on windows of a text corpus.

A source must draw batches from the generator it is given and from nothing
else, so that the same generator state gives the same batch (exact
resumption restores the generator).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import tasks as tasks_lib


@dataclasses.dataclass
class Batch:
    """One training batch.

    ``x``: ``(B, T, D)`` model input; ``targets``: ``(B, K, O)`` one-hot at
    the last ``K`` positions; ``mask``: ``(B, K)``, where accuracy counts
    (the loss ignores it, as the benchmark's public training code does);
    ``record``: fields of the log line about this batch (e.g. its length).
    """

    x: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    record: dict


class TrainingData:
    """The interface :func:`treesched.training.train` relies on (see the module docstring).

    Attributes:
      name: the run's task name, as ``TrainConfig.task`` says it.
      input_size, output_size: the model's ``D`` and ``O``.
      progress_fields: names of log-line fields the progress bar shows
        besides loss and accuracy.
    """

    name: str = ""
    input_size: int = 0
    output_size: int = 0
    progress_fields: tuple = ()

    def draw(self, rng: np.random.Generator, batch_size: int) -> Batch:
        raise NotImplementedError

    def batch_metrics(self, loss: float, logits: np.ndarray, batch: Batch) -> dict:
        """Log-line fields of a trained batch; ``logits`` are host arrays.
        The default: the pooled masked accuracy of the benchmark."""
        _, accuracy = tasks_lib.accuracy(logits, batch.targets, batch.mask)
        return {"accuracy": accuracy}

    @property
    def has_held_out(self) -> bool:
        """Whether :meth:`held_out_metrics` measures anything."""
        return False

    def held_out_metrics(self, model) -> dict:
        """Metrics of ``model`` on data it is not trained on (log-line fields)."""
        return {}

    def description(self, config) -> dict:
        """The ``task`` and ``protocol`` sections of the run's ``config.json``."""
        raise NotImplementedError

    def start_message(self, config, backend: str, out) -> str:
        """The line the progress display opens a new run with."""
        raise NotImplementedError

    def write_run_files(self, folder) -> None:
        """Files the run folder needs besides the trainer's own (written at the start)."""

    def check_resumable(self, folder, run_config: dict) -> None:
        """Raise TreeschedError unless this source is the data the run in
        ``folder`` (whose ``config.json`` is ``run_config``) was trained on."""


class FormalTaskData(TrainingData):
    """A formal-language task with the SPEC §4 curriculum: each batch draws
    one length ``n`` uniformly from ``1 .. max_length``, samples ``B``
    sequences of it, and builds the input tape (the one-hot input, then
    ``output_length(n)`` blanks); the targets are the task's outputs at the
    last ``output_length(n)`` positions.  No held-out data: a run is scored
    afterwards by range evaluation (:mod:`treesched.evaluation`)."""

    def __init__(self, task, max_length: int):
        self.task = tasks_lib.get(task) if isinstance(task, str) else task
        self.max_length = int(max_length)
        self.name = self.task.name
        self.input_size = self.task.input_size + 1   # the blank is one more input symbol
        self.output_size = self.task.output_size

    def draw(self, rng, batch_size):
        length = int(rng.integers(1, self.max_length + 1))
        inputs, targets, mask = self.task.sample(rng, batch_size, length)
        tape = tasks_lib.build_tape(inputs, targets.shape[1])
        return Batch(tape, targets, mask, {"length": length})

    def description(self, config):
        task = self.task
        return {"task": {"name": task.name, "level": task.level, "input_size": task.input_size,
                         "output_size": task.output_size},
                "protocol": {"curriculum": f"uniform over lengths 1..{self.max_length}, one "
                                           f"length per step",
                             "loss": tasks_lib.LOSS_REDUCTION,
                             "optimizer": f"clip_by_global_norm({config.clip}) then "
                                          f"adam({config.lr}, b1=0.9, b2=0.999, eps=1e-8)",
                             "tape": "one-hot input + output_length blanks; read last "
                                     "output_length positions"}}

    def start_message(self, config, backend, out):
        return (f"training {config.task}: hidden {config.hidden}, {config.steps} steps, "
                f"batch {config.batch}, lengths 1..{self.max_length}, backend {backend} -> {out}")


__all__ = ["Batch", "TrainingData", "FormalTaskData"]

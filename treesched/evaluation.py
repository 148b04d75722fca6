"""Range evaluation: accuracy per test length and the benchmark score.

The public protocol (google-deepmind/neural_networks_chomsky_hierarchy,
``range_evaluation.py``): for every test length draw ``samples`` (512)
sequences in sub-batches of ``eval_batch`` (64), compute the pooled masked
accuracy of each sub-batch (:func:`treesched.tasks.accuracy`) and average the
sub-batch values; the score is the mean of the per-length accuracies over
the test lengths (41..500 in the paper).  Sampling uses its own generator,
seeded with ``seed`` (1, as the public evaluation), so a model's score is
reproducible.  A last sub-batch smaller than ``eval_batch`` (when
``samples`` is not a multiple of it) is weighted by its size.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .errors import TreeschedError
from .fileio import write_text
from .language_model import LM_TASK, VOCABULARY_FILE, Vocabulary
from .model import PRLSTM
from .progress import Progress
from .validation import positive_int

METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy_vs_length.png"
METRICS_FORMAT = "treesched-metrics"

_RANGE = re.compile(r"^\s*(\d+)\s*(?:(?:-|\.\.|:)\s*(\d+))?\s*$")


def parse_lengths(text: str, stride: int = 1) -> list[int]:
    """``"41-500"`` (also ``41..500``), ``"100"``, ``"41-100,200,300-310"`` →
    sorted distinct lengths; ranges are inclusive and stepped by ``stride``
    from their start."""
    positive_int("--stride", stride)
    if not isinstance(text, str) or not text.strip():
        raise TreeschedError("--lengths is empty; expected e.g. 41-500 or 41,60,100")
    lengths = set()
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise TreeschedError(
                f"malformed --lengths {text!r}: {part.strip()!r} is not a length or a range "
                f"like 41-500")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise TreeschedError(f"malformed --lengths {text!r}: range {start}-{stop} is empty")
        lengths.update(range(start, stop + 1, int(stride)))
    return sorted(lengths)


def check_lengths(task, lengths) -> list[int]:
    """Every length must be one the task can sample (``task.check_length``)."""
    if not lengths:
        raise TreeschedError("no test lengths to evaluate")
    for length in lengths:
        try:
            task.check_length(length)
        except TreeschedError as error:
            raise TreeschedError(f"test length {length} is not possible: {error}") from None
    return [int(length) for length in lengths]


def evaluate(model: PRLSTM, task, lengths, samples: int = 512, eval_batch: int = 64,
             seed: int = 1, progress: bool = False, stream=None,
             progress_interval: float = 30.0) -> dict:
    """Per-length accuracies and the score of ``model`` on ``task``.

    Returns a dict with ``lengths``, ``accuracies`` (one per length, in
    [0, 1]), ``score`` (their mean), ``samples``, ``eval_batch``, ``seed``
    and ``seconds``.
    """
    if isinstance(task, str):
        task = tasks_lib.get(task)
    for name, value in (("samples", samples), ("eval_batch", eval_batch)):
        positive_int(name, value)
    if model.input_size != task.input_size + 1 or model.output_size != task.output_size:
        raise TreeschedError(
            f"the model (input {model.input_size}, output {model.output_size}) does not fit "
            f"task {task.name!r} (needs input {task.input_size + 1} with the blank, output "
            f"{task.output_size})")
    lengths = check_lengths(task, list(lengths))
    rng = np.random.default_rng(seed)
    bar = Progress(len(lengths), label=f"eval {task.name}", stream=stream, enabled=progress,
                   unit="lengths", interval=progress_interval)
    started = time.perf_counter()
    accuracies = []
    for index, length in enumerate(lengths):
        values, weights = [], []
        remaining = int(samples)
        while remaining > 0:
            size = min(int(eval_batch), remaining)
            remaining -= size
            inputs, targets, mask = task.sample(rng, size, length)
            k = targets.shape[1]
            tape = tasks_lib.build_tape(inputs, k)
            logits = model.forward(tape, outputs=k)
            get = getattr(logits, "get", None)
            logits = np.asarray(get() if callable(get) and not isinstance(logits, np.ndarray)
                                else logits)
            _, value = tasks_lib.accuracy(logits, targets, mask)
            values.append(value)
            weights.append(size)
        accuracy = float(np.average(values, weights=weights))
        accuracies.append(accuracy)
        bar.update(index + 1, length=length, acc=accuracy)
    bar.close()
    return {"lengths": lengths, "accuracies": accuracies,
            "score": float(np.mean(accuracies)), "samples": int(samples),
            "eval_batch": int(eval_batch), "seed": int(seed),
            "seconds": round(time.perf_counter() - started, 3)}


def load_run_model(folder, backend: str | None = None) -> tuple[PRLSTM, dict]:
    """``(model, run_config)`` of a run folder (a formal task or an lm run,
    whose sizes must be its vocabulary's); clear errors for anything else."""
    from .training import MODEL_FILE, read_run_config
    folder = Path(folder)
    run = read_run_config(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise TreeschedError(f"run {folder} has no checkpoint ({MODEL_FILE}) yet")
    task_name = run["train"].get("task")
    if task_name == LM_TASK:
        size = Vocabulary.load(folder / VOCABULARY_FILE).size
        input_size = output_size = size
    else:
        task = tasks_lib.get(task_name)
        input_size, output_size = task.input_size + 1, task.output_size
    model = PRLSTM.load(path, backend=backend)
    if model.input_size != input_size or model.output_size != output_size \
            or model.hidden_size != run["train"].get("hidden"):
        raise TreeschedError(f"checkpoint {path} does not belong to this run (task "
                             f"{task_name!r}, hidden {run['train'].get('hidden')})")
    return model, run


def evaluate_run(folder, lengths, samples: int = 512, eval_batch: int = 64, seed: int = 1,
                 backend: str | None = None, progress: bool = False, plot: bool = True,
                 stream=None) -> dict:
    """Evaluate a run's checkpoint; writes ``metrics.json`` (and the plot)
    into the run folder and returns the metrics."""
    from .training import STATE_FILE, load_state
    folder = Path(folder)
    model, run = load_run_model(folder, backend)
    if run["train"]["task"] == LM_TASK:
        raise TreeschedError(
            f"run {folder} is a character language model: range evaluation scores the "
            f"formal-language tasks; its validation bits per character are logged in "
            f"train_log.jsonl (valid_bpc), and `treesched generate` samples from it")
    task = tasks_lib.get(run["train"]["task"])
    lengths = check_lengths(task, list(lengths))
    step = None
    if (folder / STATE_FILE).is_file():
        try:
            step = int(load_state(folder / STATE_FILE)[0]["step"])
        except (TreeschedError, KeyError, ValueError, TypeError):
            step = None
    result = evaluate(model, task, lengths, samples=samples, eval_batch=eval_batch, seed=seed,
                      progress=progress, stream=stream)
    metrics = {"format": METRICS_FORMAT, "version": 1, "task": task.name, "level": task.level,
               "score": result["score"], "step": step, "train": run["train"],
               "backend": model.backend.name, **result}
    write_text(folder / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    if plot:
        from .plots import plot_accuracy_vs_length
        plot_accuracy_vs_length(result["lengths"], result["accuracies"], folder / PLOT_FILE,
                                title=f"{task.name}: PR-LSTM hidden {run['train'].get('hidden')}"
                                      + (f", {step} steps" if step else ""),
                                train_max=run["train"].get("max_length"),
                                score=result["score"])
    return metrics

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

import functools
import json
import re
import time
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .distributed import ProcessGroup, world
from .errors import TreeschedError
from .fileio import write_text
from .language_model import LM_TASK, VOCABULARY_FILE, Vocabulary
from .model import PRLSTM, read_checkpoint
from .progress import Progress
from .runfolder import check_model_belongs, check_state_belongs
from .runlock import RunLock, command_line
from .limits import MAX_BATCH, MAX_INTERVAL, MAX_LENGTH, MAX_SAMPLES, MAX_TEST_LENGTHS
from .validation import positive_int

METRICS_FILE = "metrics.json"
PLOT_FILE = "accuracy_vs_length.png"
METRICS_FORMAT = "treesched-metrics"

# ASCII digits only (\d would take any Unicode decimal digit), at most 40 of them
_RANGE = re.compile(r"^\s*([0-9]{1,40})\s*(?:(?:-|\.\.|:)\s*([0-9]{1,40}))?\s*$")


def parse_lengths(text: str, stride: int = 1) -> list[int]:
    """``"41-500"`` (also ``41..500``), ``"100"``, ``"41-100,200,300-310"`` →
    sorted distinct lengths; ranges are inclusive and stepped by ``stride``
    from their start."""
    positive_int("--stride", stride, most=MAX_INTERVAL)
    if not isinstance(text, str) or not text.strip():
        raise TreeschedError("--lengths is empty; expected e.g. 41-500 or 41,60,100")
    lengths, counted = set(), 0
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
        if stop > MAX_LENGTH:
            raise TreeschedError(f"--lengths {text!r}: test lengths must be at most "
                                 f"{MAX_LENGTH}, got {stop}")
        # counted before the range is built, so a huge request costs nothing
        counted += (stop - start) // int(stride) + 1
        if counted > MAX_TEST_LENGTHS:
            raise TreeschedError(f"--lengths {text!r} asks for more than {MAX_TEST_LENGTHS} "
                                 f"test lengths; use a larger --stride or fewer ranges")
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
             progress_interval: float = 30.0, group: ProcessGroup | None = None) -> dict:
    """Per-length accuracies and the score of ``model`` on ``task``.

    Returns a dict with ``lengths``, ``accuracies`` (one per length, in
    [0, 1]), ``score`` (their mean), ``samples``, ``eval_batch``, ``seed``
    and ``seconds``.

    ``group`` (default :func:`treesched.distributed.world`): with several
    ranks, each evaluates the lengths it owns (every N-th, round robin:
    :meth:`treesched.distributed.ProcessGroup.owns`) while every rank draws
    every test sequence, so the sequences, and the result every rank
    returns, are the single process's.  Rank 0 alone shows progress.
    """
    group = world() if group is None else group
    if isinstance(task, str):
        task = tasks_lib.get(task)
    for name, value, most in (("samples", samples, MAX_SAMPLES),
                              ("eval_batch", eval_batch, MAX_BATCH)):
        positive_int(name, value, most=most)
    if model.input_size != task.input_size + 1 or model.output_size != task.output_size:
        raise TreeschedError(
            f"the model (input {model.input_size}, output {model.output_size}) does not fit "
            f"task {task.name!r} (needs input {task.input_size + 1} with the blank, output "
            f"{task.output_size})")
    lengths = check_lengths(task, list(lengths))
    rng = np.random.default_rng(seed)
    bar = Progress(len(lengths), label=f"eval {task.name}", stream=stream,
                   enabled=progress and group.is_root, unit="lengths",
                   interval=progress_interval)
    started = time.perf_counter()
    accuracies = []
    for index, length in enumerate(lengths):
        values, weights = [], []
        remaining = int(samples)
        while remaining > 0:
            size = min(int(eval_batch), remaining)
            remaining -= size
            # drawn on every rank, so each rank's generator is where the single process's is
            inputs, targets, mask = task.sample(rng, size, length)
            if not group.owns(index):
                continue
            k = targets.shape[1]
            tape = tasks_lib.build_tape(inputs, k)
            logits = model.forward(tape, outputs=k)
            get = getattr(logits, "get", None)
            logits = np.asarray(get() if callable(get) and not isinstance(logits, np.ndarray)
                                else logits)
            _, value = tasks_lib.accuracy(logits, targets, mask)
            values.append(value)
            weights.append(size)
        if not group.owns(index):
            continue
        accuracy = float(np.average(values, weights=weights))
        accuracies.append(accuracy)
        bar.update(index + 1, length=length, acc=accuracy)
    if group.is_distributed:   # rank r holds lengths r, r + N, …: interleave them back
        shares = group.allgather_json(accuracies, "the gathering of the accuracies")
        accuracies = [shares[index % group.size][index // group.size]
                      for index in range(len(lengths))]
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
    model_config = read_checkpoint(path)[1]
    check_model_belongs(model_config, run, path)
    _take_newer_checkpoint(model, model_config, run, folder)
    return model, run


def _take_newer_checkpoint(model: PRLSTM, model_config: dict, run: dict, folder: Path) -> None:
    """A run killed between writing ``train_state.npz`` and ``model.npz``
    left the model one checkpoint behind (:mod:`treesched.runfolder`): then
    load the parameters of the state, the newer checkpoint of the run."""
    from .training import PROTOCOL_FIELDS, STATE_FILE, load_state
    state_path = folder / STATE_FILE
    metadata = model_config.get("metadata")
    if not state_path.is_file() or not isinstance(metadata, dict):
        return
    meta, arrays = load_state(state_path)
    if meta.get("step") == metadata.get("step"):
        return
    check_state_belongs(meta, run, state_path, PROTOCOL_FIELDS)
    try:
        model.params = {name: arrays[f"param/{name}"] for name in model.param_shapes}
    except KeyError as error:
        raise TreeschedError(f"{state_path} is incomplete: no {error}") from None


def _holding_run_lock(evaluate_function):
    """Run ``evaluate_function(folder, …)`` holding the run folder's lock
    (:class:`treesched.runlock.RunLock`): it writes ``metrics.json``, and a
    training run must not rewrite the checkpoint while it is read.  Ranks
    other than 0 write nothing and take no lock."""
    @functools.wraps(evaluate_function)
    def wrapped(folder, *args, group: ProcessGroup | None = None, **options):
        if not (world() if group is None else group).is_root or not Path(folder).is_dir():
            return evaluate_function(folder, *args, group=group, **options)
        with RunLock(folder, command_line()):
            return evaluate_function(folder, *args, group=group, **options)
    return wrapped


@_holding_run_lock
def evaluate_run(folder, lengths, samples: int = 512, eval_batch: int = 64, seed: int = 1,
                 backend: str | None = None, progress: bool = False, plot: bool = True,
                 stream=None, group: ProcessGroup | None = None) -> dict:
    """Evaluate a run's checkpoint; writes ``metrics.json`` (and the plot)
    into the run folder and returns the metrics.

    With a ``group`` of several ranks (default
    :func:`treesched.distributed.world`) the ranks share the test lengths
    (:func:`evaluate`); every rank reads the run, rank 0 alone writes, and
    the metrics are those of one process (but ``seconds``)."""
    from .training import STATE_FILE, load_state
    folder = Path(folder)
    group = world() if group is None else group
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
    group.agree()   # every rank has the run: a rank that has not stops them all here
    result = evaluate(model, task, lengths, samples=samples, eval_batch=eval_batch, seed=seed,
                      progress=progress, stream=stream, group=group)
    metrics = {"format": METRICS_FORMAT, "version": 1, "task": task.name, "level": task.level,
               "score": result["score"], "step": step, "train": run["train"],
               "backend": model.backend.name, **result}
    if not group.is_root:
        return metrics
    write_text(folder / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    if plot:
        from .plots import plot_accuracy_vs_length
        plot_accuracy_vs_length(result["lengths"], result["accuracies"], folder / PLOT_FILE,
                                title=f"{task.name}: PR-LSTM hidden {run['train'].get('hidden')}"
                                      + (f", {step} steps" if step else ""),
                                train_max=run["train"].get("max_length"),
                                score=result["score"])
    return metrics

"""Several seeds and learning rates of one formal-language task: train and
evaluate every combination, then write one summary.

A sweep lives in a folder::

    sweep.json               the summary (format "treesched-sweep"), rewritten
                             after every run: settings, every run's score,
                             and per learning rate the scores over seeds
    seed0-lr0.001/           one ordinary run folder per combination
    seed1-lr0.001/           (treesched train + treesched eval: config.json,
    ...                      train_state.npz, metrics.json, ...)

Every run is :func:`treesched.training.train` with the sweep's settings and
its own ``seed`` and ``lr``, then :func:`treesched.evaluation.evaluate_run`
over the sweep's test lengths.  Running the same sweep again continues it:
a run already trained to ``steps`` and evaluated with the same test
settings is kept as it is, a run with an older checkpoint is resumed
(exactly, as ``treesched train --resume``), a run trained but not evaluated
is evaluated, and a combination without a folder is started.  An
invocation with other seeds or learning rates adds its runs to the summary
(the earlier runs stay listed).  A run folder or sweep whose settings differ
from the ones asked (but ``steps``, which may grow) is refused, never
overwritten.

Scores (see :mod:`treesched.evaluation`): a run's score is the mean over the
test lengths of its per-length accuracy.  The paper trains one run per task,
seed 0 at learning rate 1e-3, and publishes that run's score; the summary
gives, per learning rate, the seed-0 run's score (``reference_score``: the
lowest seed's when seed 0 is not in the sweep) beside the mean, standard
deviation, minimum and maximum over seeds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .errors import TreeschedError
from .evaluation import METRICS_FILE, check_lengths, evaluate_run
from .fileio import read_json, write_text
from .language_model import LM_TASK
from .training import (PROTOCOL_FIELDS, STATE_FILE, TrainConfig, load_state, read_run_config,
                       train)
from .validation import checked_int

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "treesched-sweep"
SWEEP_VERSION = 1
#: most runs one sweep may hold (seeds x learning rates)
MAX_RUNS = 10_000


def run_folder_name(seed: int, lr: float) -> str:
    """``seed0-lr0.001``: the folder of one combination (``lr`` in ``%g``)."""
    return f"seed{int(seed)}-lr{float(lr):g}"


def check_learning_rates(lrs) -> list[float]:
    """Distinct, positive, finite learning rates in the order given."""
    values = []
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
                or lr <= 0:
            raise TreeschedError(f"a learning rate must be a positive number, got {lr!r}")
        if float(lr) in values:
            raise TreeschedError(f"learning rate {lr:g} is given twice")
        values.append(float(lr))
    if not values:
        raise TreeschedError("no learning rate given")
    if len({run_folder_name(0, lr) for lr in values}) != len(values):
        raise TreeschedError(f"learning rates {', '.join(f'{lr!r}' for lr in values)} differ "
                             f"beyond 6 significant digits; their run folders would coincide")
    return values


def check_seeds(seeds) -> list[int]:
    """Distinct non-negative integer seeds in the order given."""
    values = [checked_int("seed", seed, 0) for seed in seeds]
    if not values:
        raise TreeschedError("no seed given")
    if len(set(values)) != len(values):
        raise TreeschedError(f"seeds must be distinct, got {values}")
    return values


def _run_state(folder: Path, config: TrainConfig, lengths, samples, eval_batch, eval_seed):
    """What a combination's folder needs: ``"new"``, ``"resume"``, ``"evaluate"``
    or ``"done"``; raises TreeschedError if the folder is not this run's."""
    if not folder.exists():
        return "new"
    if not (folder / "config.json").is_file():
        if folder.is_dir() and not any(folder.iterdir()):
            return "new"
        raise TreeschedError(f"{folder} exists but is not a treesched run; move it away or "
                             f"choose another --out")
    stored = TrainConfig.from_dict(dict(read_run_config(folder)["train"]))
    conflicts = [f"{name} ({getattr(stored, name)!r} there, {getattr(config, name)!r} asked)"
                 for name in PROTOCOL_FIELDS if getattr(stored, name) != getattr(config, name)]
    if conflicts:
        raise TreeschedError(f"{folder} holds a run with other settings: " + "; ".join(conflicts))
    step = 0
    if (folder / STATE_FILE).is_file():
        step = int(load_state(folder / STATE_FILE)[0].get("step", 0))
    if step > config.steps:
        raise TreeschedError(f"{folder} has already trained {step} steps, more than the "
                             f"{config.steps} asked; ask for at least {step} steps")
    if step < config.steps:
        return "resume"
    metrics = _read_metrics(folder)
    if metrics is not None and metrics.get("step") == step \
            and metrics.get("lengths") == list(lengths) and metrics.get("samples") == samples \
            and metrics.get("eval_batch") == eval_batch and metrics.get("seed") == eval_seed:
        return "done"
    return "evaluate"


def _read_metrics(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_record(folder: Path, out: Path, seed: int, lr: float, metrics: dict) -> dict:
    accuracies = metrics["accuracies"]
    lowest = int(np.argmin(accuracies))
    meta = load_state(folder / STATE_FILE)[0]
    return {"seed": seed, "lr": lr, "folder": str(folder.relative_to(out)),
            "step": metrics.get("step"), "score": metrics["score"],
            "lowest_accuracy": accuracies[lowest], "lowest_length": metrics["lengths"][lowest],
            "train_seconds": float(meta.get("seconds", float("nan"))),
            "eval_seconds": metrics.get("seconds")}


def summarize(records: list[dict]) -> list[dict]:
    """Per learning rate (in the order first seen): the reference run's score
    (seed 0, else the lowest seed) and the mean, population standard
    deviation, minimum and maximum of the scores over seeds."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record["lr"], []).append(record)
    summary = []
    for lr, runs in groups.items():
        scores = np.array([run["score"] for run in runs], dtype=np.float64)
        reference = min(runs, key=lambda run: run["seed"])
        summary.append({"lr": lr, "runs": len(runs), "seeds": sorted(r["seed"] for r in runs),
                        "reference_seed": reference["seed"],
                        "reference_score": reference["score"],
                        "mean_score": float(scores.mean()), "std_score": float(scores.std()),
                        "min_score": float(scores.min()), "max_score": float(scores.max())})
    return summary


def run_sweep(config: TrainConfig, seeds, lrs, out, *, lengths, samples: int = 512,
              eval_batch: int = 64, eval_seed: int = 1, backend: str | None = None,
              checkpoint_every: int = 1000, progress: bool = True, stream=None,
              report=None) -> dict:
    """Train and evaluate ``config`` at every ``seed`` x ``lr``; returns the summary.

    Args:
      config: the settings every run shares (its ``seed`` and ``lr`` are
        replaced by each combination's); a formal-language task.
      seeds, lrs: the combinations, runs ordered learning rate by learning
        rate, seed by seed.
      out: the sweep folder (created; or an earlier sweep to continue).
      lengths, samples, eval_batch, eval_seed: the range evaluation
        (:func:`treesched.evaluation.evaluate_run`).
      backend, checkpoint_every, progress, stream: passed to training and
        evaluation (progress bars on ``stream``, standard error by default).
      report: called with one line before each run and after the sweep
        (e.g. ``click.echo``); None says nothing.
    Returns:
      the document written to ``out/sweep.json``.
    """
    if config.is_language_model:
        raise TreeschedError(f"a sweep trains formal-language tasks (it scores runs by range "
                             f"evaluation), not {LM_TASK}: a language model has no test lengths")
    config.validate()
    seeds, lrs = check_seeds(seeds), check_learning_rates(lrs)
    if len(seeds) * len(lrs) > MAX_RUNS:
        raise TreeschedError(f"{len(seeds)} seeds x {len(lrs)} learning rates is more than "
                             f"{MAX_RUNS} runs")
    lengths = check_lengths(tasks_lib.get(config.task), list(lengths))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TreeschedError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).is_file():
        raise TreeschedError(f"--out {out} exists, is not empty and holds no sweep "
                             f"({SWEEP_FILE}); choose a new folder")
    combinations = [(seed, lr) for lr in lrs for seed in seeds]
    earlier = _earlier_runs(out, config, combinations)
    configs = {}
    for seed, lr in combinations:   # every folder checked before any run starts
        settings = {**config.to_dict(), "seed": seed, "lr": lr}
        configs[seed, lr] = TrainConfig.from_dict(settings)
        _run_state(out / run_folder_name(seed, lr), configs[seed, lr], lengths, samples,
                   eval_batch, eval_seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TreeschedError(f"cannot create {out}: {error.strerror or error}") from None

    say = report or (lambda line: None)
    records = []
    started = time.perf_counter()
    for index, (seed, lr) in enumerate(combinations, 1):
        folder = out / run_folder_name(seed, lr)
        run_config = configs[seed, lr]
        state = _run_state(folder, run_config, lengths, samples, eval_batch, eval_seed)
        say(f"run {index}/{len(combinations)}: {config.task} seed {seed} lr {lr:g} "
            f"({'already done' if state == 'done' else state}) -> {folder}")
        if state in ("new", "resume"):
            train(run_config, folder, resume=state == "resume", backend=backend,
                  checkpoint_every=checkpoint_every, progress=progress, stream=stream)
        if state != "done":
            evaluate_run(folder, lengths, samples=samples, eval_batch=eval_batch,
                         seed=eval_seed, backend=backend, progress=progress, stream=stream)
        metrics = _read_metrics(folder)
        if metrics is None:
            raise TreeschedError(f"{folder / METRICS_FILE} is missing or unreadable after "
                                 f"its evaluation")
        records.append(_run_record(folder, out, seed, lr, metrics))
        document = _document(config, earlier + records, lengths, samples, eval_batch,
                             eval_seed, complete=len(records) == len(combinations))
        write_text(out / SWEEP_FILE, json.dumps(document, indent=1) + "\n")
    for line in _summary_lines(config.task, document["summary"]):
        say(line)
    say(f"sweep of {len(records)} runs in {time.perf_counter() - started:.0f} s -> "
        f"{out / SWEEP_FILE}")
    return document


def _shared_settings(config: TrainConfig) -> dict:
    """The settings every run of a sweep shares (all but seed and lr)."""
    return {name: value for name, value in config.to_dict().items()
            if name not in ("seed", "lr")}


def _earlier_runs(out: Path, config: TrainConfig, combinations) -> list[dict]:
    """Runs an earlier invocation put into ``out/sweep.json`` that this one
    does not repeat (other seeds or learning rates), so the summary keeps
    them; raises TreeschedError if that sweep has other settings (its
    ``steps`` may differ: a sweep may be continued to more steps)."""
    if not (out / SWEEP_FILE).is_file():
        return []
    earlier = read_sweep(out)
    ours = {name: value for name, value in _shared_settings(config).items() if name != "steps"}
    theirs = {name: value for name, value in dict(earlier.get("train") or {}).items()
              if name != "steps"}
    if ours != theirs:
        differing = sorted(name for name in set(ours) | set(theirs)
                           if ours.get(name) != theirs.get(name))
        raise TreeschedError(f"{out} holds a sweep with other settings ({', '.join(differing)}); "
                             f"choose another --out")
    repeated = set(combinations)
    return [run for run in earlier["runs"]
            if isinstance(run, dict) and (run.get("seed"), run.get("lr")) not in repeated
            and (out / str(run.get("folder", ""))).is_dir()]


def _document(config, records, lengths, samples, eval_batch, eval_seed, complete) -> dict:
    """``sweep.json``: the shared settings, the test protocol of this
    invocation, every run (``complete``: all of this invocation's are done)."""
    records = sorted(records, key=lambda run: (-run["lr"], run["seed"]))
    return {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "task": config.task,
            "train": _shared_settings(config),
            "seeds": sorted({run["seed"] for run in records}),
            "lrs": sorted({run["lr"] for run in records}, reverse=True),
            "eval": {"lengths": lengths, "samples": samples, "eval_batch": eval_batch,
                     "seed": eval_seed},
            "complete": complete, "runs": records, "summary": summarize(records)}


def _summary_lines(task: str, summary: list[dict]) -> list[str]:
    return [f"{task} lr {group['lr']:g}: score {100 * group['reference_score']:.2f}% "
            f"(seed {group['reference_seed']}); over {group['runs']} seeds mean "
            f"{100 * group['mean_score']:.2f}% ± {100 * group['std_score']:.2f}, "
            f"min {100 * group['min_score']:.2f}%, max {100 * group['max_score']:.2f}%"
            for group in summary]


def read_sweep(folder) -> dict:
    """The parsed ``sweep.json`` of a sweep folder, or a TreeschedError."""
    path = Path(folder) / SWEEP_FILE
    data = read_json(path, missing=f"{folder} is not a sweep: it has no {SWEEP_FILE}")
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT \
            or not isinstance(data.get("runs"), list):
        raise TreeschedError(f"{path} is not a treesched sweep summary")
    if data.get("version") != SWEEP_VERSION:
        raise TreeschedError(f"{path} has unsupported version {data.get('version')!r}")
    return data


__all__ = ["SWEEP_FILE", "check_learning_rates", "check_seeds", "read_sweep", "run_folder_name",
           "run_sweep", "summarize"]

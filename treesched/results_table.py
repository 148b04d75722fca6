"""The results table of the formal-language benchmark, built from evaluated runs.

Input: run folders (``treesched train`` + ``treesched eval``: ``config.json``
and ``metrics.json``) and sweep folders (``treesched sweep``: every run its
``sweep.json`` lists).  Runs are grouped by task, training settings other
than the seed, evaluated step and test protocol (lengths, samples,
sub-batch, seed); each group is one row.

Per row (scores are fractions in the JSON, percent in the markdown):

* ``score``: the score as the paper defines it — the mean over the test
  lengths of the per-length accuracy of one run, the run with seed 0 (the
  paper trains one run per task, seed 0 for data and initialisation); when
  the group has no seed-0 run, the run with the lowest seed, and
  ``reference_seed`` says which;
* ``mean_score``, ``std_score`` (population), ``min_score``, ``max_score``
  over the group's seeds, and ``seeds``;
* ``lowest_accuracy`` / ``lowest_length``: the reference run's lowest
  per-length accuracy and the test length where it occurs;
* ``train_seconds``: the reference run's training time (summed over
  resumptions, from its ``train_state.npz``); ``total_train_seconds``: all
  of the group's runs together;
* ``paper``: the published PR-LSTM score (SPEC.md §4), None where SPEC
  gives none.

:func:`write_results_table` writes ``results_table.md``,
``results_table.json`` and ``accuracy_vs_length_all_tasks.png`` (one panel
per task, all fifteen, accuracy against test length for every run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .errors import TreeschedError
from .evaluation import METRICS_FILE, METRICS_FORMAT
from .fileio import read_json, write_text
from .language_model import LM_TASK
from .sweep import SWEEP_FILE, read_sweep
from .training import CONFIG_FILE, LOG_FILE, STATE_FILE, load_state, read_log, read_run_config

TABLE_FORMAT = "treesched-results-table"
TABLE_VERSION = 1
MARKDOWN_FILE = "results_table.md"
JSON_FILE = "results_table.json"
FIGURE_FILE = "accuracy_vs_length_all_tasks.png"

#: The paper's PR-LSTM scores in percent (SPEC.md §4); a task without one is absent.
PUBLISHED_SCORES = tasks_lib.PUBLISHED_PR_LSTM_SCORES

# training settings that tell rows apart besides the task (the seed varies within a row)
_ROW_SETTINGS = ("hidden", "lr", "batch", "max_length", "num_layers", "cell", "pattern", "dtype",
                 "clip", "steps")


@dataclasses.dataclass
class EvaluatedRun:
    """One run folder's configuration and range evaluation."""

    folder: str
    task: str
    level: str
    seed: int
    train: dict
    step: int | None
    lengths: list
    accuracies: list
    score: float
    samples: int
    eval_batch: int
    eval_seed: int
    train_seconds: float | None
    eval_seconds: float | None

    @property
    def lowest(self) -> tuple[float, int]:
        """``(accuracy, length)`` of the lowest per-length accuracy."""
        index = int(np.argmin(self.accuracies))
        return float(self.accuracies[index]), int(self.lengths[index])


def _training_seconds(folder: Path) -> float | None:
    """Training time summed over resumptions: the checkpoint's clock, else the log's."""
    try:
        return float(load_state(folder / STATE_FILE)[0]["seconds"])
    except (TreeschedError, KeyError, TypeError, ValueError):
        pass
    records = read_log(folder / LOG_FILE)
    return float(records[-1]["seconds"]) if records and "seconds" in records[-1] else None


def load_evaluated_run(folder) -> EvaluatedRun:
    """A run folder with its ``metrics.json``; TreeschedError naming what is missing."""
    folder = Path(folder)
    run = read_run_config(folder)
    task = run["train"].get("task")
    if task == LM_TASK:
        raise TreeschedError(f"{folder} is a character language model; the results table "
                             f"holds the formal-language tasks")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise TreeschedError(f"run {folder} has not been evaluated (no {METRICS_FILE}): run "
                             f"`treesched eval {folder}` first")
    metrics = read_json(path)
    if not isinstance(metrics, dict) or metrics.get("format") != METRICS_FORMAT:
        raise TreeschedError(f"{path} is not a treesched metrics file")
    try:
        lengths = [int(length) for length in metrics["lengths"]]
        accuracies = [float(value) for value in metrics["accuracies"]]
        score = float(metrics["score"])
        samples, eval_batch = int(metrics["samples"]), int(metrics["eval_batch"])
        eval_seed = int(metrics["seed"])
    except (KeyError, TypeError, ValueError) as error:
        raise TreeschedError(f"{path} is incomplete: {error}") from None
    if metrics.get("task") != task or not lengths or len(lengths) != len(accuracies):
        raise TreeschedError(f"{path} does not match its run ({task}) or has no accuracies")
    return EvaluatedRun(folder=str(folder), task=task, level=tasks_lib.get(task).level,
                        seed=int(run["train"].get("seed", 0)), train=dict(run["train"]),
                        step=metrics.get("step"), lengths=lengths, accuracies=accuracies,
                        score=score, samples=samples, eval_batch=eval_batch,
                        eval_seed=eval_seed, train_seconds=_training_seconds(folder),
                        eval_seconds=metrics.get("seconds"))


def collect_runs(paths) -> list[EvaluatedRun]:
    """Every evaluated run under ``paths`` (run folders and sweep folders), each once."""
    paths = [Path(path) for path in paths]
    if not paths:
        raise TreeschedError("no run folders given")
    folders = []
    for path in paths:
        if (path / SWEEP_FILE).is_file():
            folders += [path / run["folder"] for run in read_sweep(path)["runs"]
                        if isinstance(run, dict) and isinstance(run.get("folder"), str)]
        elif (path / CONFIG_FILE).is_file():
            folders.append(path)
        elif not path.exists():
            raise TreeschedError(f"{path} does not exist")
        else:
            raise TreeschedError(f"{path} is neither a treesched run ({CONFIG_FILE}) nor a "
                                 f"sweep ({SWEEP_FILE})")
    runs, seen = [], set()
    for folder in folders:
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(load_evaluated_run(folder))
    return runs


def _row_key(run: EvaluatedRun) -> tuple:
    return (run.task, tuple(run.train.get(name) for name in _ROW_SETTINGS), run.step,
            tuple(run.lengths), run.samples, run.eval_batch, run.eval_seed)


def build_table(runs: list[EvaluatedRun]) -> dict:
    """The table as data (see the module docstring): ``rows`` in task order
    (then by decreasing learning rate), and ``not_run``: tasks without a row."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(_row_key(run), []).append(run)
    order = {name: index for index, name in enumerate(tasks_lib.names())}
    rows = []
    for (task, _, step, lengths, samples, eval_batch, eval_seed), members in groups.items():
        members.sort(key=lambda run: run.seed)
        reference = members[0]
        scores = np.array([run.score for run in members], dtype=np.float64)
        lowest_accuracy, lowest_length = reference.lowest
        seconds = [run.train_seconds for run in members]
        rows.append({
            "task": task, "level": reference.level, "paper": PUBLISHED_SCORES.get(task),
            "score": reference.score, "reference_seed": reference.seed,
            "seeds": [run.seed for run in members],
            "mean_score": float(scores.mean()), "std_score": float(scores.std()),
            "min_score": float(scores.min()), "max_score": float(scores.max()),
            "lowest_accuracy": lowest_accuracy, "lowest_length": lowest_length,
            "train_seconds": reference.train_seconds,
            "total_train_seconds": None if None in seconds else float(sum(seconds)),
            "step": step, "train": {name: reference.train.get(name) for name in _ROW_SETTINGS},
            "eval": {"first_length": lengths[0], "last_length": lengths[-1],
                     "lengths": len(lengths), "samples": samples, "eval_batch": eval_batch,
                     "seed": eval_seed},
            "runs": [{"folder": run.folder, "seed": run.seed, "score": run.score,
                      "lowest_accuracy": run.lowest[0], "lowest_length": run.lowest[1],
                      "train_seconds": run.train_seconds, "eval_seconds": run.eval_seconds}
                     for run in members]})
    rows.sort(key=lambda row: (order[row["task"]], -row["train"]["lr"], row["train"]["hidden"],
                               row["step"] or 0))
    present = {row["task"] for row in rows}
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "rows": rows,
            "not_run": [name for name in tasks_lib.names() if name not in present]}


def _percent(value, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_markdown(table: dict) -> str:
    """The table in markdown, with a key to its columns."""
    lines = [
        "| task | level | paper (%) | score (%) [seed] | mean ± sd over seeds (%) | "
        "min – max (%) | lowest length acc. (%) | steps | hidden | lr | test lengths "
        "(samples) | training time (score's run; all runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        train, evaluation = row["train"], row["eval"]
        paper = "–" if row["paper"] is None else f"{row['paper']:g}"
        lines.append(
            f"| {row['task']} | {row['level']} | {paper} | "
            f"**{_percent(row['score'])}** [{row['reference_seed']}] | "
            f"{_percent(row['mean_score'])} ± {_percent(row['std_score'])} "
            f"(n = {len(row['seeds'])}) | "
            f"{_percent(row['min_score'])} – {_percent(row['max_score'])} | "
            f"{_percent(row['lowest_accuracy'], 1)} at {row['lowest_length']} | "
            f"{row['step'] if row['step'] is not None else train['steps']} | {train['hidden']} | "
            f"{train['lr']:g} | {evaluation['first_length']}..{evaluation['last_length']}, "
            f"{evaluation['lengths']} lengths ({evaluation['samples']}) | "
            f"{_duration(row['train_seconds'])}; {_duration(row['total_train_seconds'])} |")
    lines += [
        "",
        "Score: the paper's definition, the mean over the test lengths of one run's "
        "per-length accuracy, for the run with seed 0 (the paper trains a single run per "
        "task, seed 0); in brackets the seed of the run scored (the lowest in the row when "
        "seed 0 is absent). Mean ± sd (population), min and max: over the row's seeds. "
        "Lowest length acc.: the scored run's lowest per-length accuracy and its length. "
        "Paper: the published PR-LSTM score (SPEC.md §4; – where none is given)."]
    if table["not_run"]:
        lines += ["", "Not run: " + ", ".join(table["not_run"]) + "."]
    return "\n".join(lines) + "\n"


def figure_panels(runs: list[EvaluatedRun]) -> list[dict]:
    """One panel per task (all fifteen, task order): every run's accuracy
    against length, runs of one row in one colour, the row's mean in bold."""
    panels = []
    for name in tasks_lib.names():
        rows: dict = {}
        for run in runs:
            if run.task == name:
                rows.setdefault(_row_key(run), []).append(run)
        curves, train_max = [], None
        for colour, members in enumerate(rows.values()):
            members.sort(key=lambda run: run.seed)
            reference = members[0]
            label = (f"H {reference.train.get('hidden')}, lr {reference.train.get('lr'):g}, "
                     f"{reference.step} steps")
            train_max = reference.train.get("max_length")
            for run in members:
                curves.append({"lengths": run.lengths, "accuracies": run.accuracies,
                               "colour": colour, "bold": False,
                               "label": None if len(members) > 1 else
                               f"{label}: {100 * run.score:.1f}%"})
            if len(members) > 1 and all(run.lengths == reference.lengths for run in members):
                mean = np.mean([run.accuracies for run in members], axis=0)
                curves.append({"lengths": reference.lengths, "accuracies": mean.tolist(),
                               "colour": colour, "bold": True,
                               "label": f"{label}: mean of {len(members)} seeds "
                                        f"{100 * float(np.mean(mean)):.1f}%"})
        paper = PUBLISHED_SCORES.get(name)
        title = name + ("" if paper is None else f" (paper {paper:g}%)")
        panels.append({"title": title, "curves": curves, "train_max": train_max,
                       "paper": paper})
    return panels


def write_results_table(paths, out) -> dict:
    """Collect the runs under ``paths`` and write the table (markdown, JSON)
    and the fifteen-panel figure into the folder ``out`` (created)."""
    from .plots import plot_accuracy_panels
    runs = collect_runs(paths)
    table = build_table(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TreeschedError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TreeschedError(f"cannot create {out}: {error.strerror or error}") from None
    write_text(out / JSON_FILE, json.dumps(table, indent=1) + "\n")
    write_text(out / MARKDOWN_FILE, render_markdown(table))
    plot_accuracy_panels(figure_panels(runs), out / FIGURE_FILE,
                         title="PR-LSTM accuracy against test length, per task")
    return table


__all__ = ["EvaluatedRun", "FIGURE_FILE", "JSON_FILE", "MARKDOWN_FILE", "PUBLISHED_SCORES",
           "build_table", "collect_runs", "figure_panels", "load_evaluated_run",
           "render_markdown", "write_results_table"]

"""Training a PR-LSTM, with exact resumption: on a formal-language task or
as a character language model.

Protocol (SPEC.md §4, the paper's and the public benchmark code's): every
step draws a batch from the run's *training data source*
(:mod:`treesched.training_data`), reads the logits at the positions its
targets cover (the schedule is compiled pruned to them), takes the public
loss (softmax cross-entropy averaged over batch and output positions, no
mask) and applies Adam (1e-3) after global-norm clipping at 1.0.  The
sources:

* a formal-language task (``task`` one of :func:`treesched.tasks.names`):
  one training length ``n`` uniform in ``1..max_length`` per step, a batch
  of that length, the input tape (the one-hot input then
  ``output_length(n)`` blank tokens), targets at the last
  ``output_length`` positions;
* ``task="lm"`` with a ``corpus``: ``batch`` random windows of ``context``
  characters, the next character as target at every position, and
  validation bits per character every ``eval_every`` steps
  (:mod:`treesched.language_model`).

A run lives in a folder::

    config.json        what was asked (format "treesched-run")
    model.npz          the model (PRLSTM.save), rewritten at every checkpoint
    train_state.npz    params + Adam moments + step + data-RNG state + clock
    train_log.jsonl    one line per logged step: step, loss, accuracy,
                       grad_norm, seconds, and what the source adds (the
                       formal tasks: length; lm: bpc, and valid_loss and
                       valid_bpc at validation steps)
    vocabulary.json    lm only: the character vocabulary (ids of the model)
    training_curve.png at the end

``train_state.npz`` is self-contained (it holds its own copy of the
parameters), so a run killed at any moment resumes from its last checkpoint
and, on the same backend, ends bitwise-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .errors import TreeschedError
from .fileio import read_npz, write_bytes, write_text
from .language_model import DEFAULT_CONTEXT, LM_TASK, NextCharacterData
from .model import DTYPES, PRLSTM
from .ops import cell_names
from .optim import Adam
from .progress import Progress
from .training_data import FormalTaskData, TrainingData
from .validation import positive_int

RUN_FORMAT = "treesched-run"
RUN_VERSION = 1
STATE_FORMAT = "treesched-train-state"
STATE_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.npz"
STATE_FILE = "train_state.npz"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "training_curve.png"

# Settings that change what is computed (a resumed run must keep them);
# ``steps`` may grow on resume.  (An lm run's corpus is checked by content:
# the file may move.)
PROTOCOL_FIELDS = ("task", "hidden", "num_layers", "pattern", "cell", "dtype", "lr",
                   "batch", "clip", "max_length", "context", "seed")
# Settings of one kind of run only: None elsewhere, and left out of config.json.
KIND_FIELDS = ("max_length", "corpus", "context")
DEFAULT_MAX_LENGTH = 40


def default_backend() -> str:
    """``"numba"`` where it can run, else ``"numpy"``."""
    from .backends import why_unavailable
    return "numba" if why_unavailable("numba") is None else "numpy"


@dataclasses.dataclass
class TrainConfig:
    """The training protocol; defaults are the paper's (SPEC.md §4).

    ``steps`` defaults to 1,000,000, the training length of the
    Chomsky-hierarchy benchmark; CPU reproductions use far fewer.

    ``task``: a formal-language task (then ``max_length``, default 40:
    training lengths 1..max_length) or ``"lm"`` (then ``corpus``, a UTF-8
    text file, and ``context``, default 128: the training window length).
    Settings of the other kind must stay None.
    """

    task: str
    steps: int = 1_000_000
    hidden: int = 256
    num_layers: int = 2
    pattern: str = "odd-even"
    cell: str = "lstm"
    dtype: str = "float32"
    lr: float = 1e-3
    batch: int = 128
    clip: float = 1.0
    max_length: int | None = None
    seed: int = 0
    corpus: str | None = None
    context: int | None = None

    @property
    def is_language_model(self) -> bool:
        return self.task == LM_TASK

    def validate(self) -> "TrainConfig":
        for name in ("steps", "hidden", "num_layers", "batch"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.is_language_model:
            self._validate_language_model()
        else:
            self._validate_formal_task()
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or self.seed < 0:
            raise TreeschedError(f"seed must be an integer >= 0, got {self.seed!r}")
        self.seed = int(self.seed)
        if self.dtype not in DTYPES:
            raise TreeschedError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.cell, str) or self.cell.lower() not in cell_names():
            raise TreeschedError(f"cell must be one of {', '.join(cell_names())}, "
                                 f"got {self.cell!r}")
        from .compiler import validate_pattern
        self.pattern = validate_pattern(self.pattern)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TreeschedError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip)
                and self.clip >= 0):
            raise TreeschedError(f"clip must be a number >= 0 (0 disables it), got {self.clip!r}")
        self.lr, self.clip = float(self.lr), float(self.clip)
        return self

    def _validate_formal_task(self) -> None:
        try:
            task = tasks_lib.get(self.task)
        except TreeschedError as error:
            raise TreeschedError(f"{error}; or {LM_TASK} (a character language model on "
                                 f"--corpus FILE)") from None
        for name in ("corpus", "context"):
            if getattr(self, name) is not None:
                raise TreeschedError(f"{name} (--{name}) applies to --task {LM_TASK} only, not "
                                     f"to task {self.task!r}")
        if self.max_length is None:
            self.max_length = DEFAULT_MAX_LENGTH
        self.max_length = positive_int("max_length", self.max_length)
        if self.max_length < task.min_length:
            raise TreeschedError(
                f"max_length {self.max_length} is below the shortest length task "
                f"{self.task!r} allows ({task.min_length})")
        task.check_length(self.max_length)

    def _validate_language_model(self) -> None:
        if self.corpus is None or not str(self.corpus).strip():
            raise TreeschedError(f"task {LM_TASK!r} needs a corpus (--corpus FILE): the UTF-8 "
                                 f"text to train on")
        if self.max_length is not None:
            raise TreeschedError(f"max_length (--max-length) applies to the formal-language "
                                 f"tasks; a language model trains on windows of --context "
                                 f"characters")
        self.corpus = str(Path(self.corpus).expanduser().resolve())
        self.context = positive_int("context", DEFAULT_CONTEXT if self.context is None
                                    else self.context)

    def to_dict(self) -> dict:
        return {name: value for name, value in dataclasses.asdict(self).items()
                if not (name in KIND_FIELDS and value is None)}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown or "task" not in data:
            raise TreeschedError(f"training configuration has unknown or missing keys: "
                                 f"{sorted(unknown) or ['task']}")
        return cls(**data).validate()


@dataclasses.dataclass
class TrainResult:
    """What a run ended with; ``held_out``: the last held-out metrics (lm:
    ``valid_loss``, ``valid_bpc``; empty for the formal tasks)."""

    model: PRLSTM
    step: int
    steps: int
    loss: float
    accuracy: float
    seconds: float
    out: Path
    stopped_early: bool = False
    held_out: dict = dataclasses.field(default_factory=dict)


def training_data(config: TrainConfig) -> TrainingData:
    """The data source of a validated configuration (an lm corpus is read
    and split here, so a bad corpus fails before anything is written)."""
    if config.is_language_model:
        return NextCharacterData.from_file(config.corpus, config.context)
    return FormalTaskData(config.task, config.max_length)


# --------------------------------------------------------------------- run io
def read_run_config(folder) -> dict:
    """The parsed ``config.json`` of a run folder, or a TreeschedError."""
    folder = Path(folder)
    if not folder.exists():
        raise TreeschedError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise TreeschedError(f"{folder} is not a folder (expected a treesched run folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise TreeschedError(f"{folder} is not a treesched run: it has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TreeschedError(f"{path} is unreadable or corrupt: {error}") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise TreeschedError(f"{folder} is not a treesched run: {path} is not a run configuration")
    if data.get("version") != RUN_VERSION:
        raise TreeschedError(f"{path} has unsupported version {data.get('version')!r}")
    if not isinstance(data.get("train"), dict):
        raise TreeschedError(f"{path} lacks the training configuration")
    return data


def _write_run_config(folder: Path, config: TrainConfig, model: PRLSTM, data: TrainingData,
                      extra: dict) -> None:
    document = {"format": RUN_FORMAT, "version": RUN_VERSION, "train": config.to_dict(),
                "model": model.config, **data.description(config), **extra}
    write_text(folder / CONFIG_FILE, json.dumps(document, indent=2) + "\n")


def _host(value):
    get = getattr(value, "get", None)
    return np.asarray(get() if callable(get) and not isinstance(value, np.ndarray) else value)


def save_state(path, model: PRLSTM, optimizer: Adam, step: int, rng: np.random.Generator,
               seconds: float, config: TrainConfig) -> None:
    """Everything stateful of a run, atomically, in one ``.npz``."""
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": int(step),
            "seconds": float(seconds), "rng": rng.bit_generator.state,
            "train": config.to_dict(), "optimizer": optimizer.hyperparameters()}
    state = optimizer.state_dict()
    meta["count"] = state["count"]
    arrays = {"__meta__": np.array(json.dumps(meta))}
    for name, value in model.params.numpy().items():
        arrays[f"param/{name}"] = value
        arrays[f"mu/{name}"] = state["mu"][name]
        arrays[f"nu/{name}"] = state["nu"][name]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_state(path) -> tuple[dict, dict]:
    """``(meta, arrays)`` of a train-state file, or a TreeschedError."""
    arrays = read_npz(path, "training state")
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, json.JSONDecodeError):
        raise TreeschedError(f"training state {path} is corrupt or not written by treesched") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise TreeschedError(f"{path} is not a treesched training state")
    if meta.get("version") != STATE_VERSION:
        raise TreeschedError(f"training state {path} has unsupported version "
                             f"{meta.get('version')!r}")
    return meta, arrays


def read_log(path) -> list[dict]:
    """Records of a ``train_log.jsonl`` (a torn last line is ignored)."""
    records = []
    try:
        with open(path) as stream:
            for line in stream:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        return []
    return records


# ------------------------------------------------------------------- training
def _check_resume_config(stored: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    if given is None:
        return stored
    conflicts = [f"{name} ({getattr(stored, name)!r} in the run, {getattr(given, name)!r} asked)"
                 for name in PROTOCOL_FIELDS if getattr(stored, name) != getattr(given, name)]
    if conflicts:
        raise TreeschedError("cannot resume with different settings: " + "; ".join(conflicts))
    stored.steps = given.steps
    if given.corpus is not None:   # the same text, moved: its content is checked on resume
        stored.corpus = given.corpus
    return stored


def train(config: TrainConfig | None, out, *, resume: bool = False, backend: str | None = None,
          checkpoint_every: int = 1000, log_every: int = 10, eval_every: int = 200,
          progress: bool = True, plot: bool = True, stream=None, stop_at: int | None = None,
          progress_interval: float = 30.0) -> TrainResult:
    """Train (or, with ``resume``, continue) a run in folder ``out``.

    Args:
      config: the protocol; with ``resume`` it may be None (the run's own) or
        must agree with the run on everything but ``steps`` (and an lm
        run's corpus path: the text itself must be the same).
      out: the run folder (created; must not already hold a run unless
        resuming).  Bad settings or a bad corpus fail before it is created.
      backend: "numpy", "numba", "cupy"; default: numba where it works.
      checkpoint_every: write model + state every this many steps (and at
        the end).
      log_every: append a train_log.jsonl line every this many steps.
      eval_every: held-out metrics (lm: validation bits per character) every
        this many steps and at the end; their steps are always logged.
      stop_at: stop after this step without writing anything more, as if
        the process had been killed (for tests).
    Returns:
      a :class:`TrainResult`.
    """
    out = Path(out)
    checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
    log_every = positive_int("log_every", log_every)
    eval_every = positive_int("eval_every", eval_every)
    backend = backend or default_backend()
    state_meta = state_arrays = None
    if resume:
        stored = read_run_config(out)
        if not (out / STATE_FILE).is_file():
            raise TreeschedError(f"nothing to resume in {out}: it has no checkpoint "
                                 f"({STATE_FILE}) yet")
        config = _check_resume_config(TrainConfig.from_dict(dict(stored["train"])),
                                      config.validate() if config is not None else None)
        state_meta, state_arrays = load_state(out / STATE_FILE)
        if state_meta.get("train", {}).get("task") != config.task:
            raise TreeschedError(f"{out / STATE_FILE} belongs to another run")
        done = int(state_meta["step"])
        if done >= config.steps:
            raise TreeschedError(
                f"nothing to resume in {out}: the run already finished step {done} of "
                f"{config.steps}; pass a larger --steps to train further")
        data = training_data(config)
        data.check_resumable(out, stored)
    else:
        if config is None:
            raise TreeschedError("a training configuration is needed")
        config.validate()
        if out.exists() and not out.is_dir():
            raise TreeschedError(f"--out {out} exists and is not a folder")
        if (out / CONFIG_FILE).exists():
            raise TreeschedError(f"{out} already holds a run: use --resume to continue it, "
                                 f"or choose another --out")
        if out.is_dir() and any(out.iterdir()):
            raise TreeschedError(f"--out {out} exists and is not empty; choose a new folder")
        data = training_data(config)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TreeschedError(f"cannot create {out}: {error.strerror or error}") from None

    model = PRLSTM(data.input_size, config.hidden, data.output_size,
                   num_layers=config.num_layers, cell=config.cell, pattern=config.pattern,
                   backend=backend, dtype=config.dtype, seed=config.seed)
    optimizer = Adam(lr=config.lr, clip=config.clip)
    optimizer.init(model.params)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    step, seconds_before = 0, 0.0

    if resume:
        try:
            model.params = {name: state_arrays[f"param/{name}"] for name in model.param_shapes}
            optimizer.load_state_dict(
                {"count": state_meta["count"],
                 "mu": {n: state_arrays[f"mu/{n}"] for n in model.param_shapes},
                 "nu": {n: state_arrays[f"nu/{n}"] for n in model.param_shapes}},
                like=model.params)
            rng.bit_generator.state = state_meta["rng"]
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, TreeschedError):
                raise TreeschedError(f"{out / STATE_FILE}: {error}") from None
            raise TreeschedError(f"{out / STATE_FILE} is incomplete or corrupt: {error}") \
                from None
        step, seconds_before = int(state_meta["step"]), float(state_meta["seconds"])
        # drop log lines written after the checkpoint (the killed run's tail)
        kept = [r for r in read_log(out / LOG_FILE) if r.get("step", 0) <= step]
        write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        _write_run_config(out, config, model, data, {"backend": backend, "resumed_at": step})
    else:
        data.write_run_files(out)
        _write_run_config(out, config, model, data, {"backend": backend})
        write_text(out / LOG_FILE, "")

    bar = Progress(config.steps, initial=step, label=config.task, stream=stream,
                   enabled=progress, interval=progress_interval)
    if resume:
        bar.message(f"resuming {out} at step {step} of {config.steps} (backend {backend})")
    else:
        bar.message(data.start_message(config, backend, out))
    loss = acc = float("nan")
    held_out: dict = {}
    started = time.perf_counter()
    stopped_early = False
    with open(out / LOG_FILE, "a") as log:
        while step < config.steps:
            step_started = time.perf_counter()
            batch = data.draw(rng, config.batch)
            loss, grads, logits = model.loss_and_grads(batch.x, batch.targets)
            loss = float(loss)
            if not math.isfinite(loss):
                raise TreeschedError(f"loss became {loss} at step {step + 1}: training diverged "
                                     f"(try a smaller --lr)")
            metrics = data.batch_metrics(loss, _host(logits), batch)
            acc = metrics["accuracy"]
            grad_norm = optimizer.step(model.params, grads)
            step += 1
            step_seconds = time.perf_counter() - step_started
            evaluating = data.has_held_out and (step % eval_every == 0 or step == config.steps)
            if evaluating:
                held_out = data.held_out_metrics(model)
            now = time.perf_counter()
            seconds = seconds_before + (now - started)
            if step % log_every == 0 or step == config.steps or evaluating:
                record = {"step": step, "loss": loss, **metrics, **batch.record,
                          **(held_out if evaluating else {}), "grad_norm": grad_norm,
                          "seconds": round(seconds, 4), "step_seconds": round(step_seconds, 5)}
                log.write(json.dumps(record) + "\n")
                log.flush()
            shown = {"loss": loss, **{name: value for name, value in {**metrics, **held_out}.items()
                                      if name in data.progress_fields}, "acc": acc}
            bar.update(step, **shown)
            if step % checkpoint_every == 0 or step == config.steps:
                log.flush()
                os.fsync(log.fileno())
                model.save(out / MODEL_FILE)
                save_state(out / STATE_FILE, model, optimizer, step, rng, seconds, config)
            if stop_at is not None and step >= stop_at and step < config.steps:
                stopped_early = True
                break
    bar.close()
    seconds = seconds_before + (time.perf_counter() - started)
    if plot and not stopped_early:
        from .plots import plot_training_curve
        records = read_log(out / LOG_FILE)
        if records:
            plot_training_curve(records, out / CURVE_FILE,
                                title=f"{config.task}: PR-LSTM hidden {config.hidden}, "
                                      f"{config.steps} steps")
    return TrainResult(model=model, step=step, steps=config.steps, loss=loss, accuracy=acc,
                       seconds=seconds, out=out, stopped_early=stopped_early, held_out=held_out)

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
import functools
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import tasks as tasks_lib
from .distributed import ProcessGroup, world
from .errors import DivergenceError, TreeschedError
from .fileio import read_json, read_npz, remove_orphan_temporaries, write_bytes, write_text
from .interrupts import DeferredInterrupts, TrainingInterrupted
from .language_model import DEFAULT_CONTEXT, LM_TASK, NextCharacterData
from .memory import check_pass_fits
from .model import DTYPES, PRLSTM
from .ops import cell_names
from .optim import Adam
from .progress import Progress
from .runfolder import (check_state_belongs, describe_torn_lines, new_run_id,
                        read_log_records)
from .runlock import LOCK_FILE, RunLock, command_line
from .training_data import FormalTaskData, TrainingData
from .limits import (MAX_BATCH, MAX_HIDDEN, MAX_INTERVAL, MAX_LAYERS, MAX_LENGTH, MAX_SEED,
                     MAX_STEPS)
from .validation import checked_int, positive_int

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
        for name, most in (("steps", MAX_STEPS), ("hidden", MAX_HIDDEN),
                           ("num_layers", MAX_LAYERS), ("batch", MAX_BATCH)):
            setattr(self, name, positive_int(name, getattr(self, name), most=most))
        if self.is_language_model:
            self._validate_language_model()
        else:
            self._validate_formal_task()
        self.seed = checked_int("seed", self.seed, 0, most=MAX_SEED)
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
        self.max_length = positive_int("max_length", self.max_length, most=MAX_LENGTH)
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
                                    else self.context, most=MAX_LENGTH)

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
    data = read_json(path)
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
               seconds: float, config: TrainConfig, run_id: str | None = None) -> None:
    """Everything stateful of a run, atomically, in one ``.npz`` (with the
    run's id, :mod:`treesched.runfolder`)."""
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": int(step),
            "seconds": float(seconds), "rng": rng.bit_generator.state,
            "train": config.to_dict(), "optimizer": optimizer.hyperparameters(),
            "run_id": run_id}
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
    """Records of a ``train_log.jsonl``; torn or corrupt lines, anywhere, are
    skipped (:func:`treesched.runfolder.read_log_records` also says which)."""
    return read_log_records(path)[0]


def write_checkpoint(out: Path, model: PRLSTM, optimizer: Adam, step: int,
                     rng: np.random.Generator, seconds: float, config: TrainConfig,
                     run_id: str | None) -> None:
    """The checkpoint of ``step``: ``train_state.npz`` first (the checkpoint
    itself, self-contained), then ``model.npz`` tagged with the same run id
    and step; see :mod:`treesched.runfolder` for why in this order."""
    save_state(out / STATE_FILE, model, optimizer, step, rng, seconds, config, run_id)
    model.save(out / MODEL_FILE, metadata={"run_id": run_id, "step": int(step)})


def checkpoint_step(folder) -> int | None:
    """The step of a run folder's ``train_state.npz`` (None: none, or unreadable)."""
    try:
        return int(load_state(Path(folder) / STATE_FILE)[0]["step"])
    except (TreeschedError, KeyError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------- training
def train_step(model: PRLSTM, optimizer: Adam, batch, step: int,
               group: ProcessGroup | None = None):
    """One training step of :func:`train` on one drawn batch, updating ``model.params``.

    The loss and gradients of ``model.loss_and_grads(batch.x, batch.targets)``
    (softmax cross-entropy at the batch's target positions, averaged over
    batch and positions, no mask), then ``optimizer.step``: global-norm
    clipping and Adam, applied to ``model.params`` in place.  ``step`` is
    the 1-based number of this step, used only to name it in an error.

    With a ``group`` of several ranks (:mod:`treesched.distributed`), every
    rank passes the same global batch and the ranks compute the loss and
    gradients together, each on its rows
    (:meth:`~treesched.distributed.ProcessGroup.data_parallel_loss_and_grads`:
    gradients summed in rank order, the same on every rank).

    Returns ``(loss, grad_norm, logits)``: the loss before the update (a
    float), the global gradient norm before clipping, and the logits of the
    batch (backend arrays, computed with the parameters before the update;
    with several ranks: host arrays on rank 0, None on the others).
    Raises TreeschedError if the loss is not finite (nothing is updated).
    """
    if group is None:
        loss, grads, logits = model.loss_and_grads(batch.x, batch.targets)
    else:
        loss, grads, logits = group.data_parallel_loss_and_grads(model, batch)
    loss = float(loss)
    if not math.isfinite(loss):
        raise DivergenceError(f"loss became {loss} at step {step}: training diverged "
                              f"(try a smaller --lr)")
    try:
        grad_norm = optimizer.step(model.params, grads)
    except DivergenceError as error:
        raise DivergenceError(f"at step {step}: {error} (try a smaller --lr)") from None
    return loss, grad_norm, logits


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


def _check_training_memory(model: PRLSTM, config: TrainConfig) -> None:
    """Refuse a run whose longest training step cannot fit in memory, before
    anything is written (:func:`treesched.memory.check_pass_fits`)."""
    if config.is_language_model:
        length = outputs = config.context
    else:
        task = tasks_lib.get(config.task)
        outputs = task.output_length(config.max_length)
        length = task.input_length(config.max_length) + outputs
    schedule = model.schedule(length, "all" if outputs == length else outputs)
    check_pass_fits(model, schedule, config.batch, need_grad=True,
                    what=f"the longest training step (input tape of {length} positions)",
                    release=model.backend.clear)


def _model_step(folder: Path) -> int | None:
    """The step ``model.npz`` of a run folder says it holds (None: unknown)."""
    from .model import read_checkpoint
    try:
        metadata = read_checkpoint(folder / MODEL_FILE)[1].get("metadata")
    except TreeschedError:
        return None
    return metadata.get("step") if isinstance(metadata, dict) else None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass   # not empty (or gone): it holds something we did not create


def _exclusive_run_folder(train_function):
    """Run ``train_function`` holding the run folder's lock, with deferred
    SIGINT / SIGTERM (:mod:`treesched.runlock`, :mod:`treesched.interrupts`).

    A fresh run's folder is created first (so it can be locked) and removed
    again if the run fails before writing anything into it.  Under the
    lock, temporary files a killed write left behind are deleted.  Ranks
    other than 0 of a data-parallel group write nothing and take no lock.
    """
    @functools.wraps(train_function)
    def wrapped(config, out, *, resume: bool = False, group: ProcessGroup | None = None,
                **options):
        out = Path(out)
        if not (world() if group is None else group).is_root:
            return train_function(config, out, resume=resume, group=group, **options)
        created = False
        if not resume:
            if out.exists() and not out.is_dir():
                raise TreeschedError(f"--out {out} exists and is not a folder")
            created = not out.exists()
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TreeschedError(f"cannot create {out}: {error.strerror or error}") \
                    from None
        elif not out.is_dir():
            read_run_config(out)   # the one message for a missing or wrong folder
        lock = RunLock(out, command_line())
        succeeded = False
        try:
            lock.acquire()
            if lock.taken_over:
                _say(f"note: took over the lock of {out} left by a process that is no longer "
                     f"running (PID {lock.taken_over.get('pid', '?')} on host "
                     f"{lock.taken_over.get('host', '?')}, started "
                     f"{lock.taken_over.get('started', '?')})")
            removed = remove_orphan_temporaries(out)
            if removed:
                _say(f"note: removed {len(removed)} temporary file(s) a killed write left in "
                     f"{out}: {', '.join(removed)}")
            with DeferredInterrupts(_notice_interrupt) as interrupts:
                try:
                    result = train_function(config, out, resume=resume, group=group,
                                            interrupts=interrupts, **options)
                except TrainingInterrupted as stop:
                    stop.out = out
                    if stop.checkpoint_step is None:
                        stop.checkpoint_step = checkpoint_step(out)
                    raise
            succeeded = True
            return result
        finally:
            lock.release()
            if created and not succeeded:
                _remove_if_empty(out)

    return wrapped


def _say(line: str) -> None:
    """One line on stderr (notes about the run folder, not progress)."""
    import sys
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _notice_interrupt(signal_number: int) -> None:
    import signal
    name = signal.Signals(signal_number).name
    _say(f"\n{name}: stopping after the current step and writing a checkpoint (send it "
         f"again to stop at once)")


@_exclusive_run_folder
def train(config: TrainConfig | None, out, *, resume: bool = False, backend: str | None = None,
          checkpoint_every: int = 1000, log_every: int = 10, eval_every: int = 200,
          progress: bool = True, plot: bool = True, stream=None, stop_at: int | None = None,
          progress_interval: float = 30.0, group: ProcessGroup | None = None,
          interrupts: DeferredInterrupts | None = None) -> TrainResult:
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
      interrupts: set by the wrapper that holds the run folder's lock: once
        it records SIGINT / SIGTERM, the current step finishes, a checkpoint
        is written and :class:`treesched.interrupts.TrainingInterrupted` is
        raised (``exit_status`` 130 / 143).  The folder is locked for the
        whole call (:class:`treesched.runlock.RunLock`); a second writer is
        refused with :class:`treesched.runlock.RunFolderBusy`.
      group: the ranks that train together, data-parallel
        (:mod:`treesched.distributed`); default
        :func:`treesched.distributed.world`: every process an MPI launcher
        started, else this process alone.  Every rank calls ``train`` with
        the same arguments; all read the run folder (on a resume), rank 0
        alone writes it and shows progress.  The run is the 1-process run
        to float32 rounding, whatever the number of ranks, and its
        checkpoints resume with any number of ranks.
    Returns:
      a :class:`TrainResult` (the same on every rank, but ``accuracy``:
      rank 0's; NaN on the others).
    """
    out = Path(out)
    group = world() if group is None else group
    checkpoint_every = positive_int("checkpoint_every", checkpoint_every, most=MAX_INTERVAL)
    log_every = positive_int("log_every", log_every, most=MAX_INTERVAL)
    eval_every = positive_int("eval_every", eval_every, most=MAX_INTERVAL)
    backend = backend or default_backend()
    state_meta = state_arrays = None
    torn_log_lines = ""
    if resume:
        stored = read_run_config(out)
        config = _check_resume_config(TrainConfig.from_dict(dict(stored["train"])),
                                      config.validate() if config is not None else None)
        run_id = stored.get("run_id") or new_run_id()
        done = 0   # a run stopped before its first checkpoint starts again from step 0
        if (out / STATE_FILE).is_file():
            state_meta, state_arrays = load_state(out / STATE_FILE)
            check_state_belongs(state_meta, stored, out / STATE_FILE, PROTOCOL_FIELDS)
            try:
                done = int(state_meta["step"])
            except (KeyError, TypeError, ValueError):
                raise TreeschedError(f"{out / STATE_FILE} is incomplete or corrupt: it has no "
                                     f"step") from None
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
            unstarted = "" if (out / STATE_FILE).exists() else \
                " (it stopped before its first checkpoint: --resume starts it again)"
            raise TreeschedError(f"{out} already holds a run{unstarted}: use --resume to "
                                 f"continue it, or choose another --out")
        # the lock file is this process's own (train holds the folder's lock)
        if out.is_dir() and any(entry.name != LOCK_FILE for entry in out.iterdir()):
            raise TreeschedError(f"--out {out} exists and is not empty; choose a new folder")
        run_id = new_run_id()
        data = training_data(config)

    model = PRLSTM(data.input_size, config.hidden, data.output_size,
                   num_layers=config.num_layers, cell=config.cell, pattern=config.pattern,
                   backend=backend, dtype=config.dtype, seed=config.seed)
    _check_training_memory(model, config)
    optimizer = Adam(lr=config.lr, clip=config.clip)
    optimizer.init(model.params)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    step, seconds_before = 0, 0.0

    if state_meta is not None:
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
    group.check_batch(config.batch)
    # Every rank has read and checked what it needs (a rank that failed says
    # so here, and every rank stops); from here on rank 0 alone writes.
    group.agree()
    ranks = group.run_description(model.params)
    if group.is_root and resume:
        # drop log lines written after the checkpoint (the killed run's tail)
        # (a torn line anywhere is skipped and reported, never a reason to drop the rest)
        records, torn = read_log_records(out / LOG_FILE)
        torn_log_lines = describe_torn_lines(out / LOG_FILE, torn)
        kept = [r for r in records if r["step"] <= step]
        write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        _write_run_config(out, config, model, data,
                          {"backend": backend, "resumed_at": step, "run_id": run_id, **ranks})
        if state_meta is not None and _model_step(out) != step:
            # killed between writing the state and the model: the model file
            # is the previous checkpoint's; make it this one's again
            model.save(out / MODEL_FILE, metadata={"run_id": run_id, "step": step})
    elif group.is_root:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TreeschedError(f"cannot create {out}: {error.strerror or error}") from None
        data.write_run_files(out)
        _write_run_config(out, config, model, data, {"backend": backend, "run_id": run_id,
                                                     **ranks})
        write_text(out / LOG_FILE, "")

    bar = Progress(config.steps, initial=step, label=config.task, stream=stream,
                   enabled=progress and group.is_root, interval=progress_interval)
    if torn_log_lines:
        bar.message(torn_log_lines)
    if resume:
        bar.message(f"resuming {out} at step {step} of {config.steps} (backend {backend})")
    else:
        bar.message(data.start_message(config, backend, out))
    loss = acc = float("nan")
    held_out: dict = {}
    started = time.perf_counter()
    stopped_early = False
    # ranks other than 0 log to nowhere: the loop stays one loop for every rank
    with open(out / LOG_FILE if group.is_root else os.devnull, "a") as log:
        while step < config.steps:
            step_started = time.perf_counter()
            batch = data.draw(rng, config.batch)   # every rank draws the whole batch
            loss, grad_norm, logits = train_step(model, optimizer, batch, step + 1, group)
            metrics = data.batch_metrics(loss, _host(logits), batch) if group.is_root else {}
            acc = metrics.get("accuracy", float("nan"))
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
            checkpointing = step % checkpoint_every == 0 or step == config.steps
            # SIGINT / SIGTERM during the step: finish it, checkpoint, stop
            interrupted = (interrupts is not None and interrupts.requested is not None
                           and step < config.steps)
            group.check_replicas(model.params, step, force=checkpointing or interrupted)
            if (checkpointing or interrupted) and group.is_root:
                log.flush()
                os.fsync(log.fileno())
                write_checkpoint(out, model, optimizer, step, rng, seconds, config, run_id)
            if interrupted:
                bar.close()
                raise TrainingInterrupted(interrupts.requested, step=step, checkpoint_step=step,
                                          out=out)
            if stop_at is not None and step >= stop_at and step < config.steps:
                stopped_early = True
                break
    bar.close()
    seconds = seconds_before + (time.perf_counter() - started)
    if plot and not stopped_early and group.is_root:
        from .plots import plot_training_curve
        records = read_log(out / LOG_FILE)
        if records:
            plot_training_curve(records, out / CURVE_FILE,
                                title=f"{config.task}: PR-LSTM hidden {config.hidden}, "
                                      f"{config.steps} steps")
    return TrainResult(model=model, step=step, steps=config.steps, loss=loss, accuracy=acc,
                       seconds=seconds, out=out, stopped_early=stopped_early, held_out=held_out)

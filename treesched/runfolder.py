"""What makes a run folder's files one consistent run: its run id, the
checks that a checkpoint belongs to the run, and a log reader that survives
torn lines.

* Every run gets a random **run id** when it is created (``config.json``
  ``"run_id"``); each ``train_state.npz`` and ``model.npz`` it writes
  records it (and the step).  ``--resume`` refuses a training state of
  another run (another id, or other protocol settings such as ``lr`` and
  ``seed``); ``eval`` refuses a ``model.npz`` of another run.
* A checkpoint is the pair (``train_state.npz``, ``model.npz``) of one
  step.  ``train_state.npz`` is written first and is the checkpoint
  (self-contained: it holds the parameters); ``model.npz`` follows.  A
  process killed between the two leaves ``model.npz`` one checkpoint
  behind, never ahead: readers compare the two steps and take the
  parameters from ``train_state.npz`` when they differ, and the next
  resume rewrites ``model.npz``.
* ``train_log.jsonl`` is read line by line: a torn line (cut by a kill,
  bit-flipped, not UTF-8) is skipped and reported, and the records after it
  are kept.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from .errors import TreeschedError


def new_run_id() -> str:
    """A fresh random run id (32 hex digits)."""
    return uuid.uuid4().hex


def read_log_records(path) -> tuple[list[dict], list[int]]:
    """``(records, torn)``: the JSON object lines of a ``train_log.jsonl``, and
    the 1-based numbers of the lines that are not one (torn, corrupt, not
    UTF-8).  A missing file has no records."""
    records, torn = [], []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as error:
        raise TreeschedError(f"cannot read {path}: {error.strerror or error}") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            torn.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            torn.append(number)
    return records, torn


def describe_torn_lines(path, torn: list[int]) -> str:
    """A one-line report of skipped log lines ("" when there are none)."""
    if not torn:
        return ""
    shown = ", ".join(str(number) for number in torn[:5]) + (" ..." if len(torn) > 5 else "")
    return (f"skipped {len(torn)} unreadable line{'s' if len(torn) > 1 else ''} of {path} "
            f"(line{'s' if len(torn) > 1 else ''} {shown}); every other record is kept")


def check_state_belongs(meta: dict, run: dict, path, protocol_fields) -> None:
    """TreeschedError unless the training state ``meta`` (of the file ``path``)
    was written by the run whose ``config.json`` is ``run``: the same run id
    (when both have one) and the same value of every protocol field."""
    run_id, state_id = run.get("run_id"), meta.get("run_id")
    if run_id is not None and state_id is not None and run_id != state_id:
        raise TreeschedError(f"{path} belongs to another run (run id {state_id}, this run's "
                             f"is {run_id}); it cannot be resumed here")
    if run_id is not None and state_id is None:
        raise TreeschedError(f"{path} has no run id: it was not written by this run "
                             f"({run_id})")
    stored, saved = run.get("train", {}), meta.get("train")
    if not isinstance(saved, dict):
        raise TreeschedError(f"{path} lacks its training configuration")
    differing = [f"{name} ({saved.get(name)!r} in the state, {stored.get(name)!r} in the run)"
                 for name in protocol_fields if saved.get(name) != stored.get(name)]
    if differing:
        raise TreeschedError(f"{path} belongs to another run: " + "; ".join(differing))


def check_model_belongs(model_config: dict, run: dict, path) -> None:
    """TreeschedError unless the checkpoint configuration ``model_config``
    (``PRLSTM.save`` metadata included) belongs to the run ``run``: its run
    id, or, for a run without ids, its sizes and settings."""
    metadata = model_config.get("metadata") if isinstance(model_config.get("metadata"),
                                                           dict) else {}
    run_id, model_id = run.get("run_id"), metadata.get("run_id")
    if run_id is not None and model_id != run_id:
        raise TreeschedError(f"checkpoint {path} does not belong to this run (its run id is "
                             f"{model_id}, the run's {run_id})")
    train = run.get("train", {})
    pairs = (("hidden_size", "hidden"), ("num_layers", "num_layers"), ("cell", "cell"),
             ("pattern", "pattern"), ("dtype", "dtype"), ("seed", "seed"))
    differing = [f"{mine} {model_config.get(mine)!r} (the run's {train.get(theirs)!r})"
                 for mine, theirs in pairs
                 if theirs in train and model_config.get(mine) != train.get(theirs)]
    if differing:
        raise TreeschedError(f"checkpoint {path} does not belong to this run: "
                             + "; ".join(differing))


__all__ = ["new_run_id", "read_log_records", "describe_torn_lines", "check_state_belongs",
           "check_model_belongs"]

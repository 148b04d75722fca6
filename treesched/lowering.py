"""Lowering: from a schedule to buffers a backend allocates.

Two storage plans:

* **training** keeps every node's state in a node-major buffer
  ``(num_nodes, batch, hidden)`` per state array, because backward reads the
  operands of every merge again;
* **inference** gives each node a *slot* and reuses a slot once every merge
  reading that node has run, so only the live frontier is stored.  The state
  of an answering node is copied to the output buffer in the level that
  produces it, so outputs never pin a slot.

``activation_memory`` prices both plans with the same counts the reference
executor uses, so ``treesched compile --batch B --hidden H`` tells what a run
will allocate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import TreeschedError
from .schedule import Schedule

# Floats the reference executor caches per row for backward, in units of H
# (see ops/lstm.py and ops/rnn.py for what each cache holds):
#   state:  arrays per node state (h, c) or (h,)
#   leaf:   leaf-encoder cache per position (lstm: tanh(c) + 3 gate activations)
#   merge:  binary merge cache per merge
#   unary:  cache per unary refinement layer per merge
CELL_FLOATS = {
    "lstm": {"state": 2, "leaf": 1 + 3, "merge": 2 + 5 + 2 + 1, "unary": 1 + 4 + 1 + 1},
    "rnn": {"state": 1, "leaf": 0, "merge": 2 + 1, "unary": 1 + 1},
}


@dataclass(frozen=True)
class SlotPlan:
    """Inference storage: node → slot, and how many slots exist."""

    slot: np.ndarray      # (num_nodes,) int32
    num_slots: int


def last_use_level(schedule: Schedule) -> np.ndarray:
    """For each node, the highest level of a merge that reads it (-1: none)."""
    last = np.full(schedule.num_nodes, -1, np.int64)
    merges = np.arange(schedule.length, schedule.num_nodes)
    levels = schedule.level[merges]
    np.maximum.at(last, schedule.left[merges], levels)
    np.maximum.at(last, schedule.right[merges], levels)
    return last


def inference_slots(schedule: Schedule) -> SlotPlan:
    """Assign reusable slots level by level (a free-list over levels).

    A node holds its slot from the level that produces it until the end of
    the last level that reads it; slots are released only *after* a level
    has run, so a backend may read operands and write results of one level
    in any order (fused kernels do) without aliasing.
    """
    last = last_use_level(schedule)
    # A node nobody reads (an answer at the top) lives for its own level only.
    last = np.where(last < 0, schedule.level, last)
    release_order = np.argsort(last, kind="stable")
    release_bounds = np.searchsorted(last[release_order], np.arange(schedule.depth + 2))

    slot = np.empty(schedule.num_nodes, np.int32)
    free = np.zeros(0, np.int32)  # a stack: the end is reused first
    num_slots = 0
    offsets = schedule.level_offsets
    for level in range(schedule.depth + 1):
        first, stop = int(offsets[level]), int(offsets[level + 1])
        width = stop - first
        reused = free[len(free) - min(width, len(free)):]
        free = free[:len(free) - len(reused)]
        fresh = np.arange(num_slots, num_slots + width - len(reused), dtype=np.int32)
        num_slots += len(fresh)
        slot[first:stop] = np.concatenate([reused[::-1], fresh])
        released = release_order[release_bounds[level]:release_bounds[level + 1]]
        free = np.concatenate([free, slot[released]])
    slot.setflags(write=False)
    return SlotPlan(slot, num_slots)


def _itemsize(dtype) -> int:
    try:
        size = np.dtype(dtype).itemsize
    except TypeError:
        raise TreeschedError(f"unknown dtype {dtype!r}") from None
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TreeschedError(f"dtype must be float32 or float64, got {np.dtype(dtype).name}")
    return size


def activation_memory(schedule: Schedule, batch: int, hidden: int, dtype="float32",
                      num_layers: int = 2, cell: str = "lstm") -> dict:
    """Bytes of activations for one forward, and for a forward+backward pass.

    Parameters, inputs and the logits are not counted: they are the same
    for every schedule.  ``forward`` is the inference plan (slot reuse plus
    the widest level's workspace); ``forward_backward`` keeps every node's
    state and every cache backward reads, plus one level of gradients.
    """
    for name, value in (("batch", batch), ("hidden", hidden), ("num_layers", num_layers)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise TreeschedError(f"{name} must be a positive integer, got {value!r}")
    if cell not in CELL_FLOATS:
        raise TreeschedError(f"unknown cell {cell!r}; known cells: {', '.join(CELL_FLOATS)}")
    floats = CELL_FLOATS[cell]
    item = _itemsize(dtype)
    row = batch * hidden * item  # one (batch, hidden) block
    per_merge = floats["merge"] + (num_layers - 1) * floats["unary"]
    outputs = len(schedule.output_nodes)

    slots = inference_slots(schedule).num_slots
    forward = (slots * floats["state"] * row                   # live states
               + schedule.widest * per_merge * row             # one level's workspace
               + outputs * row)                                # answers' h
    training = (schedule.num_nodes * floats["state"] * row     # every state
                + schedule.length * floats["leaf"] * row       # leaf caches
                + schedule.num_merges * per_merge * row        # merge caches
                + outputs * row)                               # head input
    backward_extra = (schedule.num_nodes * floats["state"] * row)  # state gradients
    return {
        "dtype": np.dtype(dtype).name,
        "batch": batch,
        "hidden": hidden,
        "num_layers": num_layers,
        "cell": cell,
        "inference_slots": slots,
        "forward_bytes": int(forward),
        "forward_backward_bytes": int(training + backward_extra),
    }

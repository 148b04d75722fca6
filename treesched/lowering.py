"""Lowering: from a schedule to the one plan every backend runs.

``lower(schedule, mode)`` gives an immutable, cached :class:`Plan` per
(schedule, mode).  It holds every table derived from the schedule that a
pass indexes with, so no backend derives one of its own:

* **training** (``mode="training"``) keeps every node's state in a
  node-major store ``(num_nodes, batch, hidden)`` per state array, because
  backward reads the operands of every merge again.  Locations are node ids.
  Per level it also holds the *consumer table* for the deterministic
  accumulation of operand gradients: the level's distinct operand nodes
  (``targets``), and for each, in a fixed order, the operand codes
  ``2 * merge + side`` of the merges of that level reading it (a CSR), plus
  whether it is the first gradient to reach the node (so node gradients are
  assigned, then added to, and never need zero-filling).
* **inference** (``mode="inference"``) gives each node a *slot* and reuses a
  slot once every merge reading the node has run, so only the live frontier
  is stored.  Locations are slots.  Each leaf and merge says which answer it
  is (``-1``: none), so a backend writes answers as they are produced and
  outputs never pin a slot.

``workspace_layout`` lists the buffers the executor allocates for a plan, a
cell and the sizes; ``activation_memory`` prices them, so ``treesched compile
--batch B --hidden H`` says what a run allocates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import TreeschedError
from .limits import MAX_BATCH, MAX_HIDDEN, MAX_LAYERS
from .ops import get_cell
from .schedule import Schedule
from .validation import positive_int

MODES = ("inference", "training")


def _table(values, dtype=np.int64) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=dtype)
    array.setflags(write=False)
    return array


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


# ====================================================================== plans
@dataclass(frozen=True, eq=False)
class LevelPlan:
    """One merge level: ``width`` independent merges, nodes ``first .. stop``.

    ``left``, ``right`` and ``out`` are the operand and result *locations*
    (node ids in training, slots in inference) of merge ``j``; ``answer[j]``
    the answer it produces or -1.  Training plans also hold the consumer
    table (``targets``, ``consumer_ptr``, ``consumers``, ``first_gradient``:
    see the module docstring); inference plans leave it empty.
    """

    index: int
    first: int
    stop: int
    merge_start: int      # first - length: the level's first merge, for per-merge caches
    left: np.ndarray
    right: np.ndarray
    out: np.ndarray
    answer: np.ndarray
    targets: np.ndarray
    consumer_ptr: np.ndarray
    consumers: np.ndarray
    first_gradient: np.ndarray

    @property
    def width(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a pass over ``schedule`` indexes with (batch independent).

    Attributes:
      schedule: the schedule it lowers (None for a plan built elsewhere, e.g.
        one chunk of a stream, ``treesched.streaming``).
      mode: ``"training"`` or ``"inference"``.
      length, num_merges, widest, num_answers: positions, merges, the widest
        level's merges and the answers of one pass.
      num_locations: rows of a state store, in units of ``batch``: every node
        (training) or the live slots (inference).
      leaves: ``(T,)`` the location of leaf ``t``; ``leaf_answer`` its answer
        index or -1.
      answer_locations: ``(K,)`` where answer ``k`` is after a training pass
        (the output nodes); inference writes answers as they are produced.
      levels: the merge levels in execution order.
      local: ``arange(widest)``, the locations of a level's rows in a
        per-level buffer viewed as ``(width, batch, hidden)``.
      unreached: training: nodes no gradient reaches (their gradient is zero).
    """

    schedule: Schedule | None
    mode: str
    length: int
    num_merges: int
    widest: int
    num_answers: int
    num_locations: int
    leaves: np.ndarray
    leaf_answer: np.ndarray
    answer_locations: np.ndarray
    levels: tuple
    local: np.ndarray
    unreached: np.ndarray

    def __repr__(self):
        return (f"Plan({self.mode}, length={self.length}, merges={self.num_merges}, "
                f"levels={len(self.levels)}, locations={self.num_locations})")


_EMPTY = _table(())
_EMPTY_FLAGS = _table((), bool)


def _answer_of(schedule: Schedule) -> np.ndarray:
    """Per node: the answer index it produces, or -1."""
    answer = np.full(schedule.num_nodes, -1, np.int64)
    answer[schedule.output_nodes] = np.arange(len(schedule.output_nodes))
    return answer


def _training_levels(schedule: Schedule, answer_of) -> tuple:
    length = schedule.length
    reached = np.zeros(schedule.num_nodes, bool)
    reached[schedule.output_nodes] = True
    levels = [None] * schedule.depth
    for step in reversed(schedule.levels):  # backward order decides the first gradient
        width = step.width
        operands = np.concatenate([step.left, step.right]).astype(np.int64)
        codes = np.concatenate([2 * np.arange(width), 2 * np.arange(width) + 1])
        order = np.lexsort((codes, operands))  # by node, then (merge, side)
        operands, codes = operands[order], codes[order]
        starts = np.flatnonzero(np.r_[True, operands[1:] != operands[:-1]])
        targets = operands[starts]
        first_gradient = ~reached[targets]
        reached[targets] = True
        first = int(step.out[0])
        levels[step.index - 1] = LevelPlan(
            index=step.index, first=first, stop=first + width, merge_start=first - length,
            left=_table(step.left), right=_table(step.right), out=_table(step.out),
            answer=_table(answer_of[first:first + width]), targets=_table(targets),
            consumer_ptr=_table(np.r_[starts, len(operands)]), consumers=_table(codes),
            first_gradient=_table(first_gradient, bool))
    return tuple(levels), np.flatnonzero(~reached)


def _inference_levels(schedule: Schedule, slot, answer_of) -> tuple:
    levels = []
    for step in schedule.levels:
        first = int(step.out[0])
        levels.append(LevelPlan(
            index=step.index, first=first, stop=first + step.width,
            merge_start=first - schedule.length,
            left=_table(slot[step.left]), right=_table(slot[step.right]),
            out=_table(slot[step.out]), answer=_table(answer_of[first:first + step.width]),
            targets=_EMPTY, consumer_ptr=_EMPTY, consumers=_EMPTY,
            first_gradient=_EMPTY_FLAGS))
    return tuple(levels)


@functools.lru_cache(maxsize=128)
def lower(schedule: Schedule, mode: str) -> Plan:
    """The :class:`Plan` of ``schedule`` for ``mode`` (cached; immutable)."""
    if mode not in MODES:
        raise TreeschedError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    answer_of = _answer_of(schedule)
    length = schedule.length
    local = _table(np.arange(max(schedule.widest, 1)))
    sizes = dict(length=length, num_merges=schedule.num_merges, widest=schedule.widest,
                 num_answers=len(schedule.output_nodes))
    if mode == "training":
        levels, unreached = _training_levels(schedule, answer_of)
        return Plan(schedule=schedule, mode=mode, **sizes, num_locations=schedule.num_nodes,
                    leaves=_table(np.arange(length)), leaf_answer=_table(answer_of[:length]),
                    answer_locations=_table(schedule.output_nodes), levels=levels,
                    local=local, unreached=_table(unreached))
    slots = inference_slots(schedule)
    slot = slots.slot.astype(np.int64)
    return Plan(schedule=schedule, mode=mode, **sizes, num_locations=slots.num_slots,
                leaves=_table(slot[:length]), leaf_answer=_table(answer_of[:length]),
                answer_locations=_table(slot[schedule.output_nodes]),
                levels=_inference_levels(schedule, slot, answer_of), local=local,
                unreached=_EMPTY)


# ================================================================ workspaces
def level_rows(plan: Plan, batch: int) -> int:
    """Rows of a per-level buffer: the widest level's, at least one merge's."""
    return max(plan.widest, 1) * batch


def scratch_rows(plan: Plan, batch: int) -> int:
    """Rows of the level scratch that also carries the leaves in chunks (at
    least two positions' worth, so a chunk of one position always fits)."""
    return max(plan.widest, 2) * batch


def workspace_layout(plan: Plan, cell, batch: int, inputs: int, hidden: int) -> dict:
    """``{buffer name: shape}`` of everything one pass of ``cell`` over ``plan`` keeps.

    Training (the executor's buffers, in units of rows ``(location, b)``):
    ``x_rows``; the state stores ``h`` (and ``c``) and their gradients
    ``dh`` (and ``dc``) over every node; per merge layer ``k`` its cache
    ``act{k}`` over every merge (a gated layer's activations; an affine
    layer's output, except the top one's, which is the store); one level's
    ``pair`` (operands ``[h_l | h_r]``, then their gradient; also the leaf
    scratch), and, with more than one layer, the per-level ``hidden`` input
    of a layer, the cells between layers (``cells{k}``, recomputed in
    backward rather than cached) and ping-pong gradients.  Inference:
    ``x_rows``, the slot stores, ``pair``, the gate scratch ``act`` and the
    per-level ``hidden`` / ``cells`` (gated) or ping-pong outputs (affine).
    Results, staged inputs and weight gradients are not listed.
    """
    B, H, T, D = batch, hidden, plan.length, inputs
    gated = cell.kind == "gated"
    num_layers = len(cell.merge_layers)
    rows, scratch = level_rows(plan, B), scratch_rows(plan, B)
    states = cell.state_names
    layout = {"x_rows": (T * B, D)}
    for name in states:
        layout[name] = (plan.num_locations, B, H)
    layout["pair"] = (scratch, 2 * H)
    if plan.mode == "training":
        for name in states:
            layout[f"d{name}"] = (plan.num_locations, B, H)
        merge_rows = plan.num_merges * B
        for k, layer in enumerate(cell.merge_layers):
            if gated or k < num_layers - 1:
                layout[f"act{k}"] = (merge_rows, layer.blocks * H)
        if num_layers > 1:
            for side in (0, 1):
                layout[f"ping_h{side}"] = (rows, H)
            if gated:
                layout["hidden"] = (rows, H)
                for k in range(num_layers - 1):
                    layout[f"cells{k}"] = (rows, H)
                for side in (0, 1):
                    layout[f"ping_c{side}"] = (rows, H)
        if gated and cell.merge_layers[0].num_prev == 2:
            layout["dc_left"] = (rows, H)
            layout["dc_right"] = (rows, H)
    else:
        if gated:
            widest_gates = max(layer.blocks for layer in cell.layers)
            layout["act"] = (scratch, widest_gates * H)
            if num_layers > 1:
                layout["hidden"] = (rows, H)
                layout["cells"] = (rows, H)
        else:
            for side in (0, 1):
                layout[f"ping_h{side}"] = (rows, H)
    return layout


def _itemsize(dtype) -> int:
    try:
        kind = np.dtype(dtype)
    except TypeError:
        raise TreeschedError(f"unknown dtype {dtype!r}") from None
    if kind not in (np.float32, np.float64):
        raise TreeschedError(f"dtype must be float32 or float64, got {kind.name}")
    return kind.itemsize


def activation_memory(schedule: Schedule, batch: int, hidden: int, dtype="float32",
                      num_layers: int = 2, cell: str = "lstm", inputs: int = 1) -> dict:
    """Bytes of activations for one forward, and for a forward+backward pass.

    The sum of :func:`workspace_layout` plus the answers handed back (one
    ``(batch, K, hidden)`` array per state); parameters and their gradients,
    the inputs' own copy and the logits are not counted.
    """
    batch = positive_int("batch", batch, most=MAX_BATCH)
    hidden = positive_int("hidden", hidden, most=MAX_HIDDEN)
    num_layers = positive_int("num_layers", num_layers, most=MAX_LAYERS)
    item = _itemsize(dtype)
    described = get_cell(cell, num_layers)
    answers = len(described.state_names) * batch * len(schedule.output_nodes) * hidden

    def total(mode):
        layout = workspace_layout(lower(schedule, mode), described, batch, inputs, hidden)
        return (sum(int(np.prod(shape)) for shape in layout.values()) + answers) * item

    return {
        "dtype": np.dtype(dtype).name,
        "batch": batch,
        "hidden": hidden,
        "num_layers": num_layers,
        "cell": cell,
        "inference_slots": lower(schedule, "inference").num_locations,
        "forward_bytes": int(total("inference")),
        "forward_backward_bytes": int(total("training")),
    }


__all__ = ["lower", "Plan", "LevelPlan", "MODES", "workspace_layout", "level_rows",
           "scratch_rows", "activation_memory", "inference_slots", "last_use_level", "SlotPlan"]

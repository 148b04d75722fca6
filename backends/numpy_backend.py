"""The reference executor: a schedule run level by level with array ops.

Works with any array module that has the NumPy API (``xp``), in float32 or
float64; it is the ground truth every other backend is tested against.

Storage is node-major: ``state[s]`` has shape ``(num_nodes, batch, hidden)``
so the operands of a level gather as whole ``(batch, hidden)`` blocks and a
level's results land in one contiguous id range.

* forward with ``need_grad``: every node's state and every cache stay alive
  for backward (the training plan of ``treesched.lowering``);
* forward without: states live in reusable slots (the inference plan), and
  answering states are copied out in the level that produces them.

Backward walks the levels in reverse.  A node can feed several merges (even
several in one level), so operand gradients are *accumulated*: sorted by
node and summed with ``add.reduceat``, which is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from treesched.lowering import inference_slots
from treesched.schedule import Schedule


@dataclass
class Tape:
    """What backward needs from one forward pass."""

    schedule: Schedule
    batch: int
    leaf_cache: object
    merge_caches: list = field(default_factory=list)


def scatter_add(xp, target, index, values):
    """``target[index[k]] += values[k]`` with repeated indices summed, in a
    fixed order (sort, then segment sums), so results never depend on timing."""
    if len(index) == 0:
        return
    order = xp.argsort(index, kind="stable") if xp is np else xp.argsort(index)
    sorted_index = index[order]
    is_first = xp.ones(len(index), dtype=bool)
    is_first[1:] = sorted_index[1:] != sorted_index[:-1]
    starts = xp.flatnonzero(is_first)
    sums = xp.add.reduceat(values[order], starts, axis=0)
    target[sorted_index[starts]] += sums


class NumpyBackend:
    """Reference backend over ``xp`` (NumPy by default)."""

    name = "numpy"

    def __init__(self, xp=np):
        self.xp = xp
        self._index_cache: dict = {}

    # -------------------------------------------------------------- helpers
    def asarray(self, array, dtype=None):
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array):
        return np.asarray(array)

    def _indices(self, schedule: Schedule):
        """Schedule index arrays moved to ``xp`` once per schedule."""
        key = id(schedule)
        hit = self._index_cache.get(key)
        if hit is None or hit[0] is not schedule:
            xp = self.xp
            levels = [(xp.asarray(step.left), xp.asarray(step.right),
                       int(step.out[0]), int(step.out[-1]) + 1) for step in schedule.levels]
            hit = (schedule, levels, xp.asarray(schedule.output_nodes))
            self._index_cache[key] = hit
        return hit[1], hit[2]

    # -------------------------------------------------------------- forward
    def encode(self, cell, params, x, schedule: Schedule, need_grad: bool):
        """Run the leaves and every merge level.

        Args:
          x: ``(B, T, D)`` inputs, ``T == schedule.length``.
        Returns:
          ``(states, tape)``: ``states`` is a tuple (one per state array) of
          ``(B, K, H)`` arrays, the answering node of every requested output
          position; ``tape`` is None unless ``need_grad``.
        """
        if not need_grad:
            return self._encode_inference(cell, params, x, schedule), None
        xp = self.xp
        batch, length, _ = x.shape
        levels, output_nodes = self._indices(schedule)
        rows = xp.ascontiguousarray(x.transpose(1, 0, 2)).reshape(length * batch, -1)
        leaf_state, leaf_cache = cell.leaf_forward(params, rows, need_cache=True)
        hidden = leaf_state[0].shape[-1]
        store = [xp.empty((schedule.num_nodes, batch, hidden), dtype=x.dtype)
                 for _ in leaf_state]
        for buffer, values in zip(store, leaf_state):
            buffer[:length] = values.reshape(length, batch, hidden)
        tape = Tape(schedule, batch, leaf_cache)
        for left, right, first, stop in levels:
            left_state = tuple(buffer[left].reshape(-1, hidden) for buffer in store)
            right_state = tuple(buffer[right].reshape(-1, hidden) for buffer in store)
            new_state, cache = cell.merge_forward(params, left_state, right_state, need_cache=True)
            for buffer, values in zip(store, new_state):
                buffer[first:stop] = values.reshape(stop - first, batch, hidden)
            tape.merge_caches.append(cache)
        states = tuple(buffer[output_nodes].transpose(1, 0, 2) for buffer in store)
        return states, tape

    def _encode_inference(self, cell, params, x, schedule: Schedule):
        xp = self.xp
        batch, length, _ = x.shape
        plan = _inference_plan(schedule)
        rows = xp.ascontiguousarray(x.transpose(1, 0, 2)).reshape(length * batch, -1)
        leaf_state, _ = cell.leaf_forward(params, rows, need_cache=False)
        hidden = leaf_state[0].shape[-1]
        slots = [xp.empty((plan.num_slots, batch, hidden), dtype=x.dtype) for _ in leaf_state]
        outputs = [xp.empty((len(schedule.output_nodes), batch, hidden), dtype=x.dtype)
                   for _ in leaf_state]
        leaf_slots = plan.slot[:length]
        for buffer, values in zip(slots, leaf_state):
            buffer[leaf_slots] = values.reshape(length, batch, hidden)
        self._copy_answers(plan, 0, slots, outputs)
        for index, step in enumerate(schedule.levels, start=1):
            left_state = tuple(buffer[plan.slot[step.left]].reshape(-1, hidden) for buffer in slots)
            right_state = tuple(buffer[plan.slot[step.right]].reshape(-1, hidden) for buffer in slots)
            new_state, _ = cell.merge_forward(params, left_state, right_state, need_cache=False)
            out_slots = plan.slot[step.out]
            for buffer, values in zip(slots, new_state):
                buffer[out_slots] = values.reshape(step.width, batch, hidden)
            self._copy_answers(plan, index, slots, outputs)
        return tuple(out.transpose(1, 0, 2) for out in outputs)

    @staticmethod
    def _copy_answers(plan, level, slots, outputs):
        which, slot = plan.answers_by_level[level]
        if len(which):
            for buffer, out in zip(slots, outputs):
                out[which] = buffer[slot]

    # ------------------------------------------------------------- backward
    def encode_backward(self, cell, params, tape: Tape, dstates, need_dx=False):
        """Gradients of ``sum(states * dstates)`` w.r.t. the cell parameters.

        Args:
          dstates: tuple (one per state array) of ``(B, K, H)`` arrays or
            None (zero), matching ``encode``'s ``states``.
        Returns:
          ``(grads, dx)``; ``dx`` is ``(B, T, D)`` when ``need_dx`` else None.
        """
        xp = self.xp
        schedule = tape.schedule
        levels, output_nodes = self._indices(schedule)
        reference = next(d for d in dstates if d is not None)
        batch, hidden = reference.shape[0], reference.shape[-1]
        dstore = [xp.zeros((schedule.num_nodes, batch, hidden), dtype=reference.dtype)
                  for _ in dstates]
        for buffer, grad in zip(dstore, dstates):
            if grad is not None:
                # output nodes are distinct: a plain indexed add is exact
                buffer[output_nodes] += grad.transpose(1, 0, 2)
        grads: dict = {}
        for (left, right, first, stop), cache in zip(reversed(levels),
                                                     reversed(tape.merge_caches)):
            dout = tuple(buffer[first:stop].reshape(-1, hidden) for buffer in dstore)
            dleft, dright, level_grads = cell.merge_backward(params, cache, dout)
            _accumulate(grads, level_grads)
            operands = xp.concatenate([left, right])
            for buffer, dl, dr in zip(dstore, dleft, dright):
                width = stop - first
                values = xp.concatenate([dl.reshape(width, batch, hidden),
                                         dr.reshape(width, batch, hidden)])
                scatter_add(xp, buffer, operands, values)
        length = schedule.length
        dleaf = tuple(buffer[:length].reshape(length * batch, hidden) for buffer in dstore)
        leaf_grads, dx = cell.leaf_backward(params, tape.leaf_cache, dleaf, need_dx=need_dx)
        _accumulate(grads, leaf_grads)
        if dx is not None:
            dx = dx.reshape(length, batch, -1).transpose(1, 0, 2)
        return grads, dx


def _accumulate(total: dict, more: dict):
    for name, value in more.items():
        if name in total:
            total[name] += value
        else:
            total[name] = value


@dataclass(frozen=True)
class _InferencePlan:
    slot: np.ndarray
    num_slots: int
    answers_by_level: tuple  # per level: (output indices, their slots)


_PLANS: dict = {}


def _inference_plan(schedule: Schedule) -> _InferencePlan:
    """Slots plus, per level, which answers it produces (cached per schedule)."""
    hit = _PLANS.get(id(schedule))
    if hit is not None and hit[0] is schedule:
        return hit[1]
    slots = inference_slots(schedule)
    answer_levels = schedule.level[schedule.output_nodes]
    per_level = []
    for level in range(schedule.depth + 1):
        which = np.flatnonzero(answer_levels == level)
        per_level.append((which, slots.slot[schedule.output_nodes[which]]))
    plan = _InferencePlan(slots.slot, slots.num_slots, tuple(per_level))
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[id(schedule)] = (schedule, plan)
    return plan

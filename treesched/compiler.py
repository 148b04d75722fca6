"""``treesched.compile``: length → pruned, level-ordered merge schedule.

The path is vectorized NumPy from end to end (no graph library): a pattern
emits raw merges in dependency-ordered batches (``patterns.py``), the
requested outputs mark what they need, the rest is dropped, and the kept
merges are renumbered level by level so that each level's outputs are one
contiguous id range.
"""

from __future__ import annotations

import functools
import numbers
import re

import numpy as np

from .errors import TreeschedError
from .limits import MAX_LENGTH
from .patterns import PATTERNS, MergeBuilder
from .schedule import Schedule, requested_positions_of

def normalize_outputs(outputs, length: int):
    """Validate an ``outputs`` request; return ``"all"``, ``"last"`` or an int k."""
    if isinstance(outputs, str):
        if outputs in ("all", "last"):
            return outputs
        # ASCII digits only ("³".isdigit() is True, and int() refuses it)
        if re.fullmatch(r"[0-9]{1,40}", outputs.strip()):
            outputs = int(outputs)
        else:
            raise TreeschedError(
                f"outputs must be 'all', 'last' or a positive integer k (the last k "
                f"positions), got {outputs!r}")
    if isinstance(outputs, bool) or not isinstance(outputs, numbers.Integral):
        raise TreeschedError(
            f"outputs must be 'all', 'last' or a positive integer k, got {outputs!r}")
    k = int(outputs)
    if k < 1:
        raise TreeschedError(f"outputs must be a positive number of positions, got {k}")
    if k > length:
        raise TreeschedError(f"outputs={k} asks for more positions than the length {length}")
    return k


def validate_length(length) -> int:
    """``length`` as an int in ``1 .. limits.MAX_LENGTH`` (an integral float
    such as ``512.0`` is taken), else TreeschedError."""
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        if isinstance(length, float) and length.is_integer():
            length = int(length)
        else:
            raise TreeschedError(f"length must be a positive integer, got {length!r}")
    length = int(length)
    if length < 1:
        raise TreeschedError(f"length must be a positive integer, got {length}")
    if length > MAX_LENGTH:
        raise TreeschedError(f"length must be at most {MAX_LENGTH} (treesched's bound on "
                             f"sequence lengths), got {length}")
    return length


def validate_pattern(pattern) -> str:
    if not isinstance(pattern, str) or pattern not in PATTERNS:
        known = ", ".join(PATTERNS)
        raise TreeschedError(f"unknown pattern {pattern!r}; known patterns: {known}")
    return pattern


requested_positions = requested_positions_of


def compile(length, pattern: str = "odd-even", outputs="all") -> Schedule:  # noqa: A001
    """Compile a sequence length into a level-wise merge schedule.

    Args:
      length: number of positions ``T`` (a positive integer).
      pattern: ``"odd-even"`` (default, the recursion of
        ``jax.lax.associative_scan``), ``"sequential"``, ``"sklansky"``,
        ``"kogge-stone"`` or ``"reduce"``.
      outputs: which positions are read: ``"all"``, ``"last"``, or an int k
        for the last k positions.  Merges no requested output depends on are
        pruned; the trees answering the requested positions are unchanged.

    Returns:
      An immutable :class:`~treesched.Schedule`.  Schedules are cached per
      ``(length, pattern, outputs)``: compiling twice returns the same object.

    Raises:
      TreeschedError: for a non-positive or non-integer length, an unknown
        pattern, an outputs request the length or pattern cannot answer.
    """
    length = validate_length(length)
    pattern = validate_pattern(pattern)
    outputs = normalize_outputs(outputs, length)
    return _compile_cached(length, pattern, outputs)


@functools.lru_cache(maxsize=256)
def _compile_cached(length: int, pattern: str, outputs) -> Schedule:
    builder = MergeBuilder(length)
    answers = PATTERNS[pattern](builder, length)
    left, right, level, start, stop = builder.arrays()

    positions = requested_positions(outputs, length)
    answer_nodes = answers[positions]
    if np.any(answer_nodes < 0):
        missing = positions[answer_nodes < 0]
        raise TreeschedError(
            f"pattern {pattern!r} does not answer position {int(missing[0])} "
            f"(it answers only the last position: use outputs='last')")

    keep = _needed(length, left, right, level, answer_nodes)
    return _renumber(length, pattern, outputs, keep, left, right, level, start, stop,
                     positions, answer_nodes)


_DEEP = 4096  # levels beyond which pruning loops per merge, not per level


def _needed(length: int, left, right, level, answer_nodes) -> np.ndarray:
    """Mark every node an answer depends on: one reverse sweep over levels.

    No merge reads another merge of its own level, so walking the levels from
    the deepest down and propagating "needed" from each live merge to its
    operands visits every consumer before its operands; each level is one
    vectorized step.
    """
    needed = np.zeros(length + len(left), bool)
    needed[answer_nodes] = True
    if len(left) == 0:
        return needed
    if level.max() > _DEEP:
        # A deep, thin schedule (the sequential chain) has about one merge
        # per level: a plain loop in reverse creation order beats a NumPy
        # call per level.  Raw ids are topological, so one pass is exact.
        flags = needed.tolist()
        lefts, rights = left.tolist(), right.tolist()
        for merge in range(len(lefts) - 1, -1, -1):
            if flags[length + merge]:
                flags[lefts[merge]] = True
                flags[rights[merge]] = True
        return np.array(flags, bool)
    order = np.argsort(-level, kind="stable")
    bounds = np.flatnonzero(np.diff(level[order])) + 1
    for chunk in np.split(order, bounds):
        live = chunk[needed[length + chunk]]
        needed[left[live]] = True
        needed[right[live]] = True
    return needed


def _renumber(length, pattern, outputs, keep, left, right, level, start, stop,
              positions, answer_nodes) -> Schedule:
    """Drop unneeded merges; number the rest by (level, creation order)."""
    kept_merges = np.flatnonzero(keep[length:])
    order = kept_merges[np.argsort(level[kept_merges], kind="stable")]
    new_id = np.full(len(keep), -1, np.int64)
    new_id[:length] = np.arange(length)  # every leaf is needed by the last position
    new_id[length + order] = length + np.arange(len(order))

    node_left = np.concatenate([np.full(length, -1), new_id[left[order]]])
    node_right = np.concatenate([np.full(length, -1), new_id[right[order]]])
    node_level = np.concatenate([np.zeros(length, np.int64), level[order]])
    node_start = np.concatenate([np.arange(length), start[order]])
    node_stop = np.concatenate([np.arange(1, length + 1), stop[order]])
    return Schedule(
        length=length, pattern=pattern, outputs=outputs,
        left=node_left, right=node_right, level=node_level,
        start=node_start, stop=node_stop,
        output_positions=positions, output_nodes=new_id[answer_nodes],
    )

"""Prefix-network patterns: each turns a length into a raw list of merges.

A pattern emits merges through a :class:`MergeBuilder` in *batches*: every
merge of a batch reads only nodes created by earlier batches (or leaves), so
levels and spans can be computed one vectorized NumPy step per batch.  Node
ids are raw here: leaves are ``0 .. n-1`` and merges are numbered in the order
they are created.  The compiler (``compiler.py``) renumbers, prunes and groups
them into levels.

Every pattern returns, for each position ``t``, the raw id of the node that
covers ``0..t`` (or ``-1`` where the pattern does not answer ``t``).
"""

from __future__ import annotations

import numpy as np

INDEX = np.int64  # raw ids; the compiled schedule stores int32


class MergeBuilder:
    """Collects merges in dependency-ordered batches and tracks levels/spans."""

    def __init__(self, num_leaves: int):
        self.num_leaves = num_leaves
        self._left: list[np.ndarray] = []
        self._right: list[np.ndarray] = []
        self._level: list[np.ndarray] = []
        self._start: list[np.ndarray] = []
        self._stop: list[np.ndarray] = []
        self.num_nodes = num_leaves
        # Level/span lookups for ids created so far, grown geometrically.
        cap = max(16, 2 * num_leaves)
        self.level = np.zeros(cap, INDEX)
        self.start = np.zeros(cap, INDEX)
        self.stop = np.zeros(cap, INDEX)
        self.start[:num_leaves] = np.arange(num_leaves)
        self.stop[:num_leaves] = np.arange(1, num_leaves + 1)

    def _append(self, left, right, level, start, stop) -> np.ndarray:
        count = len(left)
        first = self.num_nodes
        need = first + count
        if need > len(self.level):
            cap = max(need, 2 * len(self.level))
            for name in ("level", "start", "stop"):
                grown = np.zeros(cap, INDEX)
                grown[:first] = getattr(self, name)[:first]
                setattr(self, name, grown)
        ids = np.arange(first, need, dtype=INDEX)
        self.level[first:need] = level
        self.start[first:need] = start
        self.stop[first:need] = stop
        self._left.append(np.asarray(left, INDEX))
        self._right.append(np.asarray(right, INDEX))
        self._level.append(np.asarray(level, INDEX))
        self._start.append(np.asarray(start, INDEX))
        self._stop.append(np.asarray(stop, INDEX))
        self.num_nodes = need
        return ids

    def merge(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Create ``m(left[k], right[k])`` for every k; return the new ids.

        Every operand must already exist (no merge of this batch may read
        another merge of the same batch).
        """
        left = np.asarray(left, INDEX)
        right = np.asarray(right, INDEX)
        if len(left) == 0:
            return np.zeros(0, INDEX)
        level = np.maximum(self.level[left], self.level[right]) + 1
        return self._append(left, right, level, self.start[left], self.stop[right])

    def fold(self, first: int, rights: np.ndarray) -> np.ndarray:
        """Left fold: ``acc = first; acc = m(acc, r)`` for each r in order.

        The chain's levels have a closed form, so a fold of any length is one
        vectorized step: ``level_j = max(level_{j-1}, level(r_j)) + 1``
        unrolls to ``j + 1 + max(level(first), max_{i<=j} (level(r_i) - i))``.
        """
        rights = np.asarray(rights, INDEX)
        count = len(rights)
        if count == 0:
            return np.zeros(0, INDEX)
        j = np.arange(count, dtype=INDEX)
        reach = np.maximum.accumulate(self.level[rights] - j)
        level = j + 1 + np.maximum(self.level[first], reach)
        ids = np.arange(self.num_nodes, self.num_nodes + count, dtype=INDEX)
        left = np.concatenate([[first], ids[:-1]])
        start = np.full(count, self.start[first], INDEX)
        return self._append(left, rights, level, start, self.stop[rights])

    def arrays(self):
        """All merges so far: (left, right, level, start, stop), raw ids."""
        if not self._left:
            empty = np.zeros(0, INDEX)
            return empty, empty, empty, empty, empty
        return tuple(np.concatenate(parts) for parts in
                     (self._left, self._right, self._level, self._start, self._stop))


# --------------------------------------------------------------------------
# The patterns.  Each takes (builder, n) and returns the answering node per
# position, raw ids, -1 where the pattern answers no node.
# --------------------------------------------------------------------------

def odd_even(builder: MergeBuilder, n: int) -> np.ndarray:
    """The recursion of ``jax.lax.associative_scan`` (SPEC.md §2).

    Pair neighbours, scan the pairs recursively, then fix up the even
    positions with one more merge each: Brent–Kung in JAX's operand order.
    """

    def scan(elems: np.ndarray) -> np.ndarray:
        count = len(elems)
        if count < 2:
            return elems
        reduced = builder.merge(elems[0:-1:2], elems[1::2])
        prefix = scan(reduced)  # prefix[k] covers 0 .. 2k+1
        out = np.empty(count, INDEX)
        out[0] = elems[0]
        out[1::2] = prefix
        evens = elems[2::2]  # E[2k] for k >= 1 with 2k < count
        out[2::2] = builder.merge(prefix[:len(evens)], evens)
        return out

    return scan(np.arange(n, dtype=INDEX))


def sequential(builder: MergeBuilder, n: int) -> np.ndarray:
    """Left fold ``out[t] = m(out[t-1], E[t])``: the linear chain baseline."""
    rest = builder.fold(0, np.arange(1, n, dtype=INDEX))
    return np.concatenate([[0], rest]).astype(INDEX)


def sklansky(builder: MergeBuilder, n: int) -> np.ndarray:
    """Sklansky's divide-and-conquer network, depth ceil(log2 n).

    At stage k every position in the upper half of a block of 2^(k+1) takes
    the last prefix of the block's lower half as its left operand.
    """
    current = np.arange(n, dtype=INDEX)
    positions = np.arange(n, dtype=INDEX)
    half = 1
    while half < n:
        upper = positions[(positions & half) != 0]
        source = (upper | (half - 1)) - half  # last position of the lower half
        current[upper] = builder.merge(current[source], current[upper])
        half *= 2
    return current


def kogge_stone(builder: MergeBuilder, n: int) -> np.ndarray:
    """Kogge–Stone: at distance d, ``x[t] = m(x[t-d], x[t])`` for all t >= d."""
    current = np.arange(n, dtype=INDEX)
    distance = 1
    while distance < n:
        merged = builder.merge(current[:-distance], current[distance:])
        current = np.concatenate([current[:distance], merged])
        distance *= 2
    return current


def reduce(builder: MergeBuilder, n: int) -> np.ndarray:
    """Balanced pairwise tree over all leaves; answers the last position only.

    Each round merges neighbours (0,1), (2,3), …; an odd element out is
    carried to the next round unchanged.
    """
    current = np.arange(n, dtype=INDEX)
    while len(current) > 1:
        merged = builder.merge(current[0:-1:2], current[1::2])
        if len(current) % 2:
            merged = np.concatenate([merged, current[-1:]])
        current = merged
    answers = np.full(n, -1, INDEX)
    answers[n - 1] = current[0]
    return answers


PATTERNS = {
    "odd-even": odd_even,
    "sequential": sequential,
    "sklansky": sklansky,
    "kogge-stone": kogge_stone,
    "reduce": reduce,
}

# Patterns whose tree for position t does not depend on the length
# (SPEC.md §2): right padding never changes the outputs at real positions.
PREFIX_STABLE = frozenset({"odd-even", "sequential", "sklansky", "kogge-stone"})

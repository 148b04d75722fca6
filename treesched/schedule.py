"""The schedule IR: an immutable, level-ordered merge DAG.

Node ids: leaves are ``0 .. T-1`` (leaf ``t`` is position ``t``); merges
follow, numbered by level and then by creation order, so the merges of
level ``l`` are the contiguous id range ``level_offsets[l] ..
level_offsets[l+1]``.  Every node covers the half-open span ``start ..
stop`` of positions; a merge covers its left operand's span followed
directly by its right operand's.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import TreeschedError
from .limits import MAX_LENGTH
from .patterns import PATTERNS, PREFIX_STABLE

JSON_FORMAT = "treesched-schedule"
JSON_VERSION = 1


def requested_positions_of(outputs, length: int) -> np.ndarray:
    """The positions an outputs request (``"all"``, ``"last"``, k) reads, ascending."""
    if outputs == "all":
        return np.arange(length, dtype=np.int64)
    count = 1 if outputs == "last" else outputs
    return np.arange(length - count, length, dtype=np.int64)


def _frozen(values, dtype=np.int32) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=dtype)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Level:
    """One batched step: ``out[k] = m(left[k], right[k])`` for every k.

    All merges of a level are independent; a backend runs them as one step
    over ``(batch × width)`` rows.  ``out`` is a contiguous id range.
    """

    index: int
    left: np.ndarray
    right: np.ndarray
    out: np.ndarray

    @property
    def width(self) -> int:
        return len(self.out)


class Schedule:
    """A compiled schedule.  Build one with :func:`treesched.compile`.

    Attributes (all int32 arrays are read-only):
      length: number of positions T.
      pattern: the prefix network it was built from.
      outputs: the request it answers (``"all"``, ``"last"`` or k).
      left, right: ``(num_nodes,)`` operand ids of each node, ``-1`` for leaves.
      level: ``(num_nodes,)`` 0 for leaves, else 1 + max(operand levels).
      start, stop: ``(num_nodes,)`` the half-open span each node covers.
      output_positions: ``(K,)`` the requested positions, ascending.
      output_nodes: ``(K,)`` the node whose span is ``0 .. position``.
      level_offsets: ``(depth + 2,)`` id boundaries: level l holds ids
        ``level_offsets[l] .. level_offsets[l+1]`` (level 0: the leaves).
    """

    def __init__(self, *, length, pattern, outputs, left, right, level, start, stop,
                 output_positions, output_nodes):
        set_ = object.__setattr__
        set_(self, "length", int(length))
        set_(self, "pattern", pattern)
        set_(self, "outputs", outputs)
        for name, values in (("left", left), ("right", right), ("level", level),
                             ("start", start), ("stop", stop),
                             ("output_positions", output_positions),
                             ("output_nodes", output_nodes)):
            set_(self, name, _frozen(values))
        depth = int(self.level.max()) if len(self.level) else 0
        offsets = np.searchsorted(self.level, np.arange(depth + 2), side="left")
        set_(self, "level_offsets", _frozen(offsets))

    def __setattr__(self, name, value):
        raise AttributeError("Schedule is immutable")

    # ------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return len(self.left)

    @property
    def num_leaves(self) -> int:
        return self.length

    @property
    def num_merges(self) -> int:
        return self.num_nodes - self.length

    @property
    def depth(self) -> int:
        """Number of merge levels (sequential steps a backend launches)."""
        return len(self.level_offsets) - 2

    @cached_property
    def widths(self) -> np.ndarray:
        """Merges per level, levels 1 .. depth."""
        return _frozen(np.diff(self.level_offsets)[1:], np.int64)

    @property
    def widest(self) -> int:
        return int(self.widths.max()) if self.depth else 0

    @property
    def prefix_stable(self) -> bool:
        """True when the tree answering t does not depend on the length."""
        return self.pattern in PREFIX_STABLE

    # ----------------------------------------------------------------- levels
    def level_step(self, index: int) -> Level:
        """The batched step of merge level ``index`` (1-based)."""
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TreeschedError(f"level must be an integer in 1..{self.depth}, got {index!r}")
        if not 1 <= index <= self.depth:
            raise TreeschedError(f"level {index} is outside 1..{self.depth}")
        first, last = self.level_offsets[index], self.level_offsets[index + 1]
        out = np.arange(first, last, dtype=np.int32)
        out.setflags(write=False)
        return Level(index, self.left[first:last], self.right[first:last], out)

    @cached_property
    def levels(self) -> tuple[Level, ...]:
        """Every merge level in execution order, as (left, right, out) arrays."""
        return tuple(self.level_step(index) for index in range(1, self.depth + 1))

    # -------------------------------------------------------------- structure
    def tree(self, node: int):
        """The nested ``(left, right)`` tree of a node id in ``0 .. num_nodes - 1``,
        leaves as positions (negative ids are refused, not counted from the end)."""
        if isinstance(node, bool) or not isinstance(node, numbers.Integral) \
                or not 0 <= node < self.num_nodes:
            raise TreeschedError(f"node must be an integer id in 0..{self.num_nodes - 1}, "
                                 f"got {node!r}")
        return self._tree(int(node))

    def _tree(self, node: int):
        if self.left[node] < 0:
            return int(node)
        return (self._tree(int(self.left[node])), self._tree(int(self.right[node])))

    def answer(self, position: int) -> int:
        """The node answering ``position`` (must be a requested position)."""
        hits = np.flatnonzero(self.output_positions == position)
        if not len(hits):
            raise TreeschedError(f"position {position} is not a requested output")
        return int(self.output_nodes[hits[0]])

    def validate(self) -> "Schedule":
        """Check every structural invariant; raise TreeschedError on the first."""
        n, length = self.num_nodes, self.length
        leaves = np.arange(length)
        merges = np.arange(length, n)
        l, r = self.left[length:], self.right[length:]
        checks = [
            (n >= length, "fewer nodes than leaves"),
            (np.all(self.left[:length] == -1) and np.all(self.right[:length] == -1),
             "leaves must have no operands"),
            (np.array_equal(self.start[:length], leaves)
             and np.array_equal(self.stop[:length], leaves + 1), "leaf spans"),
            (np.all((l >= 0) & (l < merges) & (r >= 0) & (r < merges)),
             "operands must precede the merge"),
        ]
        for ok, what in checks:
            if not ok:
                raise TreeschedError(f"invalid schedule: {what}")
        checks = [
            (np.all(self.level[:length] == 0), "leaf levels must be 0"),
            (np.all(self.level[length:] ==
                    np.maximum(self.level[l], self.level[r]) + 1),
             "a merge's level must be one more than its operands' highest"),
            (np.all(np.diff(self.level) >= 0), "nodes must be ordered by level"),
            (np.all(self.stop[l] == self.start[r]), "operand spans must be adjacent"),
            (np.all(self.start[length:] == self.start[l])
             and np.all(self.stop[length:] == self.stop[r]),
             "a merge's span must be its operands' spans joined"),
            (np.all(np.diff(self.output_positions) > 0), "output positions must ascend"),
            (len(self.output_nodes) == len(self.output_positions)
             and np.all(self.start[self.output_nodes] == 0)
             and np.all(self.stop[self.output_nodes] == self.output_positions + 1),
             "each output node must span 0..position"),
        ]
        for ok, what in checks:
            if not ok:
                raise TreeschedError(f"invalid schedule: {what}")
        return self

    # ------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Counts and per-level widths (``treesched.lowering.activation_memory``
        prices a pass over the schedule)."""
        return {
            "length": self.length,
            "pattern": self.pattern,
            "outputs": self.outputs,
            "nodes": self.num_nodes,
            "leaves": self.num_leaves,
            "merges": self.num_merges,
            "depth": self.depth,
            "widest_level": self.widest,
            "level_widths": [int(w) for w in self.widths],
        }

    # ---------------------------------------------------------------- exports
    def to_json(self, indent=None) -> str:
        """Serialize the whole DAG; :meth:`from_json` restores it exactly."""
        merges = slice(self.length, None)
        document = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "length": self.length,
            "pattern": self.pattern,
            "outputs": self.outputs,
            "merges": self.num_merges,
            "depth": self.depth,
            "widest_level": self.widest,
            # Per merge node (ids length, length+1, …): operands, level, span.
            "left": self.left[merges].tolist(),
            "right": self.right[merges].tolist(),
            "level": self.level[merges].tolist(),
            "start": self.start[merges].tolist(),
            "stop": self.stop[merges].tolist(),
            "output_positions": self.output_positions.tolist(),
            "output_nodes": self.output_nodes.tolist(),
        }
        return json.dumps(document, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        """Parse and validate a document written by :meth:`to_json`."""
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise TreeschedError(f"not a schedule JSON document: {error}") from None
        if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
            raise TreeschedError(f"not a schedule JSON document (format != {JSON_FORMAT!r})")
        if document.get("version") != JSON_VERSION:
            raise TreeschedError(f"unsupported schedule JSON version {document.get('version')!r}")
        try:
            length = document["length"]
            pattern, outputs = document["pattern"], document["outputs"]
            lists = {name: document[name] for name in ("left", "right", "level", "start",
                                                       "stop", "output_positions",
                                                       "output_nodes")}
        except KeyError as error:
            raise TreeschedError(f"malformed schedule JSON: no {error}") from None
        # JSON numbers only (no "9" strings, no bools); ids within int32,
        # which the schedule stores them in, so none wraps around
        if type(length) is not int or not 1 <= length <= MAX_LENGTH:
            raise TreeschedError(f"malformed schedule JSON: length must be an integer in "
                                 f"1..{MAX_LENGTH}, got {length!r}")
        if not isinstance(pattern, str) or pattern not in PATTERNS:
            raise TreeschedError(f"malformed schedule JSON: unknown pattern {pattern!r}")
        if not (outputs in ("all", "last") or (type(outputs) is int and 1 <= outputs <= length)):
            raise TreeschedError(f"malformed schedule JSON: outputs must be 'all', 'last' or "
                                 f"an integer in 1..{length}, got {outputs!r}")
        for name, values in lists.items():
            if not isinstance(values, list) or not all(
                    type(value) is int and -1 <= value < 2 ** 31 for value in values):
                raise TreeschedError(f"malformed schedule JSON: {name} must be a list of "
                                     f"integer node ids or positions")
        count = len(lists["left"])
        if any(len(lists[name]) != count for name in ("right", "level", "start", "stop")) \
                or len(lists["output_positions"]) != len(lists["output_nodes"]):
            raise TreeschedError("malformed schedule JSON: per-merge lists of different lengths")
        arrays = {name: np.asarray(values, np.int64) for name, values in lists.items()}
        positions, nodes = arrays["output_positions"], arrays["output_nodes"]
        leaves = np.arange(length)
        schedule = cls(
            length=length, pattern=pattern, outputs=outputs,
            left=np.concatenate([np.full(length, -1), arrays["left"]]),
            right=np.concatenate([np.full(length, -1), arrays["right"]]),
            level=np.concatenate([np.zeros(length, np.int64), arrays["level"]]),
            start=np.concatenate([leaves, arrays["start"]]),
            stop=np.concatenate([leaves + 1, arrays["stop"]]),
            output_positions=positions, output_nodes=nodes,
        )
        if np.any(nodes < 0) or np.any(nodes >= schedule.num_nodes):
            raise TreeschedError("invalid schedule: output node out of range")
        if np.any(positions < 0) or np.any(positions >= length):
            raise TreeschedError("invalid schedule: output position out of range")
        expected = requested_positions_of(outputs, length)
        if not np.array_equal(positions, expected):
            raise TreeschedError(f"invalid schedule: output positions do not match "
                                 f"outputs={outputs!r}")
        return schedule.validate()

    def label(self, node: int) -> str:
        """``x{t}`` for leaf t, ``{start}..{stop-1}`` for a merge: the span it covers."""
        start, stop = int(self.start[node]), int(self.stop[node])
        return f"x{start}" if node < self.length else f"{start}..{stop - 1}"

    def to_dot(self) -> str:
        """Graphviz DOT: one rank per level, edges operand → merge (l/r labelled)."""
        lines = [
            "digraph schedule {",
            f'  label="{self.pattern}, T={self.length}, '
            f'{self.num_merges} merges, depth {self.depth}";',
            "  rankdir=BT; node [shape=box, fontsize=10];",
        ]
        answered = {int(n): int(p) for p, n in
                    zip(self.output_positions, self.output_nodes)}
        for lvl in range(self.depth + 1):
            first, last = self.level_offsets[lvl], self.level_offsets[lvl + 1]
            members = " ".join(f"n{node};" for node in range(first, last))
            lines.append(f"  {{ rank=same; {members} }}")
        for node in range(self.num_nodes):
            style = ", style=bold" if node in answered else ""
            lines.append(f'  n{node} [label="{self.label(node)}"{style}];')
        for node in range(self.length, self.num_nodes):
            lines.append(f'  n{self.left[node]} -> n{node} [label="l"];')
            lines.append(f'  n{self.right[node]} -> n{node} [label="r"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_networkx(self):
        """A ``networkx.DiGraph``: edges operand → merge with ``side`` 'left'/'right'.

        Built only on request; the compile path never touches networkx.
        """
        import networkx as nx  # optional: only this method needs it

        graph = nx.DiGraph(length=self.length, pattern=self.pattern,
                           outputs=self.outputs, depth=self.depth)
        answered = {int(n): int(p) for p, n in
                    zip(self.output_positions, self.output_nodes)}
        for node in range(self.num_nodes):
            graph.add_node(node, level=int(self.level[node]),
                           span=(int(self.start[node]), int(self.stop[node])),
                           leaf=node < self.length, answers=answered.get(node))
        merges = range(self.length, self.num_nodes)
        graph.add_edges_from((int(self.left[m]), m, {"side": "left"}) for m in merges)
        graph.add_edges_from((int(self.right[m]), m, {"side": "right"}) for m in merges)
        return graph

    # ---------------------------------------------------------------- python
    def _key(self):
        return (self.length, self.pattern, self.outputs)

    def __eq__(self, other):
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._key() == other._key() and all(
            np.array_equal(getattr(self, name), getattr(other, name))
            for name in ("left", "right", "level", "start", "stop",
                         "output_positions", "output_nodes"))

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"Schedule(length={self.length}, pattern={self.pattern!r}, "
                f"outputs={self.outputs!r}, merges={self.num_merges}, depth={self.depth}, "
                f"widest={self.widest})")

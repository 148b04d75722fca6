"""Streaming inference: one token (or chunk) at a time, exactly the parallel forward.

Every pattern but ``reduce`` is prefix-stable (SPEC.md §2): the tree that
answers position ``t`` does not depend on what follows.  So when tokens
``p .. q-1`` arrive, the only new nodes are those whose span ends in ``p ..
q-1``; their operands were computed before, and a node can be dropped once
its last consumer has run.  A :class:`Stream` keeps exactly the nodes later
positions will read (its *frontier*) and runs each chunk's new nodes level
by level, in batched steps, through the executor and the model's backend:
``push`` (one token) and ``extend`` (a chunk; a long prompt costs about what
the parallel forward costs).

Each pattern is generated incrementally (the generators below), node for
node the schedule ``treesched.compile`` builds (``tests/test_streaming.py``
compares the trees); what each keeps:

* ``sequential``: the last output: 1 state, 1 merge per token;
* ``odd-even`` (the recursion of ``jax.lax.associative_scan``): level ``k``
  of the recursion keeps its pending even element and the last prefix of
  the level below: at most ``2 * ceil(log2 t) + 2`` states; ``2t - 2 -
  log2 t`` merges for ``t = 2^j`` tokens (below 2 per token amortized, at
  most ``log2 t + 1`` for one token);
* ``sklansky``: per stage the prefix of the current block's lower half: at
  most ``ceil(log2 t) + 1`` states; ``popcount(t)`` merges for token ``t``;
* ``kogge-stone``: stage ``d`` reads position ``t - d``: it keeps a window of
  the last ``d`` values per stage and the outputs up to the next power of
  two, about ``3t`` states in all: memory grows with ``t`` (the pattern's own
  cost, not the stream's), and ``floor(log2 t) + 1`` merges per token.

A stream is a value: ``copy()`` forks it (beam search, several samples from
one prompt), ``save(path)`` / :func:`load_stream` continue it in another
process (atomic, versioned, refused when the model's configuration or
weights differ).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import deque

import numpy as np

from .errors import TreeschedError
from .executor import Workspace, run_inference
from .fileio import read_npz, write_bytes
from .lowering import LevelPlan, Plan, workspace_layout
from .ops import head_forward
from .validation import positive_int

STREAM_FORMAT = "treesched-stream"
STREAM_VERSION = 1


# ================================================================ generators
# A generator is a pattern run one element at a time, symbolically: ``push(
# element, emit)`` returns the node answering the element's position, calling
# ``emit(left, right)`` (which returns a new node) for every merge it needs;
# ``live()`` lists the nodes later positions will read; ``state()`` /
# ``from_state()`` / ``renumbered(mapping)`` make it a value (forks, files).
class SequentialGenerator:
    """``out[t] = m(out[t-1], E[t])``."""

    def __init__(self):
        self.last = None

    def push(self, element, emit):
        self.last = element if self.last is None else emit(self.last, element)
        return self.last

    def live(self):
        return [] if self.last is None else [self.last]

    def state(self):
        return {"last": self.last}

    @classmethod
    def from_state(cls, state):
        generator = cls()
        generator.last = state["last"]
        return generator

    def renumbered(self, mapping):
        return self.from_state({"last": None if self.last is None else mapping[self.last]})


class OddEvenGenerator:
    """The recursion of SPEC.md §2, one element at a time.

    Recursion level ``k`` receives its ``n``-th element ``E[n]``: for even ``n``
    it answers ``E[0]`` or ``m(P[n/2 - 1], E[n])`` and keeps ``E[n]``
    pending; for odd ``n`` it hands ``m(E[n-1], E[n])`` to level ``k + 1``,
    whose answer ``P[(n-1)/2]`` is its own (and the left operand of its next
    even element).  Per level: ``[count, pending, last prefix of the level
    below]``.
    """

    def __init__(self):
        self.levels = []

    def push(self, element, emit, depth=0):
        if depth == len(self.levels):
            self.levels.append([0, None, None])
        level = self.levels[depth]
        count = level[0]
        level[0] += 1
        if count % 2 == 0:
            out = element if count == 0 else emit(level[2], element)
            level[1] = element
            level[2] = None   # read once: the next even element needs a newer prefix
            return out
        reduced = emit(level[1], element)
        level[1] = None
        out = self.push(reduced, emit, depth + 1)
        level[2] = out
        return out

    def live(self):
        return [node for _, pending, prefix in self.levels for node in (pending, prefix)
                if node is not None]

    def state(self):
        return {"levels": [list(level) for level in self.levels]}

    @classmethod
    def from_state(cls, state):
        generator = cls()
        generator.levels = [list(level) for level in state["levels"]]
        return generator

    def renumbered(self, mapping):
        def node(value):
            return None if value is None else mapping[value]
        return self.from_state({"levels": [[count, node(pending), node(prefix)]
                                           for count, pending, prefix in self.levels]})


class SklanskyGenerator:
    """Sklansky's network: at stage ``half`` a position in the upper half of a
    block of ``2 half`` takes the prefix of the lower half's last position
    (after the stages below ``half``) as its left operand."""

    def __init__(self):
        self.count = 0
        self.saved = {}   # half -> the lower half's last prefix, while its upper half runs

    def push(self, element, emit):
        t = self.count
        self.count += 1
        value = element
        half = 1
        while half <= t + 1:
            low = t & (2 * half - 1)
            if t & half:
                value = emit(self.saved[half], value)
                if low == 2 * half - 1:   # the block's last position: no one reads it again
                    del self.saved[half]
            elif low == half - 1:
                self.saved[half] = value
            half *= 2
        return value

    def live(self):
        return list(self.saved.values())

    def state(self):
        return {"count": self.count, "saved": [[half, node] for half, node in self.saved.items()]}

    @classmethod
    def from_state(cls, state):
        generator = cls()
        generator.count = state["count"]
        generator.saved = {int(half): node for half, node in state["saved"]}
        return generator

    def renumbered(self, mapping):
        return self.from_state({"count": self.count,
                                "saved": [[half, mapping[node]]
                                          for half, node in self.saved.items()]})


class KoggeStoneGenerator:
    """Kogge–Stone: at distance ``d``, ``x[t] = m(x[t-d], x[t])`` for ``t >= d``.

    Stage ``d`` keeps the last ``d`` values it was given (a window); it starts
    when ``t`` reaches ``d`` with the outputs of positions ``0 .. d-1``, which
    are therefore kept up to the next power of two.
    """

    def __init__(self):
        self.count = 0
        self.windows = {}     # d -> deque of the last d stage inputs
        self.outputs = []     # outputs of positions 0 .. (next power of two) - 1

    def push(self, element, emit):
        t = self.count
        self.count += 1
        value = element
        distance = 1
        while distance <= t:
            window = self.windows.get(distance)
            if window is None:   # t == distance: this stage starts now
                window = self.windows[distance] = deque(self.outputs[:distance])
            left = window.popleft()
            window.append(value)
            value = emit(left, value)
            distance *= 2
        # positions below the next stage's distance feed its first window
        if t < distance:
            self.outputs.append(value)
        if len(self.outputs) > distance:
            del self.outputs[distance:]
        return value

    def live(self):
        return [node for window in self.windows.values() for node in window] + self.outputs

    def state(self):
        return {"count": self.count, "outputs": list(self.outputs),
                "windows": [[d, list(window)] for d, window in self.windows.items()]}

    @classmethod
    def from_state(cls, state):
        generator = cls()
        generator.count = state["count"]
        generator.outputs = list(state["outputs"])
        generator.windows = {int(d): deque(window) for d, window in state["windows"]}
        return generator

    def renumbered(self, mapping):
        return self.from_state({"count": self.count,
                                "outputs": [mapping[node] for node in self.outputs],
                                "windows": [[d, [mapping[node] for node in window]]
                                            for d, window in self.windows.items()]})


GENERATORS = {"sequential": SequentialGenerator, "odd-even": OddEvenGenerator,
              "sklansky": SklanskyGenerator, "kogge-stone": KoggeStoneGenerator}


def generator_for(pattern: str):
    """A fresh incremental generator of ``pattern``; TreeschedError if it has none."""
    cls = GENERATORS.get(pattern)
    if cls is None:
        raise TreeschedError(
            f"pattern {pattern!r} cannot stream: it is not prefix-stable (the tree of a "
            f"position depends on what follows); streaming patterns: {', '.join(GENERATORS)}")
    return cls()


# ==================================================================== stream
#: rows (of ``batch x hidden`` per state) a stream's stores keep once grown:
#: room for odd-even's live states and one push's new nodes up to t ~ 2**20
STORE_ROWS_KEPT = 64


class Stream:
    """A model's running prefix: feed tokens with :meth:`push` / :meth:`extend`.

    Build one with ``model.stream(batch=B)``.  Outputs equal ``model.forward``
    on the whole sequence at every position (to float tolerance; the same
    kernels, another batching).

    Attributes:
      position: tokens consumed so far.
      merges: merge nodes computed so far (the schedule's own count).
      live_states: nodes kept for later positions (the frontier).
    """

    def __init__(self, model, batch: int):
        self.model = model
        self.batch = positive_int("batch", batch)
        self._generator = generator_for(model.pattern)
        self.position = 0
        self.merges = 0
        self._slots = {}          # node id -> slot of the stores
        self._next_id = 0
        self._capacity = 0
        self._stores = None       # one (capacity, B, H) array per state
        self._last_state = None
        self._buffers = {}        # the chunk workspace's other buffers, reused by shape

    # ---------------------------------------------------------------- info
    @property
    def live_states(self) -> int:
        return len(self._slots)

    @property
    def capacity(self) -> int:
        """Rows of the stores, in units of ``batch``: live states plus what the
        widest chunk so far needed at once."""
        return self._capacity

    def __repr__(self):
        return (f"Stream(position={self.position}, batch={self.batch}, "
                f"live_states={self.live_states}, pattern={self.model.pattern!r})")

    # --------------------------------------------------------------- feed
    def push(self, x_t, return_state: bool = False):
        """Consume one token ``x_t`` (B, D) -> logits (B, O) of its position
        (and, with ``return_state``, the state there: a tuple of (B, H))."""
        x = self.model._as_backend_array(x_t, "x_t")
        if x.ndim != 2:
            raise TreeschedError(f"x_t must have shape ({self.batch}, {self.model.input_size}), "
                                 f"got {tuple(x.shape)}")
        result = self.extend(x[:, None, :], return_state=return_state)
        if return_state:
            logits, states = result
            return logits[:, 0], tuple(state[:, 0] for state in states)
        return result[:, 0]

    def extend(self, x_chunk, return_state: bool = False):
        """Consume ``n`` tokens ``x_chunk`` (B, n, D) -> logits (B, n, O) of those
        positions (and, with ``return_state``, the states: a tuple of (B, n, H)).

        The chunk's new nodes run level by level, each level one batched step.
        """
        model = self.model
        x = model._as_backend_array(x_chunk, "x_chunk")
        expected = (self.batch, model.input_size)
        if x.ndim != 3 or (x.shape[0], x.shape[2]) != expected or x.shape[1] < 1:
            raise TreeschedError(f"x_chunk must have shape ({self.batch}, n, "
                                 f"{model.input_size}) with n >= 1, got {tuple(x.shape)}")
        if not bool(model.xp.isfinite(x).all()):
            raise TreeschedError("x_chunk contains NaN or infinity")
        x = x.astype(model.dtype, copy=False)
        generator_state, next_id = json.dumps(self._generator.state()), self._next_id
        # the head runs inside host_compute too: a multi-threaded BLAS call on
        # the host would leave its workers spinning against the backend's threads
        with model.backend.host_compute():
            try:
                plan, new_slots, merges = self._lower_chunk(x.shape[1])
                answers = run_inference(model.backend, model.cell, model.params, x, plan,
                                        self._workspace(plan, x.shape[2], x.dtype))
            except BaseException:
                # nothing was consumed: the pattern state goes back to where it was
                self._generator = type(self._generator).from_state(json.loads(generator_state))
                self._next_id = next_id
                raise
            self._slots = new_slots
            self.position += x.shape[1]
            self.merges += merges
            self._last_state = tuple(state[:, -1].copy() for state in answers)
            self._compact()
            h = answers[0]
            logits, _ = head_forward(model.params, h if not return_state else h.copy(),
                                     need_cache=False, overwrite_input=True)
        return (logits, answers) if return_state else logits

    def state(self):
        """The state at the last position consumed: a tuple of fresh (B, H) arrays."""
        if self._last_state is None:
            raise TreeschedError("the stream has consumed no token yet")
        return tuple(state.copy() for state in self._last_state)

    # ----------------------------------------------------------- lowering
    def _lower_chunk(self, length):
        """The chunk's plan: new node ids, their levels and slots -> (Plan, slots, merges)."""
        levels = {node: 0 for node in self._slots}     # stored nodes count as level 0
        leaves, answers, merges = [], [], []

        def new_id():
            self._next_id += 1
            return self._next_id - 1

        def emit(left, right):
            node = new_id()
            levels[node] = max(levels[left], levels[right]) + 1
            merges.append((node, left, right))
            return node

        for _ in range(length):
            leaf = new_id()
            levels[leaf] = 0
            leaves.append(leaf)
            answers.append(self._generator.push(leaf, emit))
        keep = set(self._generator.live())
        # when a node's slot is free again: after the last level reading it
        last_use = {}
        for node, left, right in merges:
            for operand in (left, right):
                last_use[operand] = max(last_use.get(operand, 0), levels[node])
        depth = max((levels[node] for node, _, _ in merges), default=0)
        forever = depth + 1
        for node in keep:
            last_use[node] = forever
        answer_of = {node: k for k, node in enumerate(answers)}
        by_level = [[] for _ in range(depth + 1)]
        by_level[0] = leaves
        for node, _, _ in merges:
            by_level[levels[node]].append(node)
        assigned = self._assign(by_level, last_use, forever)
        self._ensure_capacity(assigned["capacity"])
        table = assigned["slot"]
        leaf_slots = np.array([table[leaf] for leaf in leaves], np.int64)
        leaf_answer = np.array([answer_of.get(leaf, -1) for leaf in leaves], np.int64)
        plan_levels = []
        widest = 0
        operands = {node: (left, right) for node, left, right in merges}
        for level in range(1, depth + 1):
            nodes = by_level[level]
            widest = max(widest, len(nodes))
            table_left = np.array([table[operands[n][0]] for n in nodes], np.int64)
            table_right = np.array([table[operands[n][1]] for n in nodes], np.int64)
            plan_levels.append(LevelPlan(
                index=level, first=0, stop=len(nodes), merge_start=0,
                left=_frozen(table_left), right=_frozen(table_right),
                out=_frozen([table[n] for n in nodes]),
                answer=_frozen([answer_of.get(n, -1) for n in nodes]),
                targets=_EMPTY, consumer_ptr=_EMPTY, consumers=_EMPTY,
                first_gradient=_frozen([], bool)))
        plan = Plan(schedule=None, mode="inference", length=length, num_merges=len(merges),
                    widest=widest, num_answers=length, num_locations=self._capacity,
                    leaves=_frozen(leaf_slots), leaf_answer=_frozen(leaf_answer),
                    answer_locations=_EMPTY, levels=tuple(plan_levels),
                    local=_frozen(np.arange(max(widest, 1))), unreached=_EMPTY)
        survivors = {node: table[node] for node in keep}
        return plan, survivors, len(merges)

    def _assign(self, by_level, last_use, forever):
        """Slots level by level: a node holds its slot from its level to the end of
        the last level reading it (released only after a level has run, so one
        level's reads and writes never alias); returns every node's slot."""
        slot = dict(self._slots)
        free = []
        for node in list(slot):
            if node not in last_use:   # stored, but nobody reads it any more
                free.append(slot[node])
        free.sort(reverse=True)
        capacity = max(slot.values(), default=-1) + 1
        depth = len(by_level) - 1
        releases = [[] for _ in range(depth + 1)]
        for node, level in last_use.items():
            if level < forever:
                releases[level].append(node)
        for level in range(depth + 1):
            for node in by_level[level]:
                if free:
                    slot[node] = free.pop()
                else:
                    slot[node] = capacity
                    capacity += 1
                if node not in last_use:   # answered, read by no later merge
                    releases[level].append(node)
            for node in releases[level]:
                free.append(slot[node])
        return {"slot": slot, "capacity": capacity}

    # ------------------------------------------------------------- memory
    def _new_stores(self, capacity, dtype):
        backend = self.model.backend
        hidden = self.model.hidden_size
        return [backend.empty((capacity, self.batch, hidden), dtype)
                for _ in self.model.cell.state_names]

    def _ensure_capacity(self, needed):
        if self._stores is not None and needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, 8)
        stores = self._new_stores(capacity, np.dtype(self.model.dtype))
        if self._stores is not None and self._slots:
            rows = self.model.xp.asarray(np.fromiter(self._slots.values(), np.int64))
            for new, old in zip(stores, self._stores):
                new[rows] = old[rows]
        self._stores, self._capacity = stores, capacity

    def _compact(self):
        """Give back what a wide chunk needed: the stores shrink to the live
        states (and some room) when they are much larger.  They never shrink
        below ``STORE_ROWS_KEPT`` rows: a token-by-token stream then keeps its
        stores for good (a push needs the live states plus about log2 t new
        nodes), instead of reallocating them every few pushes."""
        live = len(self._slots)
        if self._capacity <= max(STORE_ROWS_KEPT, 4 * live):
            return
        capacity = max(STORE_ROWS_KEPT, 2 * live)
        stores = self._new_stores(capacity, np.dtype(self.model.dtype))
        nodes = list(self._slots)
        if nodes:
            xp = self.model.xp
            old_rows = xp.asarray(np.array([self._slots[n] for n in nodes], np.int64))
            for new, old in zip(stores, self._stores):
                new[:len(nodes)] = old[old_rows]
        self._slots = {node: k for k, node in enumerate(nodes)}
        self._stores, self._capacity = stores, capacity
        self._buffers.clear()

    def _workspace(self, plan, inputs, dtype):
        """The chunk's workspace: the stream's stores and reused scratch buffers."""
        layout = workspace_layout(plan, self.model.cell, self.batch, inputs,
                                  self.model.hidden_size)
        buffers = dict(zip(self.model.cell.state_names, self._stores))
        for name, shape in layout.items():
            if name in buffers:
                continue
            buffer = self._buffers.get(name)
            if buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype:
                buffer = self._buffers[name] = self.model.backend.empty(shape, dtype)
            buffers[name] = buffer
        workspace = Workspace(None, plan, buffers, self.model.backend)
        return workspace

    # --------------------------------------------------------------- fork
    def copy(self) -> "Stream":
        """An independent stream at the same position (a fork)."""
        other = Stream(self.model, self.batch)
        other._generator = type(self._generator).from_state(
            json.loads(json.dumps(self._generator.state())))
        other.position, other.merges = self.position, self.merges
        other._next_id = self._next_id
        other._slots = dict(self._slots)
        other._capacity = self._capacity
        other._stores = None if self._stores is None else [s.copy() for s in self._stores]
        other._last_state = (None if self._last_state is None
                             else tuple(s.copy() for s in self._last_state))
        return other

    fork = copy

    # --------------------------------------------------------- save, load
    def save(self, path) -> None:
        """Write the stream to one ``.npz``, atomically: its position, pattern
        state, live states and a fingerprint of the model it belongs to."""
        model = self.model
        nodes = sorted(self._slots)
        mapping = {node: k for k, node in enumerate(nodes)}
        header = {"format": STREAM_FORMAT, "version": STREAM_VERSION,
                  "model": model_fingerprint(model), "batch": self.batch,
                  "position": self.position, "merges": self.merges,
                  "generator": self._generator.renumbered(mapping).state()}
        arrays = {"__header__": np.array(json.dumps(header))}
        if nodes:
            rows = model.xp.asarray(np.array([self._slots[n] for n in nodes], np.int64))
            for name, store in zip(model.cell.state_names, self._stores):
                arrays[f"live {name}"] = model.backend.to_numpy(store[rows])
        if self._last_state is not None:
            for name, value in zip(model.cell.state_names, self._last_state):
                arrays[f"last {name}"] = model.backend.to_numpy(value)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(path, buffer.getvalue())


def model_fingerprint(model) -> dict:
    """What a saved stream must match: the configuration and a hash of the weights."""
    digest = hashlib.sha256()
    for name, value in sorted(model.params.numpy().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    config = {key: model.config[key] for key in ("input_size", "hidden_size", "output_size",
                                                 "num_layers", "cell", "pattern", "dtype")}
    return {"config": config, "weights_sha256": digest.hexdigest()}


def load_stream(path, model) -> Stream:
    """The stream saved at ``path``, continued on ``model`` (which must be the
    model it was saved from: same configuration and weights)."""
    contents = read_npz(path, "stream")
    try:
        header = json.loads(str(contents.pop("__header__")))
    except (KeyError, json.JSONDecodeError):
        raise TreeschedError(f"stream {path} has no header: not written by Stream.save") from None
    if not isinstance(header, dict) or header.get("format") != STREAM_FORMAT:
        raise TreeschedError(f"{path} is not a treesched stream")
    if header.get("version") != STREAM_VERSION:
        raise TreeschedError(f"stream {path} has unsupported version {header.get('version')!r}")
    want = model_fingerprint(model)
    saved = header.get("model", {})
    if saved.get("config") != want["config"]:
        raise TreeschedError(f"stream {path} belongs to another model: saved with "
                             f"{saved.get('config')}, this model is {want['config']}")
    if saved.get("weights_sha256") != want["weights_sha256"]:
        raise TreeschedError(f"stream {path} was saved with other weights than this model's")
    try:
        stream = Stream(model, int(header["batch"]))
        stream.position = int(header["position"])
        stream.merges = int(header["merges"])
        stream._generator = type(stream._generator).from_state(header["generator"])
        names = model.cell.state_names
        live = [contents.get(f"live {name}") for name in names]
        count = 0 if live[0] is None else live[0].shape[0]
        stream._slots = {node: node for node in range(count)}
        stream._next_id = count
        if count:
            stream._ensure_capacity(count)
            for store, values in zip(stream._stores, live):
                if values is None or values.shape != (count, stream.batch, model.hidden_size):
                    raise TreeschedError(f"stream {path}: live states of the wrong shape")
                store[:count] = model._as_backend_array(values, "stream state")
        if f"last {names[0]}" in contents:
            stream._last_state = tuple(model._as_backend_array(contents[f"last {name}"],
                                                               "stream state")
                                       for name in names)
        referenced = set(stream._generator.live())
        if referenced != set(stream._slots):
            raise TreeschedError(f"stream {path} is inconsistent: its pattern state and its "
                                 "live states do not match")
    except (KeyError, TypeError, ValueError) as error:
        raise TreeschedError(f"stream {path} is corrupt: {error}") from None
    return stream


def _frozen(values, dtype=np.int64):
    array = np.ascontiguousarray(values, dtype=dtype)
    array.setflags(write=False)
    return array


_EMPTY = _frozen([])


def expected_live_states(pattern: str, position: int) -> int:
    """An upper bound of :attr:`Stream.live_states` after ``position`` tokens."""
    if position < 1:
        return 0
    bits = math.ceil(math.log2(position + 1))
    return {"sequential": 1, "odd-even": 2 * bits + 2, "sklansky": bits + 1,
            "kogge-stone": 3 * position + 2}[pattern]


__all__ = ["Stream", "load_stream", "model_fingerprint", "generator_for", "GENERATORS",
           "expected_live_states", "STREAM_FORMAT", "STREAM_VERSION"]

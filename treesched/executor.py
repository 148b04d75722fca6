"""The executor: the loop that runs a plan, written once for every backend.

``Backend.encode`` runs the leaves and then every merge level of a
:class:`~treesched.lowering.Plan`; ``Backend.encode_backward`` walks the
levels in reverse.  Both are written here, against a small set of
*primitives* that each backend implements (``backends/numpy_backend.py``,
``numba_backend.py``, ``cupy_backend.py``) and that know nothing of the
model: allocation and staging, the pair gather, a gated or affine layer's
forward (its GEMM included, so a backend may fuse it), the cell and hidden
recomputation, a gated layer's backward, the GEMMs of the backward, the
deterministic accumulation of operand gradients and the answer copies.
The cell says which layers run (``ops.cell.Layer``); the plan says on which
rows.

Data layout (every primitive's contract; docs/architecture.md):

* a *store* is ``(locations, batch, hidden)``: node-major (training: one
  location per node) or slot-major (inference);
* a level's rows are a ``(width * batch, columns)`` matrix, row ``r = j *
  batch + b`` for merge ``j`` and batch element ``b``; node ids of a level
  are contiguous, so its rows of a store are one contiguous block;
* a per-level buffer read as a store is ``(width, batch, hidden)``, indexed
  with the plan's ``local`` locations ``0 .. width - 1``.

What a training pass keeps per merge is only each layer's activations (an
affine layer's output); the layer inputs (the gathered pair, the hidden
state between layers) and the cells between layers are recomputed in the
backward from the activations and the stores: the memory of a pass is
``lowering.workspace_layout``.

Workspaces: all buffers of one (mode, plan, batch, sizes, dtype, cell) are
allocated once and reused by later calls (an LRU per backend, bounded in
entries and bytes).  A training forward's workspace belongs to its tape
until the tape's backward has run; a forward meanwhile gets a fresh one.

Tapes: ``encode(..., need_grad=True)`` returns a :class:`Tape`.  Its backward
runs once (the activations become the pre-activation gradients in place):
a second ``encode_backward`` on the same tape raises ``TreeschedError``, as
does a tape from another backend or for another cell.

Arrays handed to a caller are the caller's: results are fresh arrays, or
pooled arrays that nothing references any more (:class:`ReusedArrays`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import weakref
from collections import OrderedDict

import numpy as np

from .errors import TreeschedError
from .lowering import lower, workspace_layout
from .validation import positive_int

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ================================================================ workspaces
class ReusedArrays:
    """Arrays handed out again only once nothing references them any more.

    Results must be fresh to the caller, but allocating them per call is slow
    on the CPU (first-touch page faults cost more than the copy into them).
    CPython's reference count says whether the array handed out last time is
    still referenced anywhere (a view holds its base): if not, overwriting it
    is unobservable and it is handed out again; if so, a new one replaces it.
    """

    def __init__(self, allocate):
        self._allocate = allocate
        self._arrays: dict = {}

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self._arrays.values())

    def get(self, key, shape, dtype):
        array = self._arrays.get(key)
        # references: the dict, the local name, getrefcount's argument
        if (array is None or tuple(array.shape) != tuple(shape) or array.dtype != dtype
                or sys.getrefcount(array) > 3):
            array = self._allocate(tuple(shape), dtype)
            self._arrays[key] = array
        return array


class Workspace:
    """The buffers of one (mode, plan, batch, sizes, dtype, cell), and what a
    backend keeps with them (``launch_state``: e.g. captured CUDA graphs)."""

    def __init__(self, key, plan, buffers: dict, backend):
        self.key = key
        self.plan = plan
        self.buffers = buffers
        self.backend = backend
        self.tape_ref = None
        self.launch_state: dict = {}
        self.results = ReusedArrays(backend.empty)

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers.values()) + self.results.nbytes

    def __getitem__(self, name):
        return self.buffers[name]

    def buffer(self, name: str, shape, dtype, fill=None):
        """Buffer ``name``, allocated on first use (staged inputs, gradients, dx,
        a backend's scratch); ``fill``: the value a new buffer starts with."""
        array = self.buffers.get(name)
        if array is None or tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            array = self.backend.empty(tuple(shape), dtype)
            if fill is not None:
                array.fill(fill)
            self.buffers[name] = array
        return array

    def busy(self) -> bool:
        tape = self.tape_ref() if self.tape_ref is not None else None
        return tape is not None and not tape.consumed


class WorkspaceCache:
    """LRU of workspaces, bounded in entries and bytes (the newest always stays).

    ``allocations`` counts workspaces ever allocated, ``hits`` reuses: a
    steady training loop allocates once per distinct shape and then only hits.
    """

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30):
        self.max_entries = positive_int("max_workspaces", max_entries)
        self.max_bytes = positive_int("max_workspace_bytes", max_bytes)
        self.entries: OrderedDict = OrderedDict()
        self.allocations = 0
        self.hits = 0
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes for ws in self.entries.values())

    def get(self, key, make):
        with self.lock:
            ws = self.entries.get(key)
            if ws is not None and not ws.busy():
                self.entries.move_to_end(key)
                self.hits += 1
                return ws
            shared = ws is None
        ws = make()
        with self.lock:
            self.allocations += 1
            if shared:  # a busy entry keeps its place; the extra one is private
                self.entries[key] = ws
                self._evict()
        return ws

    def _evict(self):
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries
                                         or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self):
        with self.lock:
            self.entries.clear()

    def stats(self) -> dict:
        return {"workspaces": len(self.entries), "workspace_bytes": self.nbytes,
                "allocations": self.allocations, "hits": self.hits}


class Tape:
    """What ``encode_backward`` needs from one training forward.  Single use."""

    def __init__(self, backend, cell, workspace: Workspace, batch, inputs, hidden, dtype):
        self.backend = backend
        self.cell = cell
        self.layers = cell.layers
        self.workspace = workspace
        self.plan = workspace.plan
        self.schedule = workspace.plan.schedule
        self.batch, self.inputs, self.hidden, self.dtype = batch, inputs, hidden, dtype
        self.consumed = False
        workspace.tape_ref = weakref.ref(self)


# =================================================================== backend
class Backend:
    """A backend: the primitives below, run by :meth:`encode` / :meth:`encode_backward`.

    Subclasses set ``name`` and ``xp`` (the array module), and ``captures``
    when they replay a recorded launch sequence (every input a pass reads
    must then live in a workspace buffer: :meth:`stage` copies it there).
    Index arrays given to primitives are what :meth:`index` made of the
    plan's int64 tables.  Primitives never allocate: every buffer comes from
    the workspace.  ``batch`` is the batch size B; ``R`` a level's rows.
    """

    name = "abstract"
    xp = np
    captures = False

    def __init__(self, max_workspaces: int = 8, max_workspace_bytes: int = 4 << 30):
        self.workspaces = WorkspaceCache(max_workspaces, max_workspace_bytes)
        self._device_plans: OrderedDict = OrderedDict()
        # the workspace whose pass runs on this thread (see scratch())
        self._running = threading.local()

    def device_key(self):
        """Which device the current arrays live on (part of every cache key:
        buffers and index tables of one GPU are never used on another)."""
        return None

    def scratch(self, name: str, shape, dtype, fill=None):
        """A private buffer of the workspace whose pass runs on this thread
        (GEMM partials, a vector of ones), allocated on first use and kept with
        it; ``fill``: the value a new buffer starts with.  A pass's first run
        is never captured, so the allocation happens eagerly."""
        workspace = getattr(self._running, "workspace", None)
        if workspace is None:
            raise TreeschedError("a primitive's scratch exists only while a pass runs")
        return workspace.buffer(name, shape, dtype, fill)

    # ----------------------------------------------------- memory, staging
    def empty(self, shape, dtype):
        """An uninitialised array (every primitive writes before it reads)."""
        raise NotImplementedError

    def index(self, table: np.ndarray):
        """A plan table (host int64) as the index array the kernels take."""
        raise NotImplementedError

    def load_rows(self, x, rows) -> None:
        """``rows[t * B + b] = x[b, t]``: x (B, T, D), any strides; rows (T*B, D)."""
        raise NotImplementedError

    def stage(self, workspace: Workspace, name: str, value):
        """``value`` where a pass reads it: a copy in buffer ``name`` when the
        backend captures launches, else ``value`` itself (made contiguous)."""
        raise NotImplementedError

    def copy(self, array):
        """A fresh copy (results taken out of a captured buffer)."""
        return array.copy()

    def launch(self, workspace: Workspace, variant, program) -> None:
        """Run ``program`` (primitive calls only) for ``variant`` of this
        workspace.  ``variant`` None: a one-off program (a chunk of a stream),
        run once and never recorded."""
        program()

    def projects_in_kernel(self, inputs: int) -> bool:
        """True when :meth:`gated_forward` computes ``X @ weight`` inside its
        kernel for ``X`` of this width and, without ``keep``, never touches
        ``act``: the executor then runs the leaves in one call instead of in
        chunks of the scratch."""
        return False

    def host_compute(self):
        """A context for the caller's own array work around the passes (the
        model's head and loss): a backend may keep its threading settings
        there too, so that work does not leave threads spinning into the next
        pass."""
        return contextlib.nullcontext()

    def check_input(self, x):
        """``x`` as this backend's array (TreeschedError if it cannot be)."""
        if not isinstance(x, self.xp.ndarray):
            raise TreeschedError(f"x must be a {self.xp.__name__} array, got {type(x).__name__}")
        return x

    # ------------------------------------------------------------ forward
    def gather_pairs(self, store, left, right, out) -> None:
        """``out[j*B + b] = [store[left[j], b] | store[right[j], b]]``: out (R, 2H)."""
        raise NotImplementedError

    def gated_forward(self, X, weight, bias, act, batch, cells, h_out, c_out, out_index,
                      answers=None, keep=True) -> None:
        """One gated layer (``ops.gated``) over the rows of ``X``.

        ``A = X @ weight + bias``; ``act`` (R, (3+N) H) receives the
        activations ``[σ(a_i), tanh(a_g), σ(a_o), σ(a_f1..N)]`` if ``keep``
        (the backward's cache), else is scratch.  ``cells``: N pairs
        ``(store, index)``, cell ``k`` of row ``(j, b)`` is ``store[index[j],
        b]``.  ``c = i g + Σ f_k c_k`` and ``h = o tanh(c)`` go to
        ``h_out[out_index[j], b]`` / ``c_out[...]`` (either may be None; a
        store may be a cell source of the same call only row for row).
        ``answers = (ans_h, ans_c, ans_index)``: where ``ans_index[j] >= 0``
        also ``ans_h[b, ans_index[j]] = h`` (and ``c``).
        """
        raise NotImplementedError

    def affine_forward(self, X, weight, bias, out, batch, relu, h_out=None, out_index=None,
                       answers=None) -> None:
        """``out = X @ weight + bias`` (rectified if ``relu``), out (R, H); also
        ``h_out[out_index[j], b]`` and ``answers = (ans_h, ans_index)`` as in
        :meth:`gated_forward`."""
        raise NotImplementedError

    def copy_answers(self, store, locations, out) -> None:
        """``out[b, k] = store[locations[k], b]``: out (B, K, H)."""
        raise NotImplementedError

    def zero(self, array) -> None:
        """``array[...] = 0``."""
        raise NotImplementedError

    # ----------------------------------------------------------- backward
    def scatter_answers(self, values, locations, store) -> None:
        """``store[locations[k], b] = values[b, k]`` (zero where ``values`` is None)."""
        raise NotImplementedError

    def zero_locations(self, store, locations) -> None:
        """``store[locations] = 0``."""
        raise NotImplementedError

    def gated_cells(self, act, batch, cells, c_out) -> None:
        """``c_out = i g + Σ f_k c_k`` from activations (the forward's c, recomputed)."""
        raise NotImplementedError

    def hidden_from_cells(self, act, c, h_out) -> None:
        """``h_out = o tanh(c)``, ``o`` the output-gate block of ``act``: a layer's h."""
        raise NotImplementedError

    def gated_backward(self, act, c, batch, cells, dh, dc, dcells) -> None:
        """Backward of one gated layer: ``act`` becomes ``dA`` (in place).

        ``c`` (R, H) the layer's cell output; ``cells`` as in the forward;
        ``dh`` (R, H) and ``dc`` (R, H or None: zero) the gradients reaching
        h and c; ``dcells[k]`` (R, H) receives the gradient of gated cell k.
        """
        raise NotImplementedError

    def relu_backward(self, dh, h) -> None:
        """``dh *= [h > 0]`` in place (``dh`` becomes the pre-activation gradient)."""
        raise NotImplementedError

    def input_gradient(self, dA, weight, out) -> None:
        """``out = dA @ weight^T``."""
        raise NotImplementedError

    def weight_gradient(self, X, dA, grad_weight_t, grad_bias, accumulate) -> None:
        """``grad_weight_t = dA^T X`` and ``grad_bias = Σ_r dA`` (``+=`` if ``accumulate``),
        summed in a fixed order."""
        raise NotImplementedError

    def accumulate_operands(self, level, d_pair, batch, dh_store, dc_pair=None,
                            dc_store=None) -> None:
        """The operand gradients of a level into the node gradient stores.

        ``d_pair`` (R, 2H) is ``[dh_l | dh_r]`` per merge row, ``dc_pair`` the
        rows ``(dc_l, dc_r)`` (None: zero).  For each of the level's
        ``targets`` in the consumer order of the plan, ``store[t, b] =
        Σ consumers`` if ``first_gradient`` else ``store[t, b] + Σ``.  No
        atomics: the result does not depend on timing.
        """
        raise NotImplementedError

    # ------------------------------------------------------------ public
    @staticmethod
    def why_unavailable() -> str | None:
        """None if this backend can run here, else the reason it cannot."""
        return None

    def to_numpy(self, array):
        return np.asarray(array)

    def asarray(self, array, dtype=None):
        return self.xp.asarray(array, dtype=dtype)

    def clear(self) -> None:
        """Free every idle workspace (live tapes keep theirs)."""
        self.workspaces.clear()

    def stats(self) -> dict:
        return self.workspaces.stats()

    def encode(self, cell, params, x, schedule, need_grad: bool):
        """Run the leaves and every merge level of ``schedule``.

        Args:
          cell: an ``ops.Cell``; params: its parameters (SPEC names).
          x: ``(B, T, D)`` float32 / float64, ``T == schedule.length``.
        Returns:
          ``(states, tape)``: ``states`` a tuple (one per ``cell.state_names``)
          of fresh ``(B, K, H)`` arrays, the answering node of every requested
          output position; ``tape`` None unless ``need_grad``.
        """
        return encode(self, cell, params, x, schedule, need_grad)

    def encode_backward(self, cell, params, tape, dstates, need_dx=False):
        """Gradients of ``sum(states * dstates)`` w.r.t. the cell parameters.

        Args:
          dstates: one ``(B, K, H)`` array (or None: zero) per state.
        Returns:
          ``(grads, dx)``: a dict of fresh arrays for every cell parameter, and
          ``dx`` (B, T, D) if ``need_dx`` else None.
        """
        return encode_backward(self, cell, params, tape, dstates, need_dx)

    # ------------------------------------------------------------ helpers
    def device_plan(self, plan):
        """The plan with every table converted by :meth:`index` (cached)."""
        key = (id(plan), self.device_key())
        hit = self._device_plans.get(key)
        if hit is not None and hit[0] is plan:
            self._device_plans.move_to_end(key)
            return hit[1]
        converted = self.convert_plan(plan)
        self._device_plans[key] = (plan, converted)
        while len(self._device_plans) > 256:
            self._device_plans.popitem(last=False)
        return converted

    def convert_plan(self, plan):
        """The plan with every table converted by :meth:`index` (not cached)."""
        tables = {name: self.index(getattr(plan, name))
                  for name in ("leaves", "leaf_answer", "answer_locations", "local",
                               "unreached")}
        levels = tuple(dataclasses.replace(level, **{
            name: self.index(getattr(level, name))
            for name in ("left", "right", "out", "answer", "targets", "consumer_ptr",
                         "consumers", "first_gradient")}) for level in plan.levels)
        return dataclasses.replace(plan, levels=levels, **tables)


# ================================================================== passes
def _check_x(backend, cell, params, x, schedule):
    x = backend.check_input(x)
    if x.ndim != 3:
        raise TreeschedError(f"x must be a 3-D array (batch, length, features), got shape "
                             f"{tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TreeschedError(f"x must be float32 or float64, got {x.dtype}")
    batch, length, inputs = x.shape
    if length != schedule.length:
        raise TreeschedError(f"x has length {length} but the schedule is for {schedule.length}")
    if batch < 1 or inputs < 1:
        raise TreeschedError(f"x must hold at least one sequence and one feature, got "
                             f"{tuple(x.shape)}")
    hidden = cell.check_params(params, inputs, x.dtype)
    return x, batch, inputs, hidden


def _workspace(backend, mode, cell, schedule, batch, inputs, hidden, dtype):
    plan = lower(schedule, mode)
    key = (mode, schedule, batch, inputs, hidden, np.dtype(dtype).str, cell.layers,
           backend.device_key())

    def make():
        layout = workspace_layout(plan, cell, batch, inputs, hidden)
        buffers = {name: backend.empty(shape, dtype) for name, shape in layout.items()}
        ws = Workspace(key, plan, buffers, backend)
        # the workspace holds its own index tables: a captured launch reads
        # them for as long as the workspace lives
        ws.device_plan = backend.device_plan(plan)
        if mode == "training" and len(plan.unreached):
            # no gradient ever reaches these nodes: zero once, never written
            for name in cell.state_names:
                backend.zero_locations(ws[f"d{name}"], ws.device_plan.unreached)
        return ws

    return plan, backend.workspaces.get(key, make)


def _launch(backend, ws, variant, program):
    """``backend.launch`` with ``ws`` as the thread's running workspace (scratch)."""
    backend._running.workspace = ws
    try:
        backend.launch(ws, variant, program)
    finally:
        backend._running.workspace = None


def _weights(backend, ws, cell, params):
    """Every layer's (weight, bias), staged where a pass reads them."""
    return {layer.name: (backend.stage(ws, layer.weight, params[layer.weight]),
                         backend.stage(ws, layer.bias, params[layer.bias]))
            for layer in cell.layers}


def _leaf_chunks(scratch, length, batch, columns, whole=False):
    """``(t0, t1, rows)``: positions in chunks whose ``(rows, columns)`` block
    fits the flat ``scratch`` (the leaves are never held all at once), or,
    ``whole``, every position at once with an empty ``rows`` (a backend that
    needs no activation buffer)."""
    flat = scratch.reshape(-1)
    if whole:
        yield 0, length, flat[:0].reshape(0, columns)
        return
    step = max(1, min(length, flat.size // (columns * batch)))
    for t0 in range(0, length, step):
        t1 = min(length, t0 + step)
        yield t0, t1, flat[:(t1 - t0) * batch * columns].reshape((t1 - t0) * batch, columns)


def _as_store(rows, width, batch):
    """A per-level ``(R, H)`` buffer read as a ``(width, batch, H)`` store."""
    return rows.reshape(width, batch, rows.shape[-1])


def _store_rows(store, first, stop):
    """Rows of locations ``first .. stop`` of a store, as ``((stop-first)*B, H)``."""
    return store[first:stop].reshape(-1, store.shape[-1])


def encode(backend, cell, params, x, schedule, need_grad: bool):
    x, batch, inputs, hidden = _check_x(backend, cell, params, x, schedule)
    mode = "training" if need_grad else "inference"
    plan, ws = _workspace(backend, mode, cell, schedule, batch, inputs, hidden, x.dtype)
    device = ws.device_plan
    backend.load_rows(x, ws["x_rows"])
    weights = _weights(backend, ws, cell, params)
    shape = (batch, plan.num_answers, hidden)
    if backend.captures:
        answers = [ws.buffer(f"answer {name}", shape, x.dtype) for name in cell.state_names]
    else:
        answers = [ws.results.get(k, shape, x.dtype) for k in range(len(cell.state_names))]
    _launch(backend, ws, (mode, "forward"),
            lambda: _forward(backend, cell, device, ws, weights, batch, answers))
    states = tuple(backend.copy(a) for a in answers) if backend.captures else tuple(answers)
    if not need_grad:
        return states, None
    return states, Tape(backend, cell, ws, batch, inputs, hidden, x.dtype)


def run_inference(backend, cell, params, x, plan, ws):
    """One inference pass of ``plan`` (mode "inference") on a workspace the
    caller made, whose ``h`` (and ``c``) stores it keeps between calls: a
    chunk of a stream (``treesched.streaming``).  ``x`` is ``(B, plan.length,
    D)``; returns the answers, one fresh ``(B, plan.num_answers, H)`` array
    per state.  The program runs once, never recorded (variant None)."""
    x = backend.check_input(x)
    if x.ndim != 3 or x.shape[1] != plan.length or x.dtype not in FLOAT_DTYPES:
        raise TreeschedError(f"x must be a float array of shape (batch, {plan.length}, "
                             f"features), got {getattr(x, 'shape', None)}")
    batch, _, inputs = x.shape
    hidden = cell.check_params(params, inputs, x.dtype)
    device = backend.convert_plan(plan)
    backend.load_rows(x, ws["x_rows"])
    weights = _weights(backend, ws, cell, params)
    shape = (batch, plan.num_answers, hidden)
    answers = [ws.buffer(f"answer {name}", shape, x.dtype) for name in cell.state_names]
    _launch(backend, ws, None, lambda: _forward(backend, cell, device, ws, weights, batch,
                                                answers))
    return tuple(backend.copy(a) for a in answers)


def _forward(backend, cell, plan, ws, weights, batch, answers):
    """The leaves, then every level: one program for both modes.

    Training keeps each layer's activations per merge (``act{k}``; an affine
    layer's output) and writes node stores; inference writes slots, keeps
    nothing (the activations go to the scratch ``act``, the cells between
    layers are updated in place) and writes each answer as it is produced.
    """
    B, T = batch, plan.length
    training = plan.mode == "training"
    gated = cell.kind == "gated"
    h_store = ws["h"]
    c_store = ws["c"] if gated else None
    H = h_store.shape[-1]
    leaf = cell.leaf
    W, b = weights[leaf.name]
    if gated or not training:
        scratch = ws["pair"] if training or not gated else ws["act"]
        whole = gated and backend.projects_in_kernel(ws["x_rows"].shape[1])
        for t0, t1, rows in _leaf_chunks(scratch, T, B, leaf.blocks * H, whole):
            x_rows = ws["x_rows"][t0 * B:t1 * B]
            where, answer = plan.leaves[t0:t1], plan.leaf_answer[t0:t1]
            if gated:
                backend.gated_forward(x_rows, W, b, rows, B, (), h_store, c_store, where,
                                      answers=None if training else (*answers, answer),
                                      keep=False)
            else:
                backend.affine_forward(x_rows, W, b, rows, B, leaf.relu, h_store, where,
                                       answers=(answers[0], answer))
    else:  # the leaf rows are the store's first T locations: write them in place
        backend.affine_forward(ws["x_rows"], W, b, _store_rows(h_store, 0, T), B, leaf.relu)
    last = len(cell.merge_layers) - 1
    for level in plan.levels:
        width = level.width
        R = width * B
        merge_rows = slice(level.merge_start * B, level.merge_start * B + R)
        local = plan.local[:width]
        pair = ws["pair"][:R]
        backend.gather_pairs(h_store, level.left, level.right, pair)
        below = pair
        for k, layer in enumerate(cell.merge_layers):
            W, b = weights[layer.name]
            top = k == last
            if gated:
                if training:
                    act = ws[f"act{k}"][merge_rows]
                    cells_below = ws[f"cells{k - 1}"][:R] if k else None
                    cells_out = None if top else ws[f"cells{k}"][:R]
                else:  # one cells buffer, updated row for row
                    act = _rows_of(ws["act"], R, layer.blocks * H)
                    cells_below = cells_out = ws["cells"][:R] if last else None
                cells = _gated_sources(layer, c_store, level, cells_below, local, B)
                if top:
                    outputs = (h_store, c_store, level.out)
                    answer = None if training else (*answers, level.answer)
                else:
                    outputs = (_as_store(ws["hidden"][:R], width, B),
                               _as_store(cells_out, width, B), local)
                    answer = None
                backend.gated_forward(below, W, b, act, B, cells, *outputs, answers=answer,
                                      keep=training)
                below = None if top else ws["hidden"][:R]
            else:
                if training:
                    out = (_store_rows(h_store, level.first, level.stop) if top
                           else ws[f"act{k}"][merge_rows])
                    backend.affine_forward(below, W, b, out, B, layer.relu)
                else:
                    out = ws[f"ping_h{k % 2}"][:R]
                    scatter = (h_store, level.out) if top else (None, None)
                    backend.affine_forward(below, W, b, out, B, layer.relu, *scatter,
                                           answers=(answers[0], level.answer) if top else None)
                below = out
    if training:
        stores = (h_store, c_store) if gated else (h_store,)
        for store, out in zip(stores, answers):
            backend.copy_answers(store, plan.answer_locations, out)


def _gated_sources(layer, c_store, level, cells_below, local, batch):
    """The cells gated merge layer ``layer`` gates, as (store, index) pairs:
    the operands' cells from the store, or the layer below's from its
    per-level rows."""
    if layer.num_prev == 2:
        return ((c_store, level.left), (c_store, level.right))
    if layer.num_prev == 1:
        return ((_as_store(cells_below, level.width, batch), local),)
    return ()


def _rows_of(buffer, rows, columns):
    """The first ``rows x columns`` elements of a scratch buffer, as a matrix."""
    return buffer.reshape(-1)[:rows * columns].reshape(rows, columns)


def encode_backward(backend, cell, params, tape, dstates, need_dx=False):
    if not isinstance(tape, Tape) or tape.backend is not backend:
        raise TreeschedError(f"tape must come from this backend's encode(need_grad=True), got "
                             f"{type(tape).__name__}" + (" of another backend"
                                                         if isinstance(tape, Tape) else ""))
    if tape.consumed:
        raise TreeschedError("this tape's backward has already run (it turns the cached "
                             "activations into gradients in place); run the forward again")
    if cell.layers != tape.layers:
        raise TreeschedError(f"tape was recorded for {tape.cell!r}, not {cell!r}")
    ws, plan = tape.workspace, tape.plan
    B, H, dtype = tape.batch, tape.hidden, tape.dtype
    names = cell.state_names
    if not isinstance(dstates, (tuple, list)) or len(dstates) != len(names):
        raise TreeschedError(f"dstates must be a tuple of {len(names)} arrays or None "
                             f"({', '.join(names)})")
    shape = (B, plan.num_answers, H)
    for grad in dstates:
        if grad is None:
            continue
        if tuple(getattr(grad, "shape", ())) != shape or getattr(grad, "dtype", None) != dtype:
            raise TreeschedError(f"each dstate must have shape {shape} and dtype {dtype}, got "
                                 f"{getattr(grad, 'shape', None)} {getattr(grad, 'dtype', None)}")
    if cell.check_params(params, tape.inputs, dtype) != H:
        raise TreeschedError(f"params have another hidden size than the tape ({H})")
    weights = _weights(backend, ws, cell, params)
    incoming = tuple(None if grad is None else backend.stage(ws, f"dstate {name}", grad)
                     for name, grad in zip(names, dstates))
    grads = {}
    for layer in cell.layers:
        grads[layer.name] = (ws.buffer(f"grad {layer.weight}",
                                       params[layer.weight].shape[::-1], dtype),
                             ws.buffer(f"grad {layer.bias}", params[layer.bias].shape, dtype))
    dx_rows = ws.buffer("dx_rows", (plan.length * B, tape.inputs), dtype) if need_dx else None
    device = ws.device_plan
    tape.consumed = True
    try:
        variant = ("training", "backward", tuple(g is not None for g in dstates), need_dx)
        _launch(backend, ws, variant, lambda: _backward(backend, cell, device, ws, weights,
                                                        incoming, grads, dx_rows, B))
    finally:
        ws.tape_ref = None
    result = {}
    for layer in cell.layers:
        grad_weight_t, grad_bias = grads[layer.name]
        # .T.copy(), not ascontiguousarray(): a (1, n) gradient's transpose is
        # already contiguous and would hand out the workspace itself
        result[layer.weight] = grad_weight_t.T.copy()
        result[layer.bias] = backend.copy(grad_bias)
    dx = None
    if need_dx:
        # copy(), not ascontiguousarray(): with batch or length 1 the transposed
        # view is already contiguous, and the caller would get the workspace
        dx = dx_rows.reshape(plan.length, B, tape.inputs).transpose(1, 0, 2).copy()
    return result, dx


def _backward(backend, cell, plan, ws, weights, incoming, grads, dx_rows, batch):
    """Levels in reverse, then the leaves: the node gradient stores ``dh`` (and
    ``dc``) start at the answers' gradients and collect every consumer's
    operand gradients (``accumulate_operands``) before their own level runs."""
    B, T = batch, plan.length
    gated = cell.kind == "gated"
    h_store, dh_store = ws["h"], ws["dh"]
    c_store, dc_store = (ws["c"], ws["dc"]) if gated else (None, None)
    stores = (dh_store, dc_store) if gated else (dh_store,)
    for values, store in zip(incoming, stores):
        backend.scatter_answers(values, plan.answer_locations, store)
    layers = cell.merge_layers
    last = len(layers) - 1
    started = {layer.name: False for layer in cell.layers}

    def weight_gradient(layer, X, dA):
        backend.weight_gradient(X, dA, *grads[layer.name], accumulate=started[layer.name])
        started[layer.name] = True

    for level in reversed(plan.levels):
        width = level.width
        R = width * B
        merge_rows = slice(level.merge_start * B, level.merge_start * B + R)
        local = plan.local[:width]

        def below_cells(k, R=R):
            return ws[f"cells{k - 1}"][:R] if k else None

        dh = _store_rows(dh_store, level.first, level.stop)
        dc = _store_rows(dc_store, level.first, level.stop) if gated else None
        if gated and last > 0:
            # the cells between layers are recomputed, not cached
            for k in range(last):
                backend.gated_cells(ws[f"act{k}"][merge_rows], B,
                                    _gated_sources(layers[k], c_store, level, below_cells(k),
                                                   local, B),
                                    ws[f"cells{k}"][:R])
        for k in range(last, -1, -1):
            layer = layers[k]
            W, _ = weights[layer.name]
            pair = ws["pair"][:R]
            if gated:
                act = ws[f"act{k}"][merge_rows]
                c = _store_rows(c_store, level.first, level.stop) if k == last \
                    else ws[f"cells{k}"][:R]
                if layer.num_prev == 2:
                    dcells = (ws["dc_left"][:R], ws["dc_right"][:R])
                elif layer.num_prev == 1:
                    dcells = (ws[f"ping_c{k % 2}"][:R],)
                else:
                    dcells = ()
                backend.gated_backward(act, c, B, _gated_sources(layer, c_store, level,
                                                                 below_cells(k), local, B),
                                       dh, dc, dcells)
                delta = act
                if k == 0:
                    backend.gather_pairs(h_store, level.left, level.right, pair)
                    inputs = pair
                else:  # the layer's input: h of the layer below, recomputed
                    backend.hidden_from_cells(ws[f"act{k - 1}"][merge_rows],
                                              ws[f"cells{k - 1}"][:R], ws["hidden"][:R])
                    inputs = ws["hidden"][:R]
            else:
                dcells = ()
                h = _store_rows(h_store, level.first, level.stop) if k == last \
                    else ws[f"act{k}"][merge_rows]
                if layer.relu:
                    backend.relu_backward(dh, h)
                delta = dh
                if k == 0:
                    backend.gather_pairs(h_store, level.left, level.right, pair)
                    inputs = pair
                else:
                    inputs = ws[f"act{k - 1}"][merge_rows]
            weight_gradient(layer, inputs, delta)
            if k == 0:
                backend.input_gradient(delta, W, pair)  # d [h_l | h_r], over the used pair
                backend.accumulate_operands(level, pair, B, dh_store, dcells or None, dc_store)
            else:
                dh = ws[f"ping_h{k % 2}"][:R]
                backend.input_gradient(delta, W, dh)
                dc = dcells[0] if dcells else None
    leaf = cell.leaf
    W, b = weights[leaf.name]
    H = h_store.shape[-1]
    if gated:
        # the leaf activations are recomputed (a GEMM with K = D), chunk by chunk
        for t0, t1, act in _leaf_chunks(ws["pair"], T, B, leaf.blocks * H):
            x_rows = ws["x_rows"][t0 * B:t1 * B]
            backend.gated_forward(x_rows, W, b, act, B, (), None, None, None, keep=True)
            backend.gated_backward(act, _store_rows(c_store, t0, t1), B, (),
                                   _store_rows(dh_store, t0, t1), _store_rows(dc_store, t0, t1),
                                   ())
            weight_gradient(leaf, x_rows, act)
            if dx_rows is not None:
                backend.input_gradient(act, W, dx_rows[t0 * B:t1 * B])
    else:
        delta = _store_rows(dh_store, 0, T)
        if leaf.relu:
            backend.relu_backward(delta, _store_rows(h_store, 0, T))
        weight_gradient(leaf, ws["x_rows"], delta)
        if dx_rows is not None:
            backend.input_gradient(delta, W, dx_rows)
    for layer in cell.merge_layers:
        if not started[layer.name]:  # no level ran it (a schedule without merges)
            for array in grads[layer.name]:
                backend.zero(array)


__all__ = ["Backend", "Tape", "Workspace", "WorkspaceCache", "ReusedArrays", "encode",
           "encode_backward", "run_inference",
           "FLOAT_DTYPES"]

"""Cells: what a tree-structured recurrent cell is, described by its layers.

A cell is a list of learned layers over *rows* (rows are independent, so a
whole level of a schedule, batch x merges-in-level, runs as one call):

* the leaf encoder, ``x -> state``, applied to every position;
* the merge ``m(L, R)``: a layer reading ``concat(h_l, h_r)`` (the binary
  merge), then ``num_layers - 1`` layers each reading the previous layer's
  ``h`` (the unary refinements of SPEC section 1).

Each :class:`Layer` says everything a backend needs to run it: its parameter
names, its kind (``"gated"``: the N-ary LSTM layer of ``ops.gated``;
``"affine"``: the rectified affine layer of ``ops.affine``), what it reads
(``source``), how many previous cells it gates (``num_prev``) and so its
number of gate blocks.  The executor (``treesched.executor``) runs any cell
described this way on every backend; registering a new one
(``register_cell``) needs no backend change.

A state is a tuple of ``(R, H)`` arrays in ``state_names`` order: ``(h, c)``
for gated cells, ``(h,)`` for affine ones.  A ``dstate`` is a tuple of the
same length whose entries are the loss gradients w.r.t. those arrays, or
None for zero.  Parameters live in a flat dict keyed ``"leaf/w"``,
``"merge/b"``, ``"unary_1/w"``, ... (SPEC section 1).

The row-level methods (``leaf_forward``, ``merge_forward`` and their
backward) are the reference composition of the layers, with hand-written
gradients; backward functions return fresh gradient dicts for exactly the
parameters they touched.  Caches hold references, not copies: the arrays
passed to a forward must not be overwritten before the matching backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TreeschedError
from . import affine, gated
from ._check import check_cache, check_dtype, check_rows, check_state, param
from .xp import array_module

KINDS = ("gated", "affine")
SOURCES = ("input", "pair", "below")
#: Previous cells a gated layer can gate, by what it reads: nothing at the
#: leaf; the operands' two cells (or none) at the binary merge; the cell of
#: the layer below (or none) at a unary layer.
GATED_PREVIOUS = {"input": (0,), "pair": (0, 2), "below": (0, 1)}
STATE_NAMES = {"gated": ("h", "c"), "affine": ("h",)}


@dataclass(frozen=True)
class Layer:
    """One learned layer: ``A = X @ {name}/w + {name}/b``, then its activation.

    Attributes:
      name: parameter prefix; the weight is ``name + "/w"``, the bias ``"/b"``.
      kind: ``"gated"`` (``ops.gated``: gates ``[i, g, o, f_1..f_N]``,
        state ``(h, c)``) or ``"affine"`` (``ops.affine``: state ``h``).
      source: what ``X`` is: ``"input"`` (the features ``x``, the leaf),
        ``"pair"`` (``concat(h_l, h_r)``, the binary merge) or ``"below"``
        (the previous layer's ``h``).
      num_prev: cells a gated layer gates: the operands' ``(c_l, c_r)`` for
        ``"pair"`` (2), the layer below's ``c`` for ``"below"`` (1), or none.
      relu: an affine layer's output is rectified.
    """

    name: str
    kind: str
    source: str
    num_prev: int = 0
    relu: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TreeschedError(f"layer {self.name!r}: kind must be one of {KINDS}, "
                                 f"got {self.kind!r}")
        if self.source not in SOURCES:
            raise TreeschedError(f"layer {self.name!r}: source must be one of {SOURCES}, "
                                 f"got {self.source!r}")
        allowed = GATED_PREVIOUS[self.source] if self.kind == "gated" else (0,)
        if self.num_prev not in allowed:
            raise TreeschedError(f"layer {self.name!r}: a {self.kind} layer reading "
                                 f"{self.source!r} gates {allowed} previous cells, "
                                 f"not {self.num_prev!r}")
        if self.relu and self.kind != "affine":
            raise TreeschedError(f"layer {self.name!r}: only affine layers take relu")

    @property
    def weight(self) -> str:
        return f"{self.name}/w"

    @property
    def bias(self) -> str:
        return f"{self.name}/b"

    @property
    def blocks(self) -> int:
        """Column blocks of width H in the weight: ``3 + num_prev`` gates, or 1."""
        return 3 + self.num_prev if self.kind == "gated" else 1

    def input_width(self, input_size: int, hidden_size: int) -> int:
        return {"input": input_size, "pair": 2 * hidden_size, "below": hidden_size}[self.source]

    def param_shapes(self, input_size: int, hidden_size: int) -> dict:
        width = self.blocks * hidden_size
        return {self.weight: (self.input_width(input_size, hidden_size), width),
                self.bias: (width,)}


class Cell:
    """A cell described by its layers.  Subclasses set ``name``, ``kind`` and
    implement :meth:`build_layers`; everything else follows from them."""

    name: str = ""
    kind: str = "gated"
    state_names: tuple = STATE_NAMES["gated"]

    def __init_subclass__(cls, **options):
        super().__init_subclass__(**options)
        if cls.kind not in KINDS:
            raise TreeschedError(f"cell {cls.name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
        cls.state_names = STATE_NAMES[cls.kind]

    def __init__(self, num_layers=2):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise TreeschedError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        self.num_layers = num_layers
        layers = tuple(self.build_layers(num_layers))
        self._check_description(layers)
        self.leaf, self.merge_layers = layers[0], layers[1:]
        # a params dict holding this name was built for more layers than we have
        self._extra_weight = self.build_layers(num_layers + 1)[-1].weight

    def build_layers(self, num_layers: int):
        """``(leaf, binary merge, unary_1, ..)``: ``1 + num_layers`` :class:`Layer` s."""
        raise NotImplementedError

    def _check_description(self, layers):
        where = f"cell {self.name!r}"
        if self.kind not in KINDS:
            raise TreeschedError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(layers) != 1 + self.num_layers:
            raise TreeschedError(f"{where}: build_layers({self.num_layers}) must give the leaf "
                                 f"and {self.num_layers} merge layers, got {len(layers)} layers")
        want = ("input", "pair") + ("below",) * (self.num_layers - 1)
        for layer, source in zip(layers, want):
            if not isinstance(layer, Layer) or layer.source != source or layer.kind != self.kind:
                raise TreeschedError(f"{where}: layer {layer!r} must be a {self.kind} Layer "
                                     f"reading {source!r}")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise TreeschedError(f"{where}: layer names repeat: {names}")

    @property
    def layers(self) -> tuple:
        return (self.leaf,) + self.merge_layers

    def __repr__(self):
        return f"{type(self).__name__}(num_layers={self.num_layers})"

    def param_shapes(self, input_size, hidden_size, num_layers=None):
        """``{name: shape}`` for the leaf, merge and unary params (not the head).

        ``num_layers`` defaults to this cell's own.
        """
        layers = self.layers if num_layers in (None, self.num_layers) else \
            type(self)(num_layers).layers
        shapes = {}
        for layer in layers:
            shapes.update(layer.param_shapes(input_size, hidden_size))
        return shapes

    def hidden_size(self, params) -> int:
        """H read off ``leaf/w`` (columns = blocks * H)."""
        leaf = params.get(self.leaf.weight) if hasattr(params, "get") else None
        shape = getattr(leaf, "shape", None)
        blocks = self.leaf.blocks
        if shape is None or len(shape) != 2 or shape[1] % blocks or shape[1] == 0:
            raise TreeschedError(f"parameter {self.leaf.weight!r} has shape {shape}, expected "
                                 f"(inputs, {blocks}*H) with H >= 1")
        return shape[1] // blocks

    def check_params(self, params, input_size, dtype):
        """Every parameter present with its shape and ``dtype`` -> hidden size."""
        if self._extra_weight in params:
            raise TreeschedError(
                f"params contain {self._extra_weight!r} but this {self.name} cell has "
                f"num_layers={self.num_layers}")
        hidden = self.hidden_size(params)
        for name, shape in self.param_shapes(input_size, hidden).items():
            param(params, name, shape, dtype)
        return hidden

    # ------------------------------------------------ reference composition
    def _layer_forward(self, layer, params, X, cells, need_cache):
        W, b = params[layer.weight], params[layer.bias]
        if self.kind == "gated":
            h, c, cache = gated.forward(X, W, b, cells, need_cache)
            return (h, c), cache
        h = affine.forward(X, W, b, layer.relu)
        return (h,), ((X, h if layer.relu else None) if need_cache else None)

    def _layer_backward(self, layer, params, cache, dstate, need_dx=True):
        """-> (dX, dstate of the gated cells, dW, db)."""
        W = params[layer.weight]
        if self.kind == "gated":
            dh, dc = dstate
            dX, dcells, dW, db = gated.backward(W, cache, dh, dc, need_dx)
            return dX, dcells, dW, db
        (dh,) = dstate
        dX, dW, db = affine.backward(W, cache, dh, need_dx)
        return dX, [], dW, db

    def _check_rows(self, params, state, what, rows=None):
        state = check_state(self, state, f"{what} state")
        dtype = check_dtype(f"{what} h", state[0])
        check_rows(f"{what} h", state[0], None, dtype, rows)
        R, H = state[0].shape
        for name, array in zip(self.state_names[1:], state[1:]):
            check_rows(f"{what} {name}", array, H, dtype, R)
        return state, R, H, dtype

    def _zeros_for_none(self, dstate, like):
        xp = array_module(like)
        dstate = list(check_state(self, dstate))
        for index, value in enumerate(dstate):
            if value is not None:
                check_rows(f"d{self.state_names[index]}", value, like.shape[1], like.dtype,
                           like.shape[0])
        if dstate[0] is None:
            dstate[0] = xp.zeros_like(like)
        return tuple(dstate)

    def leaf_forward(self, params, x, need_cache=True):
        """``x`` (R, D) -> ``(state, cache)``; cache is None if not need_cache."""
        dtype = check_dtype("x", x)
        check_rows("x", x, None, dtype)
        H = self.hidden_size(params)
        for name, shape in self.leaf.param_shapes(x.shape[1], H).items():
            param(params, name, shape, dtype)
        return self._layer_forward(self.leaf, params, x, (), need_cache)

    def leaf_backward(self, params, cache, dstate, need_dx=True):
        """-> ``(grads, dx)``: grads for the leaf params, dx (R, D) (None if not need_dx)."""
        check_cache(f"{self.name} leaf_backward", cache)
        X = cache[0]
        H = self.hidden_size(params)
        for name, shape in self.leaf.param_shapes(X.shape[1], H).items():
            param(params, name, shape, X.dtype)
        like = array_module(X).empty((X.shape[0], H), dtype=X.dtype)
        dstate = self._zeros_for_none(dstate, like)
        dx, _, dW, db = self._layer_backward(self.leaf, params, cache, dstate, need_dx)
        return {self.leaf.weight: dW, self.leaf.bias: db}, dx

    def merge_forward(self, params, left_state, right_state, need_cache=True):
        """m(L, R) then the unary layers, row-wise -> ``(state, cache)``."""
        left, R, H, dtype = self._check_rows(params, left_state, "left")
        right, _, _, _ = self._check_rows(params, right_state, "right", R)
        if self._extra_weight in params:
            raise TreeschedError(f"params contain {self._extra_weight!r} but this {self.name} "
                                 f"cell has num_layers={self.num_layers}")
        for layer in self.merge_layers:
            for name, shape in layer.param_shapes(0, H).items():
                param(params, name, shape, dtype)
        xp = array_module(left[0], right[0])
        X = xp.concatenate((left[0], right[0]), axis=1)
        caches = []
        state = None
        for layer in self.merge_layers:
            if layer.source == "pair":
                cells = (left[1], right[1]) if layer.num_prev == 2 else ()
            else:
                X = state[0]
                cells = (state[1],) if layer.num_prev == 1 else ()
            state, cache = self._layer_forward(layer, params, X, cells, need_cache)
            caches.append(cache)
        return state, (tuple(caches) if need_cache else None)

    def merge_backward(self, params, cache, dstate):
        """-> ``(dleft_state, dright_state, grads)``; grads for the merge layers."""
        check_cache(f"{self.name} merge_backward", cache)
        if self._extra_weight in params:
            raise TreeschedError(f"params contain {self._extra_weight!r} but this {self.name} "
                                 f"cell has num_layers={self.num_layers}")
        top = cache[-1]
        like = top[3] if self.kind == "gated" else (top[1] if top[1] is not None else top[0])
        R = like.shape[0]
        H = params[self.merge_layers[-1].weight].shape[1] // self.merge_layers[-1].blocks
        like = array_module(like).empty((R, H), dtype=like.dtype)
        dstate = self._zeros_for_none(dstate, like)
        for layer in self.merge_layers:
            for name, shape in layer.param_shapes(0, H).items():
                param(params, name, shape, like.dtype)
        grads = {}
        # layers last-to-first: each hands (dh, dc) to the layer below
        for index in range(self.num_layers - 1, 0, -1):
            layer = self.merge_layers[index]
            dX, dcells, grads[layer.weight], grads[layer.bias] = self._layer_backward(
                layer, params, cache[index], dstate)
            dstate = (dX, dcells[0] if dcells else None) if self.kind == "gated" else (dX,)
        layer = self.merge_layers[0]
        dX, dcells, grads[layer.weight], grads[layer.bias] = self._layer_backward(
            layer, params, cache[0], dstate)
        # dX is d/d concat(h_l, h_r); the halves are views (no copy)
        if self.kind == "gated":
            dc_l, dc_r = dcells if dcells else (None, None)
            return (dX[:, :H], dc_l), (dX[:, H:], dc_r), grads
        return (dX[:, :H],), (dX[:, H:],), grads


__all__ = ["Cell", "Layer", "KINDS", "SOURCES", "STATE_NAMES"]

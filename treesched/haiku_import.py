"""Import checkpoints written by the paper's code (JAX + Haiku, saved with flax).

The paper's training code (tristangaudreault/pr-lstm) saves the parameters of
``hk.transform(model).init`` — a dict ``{module_name: {"w": ..., "b": ...}}`` —
with ``flax.serialization.to_bytes``: a msgpack map whose array leaves are
msgpack ExtType code 1 holding a nested msgpack array ``(shape, dtype name,
C-order bytes)`` (code 3: the same for a NumPy scalar, code 2: a complex
scalar ``(real, imag)``; arrays over 2**30 bytes are split into a map
``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``).
This module decodes that format with ``msgpack`` and NumPy alone — JAX,
Haiku and flax need not be installed — and maps the Haiku module names onto
the SPEC.md §1 parameter names.

Which tensor is which. The model is a recursive core (class
``ParallelRecursive``, earlier ``NTR``) and a read-out ``hk.Linear`` applied to
``relu(h)`` outside it. Haiku names a module after its class, numbered in
creation order (``nary_lstm``, ``nary_lstm_1``, ...), and puts ``~method/`` in
the path of a module created inside a method other than ``__call__``
(``~get_cell/``; ``~/`` for ``__init__``). Each tensor is identified by that
structure and then checked by shape (``P``: the core's path, found as the
path in front of the cells, so its name — ``parallel_recursive``, ``ntr`` —
and any outer prefix do not matter; ``~m/``: any method scope or none;
``D``, ``H``, ``O``: input, hidden and output size):

=================================================  ===================  ============
Haiku module                                        ``w`` (lstm / rnn)   treesched
=================================================  ===================  ============
``P/~m/linear``      (the leaf encoder)              (D, 3H) / (D, H)     ``leaf/*``
``P/~m/nary_lstm/linear``    (first cell: merge)     (2H, 5H) / (2H, H)   ``merge/*``
``P/~m/nary_lstm_k/linear``  (k-th cell: unary)      (H, 4H) / (H, H)     ``unary_k/*``
the one module outside ``P``  (read-out)             (H, O)               ``head/*``
=================================================  ===================  ============

(``nary_rnn`` instead of ``nary_lstm`` for the PR-RNN.)

Layouts the paper's code used, read from the history of tristangaudreault/pr-lstm:

* ``parallel_recursive/~get_elems/linear``,
  ``parallel_recursive/~get_cell/nary_lstm/linear``,
  ``parallel_recursive/~get_cell/nary_lstm_k/linear``, ``linear``:
  ``src/pr_lstm/haiku/model.py`` as published (bfd273af553be3c5bcaccf55ebeb6fa00351b369);
  the same class in ``src/pr_lstm/jax/model.py`` (145d4637c7e87600f9ba8c0357b282c754896252,
  whose README lists the paper's runs) and ``src/prnn/jax/model.py``
  (943b6e71123d6568952423cc555625fe70c7237b); registered as model ``parallel_recursive``
  from ``thesis.model`` by ``experiments/plugins/nnch.py``
  (90012391b8bbc62670feeba585dd1f6e4431088b) and from ``pr_lstm.model`` by
  ``experiments/neural_networks_chomsky_hierarchy/plugins/nnch.py``
  (4e4fd8282395b2b6f80f86e452df7ec18f99031a). Both builders add the read-out
  ``hk.Linear(output_size)(relu(h))`` and save ``serialization.to_bytes(params)``.
* ``ntr/~get_elems/linear``, ``ntr/~get_cell/nary_lstm[_k]/linear``, ``linear``:
  the same code under its earlier class name ``NTR`` (``src/thesis/model.py`` and
  model ``ntr`` in ``experiments/plugins/nnch.py`` at
  3c9b6d2186096c7db68b0f02135e87a6f22bf169; its ``nary_cells.py`` is not in the
  history read, the class names it imports — NaryLSTM, NaryRNN — give the names).

Also accepted: the leaf and the cells directly in the core (``P/linear``,
``P/nary_lstm/linear``), as when the modules are created in ``__call__``. No
version of the paper's code does that, but it is the same function under
other scopes (a port or refactor of it), and treesched accepted it before.

Refused, each with a message naming the module or tensor: the repository's
prototypes ``SCM``/``LSCM`` (5efc5a7987051780b0f59344fc81528a6e9ea40e: bare
``hk.Linear`` cells in ``~get_cell``/``~get_op``, gate order (i, g, f_l, f_r, o),
one set of unary weights reused for every substep — not SPEC.md §1's
PR-LSTM), the GRU cell (``--cell-name gru``), a missing or unexpected module
or tensor, a tensor of the wrong shape, a non-float dtype, NaN or infinity, a
corrupt or truncated file.

Haiku's ``Linear`` computes ``x @ w + b`` and the paper's ``NaryLSTM`` splits the
gates in the order (i, g, o, forget...) of ``concat(h_l, h_r) @ w``, as SPEC.md
§1 does, so every tensor is copied unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TreeschedError
from .ops import get_cell

# flax.serialization._MsgpackExtType
EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
#: a parameter tree is a few levels deep; deeper nesting is refused before
#: Python's recursion limit is reached
MAX_TREE_DEPTH = 64
MAX_ARRAY_DIMENSIONS = 32
CHUNKED_KEY = "__msgpack_chunked_array__"

# Haiku puts "~method/" into the path of a module created in a method other
# than __call__ ("~/" for __init__); the paper's code builds its cells in
# get_cell and its leaf encoder in get_elems, so either may carry a scope.
_SCOPE = r"(?:~\w*/)?"
# The hk.Linear of an n-ary cell: <core>[~method/]nary_lstm[_k]/linear.
_CELL_RE = re.compile(r"^(?P<core>(?:.*?/)?)(?P<scope>" + _SCOPE + r")"
                      r"(?P<kind>nary_lstm|nary_rnn)(?:_(?P<index>\d+))?/(?:~/)?linear$")
# Recognised only to explain a refusal: the --cell-name gru core, and the
# SCM/LSCM prototypes whose cells are bare hk.Linear modules in get_cell/get_op.
_GRU_RE = re.compile(r"(?:^|/)" + _SCOPE + r"gru(?:_\d+)?$")
_PROTOTYPE_CELL_RE = re.compile(r"(?:^|/)~(?:get_cell|get_op)/linear(?:_\d+)?$")
# leaf, merge and unary weight widths in units of H, as the cells describe them
_GATES = {name: tuple(layer.blocks for layer in get_cell(name, 2).layers) for name in ("lstm", "rnn")}


@dataclass
class HaikuImport:
    """What :func:`map_haiku_params` found in a checkpoint.

    Attributes:
      params: ``{SPEC name: np.ndarray}`` ready for ``PRLSTM.params``.
      config: ``input_size, hidden_size, output_size, num_layers, cell, dtype``.
      mapping: ``{SPEC name: "haiku_module/param"}`` (where each tensor came from).
      core: the module prefix of the recursive core (``"parallel_recursive"``).
    """

    params: dict
    config: dict
    mapping: dict = field(default_factory=dict)
    core: str = ""


class _Ext:
    """A msgpack extension value, decoded later when its tree path is known."""

    __slots__ = ("code", "data")

    def __init__(self, code, data):
        self.code, self.data = code, bytes(data)


# ------------------------------------------------------------------ decoding
def _msgpack():
    try:
        import msgpack
    except ModuleNotFoundError:  # pragma: no cover - msgpack is a dependency
        raise TreeschedError("reading Haiku checkpoints needs the msgpack package "
                             "(pip install msgpack)") from None
    return msgpack


def _dtype_from_name(name, where):
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).decode("ascii", "replace")
    if name == "bfloat16":
        return "bfloat16"
    try:
        return np.dtype(str(name))
    except TypeError:
        raise TreeschedError(f"{where}: unknown dtype {name!r}") from None


def _decode_ndarray(data: bytes, where: str) -> np.ndarray:
    msgpack = _msgpack()
    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    except Exception as error:  # noqa: BLE001 - any unpack failure is a corrupt tensor
        raise TreeschedError(f"{where}: corrupt array record ({error})") from None
    # type() is int: a bool is an int to isinstance, and no shape holds one
    if not (isinstance(shape, (list, tuple)) and len(shape) <= MAX_ARRAY_DIMENSIONS
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(buffer, (bytes, bytearray))):
        raise TreeschedError(f"{where}: corrupt array record (shape {shape!r})")
    dtype = _dtype_from_name(dtype_name, where)
    shape = tuple(shape)
    # Python integers: np.prod in int64 wraps around for (2**32, 2**32)
    count = math.prod(shape)
    if dtype == "bfloat16":
        if len(buffer) != 2 * count:
            raise TreeschedError(f"{where}: truncated data: {len(buffer)} bytes for bfloat16 "
                                 f"shape {shape} (needs {2 * count})")
        # bfloat16 is the top half of a float32: widen exactly.
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype.kind not in "biufc" or dtype.shape != ():
        # objects, strings, void / structured records and sub-array dtypes
        # hold no parameters, and sub-arrays change the element count
        raise TreeschedError(f"{where}: arrays of dtype {dtype} are not supported (numbers "
                             f"only)")
    if len(buffer) != dtype.itemsize * count:
        raise TreeschedError(
            f"{where}: truncated data: {len(buffer)} bytes for {dtype.name} shape {shape} "
            f"(needs {dtype.itemsize * count})")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _materialize(value, where: str, depth: int = 0):
    """Turn ``_Ext`` leaves and chunked-array maps into NumPy arrays (recursively)."""
    if depth > MAX_TREE_DEPTH:
        raise TreeschedError(f"the file nests values more than {MAX_TREE_DEPTH} levels deep: "
                             f"not a parameter tree")
    if isinstance(value, _Ext):
        if value.code == EXT_NDARRAY:
            return _decode_ndarray(value.data, where)
        if value.code == EXT_NPSCALAR:
            scalar = _decode_ndarray(value.data, where)
            if scalar.shape != ():
                raise TreeschedError(f"{where}: corrupt scalar record (shape {scalar.shape})")
            return scalar[()]
        if value.code == EXT_COMPLEX:
            try:
                real, imag = _msgpack().unpackb(value.data)
                return complex(real, imag)
            except Exception as error:  # noqa: BLE001 - any failure is a corrupt record
                raise TreeschedError(f"{where}: corrupt complex number record ({error})") \
                    from None
        raise TreeschedError(f"{where}: unknown msgpack extension type {value.code}")
    if isinstance(value, dict):
        if value.get(CHUNKED_KEY) is True:
            return _unchunk(value, where, depth)
        return {str(key): _materialize(item, f"{where}/{key}" if where else str(key), depth + 1)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_materialize(item, f"{where}/{index}", depth + 1)
                for index, item in enumerate(value)]
    return value


def _unchunk(value: dict, where: str, depth: int) -> np.ndarray:
    try:
        shape_map, chunk_map = value["shape"], value["chunks"]
        shape = tuple(int(shape_map[str(i)]) for i in range(len(shape_map)))
        chunks = [_materialize(chunk_map[str(i)], f"{where}/chunks/{i}", depth + 1)
                  for i in range(len(chunk_map))]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TreeschedError(f"{where}: corrupt chunked array record") from None
    if not chunks or not all(isinstance(chunk, np.ndarray) for chunk in chunks):
        raise TreeschedError(f"{where}: corrupt chunked array record")
    flat = np.concatenate([chunk.reshape(-1) for chunk in chunks])
    if any(n < 0 for n in shape) or flat.size != math.prod(shape):
        raise TreeschedError(f"{where}: chunked array holds {flat.size} values for shape {shape}")
    return flat.reshape(shape)


def decode_msgpack(data: bytes, source: str = "checkpoint"):
    """Decode ``flax.serialization.to_bytes`` output into a tree of NumPy arrays.

    Equivalent to ``flax.serialization.msgpack_restore`` without JAX. Raises
    :class:`TreeschedError` on corrupt or truncated input.
    """
    msgpack = _msgpack()
    try:
        tree = msgpack.unpackb(data, ext_hook=_Ext, raw=False, strict_map_key=False)
    except msgpack.exceptions.ExtraData:
        raise TreeschedError(
            f"{source} is not a valid msgpack file: trailing bytes after the first value "
            "(corrupt, or not written by flax.serialization.to_bytes)") from None
    except Exception as error:  # noqa: BLE001 - OutOfData, FormatError, ValueError ...
        text = str(error) or type(error).__name__
        if "incomplete" in text or "OutOfData" in text:
            text = "the file is truncated"
        raise TreeschedError(f"{source} is not a valid msgpack file: {text}") from None
    return _materialize(tree, "")


def read_haiku_msgpack(path) -> dict:
    """``{module: {param: np.ndarray}}`` from a flax-serialized Haiku params file.

    No JAX needed. Validates the file and the tree structure (a map of modules,
    each a map of arrays); it does not check names or shapes — see
    :func:`map_haiku_params`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TreeschedError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise TreeschedError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as error:
        raise TreeschedError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    if not data:
        raise TreeschedError(f"checkpoint {path} is empty")
    tree = decode_msgpack(data, f"checkpoint {path}")
    if not isinstance(tree, dict):
        raise TreeschedError(
            f"checkpoint {path} holds a {type(tree).__name__}, not a Haiku parameter dict "
            "{module: {name: array}}")
    # A state dict saved as {"params": {...}} (e.g. a train state) is accepted too.
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    if not tree:
        raise TreeschedError(f"checkpoint {path} holds no parameters")
    for module, params in tree.items():
        if isinstance(params, np.ndarray):
            raise TreeschedError(
                f"checkpoint {path}: top-level entry {module!r} is an array, not a Haiku module "
                "(expected {module: {'w': array, 'b': array}})")
        if not isinstance(params, dict):
            raise TreeschedError(
                f"checkpoint {path}: module {module!r} is a {type(params).__name__}, not a map of "
                "parameters")
        for name, value in params.items():
            if not isinstance(value, np.ndarray):
                raise TreeschedError(
                    f"checkpoint {path}: tensor '{module}/{name}' is a {type(value).__name__}, "
                    "not an array")
    return tree


# ------------------------------------------------------------------ mapping
def _tensor_list(tree, modules):
    """'module/name', ... for every tensor of ``modules`` (what a refusal names)."""
    return ", ".join(f"'{module}/{name}'" for module in modules for name in sorted(tree[module]))


def _linear(tree, module, spec, what):
    """The (w, b) pair of one hk.Linear module, checked for names, rank and dtype."""
    params = tree[module]
    names = set(params)
    if "w" not in names:
        raise TreeschedError(
            f"missing tensor '{module}/w' (-> {spec}/w): the {what} hk.Linear has no weight")
    if "b" not in names:
        raise TreeschedError(
            f"missing tensor '{module}/b' (-> {spec}/b): the {what} has no bias "
            "(hk.Linear(with_bias=False) is not the paper's model)")
    extra = sorted(names - {"w", "b"})
    if extra:
        listed = ", ".join(f"'{module}/{name}'" for name in extra)
        raise TreeschedError(f"unexpected tensor{'s' if len(extra) > 1 else ''} {listed}: the "
                             f"{what} is an hk.Linear, which holds only w and b")
    out = {}
    for name, rank in (("w", 2), ("b", 1)):
        value = params[name]
        where = f"tensor '{module}/{name}' (-> {spec}/{name})"
        if value.dtype.kind != "f":
            raise TreeschedError(f"{where} has dtype {value.dtype}; parameters must be floating point")
        if value.ndim != rank:
            raise TreeschedError(f"{where} has shape {value.shape}; expected a rank-{rank} array")
        out[name] = value
    return out


def _no_cells_message(tree):
    """Why a tree without n-ary cells is not a PR-LSTM, as specific as the tree allows."""
    gru = sorted(module for module in tree if _GRU_RE.search(module))
    if gru:
        return (f"module '{gru[0]}' is a GRU cell (the paper's --cell-name gru); treesched "
                "implements the PR-LSTM and PR-RNN cells of SPEC.md §1 only")
    bare = sorted(module for module in tree if _PROTOTYPE_CELL_RE.search(module))
    if bare:
        return (f"no PR-LSTM cell found: module '{bare[0]}' is a bare hk.Linear cell, as in the "
                "pr-lstm repository's SCM/LSCM prototypes, whose gate order (i, g, f_l, f_r, o) "
                "and shared unary weights are not SPEC.md §1's; the PR-LSTM's cells are "
                "'<core>/~get_cell/nary_lstm/linear', 'nary_lstm_1', ...")
    return ("missing module: no PR-LSTM cell found (expected '<core>/~get_cell/nary_lstm/linear' "
            "or '<core>/~get_cell/nary_rnn/linear', as the paper's ParallelRecursive creates); "
            f"modules present: {', '.join(sorted(tree))}")


def _find_cells(tree):
    """(core prefix, scope, cell kind, {layer index: module}) from the cell module names.

    The first cell Haiku creates (no suffix) is the binary merge; ``_k`` is the
    k-th unary layer, as the paper's ``get_cell`` builds them in that order.
    """
    groups = {}
    for module in tree:
        match = _CELL_RE.match(module)
        if not match:
            continue
        layers = groups.setdefault((match["core"], match["scope"], match["kind"]), {})
        index = int(match["index"] or 0)
        if index in layers:
            raise TreeschedError(f"unexpected extra module '{module}': cell layer {index} is "
                                 f"already '{layers[index]}'")
        layers[index] = module
    if not groups:
        raise TreeschedError(_no_cells_message(tree))
    if len(groups) > 1:
        found = ", ".join(f"{kind} cells under {(core + scope).rstrip('/') or '(top level)'!r}"
                          for core, scope, kind in sorted(groups))
        raise TreeschedError(f"unexpected extra modules: more than one recursive core ({found})")
    (core, scope, kind), layers = next(iter(groups.items()))
    for index in range(max(layers) + 1):
        if index not in layers:
            base = f"{core}{scope}{kind}" + (f"_{index}" if index else "")
            raise TreeschedError(
                f"missing module '{base}/linear': cell layers must be numbered 0..{max(layers)} "
                f"without gaps (found {', '.join(layers[k] for k in sorted(layers))})")
    return core, scope, kind, layers


def map_haiku_params(tree: dict, source: str = "checkpoint") -> HaikuImport:
    """Map a Haiku params tree (``{module: {"w", "b"}}``) to SPEC.md §1 names.

    Infers the cell (``lstm``/``rnn``), the input, hidden and output sizes and
    ``num_layers`` from module names and shapes; accepts the layouts listed in
    the module docstring and refuses anything that is not exactly the paper's
    PR-LSTM / PR-RNN plus a read-out ``hk.Linear``.
    """
    try:
        return _map(tree)
    except TreeschedError as error:
        raise TreeschedError(f"{source}: {error}") from None


def _map(tree):
    core, scope, kind, layers = _find_cells(tree)
    cell = kind.split("_")[1]  # nary_lstm -> lstm
    core_label = core.rstrip("/") or "(top level)"
    cell_modules = set(layers.values())
    # The leaf encoder: the core's one hk.Linear outside the cells, in whichever
    # method it was created (get_elems in the paper's code).
    leaf_re = re.compile(re.escape(core) + _SCOPE + "linear$")
    leaves = sorted(m for m in tree if m not in cell_modules and leaf_re.match(m))
    if not leaves:
        # Name it where the paper's code would put it, next to these cells.
        expected = f"{core}~get_elems/linear" if scope else f"{core}linear"
        raise TreeschedError(
            f"missing module '{expected}': the leaf encoder hk.Linear of the core {core_label!r}")
    if len(leaves) > 1:
        raise TreeschedError(
            f"unexpected extra modules inside the core {core_label!r}: more than one leaf "
            f"encoder ({_tensor_list(tree, leaves)})")
    leaf_module = leaves[0]
    rest = [m for m in tree if m not in cell_modules and m != leaf_module]
    inside = sorted(m for m in rest if core and m.startswith(core))
    if inside:
        raise TreeschedError(
            f"unexpected extra module{'s' if len(inside) > 1 else ''} inside the core "
            f"{core_label!r}: {_tensor_list(tree, inside)} (the paper's core holds only the leaf "
            f"encoder '{leaf_module}' and the {kind} cells)")
    if not rest:
        raise TreeschedError(
            f"missing module: no read-out head (the paper's model applies hk.Linear(output_size) "
            f"to relu(h) outside {core_label!r}); modules present: {', '.join(sorted(tree))}")
    if len(rest) > 1:
        raise TreeschedError(
            f"unexpected extra modules outside the core {core_label!r}: "
            f"{_tensor_list(tree, sorted(rest))}; expected one read-out head hk.Linear")
    head_module = rest[0]

    leaf = _linear(tree, leaf_module, "leaf", "leaf encoder")
    merge = _linear(tree, layers[0], "merge", "binary merge cell")
    unary = [_linear(tree, layers[k], f"unary_{k}", f"unary cell {k}")
             for k in range(1, len(layers))]
    head = _linear(tree, head_module, "head", "read-out head")

    leaf_gates, merge_gates, unary_gates = _GATES[cell]
    rows = merge["w"].shape[0]
    if rows % 2:
        raise TreeschedError(
            f"tensor '{layers[0]}/w' (-> merge/w) has shape {merge['w'].shape}: its {rows} rows "
            "are not concat(h_l, h_r) = 2 * hidden_size")
    H = rows // 2
    D = leaf["w"].shape[0]
    O = head["w"].shape[1]
    expected = [(leaf_module, "leaf", leaf, (D, leaf_gates * H)),
                (layers[0], "merge", merge, (2 * H, merge_gates * H))]
    expected += [(layers[k], f"unary_{k}", unary[k - 1], (H, unary_gates * H))
                 for k in range(1, len(layers))]
    expected.append((head_module, "head", head, (H, O)))
    gate_names = {"leaf": "i, g, o", "merge": "i, g, o, f_l, f_r", "head": "logits"}
    for module, spec, pair, shape in expected:
        if pair["w"].shape != shape:
            why = (f"hidden size {H} (from merge/w) and {cell} gates "
                   f"{gate_names.get(spec, 'i, g, o, f')}" if cell == "lstm" and spec != "head"
                   else f"hidden size {H} (from merge/w)")
            raise TreeschedError(
                f"tensor '{module}/w' (-> {spec}/w) has shape {pair['w'].shape}; expected {shape} "
                f"for {why}")
        if pair["b"].shape != shape[1:]:
            raise TreeschedError(
                f"tensor '{module}/b' (-> {spec}/b) has shape {pair['b'].shape}; expected "
                f"{shape[1:]} to match '{module}/w' {shape}")

    params, mapping = {}, {}
    for module, spec, pair, _ in expected:
        for name in ("w", "b"):
            if not np.isfinite(pair[name]).all():
                raise TreeschedError(
                    f"tensor '{module}/{name}' (-> {spec}/{name}) contains NaN or infinity")
            params[f"{spec}/{name}"] = np.array(pair[name])  # own, writable copy of the file's bytes
            mapping[f"{spec}/{name}"] = f"{module}/{name}"
    dtype = "float64" if all(value.dtype == np.float64 for value in params.values()) else "float32"
    config = {"input_size": D, "hidden_size": H, "output_size": O, "num_layers": len(layers),
              "cell": cell, "dtype": dtype}
    return HaikuImport(params=params, config=config, mapping=mapping, core=core.rstrip("/"))


def load_haiku_msgpack(path) -> HaikuImport:
    """Read and map a checkpoint: :func:`read_haiku_msgpack` + :func:`map_haiku_params`."""
    return map_haiku_params(read_haiku_msgpack(path), f"checkpoint {path}")


__all__ = ["HaikuImport", "decode_msgpack", "read_haiku_msgpack", "map_haiku_params",
           "load_haiku_msgpack"]

"""The public model API: :class:`PRLSTM`.

A model is a cell (``treesched.ops``), parameters named as SPEC.md §1, a
schedule pattern and a backend.  Each call compiles (cached) the schedule
for the input length and the requested outputs, runs the backend's encoder
over it, and applies the read-out head.
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np

from .compiler import compile as compile_schedule
from .compiler import normalize_outputs, validate_pattern
from .errors import TreeschedError
from .executor import ReusedArrays
from .fileio import read_npz, write_bytes
from .haiku_import import HaikuImport, load_haiku_msgpack
from .interop import last_state, returned_as, to_backend_array, to_host
from .ops import get_cell, head_backward, head_forward, head_param_shapes
from .ops import softmax_cross_entropy
from .backends import get_backend
from .streaming import Stream, load_stream
from .memory import check_pass_fits
from .limits import MAX_FEATURES, MAX_HIDDEN, MAX_LAYERS, MAX_SEED
from .validation import checked_int, positive_int

CHECKPOINT_FORMAT = "treesched-prlstm"
CHECKPOINT_VERSION = 1
DTYPES = ("float32", "float64")


def haiku_linear_init(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Haiku's ``Linear`` default: truncated normal on [-2σ, 2σ], σ = 1/√fan_in.

    Rejection sampling: redraw the entries that fall outside ±2.
    """
    sample = rng.standard_normal(shape)
    outside = np.abs(sample) > 2
    while outside.any():
        sample[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(sample) > 2
    return (sample / np.sqrt(shape[0])).astype(dtype)


class ParamDict(dict):
    """The model's parameters; every way of setting one checks the name, shape
    and values and stores the model's own copy.

    A parameter cannot be removed (``del``, ``pop``, ``popitem``, ``clear``
    raise TreeschedError): a model always has all of them.  ``update``,
    ``|=`` and ``setdefault`` go through the same check as ``params[name] =
    value``; the stored array never shares memory with the caller's, so a
    later change to the caller's array does not reach the model.
    """

    def __init__(self, shapes: dict, convert):
        super().__init__()
        self._shapes = dict(shapes)
        self._convert = convert

    def __setitem__(self, name, value):
        if not isinstance(name, str) or name not in self._shapes:
            raise TreeschedError(
                f"unknown parameter {name!r}; this model has: {', '.join(self._shapes)}")
        shape = self._shapes[name]
        try:
            value_shape = tuple(getattr(value, "shape", None) or np.shape(value))
        except (TypeError, ValueError):
            raise TreeschedError(f"parameter {name!r} must be an array of shape {shape}, "
                                 f"got {type(value).__name__}") from None
        if value_shape != shape:
            raise TreeschedError(f"parameter {name!r} must have shape {shape}, got {value_shape}")
        array = self._convert(value, f"parameter {name!r}")
        super().__setitem__(name, array)

    def update(self, other=(), **more):
        """Set several parameters; each is checked as ``params[name] = value``.
        Either all are set or, when one is refused, none is."""
        try:
            items = dict(other, **more)
        except (TypeError, ValueError):
            raise TreeschedError("params.update takes a mapping of parameter names to "
                                 "arrays") from None
        saved = dict(self)
        try:
            for name, value in items.items():
                self[name] = value
        except BaseException:
            dict.update(self, saved)
            raise

    def __ior__(self, other):
        self.update(other)
        return self

    def __or__(self, other):
        return {**self.numpy(), **dict(other)}

    def setdefault(self, name, value=None):
        if name not in self:
            self[name] = value  # refused: every known name is always present
        return self[name]

    def _refuse_removal(self, *args, **options):
        raise TreeschedError("parameters cannot be removed: a model always has all of "
                             f"{', '.join(self._shapes)}")

    __delitem__ = pop = popitem = clear = _refuse_removal

    def numpy(self) -> dict:
        """Host copies of every parameter, as NumPy arrays."""
        return {name: np.asarray(to_host(value, name)) for name, value in self.items()}


def _with_host_compute(method):
    """Run a model method inside its backend's ``host_compute`` context, with
    NumPy's floating-point warnings off.

    Why no warnings: values that overflow become inf / NaN in the result, and
    the caller who cares checks them (training turns a non-finite loss or
    gradient into one error naming the step); NumPy's ``RuntimeWarning``
    lines would reach the user as raw noise before that error.
    """
    @functools.wraps(method)
    def wrapped(self, *args, **options):
        with self.backend.host_compute(), np.errstate(all="ignore"):
            return method(self, *args, **options)
    return wrapped


class PRLSTM:
    """The Parallel Recursive LSTM (SPEC.md §1) on a compiled schedule.

    Args:
      input_size: features per position ``D`` (one-hot size for tokens).
      hidden_size: state size ``H``.
      output_size: logits per position ``O``.
      num_layers: 1 binary merge layer plus ``num_layers - 1`` unary
        refinement layers (2: the paper's PR-LSTM; 1 and 3: its 0R and 2R).
      cell: ``"lstm"`` or ``"rnn"`` (the paper's PR-RNN ablation).
      pattern: the merge schedule, ``"odd-even"`` (default, the paper's).
      backend: ``"numpy"`` (reference), ``"numba"`` (CPU), ``"cupy"`` (GPU).
      dtype: ``"float32"`` or ``"float64"``.
      seed: seeds the Haiku-style initialisation.

    Example:
      >>> model = treesched.PRLSTM(4, 32, 3)
      >>> y = model.forward(np.eye(4, dtype=np.float32)[[[0, 1, 2]]])
      >>> y.shape
      (1, 3, 3)
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 2,
                 cell: str = "lstm", pattern: str = "odd-even", backend: str = "numpy",
                 dtype: str = "float32", seed: int = 0):
        for name, value, most in (("input_size", input_size, MAX_FEATURES),
                                  ("hidden_size", hidden_size, MAX_HIDDEN),
                                  ("output_size", output_size, MAX_FEATURES),
                                  ("num_layers", num_layers, MAX_LAYERS)):
            positive_int(name, value, most=most)
        seed = checked_int("seed", seed, 0, most=MAX_SEED)
        try:
            dtype = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else dtype
        except TypeError:
            raise TreeschedError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") \
                from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise TreeschedError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(cell, str):
            raise TreeschedError(f"cell must be a name (lstm or rnn), got {cell!r}")
        if not isinstance(backend, str):
            raise TreeschedError(f"backend must be a name (numpy, numba or cupy), got "
                                 f"{backend!r}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.output_size, self.num_layers = int(output_size), int(num_layers)
        self.cell_name, self.pattern, self.dtype = cell, validate_pattern(pattern), dtype
        self.seed = seed
        self.cell = get_cell(cell, self.num_layers)
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        # the head's input gradient, handed to the backend and then dead:
        # reused between calls instead of page-faulted in anew
        self._scratch = ReusedArrays(lambda shape, dtype: self.xp.empty(shape, dtype))
        shapes = dict(self.cell.param_shapes(self.input_size, self.hidden_size, self.num_layers))
        shapes.update(head_param_shapes(self.hidden_size, self.output_size))
        self.param_shapes = shapes
        self._params = ParamDict(shapes, self._convert_param)
        rng = np.random.default_rng(seed)
        for name, shape in shapes.items():
            self._params[name] = (haiku_linear_init(rng, shape, dtype) if len(shape) == 2
                                  else np.zeros(shape, dtype))

    # ------------------------------------------------------------ parameters
    @property
    def params(self) -> ParamDict:
        """Parameters by SPEC.md §1 name; assign arrays of the same shapes to load weights."""
        return self._params

    @params.setter
    def params(self, values: dict):
        missing = set(self.param_shapes) - set(values)
        extra = set(values) - set(self.param_shapes)
        if missing or extra:
            raise TreeschedError(
                f"params must have exactly the names {sorted(self.param_shapes)}; "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self.param_shapes:
            self._params[name] = values[name]

    @property
    def config(self) -> dict:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "output_size": self.output_size, "num_layers": self.num_layers,
                "cell": self.cell_name, "pattern": self.pattern, "dtype": self.dtype,
                "backend": self.backend.name, "seed": self.seed}

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"PRLSTM({settings})"

    def _convert_param(self, value, what):
        array = self._as_backend_array(value, what)
        if not bool(self.xp.isfinite(array).all()):
            raise TreeschedError(f"{what} contains NaN or infinity")
        # the model's own copy: a caller later writing into the array it
        # passed (NaN, another run's weights) must not reach the model
        return array.copy()

    # ------------------------------------------------------------ validation
    def _as_backend_array(self, value, what):
        """Any array-like (NumPy, CuPy, DLPack producers) → backend array of our dtype."""
        array = to_backend_array(value, self.backend, what)
        kind = array.dtype.kind
        if kind not in "biuf":
            raise TreeschedError(f"{what} must hold real numbers, got dtype {array.dtype}")
        return array.astype(self.dtype, copy=False)

    def _check_inputs(self, x, lengths):
        x = self._as_backend_array(x, "x")
        if x.ndim != 3:
            raise TreeschedError(f"x must have shape (batch, length, {self.input_size}), got {x.shape}")
        batch, length, features = x.shape
        if features != self.input_size:
            raise TreeschedError(
                f"x has {features} features per position but the model's input_size is "
                f"{self.input_size} (x.shape = {x.shape})")
        if batch < 1 or length < 1:
            raise TreeschedError(f"x must have at least one sequence and one position, got {x.shape}")
        if not bool(self.xp.isfinite(x).all()):
            raise TreeschedError("x contains NaN or infinity")
        if lengths is not None:
            lengths = np.asarray(to_host(lengths, "lengths"))
            if lengths.shape != (batch,):
                raise TreeschedError(f"lengths must have shape ({batch},), got {lengths.shape}")
            if lengths.dtype.kind not in "iu":
                if lengths.dtype.kind == "f" and np.all(np.mod(lengths, 1) == 0):
                    lengths = lengths.astype(np.int64)
                else:
                    raise TreeschedError(f"lengths must be integers, got dtype {lengths.dtype}")
            if lengths.min() < 1 or lengths.max() > length:
                raise TreeschedError(
                    f"lengths must lie in 1..{length} (the padded length), got "
                    f"{int(lengths.min())}..{int(lengths.max())}")
            lengths = lengths.astype(np.int64)
            if np.all(lengths == length):
                lengths = None
        return x, lengths

    def _check_same(self, array, shape, what):
        array = self._as_backend_array(array, what)
        if tuple(array.shape) != tuple(shape):
            raise TreeschedError(f"{what} must have shape {tuple(shape)}, got {tuple(array.shape)}")
        if not bool(self.xp.isfinite(array).all()):
            raise TreeschedError(f"{what} contains NaN or infinity")
        return array

    # --------------------------------------------------------------- running
    def schedule(self, length: int, outputs="all"):
        """The compiled (cached) schedule this model runs for ``length``."""
        return compile_schedule(length, self.pattern, outputs)

    def _groups(self, x, lengths, outputs):
        """Split a batch into runs that share one schedule.

        Without ``lengths`` (or with a prefix-stable pattern reading every
        position) one schedule serves the whole padded batch: outputs at real
        positions do not depend on what follows.  Otherwise each distinct
        length gets its own schedule, so ``"last"``/k read each sequence's
        own last positions.
        """
        length = x.shape[1]
        outputs = normalize_outputs(outputs, length)
        if lengths is None or (outputs == "all" and self.pattern_prefix_stable):
            yield np.arange(x.shape[0]), x, self.schedule(length, outputs)
            return
        if outputs == "all":
            raise TreeschedError(
                f"pattern {self.pattern!r} is not prefix-stable: it cannot read every position "
                f"of a padded batch; use outputs='last' or k")
        for value in np.unique(lengths):
            rows = np.flatnonzero(lengths == value)
            value = int(value)
            if isinstance(outputs, int) and outputs > value:
                raise TreeschedError(
                    f"outputs={outputs} asks for more positions than a sequence of length {value}")
            yield rows, x[self.xp.asarray(rows), :value], self.schedule(value, outputs)

    @property
    def pattern_prefix_stable(self) -> bool:
        return self.schedule(1).prefix_stable

    def _valid_positions(self, lengths, schedule_positions, length):
        """(B, K) mask of outputs at real positions, or None if all are real."""
        if lengths is None:
            return None
        positions = np.asarray(schedule_positions)
        mask = positions[None, :] < lengths[:, None]
        return None if mask.all() else self.xp.asarray(mask.astype(self.dtype))

    def _run(self, x, lengths, outputs, need_grad):
        """Encode every group; returns [(rows, states, tape, valid_mask)]."""
        runs = []
        for rows, xs, schedule in self._groups(x, lengths, outputs):
            # refuse before the workspace is allocated, not in the middle of it
            check_pass_fits(self, schedule, len(rows), need_grad,
                            what="a forward+backward pass" if need_grad else "a forward pass",
                            release=self.backend.clear)
            states, tape = self.backend.encode(self.cell, self._params, xs, schedule, need_grad)
            valid = None
            if lengths is not None and len(rows) == x.shape[0]:
                valid = self._valid_positions(lengths, schedule.output_positions, x.shape[1])
            runs.append((rows, states, tape, valid))
        return runs

    def _gather(self, runs, batch, per_run):
        """Stitch per-group (rows, K, ·) results back into batch order."""
        if len(runs) == 1 and len(runs[0][0]) == batch:
            return per_run[0]
        first = per_run[0]
        out = self.xp.zeros((batch,) + first.shape[1:], dtype=first.dtype)
        for (rows, *_), values in zip(runs, per_run):
            out[self.xp.asarray(rows)] = values
        return out

    @_with_host_compute
    def encode(self, x, lengths=None, outputs="all", like=None):
        """States without the head: a tuple ``(h, c)`` (``(h,)`` for the rnn
        cell), each ``(B, K, H)``, for the requested positions (zero at
        padded positions).

        ``like``: None returns backend arrays (NumPy or CuPy); ``"input"``
        returns them in the library and device of ``x`` (PyTorch, JAX, …);
        or name a library / pass an array of it (see ``treesched.interop``).
        """
        source = x
        x, lengths = self._check_inputs(x, lengths)
        runs = self._run(x, lengths, outputs, need_grad=False)
        result = []
        for index in range(len(self.cell.state_names)):
            parts = []
            for rows, states, _, valid in runs:
                value = states[index]
                if valid is not None:
                    value = value * valid[..., None]
                parts.append(value)
            result.append(self._gather(runs, x.shape[0], parts))
        return returned_as(tuple(result), like, source)

    def last_state(self, x, lengths=None, like=None):
        """Each sequence's final state ``(h, c)`` (``(h,)`` for rnn), each ``(B, H)``,
        without the head: features for a downstream model."""
        return last_state(self, x, lengths, like=like)

    @_with_host_compute
    def forward(self, x, lengths=None, outputs="all", like=None):
        """Logits ``(B, K, O)`` at the requested positions (``K = T`` for "all").

        Args:
          x: ``(B, T, D)`` real array (NumPy, CuPy or any DLPack producer).
          lengths: optional ``(B,)`` real lengths of a right-padded batch;
            outputs at padded positions are zero.
          outputs: ``"all"``, ``"last"`` or k (each sequence's last k).
          like: None (backend arrays), ``"input"`` (the library and device
            of ``x``), or a library name / module / array of it.
        """
        source = x
        x, lengths = self._check_inputs(x, lengths)
        runs = self._run(x, lengths, outputs, need_grad=False)
        logits = []
        for rows, states, _, valid in runs:
            # the states are this call's own (fresh from the backend): relu in place
            y, _ = head_forward(self._params, states[0], need_cache=False, overwrite_input=True)
            if valid is not None:
                y *= valid[..., None]
            logits.append(y)
        return returned_as(self._gather(runs, x.shape[0], logits), like, source)

    @_with_host_compute
    def forward_backward(self, x, dy, lengths=None, outputs="all"):
        """``(y, grads)``: logits and the gradient of ``sum(y * dy)``.

        ``grads`` has the keys of :attr:`params`.  Padded positions (past
        ``lengths``) contribute nothing.
        """
        x, lengths = self._check_inputs(x, lengths)
        logits, runs = self._forward_with_tapes(x, lengths, outputs)
        dy = self._check_same(dy, logits.shape, "dy")
        return logits, self._backward(runs, dy, x.shape[0])

    @_with_host_compute
    def loss_and_grads(self, x, targets, mask=None, lengths=None):
        """Softmax cross-entropy at the last ``K = targets.shape[1]`` positions.

        The loss is ``sum(mask * xent) / (B * K)``: with no mask, the mean
        over batch and output positions, as the public training code of the
        formal-language benchmark computes it (it trains on every output
        position; its masks apply to accuracy only).

        Args:
          x: ``(B, T, D)`` inputs (the task's input tape).
          targets: ``(B, K, O)`` one-hot (or probabilities), ``K <= T``.
          mask: optional ``(B, K)`` weights, 1 where a position counts.
          lengths: optional real lengths; with them, the K positions are each
            sequence's own last K.
        Returns:
          ``(loss, grads, logits)``: a float, a dict like :attr:`params`,
          and the ``(B, K, O)`` logits.
        """
        x, lengths = self._check_inputs(x, lengths)
        batch, length = x.shape[:2]
        if len(getattr(targets, "shape", ())) != 3:
            raise TreeschedError(f"targets must have shape (batch, K, {self.output_size})")
        k = targets.shape[1]
        if not 1 <= k <= length:
            raise TreeschedError(f"targets cover {k} positions; x has {length}")
        targets = self._check_same(targets, (batch, k, self.output_size), "targets")
        weights = (self.xp.ones((batch, k), self.dtype) if mask is None
                   else self._check_same(mask, (batch, k), "mask"))
        outputs = "all" if k == length else k
        logits, runs = self._forward_with_tapes(x, lengths, outputs)
        loss, dlogits = softmax_cross_entropy(logits, targets, weights / (batch * k))
        return loss, self._backward(runs, dlogits, batch), logits

    def _forward_with_tapes(self, x, lengths, outputs):
        """Forward keeping what backward needs: ``(logits, runs)``."""
        runs, logits = [], []
        for rows, states, tape, valid in self._run(x, lengths, outputs, need_grad=True):
            y, head_cache = head_forward(self._params, states[0], need_cache=True,
                                         overwrite_input=True)
            if valid is not None:
                y *= valid[..., None]
            logits.append(y)
            runs.append((rows, len(states), tape, valid, head_cache))
        return self._gather(runs, x.shape[0], logits), runs

    def _backward(self, runs, dy, batch):
        grads = {name: self.xp.zeros(shape, self.dtype) for name, shape in self.param_shapes.items()}
        for rows, num_states, tape, valid, head_cache in runs:
            run_dy = dy if len(rows) == batch else dy[self.xp.asarray(rows)]
            if valid is not None:
                run_dy = run_dy * valid[..., None]
            dh_buffer = self._scratch.get(("dh", len(rows)), head_cache.shape, head_cache.dtype)
            dh, head_grads = head_backward(self._params, head_cache, run_dy, out=dh_buffer)
            dstates = (dh,) + (None,) * (num_states - 1)
            cell_grads, _ = self.backend.encode_backward(self.cell, self._params, tape, dstates)
            for name, value in {**head_grads, **cell_grads}.items():
                grads[name] += value
        return grads

    # ------------------------------------------------------------- streaming
    def stream(self, batch: int = 1) -> Stream:
        """A :class:`treesched.streaming.Stream`: feed tokens one at a time
        (``push``) or in chunks (``extend``), each position's logits equal to
        :meth:`forward` on the whole sequence, in memory that grows like the
        pattern's frontier (``O(log t)`` for odd-even).  Not for ``reduce``."""
        return Stream(self, batch)

    def load_stream(self, path) -> Stream:
        """Continue a stream saved with ``Stream.save`` (it must have been saved
        from this model: same configuration and weights)."""
        return load_stream(path, self)

    # ----------------------------------------------------------- checkpoints
    def save(self, path, *, replace: bool = False, metadata: dict | None = None) -> None:
        """Write params and configuration to one ``.npz``, atomically.

        ``replace``: also write over a symbolic link, special or read-only
        file (refused otherwise, :func:`treesched.fileio.atomic_open`).
        ``metadata``: JSON-able facts stored with the configuration under
        ``"metadata"`` (a training run records its run id and step there).
        """
        config = dict(self.config, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
        if metadata is not None:
            config["metadata"] = metadata
        buffer = io.BytesIO()
        np.savez(buffer, __config__=np.array(json.dumps(config)), **self._params.numpy())
        write_bytes(path, buffer.getvalue(), replace=replace)

    @classmethod
    def from_haiku(cls, found: HaikuImport, *, pattern: str = "odd-even", backend: str = "numpy",
                   dtype: str | None = None, source: str = "checkpoint") -> "PRLSTM":
        """A model holding the parameters of an imported paper checkpoint
        (:func:`treesched.haiku_import.load_haiku_msgpack`).

        ``pattern``: ``"odd-even"`` (default) is the ``jax.lax.associative_scan``
        recursion the paper's code uses, the only one that reproduces its
        outputs.  ``dtype``: default float64 if every tensor of the file is
        float64, else float32.  Sizes, cell and ``num_layers`` come from the file.
        """
        config = found.config
        model = cls(config["input_size"], config["hidden_size"], config["output_size"],
                    num_layers=config["num_layers"], cell=config["cell"], pattern=pattern,
                    backend=backend, dtype=dtype or config["dtype"])
        try:
            model.params = found.params
        except TreeschedError as error:
            raise TreeschedError(f"{source}: {error}") from None
        return model

    @classmethod
    def from_haiku_msgpack(cls, path, *, pattern: str = "odd-even", backend: str = "numpy",
                           dtype: str | None = None) -> "PRLSTM":
        """Import a checkpoint of the paper's code (Haiku params serialized with
        ``flax.serialization.to_bytes``); see :mod:`treesched.haiku_import`.
        Needs msgpack only, not JAX; refuses anything that is not the paper's
        PR-LSTM / PR-RNN with a read-out head."""
        return cls.from_haiku(load_haiku_msgpack(path), pattern=pattern, backend=backend,
                              dtype=dtype, source=f"checkpoint {path}")

    @classmethod
    def load(cls, path, backend: str | None = None) -> "PRLSTM":
        """Read a checkpoint written by :meth:`save`; refuse anything else."""
        params, config = read_checkpoint(path)
        model = cls(config["input_size"], config["hidden_size"], config["output_size"],
                    num_layers=config["num_layers"], cell=config["cell"],
                    pattern=config["pattern"], backend=backend or config.get("backend", "numpy"),
                    dtype=config["dtype"], seed=config.get("seed", 0))
        missing = set(model.param_shapes) - set(params)
        extra = set(params) - set(model.param_shapes)
        if missing or extra:
            raise TreeschedError(
                f"checkpoint {path} does not match its configuration: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}")
        for name, value in params.items():
            if value.dtype.kind != "f":
                raise TreeschedError(f"checkpoint {path}: parameter {name!r} is not floating point")
            try:
                model.params[name] = value
            except TreeschedError as error:
                raise TreeschedError(f"checkpoint {path}: {error}") from None
        return model


def read_checkpoint(path) -> tuple[dict, dict]:
    """``(params, config)`` from a treesched ``.npz``, or a TreeschedError."""
    contents = read_npz(path, "checkpoint")
    if "__config__" not in contents:
        raise TreeschedError(f"checkpoint {path} has no configuration: not written by treesched")
    try:
        config = json.loads(str(contents.pop("__config__")))
    except json.JSONDecodeError:
        raise TreeschedError(f"checkpoint {path} has a corrupt configuration") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise TreeschedError(f"checkpoint {path} is not a treesched PRLSTM checkpoint")
    if config.get("version") != CHECKPOINT_VERSION:
        raise TreeschedError(f"checkpoint {path} has unsupported version {config.get('version')!r}")
    required = ("input_size", "hidden_size", "output_size", "num_layers", "cell", "pattern", "dtype")
    absent = [key for key in required if key not in config]
    if absent:
        raise TreeschedError(f"checkpoint {path} configuration lacks {', '.join(absent)}")
    return contents, config

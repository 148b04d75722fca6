"""Backend parity: a backend against the NumPy reference, on random weights.

``run_parity("numba")`` builds, for every configuration (both cells, every
schedule pattern, 1-3 layers) and every shape of a sweep (several batch
sizes and padded lengths, odd ones included), a reference model on the
``numpy`` backend and the same model (same parameters) on the backend under
test, then compares, on a right-padded batch with random ``lengths``:

* the encoder states (``encode``: h, and c for the LSTM cell),
* the logits (``forward``),
* every parameter gradient (``forward_backward`` with a random ``dy``),

at every requested position (all positions for the prefix-stable patterns;
the last one for ``reduce``), in float32 and float64.  A backend with several
code paths names them (``parity_variants()``: the numba backend's two GEMM
paths) and each is checked against the same reference numbers.

Why a sweep: buffers reused across calls and shapes, row blocking that
depends on the row count, and remainder loops only misbehave at some
shapes; a bias gradient summed against a half-initialised buffer once
passed at the old single default shape (batch 4, length 41) and failed at
batch 3, length 7.  Each shape draws its data from ``(seed, batch, length)``
alone, so ``--batch 3 --length 7`` reproduces that shape of the sweep.

The error of an array is *relative*: ``max |got - want| / max |want|``; it
must not exceed 1e-4 in float32 and 1e-10 in float64.  The result is a
:class:`ParityReport` (a table for people, ``to_dict()`` for programs).  Used
by ``treesched parity`` and by the backend tests.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from .compiler import validate_pattern
from .errors import TreeschedError
from .interop import to_host
from .model import PRLSTM
from .ops import cell_names
from .patterns import PATTERNS, PREFIX_STABLE

TOLERANCES = {"float32": 1e-4, "float64": 1e-10}
#: The cells checked by default: the paper's two.
CELLS = ("lstm", "rnn")
LAYERS = (1, 2, 3)
# The default sweep: odd batches and lengths (a single sequence, short
# schedules, non-powers of two), and one batch whose widest levels exceed
# 512 rows (where the numba backend splits its weight-gradient GEMMs).
DTYPES = ("float32", "float64")
LENGTHS = (1, 2, 3, 7, 13, 41)
BATCHES = (1, 3, 13)
MAX_FAILURE_LINES = 20


@dataclass(frozen=True)
class ParityCase:
    """One compared array of one configuration, shape and backend variant."""

    cell: str
    pattern: str
    num_layers: int
    quantity: str          # "logits", "state h", "state c" or "grad <param>"
    max_abs_error: float
    rel_error: float
    tolerance: float
    dtype: str = ""
    batch: int = 0
    length: int = 0
    variant: str = ""      # the backend's code path ("numba-gemm", ...), or its name

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel_error) and self.rel_error <= self.tolerance

    @property
    def where(self) -> str:
        """``"BxT variant"``: the shape and code path of this comparison."""
        return f"{self.batch}x{self.length} {self.variant}".strip()


@dataclass
class ParityReport:
    """Every comparison of one parity run."""

    backend: str
    dtypes: tuple
    lengths: tuple
    batches: tuple
    hidden: int
    tolerances: dict       # dtype -> tolerance
    seed: int
    variants: tuple = ()
    cases: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case.passed for case in self.cases)

    @property
    def failures(self) -> list:
        return [case for case in self.cases if not case.passed]

    def worst(self, dtype: str | None = None, prefix: str = ""):
        """The case with the largest relative error (of ``dtype``, of quantities
        starting with ``prefix``), or None."""
        chosen = [c for c in self.cases if (dtype is None or c.dtype == dtype)
                  and c.quantity.startswith(prefix)]
        return max(chosen, key=lambda c: _sort_key(c.rel_error), default=None)

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "cases"}
        data["passed"] = self.passed
        data["worst"] = {dtype: _case_dict(self.worst(dtype)) for dtype in self.dtypes}
        data["cases"] = [_case_dict(case) for case in self.cases]
        return data

    def _configs(self, dtype):
        configs: dict = {}
        for case in self.cases:
            if case.dtype == dtype:
                configs.setdefault((case.cell, case.pattern, case.num_layers), []).append(case)
        return configs

    def format_table(self, verbose: bool = False) -> str:
        """Fixed-width tables, one per dtype: one line per configuration (the
        worst over shapes and variants, and where it was), or per array if verbose."""
        shapes = " ".join(f"{b}x{t}" for b in self.batches for t in self.lengths)
        lines = [f"parity: backend {self.backend} vs numpy, hidden {self.hidden}, "
                 f"random lengths, seed {self.seed}",
                 f"shapes (batch x length): {shapes}"]
        if self.variants:
            lines.append(f"variants: {', '.join(self.variants)}")
        lines.append("relative error = max|got - want| / max|want|, the worst over shapes"
                     + (" and variants" if self.variants else ""))
        for dtype in self.dtypes:
            lines.append("")
            top = self.worst(dtype)
            summary = (f"worst {top.rel_error:.2e} ({top.quantity}, {top.cell} {top.pattern} "
                       f"layers={top.num_layers}, {top.where})" if top else "nothing compared")
            lines.append(f"{dtype}, tolerance {self.tolerances[dtype]:g}: {summary}")
            if verbose:
                lines.append(f"{'cell':<5} {'pattern':<12} {'layers':>6}  {'at':<18} "
                             f"{'quantity':<18} {'rel error':>10}  status")
                for case in self.cases:
                    if case.dtype == dtype:
                        lines.append(f"{case.cell:<5} {case.pattern:<12} {case.num_layers:>6}  "
                                     f"{case.where:<18} {case.quantity:<18} "
                                     f"{case.rel_error:>10.2e}  "
                                     f"{'ok' if case.passed else 'FAIL'}")
                continue
            lines.append(f"{'cell':<5} {'pattern':<12} {'layers':>6}  {'states':>9} "
                         f"{'logits':>9} {'grads':>9}  {'worst grad':<14} {'at':<18} status")
            for (cell, pattern, layers), cases in self._configs(dtype).items():
                def worst(prefix):
                    chosen = [c for c in cases if c.quantity.startswith(prefix)]
                    return max(chosen, key=lambda c: _sort_key(c.rel_error), default=None)
                state, logits, grad = worst("state"), worst("logits"), worst("grad")
                fmt = lambda c: f"{c.rel_error:>9.2e}" if c else f"{'-':>9}"  # noqa: E731
                ok = all(c.passed for c in cases)
                lines.append(f"{cell:<5} {pattern:<12} {layers:>6}  {fmt(state)} {fmt(logits)} "
                             f"{fmt(grad)}  {(grad.quantity[5:] if grad else '-'):<14} "
                             f"{(grad.where if grad else '-'):<18} {'ok' if ok else 'FAIL'}")
        failures = self.failures
        if failures:
            lines.append("")
        for case in failures[:MAX_FAILURE_LINES]:
            lines.append(f"FAILED: {case.dtype} {case.where} {case.cell} {case.pattern} "
                         f"layers={case.num_layers} {case.quantity}: relative error "
                         f"{case.rel_error:.3g} > {case.tolerance:g} "
                         f"(max abs {case.max_abs_error:.3g})")
        if len(failures) > MAX_FAILURE_LINES:
            lines.append(f"... and {len(failures) - MAX_FAILURE_LINES} more failed arrays "
                         f"(--verbose or --json list them all)")
        lines.append("")
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {len(self.cases) - len(failures)}"
                     f"/{len(self.cases)} arrays within tolerance ({self.seconds:.1f} s)")
        return "\n".join(lines) + "\n"


def _case_dict(case):
    return None if case is None else dict(asdict(case), passed=case.passed)


def _sort_key(value: float) -> float:
    return math.inf if not math.isfinite(value) else value


def _cell_number(cell: str) -> int:
    """A number per cell name that does not change when other cells are registered."""
    return CELLS.index(cell) if cell in CELLS else zlib.crc32(cell.encode())


def compare(got, want) -> tuple:
    """(max abs error, relative error) of two arrays; inf on shape mismatch or NaN."""
    if got is None or want is None:
        return math.inf, math.inf
    got = np.asarray(to_host(got), np.float64)
    want = np.asarray(to_host(want), np.float64)
    if got.shape != want.shape:
        return math.inf, math.inf
    if want.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    if not np.all(np.isfinite(diff)):
        return math.inf, math.inf
    max_abs = float(diff.max())
    scale = float(np.abs(want).max())
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def _candidate(backend, **config) -> PRLSTM:
    if isinstance(backend, str):
        return PRLSTM(backend=backend, **config)
    # a backend instance (tests, emulations): swap it into a numpy-built model
    model = PRLSTM(backend="numpy", **config)
    model.backend = backend
    model.xp = backend.xp
    return model


def _variants(backend) -> list:
    """``[(label, backend name or instance)]``: every code path to check."""
    if not isinstance(backend, str):
        return [("", backend)]
    from .backends import get_backend
    shared = get_backend(backend)  # TreeschedError with the reason if it cannot run here
    variants = getattr(type(shared), "parity_variants", None)
    return list(variants()) if variants is not None else [("", backend)]


def _positive(name, value, most=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TreeschedError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:
        raise TreeschedError(f"{name} must be at most {most}, got {value}")
    return int(value)


def _values(name, value, check) -> tuple:
    """One value or a sequence of them -> a tuple of distinct checked values, in order."""
    values = (value,) if isinstance(value, (str, int, np.integer)) else tuple(value)
    if not values:
        raise TreeschedError(f"{name}: nothing given")
    return tuple(dict.fromkeys(check(v) for v in values))


def _rng(seed, *keys):
    return np.random.default_rng([seed, *keys])


def run_parity(backend, dtype=DTYPES, length=LENGTHS, batch=BATCHES, hidden: int = 16, *,
               patterns=None, cells=CELLS, layers=LAYERS, seed: int = 0, input_size: int = 5,
               output_size: int = 5, tolerance: float | None = None,
               progress=None) -> ParityReport:
    """Compare ``backend`` (a name, or a backend instance) with ``numpy``.

    Args:
      dtype: "float32" (tolerance 1e-4), "float64" (1e-10), or a sequence.
      length, batch: padded length(s) T and batch size(s): an int or a
        sequence; every (batch, length) pair is checked.  Default: batches
        1, 3, 13 by lengths 1, 2, 3, 7, 13, 41.
      hidden: the hidden size.
      patterns, cells, layers: what to cover; by default every pattern, both
        cells and 1-3 layers (every combination).
      seed: non-negative; a shape's data depend on (seed, batch, length) only.
      tolerance: overrides the per-dtype tolerance.
      progress: optional callable receiving one line per (dtype, shape).
    Raises:
      TreeschedError: bad arguments, or the backend cannot run here.
    """
    dtypes = _values("dtype", dtype, _dtype)
    lengths = _values("length", length, lambda v: _positive("length", v, 100_000))
    batches = _values("batch", batch, lambda v: _positive("batch", v, 4096))
    hidden = _positive("hidden", hidden, 4096)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TreeschedError(f"seed must be a non-negative integer, got {seed!r}")
    patterns = tuple(PATTERNS) if patterns is None else tuple(validate_pattern(p) for p in patterns)
    for cell in cells:
        if cell not in cell_names():
            raise TreeschedError(f"cell must be one of {', '.join(cell_names())}, got {cell!r}")
    layers = _values("layers", LAYERS if layers is None else layers,
                     lambda v: _positive("layers", v, 8))
    if not patterns or not cells:
        raise TreeschedError("nothing to compare: no pattern or no cell given")
    variants = _variants(backend)
    name = backend if isinstance(backend, str) else getattr(backend, "name",
                                                             type(backend).__name__)
    tolerances = {d: TOLERANCES[d] if tolerance is None else float(tolerance) for d in dtypes}
    labels = tuple(label for label, _ in variants)
    report = ParityReport(name, dtypes, lengths, batches, hidden, tolerances, int(seed),
                          tuple(label for label in labels if label))
    started = time.perf_counter()
    configs = [(c, p, n) for c in cells for p in patterns for n in layers]
    for dtype_name in dtypes:
        for batch_size in batches:
            for length_value in lengths:
                first_case = len(report.cases)
                _check_shape(report, variants, dtype_name, batch_size, length_value, configs,
                             hidden, input_size, output_size, int(seed))
                if progress is not None:
                    worst = max((c.rel_error for c in report.cases[first_case:]),
                                key=_sort_key)
                    progress(f"{dtype_name} batch {batch_size} length {length_value}: worst "
                             f"relative error {worst:.2e} ({len(configs)} configurations"
                             f"{f' x {len(variants)} variants' if len(variants) > 1 else ''})")
    report.seconds = time.perf_counter() - started
    return report


def _dtype(value) -> str:
    if value not in TOLERANCES:
        raise TreeschedError(f"dtype must be one of {', '.join(TOLERANCES)}, got {value!r}")
    return value


def _check_shape(report, variants, dtype, batch, length, configs, hidden, input_size,
                 output_size, seed):
    """Every configuration at one (dtype, batch, length), every variant."""
    tol = report.tolerances[dtype]
    rng = _rng(seed, batch, length)  # the same data in both dtypes
    x = rng.standard_normal((batch, length, input_size)).astype(dtype)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # at least one full-length sequence
    for cell, pattern, num_layers in configs:
        config_rng = _rng(seed, batch, length, _cell_number(cell), list(PATTERNS).index(pattern),
                          num_layers)
        config = dict(input_size=input_size, hidden_size=hidden, output_size=output_size,
                      num_layers=num_layers, cell=cell, pattern=pattern, dtype=dtype,
                      seed=int(config_rng.integers(2**31)))
        reference = PRLSTM(backend="numpy", **config)
        # larger-than-default weights so the gates are not all near 0.5
        for key, value in reference.params.numpy().items():
            reference.params[key] = (value * 2 + (0.1 * config_rng.standard_normal(value.shape)
                                                  if value.ndim == 1 else 0)).astype(dtype)
        outputs = "all" if pattern in PREFIX_STABLE else "last"
        k = length if outputs == "all" else 1
        dy = config_rng.standard_normal((batch, k, output_size)).astype(dtype)
        want_states = reference.encode(x, lengths, outputs)
        want_logits = reference.forward(x, lengths, outputs)
        _, want_grads = reference.forward_backward(x, dy, lengths, outputs)

        for label, backend in variants:
            candidate = _candidate(backend, **config)
            candidate.params = reference.params.numpy()

            def add(quantity, got, want):
                max_abs, rel = compare(got, want)
                report.cases.append(ParityCase(cell, pattern, num_layers, quantity, max_abs,
                                               rel, tol, dtype, batch, length, label))

            got_states = candidate.encode(x, lengths, outputs)
            for state_name, got, want in zip(("h", "c"), got_states, want_states):
                add(f"state {state_name}", got, want)
            add("logits", candidate.forward(x, lengths, outputs), want_logits)
            _, got_grads = candidate.forward_backward(x, dy, lengths, outputs)
            for param in reference.param_shapes:
                add(f"grad {param}", got_grads.get(param), want_grads[param])


__all__ = ["run_parity", "ParityReport", "ParityCase", "compare", "TOLERANCES", "DTYPES",
           "LENGTHS", "BATCHES", "LAYERS"]

"""Backend parity: a backend against the NumPy reference, on random weights.

``run_parity("cupy")`` builds, for every configuration (both cells, every
schedule pattern, 1-3 layers), a reference model on the ``numpy`` backend
and the same model (same parameters) on the backend under test, then
compares, on a right-padded batch with random ``lengths``:

* the encoder states (``encode``: h, and c for the LSTM cell),
* the logits (``forward``),
* every parameter gradient (``forward_backward`` with a random ``dy``),

at every requested position (all positions for the prefix-stable patterns;
the last one for ``reduce``).  The error of an array is *relative*:
``max |got - want| / max |want|``; it must not exceed 1e-4 in float32 and
1e-10 in float64.  The result is a :class:`ParityReport` (a table for
people, ``to_dict()`` for programs).  Used by ``treesched parity`` and by
the backend tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .compiler import validate_pattern
from .errors import TreeschedError
from .model import PRLSTM, _to_host
from .patterns import PATTERNS, PREFIX_STABLE

TOLERANCES = {"float32": 1e-4, "float64": 1e-10}
CELLS = ("lstm", "rnn")


@dataclass(frozen=True)
class ParityCase:
    """One compared array of one configuration."""

    cell: str
    pattern: str
    num_layers: int
    quantity: str          # "logits", "state h", "state c" or "grad <param>"
    max_abs_error: float
    rel_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel_error) and self.rel_error <= self.tolerance


@dataclass
class ParityReport:
    """Every comparison of one parity run."""

    backend: str
    dtype: str
    length: int
    batch: int
    hidden: int
    tolerance: float
    seed: int
    cases: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case.passed for case in self.cases)

    @property
    def failures(self) -> list:
        return [case for case in self.cases if not case.passed]

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "cases"}
        data["passed"] = self.passed
        data["cases"] = [dict(asdict(case), passed=case.passed) for case in self.cases]
        return data

    def _configs(self):
        configs: dict = {}
        for case in self.cases:
            configs.setdefault((case.cell, case.pattern, case.num_layers), []).append(case)
        return configs

    def format_table(self, verbose: bool = False) -> str:
        """A fixed-width table: one line per configuration (or per array if verbose)."""
        lines = [f"parity: backend {self.backend} vs numpy, {self.dtype}, length {self.length}, "
                 f"batch {self.batch}, hidden {self.hidden}, random lengths, seed {self.seed}; "
                 f"relative error = max|got - want| / max|want|, tolerance {self.tolerance:g}",
                 ""]
        if verbose:
            lines.append(f"{'cell':<5} {'pattern':<12} {'layers':>6}  {'quantity':<18} "
                         f"{'rel error':>10}  status")
            for case in self.cases:
                lines.append(f"{case.cell:<5} {case.pattern:<12} {case.num_layers:>6}  "
                             f"{case.quantity:<18} {case.rel_error:>10.2e}  "
                             f"{'ok' if case.passed else 'FAIL'}")
        else:
            lines.append(f"{'cell':<5} {'pattern':<12} {'layers':>6}  {'states':>9} "
                         f"{'logits':>9} {'grads':>9}  {'worst grad':<16} status")
            for (cell, pattern, layers), cases in self._configs().items():
                def worst(prefix):
                    chosen = [c for c in cases if c.quantity.startswith(prefix)]
                    return max(chosen, key=lambda c: _sort_key(c.rel_error), default=None)
                state, logits, grad = worst("state"), worst("logits"), worst("grad")
                fmt = lambda c: f"{c.rel_error:>9.2e}" if c else f"{'-':>9}"  # noqa: E731
                ok = all(c.passed for c in cases)
                lines.append(f"{cell:<5} {pattern:<12} {layers:>6}  {fmt(state)} {fmt(logits)} "
                             f"{fmt(grad)}  {(grad.quantity[5:] if grad else '-'):<16} "
                             f"{'ok' if ok else 'FAIL'}")
        for case in self.failures:
            lines.append(f"FAILED: {case.cell} {case.pattern} layers={case.num_layers} "
                         f"{case.quantity}: relative error {case.rel_error:.3g} > "
                         f"{case.tolerance:g} (max abs {case.max_abs_error:.3g})")
        lines.append("")
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {len(self.cases) - len(self.failures)}"
                     f"/{len(self.cases)} arrays within tolerance ({self.seconds:.1f} s)")
        return "\n".join(lines) + "\n"


def _sort_key(value: float) -> float:
    return math.inf if not math.isfinite(value) else value


def compare(got, want) -> tuple:
    """(max abs error, relative error) of two arrays; inf on shape mismatch or NaN."""
    if got is None or want is None:
        return math.inf, math.inf
    got = np.asarray(_to_host(got), np.float64)
    want = np.asarray(_to_host(want), np.float64)
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


def _configurations(cells, patterns, layers):
    if layers is not None:
        return [(c, p, n) for c in cells for p in patterns for n in layers]
    configs = [(c, p, 2) for c in cells for p in patterns]
    base = "odd-even" if "odd-even" in patterns else patterns[0]
    configs += [(c, base, n) for c in cells for n in (1, 3)]
    return configs


def _candidate(backend, **config) -> PRLSTM:
    if isinstance(backend, str):
        return PRLSTM(backend=backend, **config)
    # a backend instance (tests, emulations): swap it into a numpy-built model
    model = PRLSTM(backend="numpy", **config)
    model.backend = backend
    model.xp = backend.xp
    return model


def _positive(name, value, most=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TreeschedError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:
        raise TreeschedError(f"{name} must be at most {most}, got {value}")
    return int(value)


def run_parity(backend, dtype: str = "float32", length: int = 41, batch: int = 4,
               hidden: int = 16, *, patterns=None, cells=CELLS, layers=None, seed: int = 0,
               input_size: int = 5, output_size: int = 5, tolerance: float | None = None,
               progress=None) -> ParityReport:
    """Compare ``backend`` (a name, or a backend instance) with ``numpy``.

    Args:
      dtype: "float32" (tolerance 1e-4) or "float64" (1e-10).
      length, batch, hidden: the padded length T, the batch, the hidden size.
      patterns, cells, layers: what to cover; by default every pattern and
        both cells with 2 layers, plus 1 and 3 layers on odd-even.
      progress: optional callable receiving one line per configuration.
    Raises:
      TreeschedError: bad arguments, or the backend cannot run here.
    """
    if dtype not in TOLERANCES:
        raise TreeschedError(f"dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
    length = _positive("length", length, 100_000)
    batch = _positive("batch", batch, 4096)
    hidden = _positive("hidden", hidden, 4096)
    patterns = tuple(PATTERNS) if patterns is None else tuple(validate_pattern(p) for p in patterns)
    for cell in cells:
        if cell not in CELLS:
            raise TreeschedError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if not patterns or not cells:
        raise TreeschedError("nothing to compare: no pattern or no cell given")
    if isinstance(backend, str):
        from .backends import get_backend
        get_backend(backend)  # TreeschedError with the reason if it cannot run here
        name = backend
    else:
        name = getattr(backend, "name", type(backend).__name__)
    tol = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    report = ParityReport(name, dtype, length, batch, hidden, tol, seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    x = rng.standard_normal((batch, length, input_size)).astype(dtype)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # at least one full-length sequence
    for cell, pattern, num_layers in _configurations(cells, patterns, layers):
        config = dict(input_size=input_size, hidden_size=hidden, output_size=output_size,
                      num_layers=num_layers, cell=cell, pattern=pattern, dtype=dtype,
                      seed=int(rng.integers(2**31)))
        reference = PRLSTM(backend="numpy", **config)
        # larger-than-default weights so the gates are not all near 0.5
        for key, value in reference.params.numpy().items():
            reference.params[key] = (value * 2 + (0.1 * rng.standard_normal(value.shape)
                                                  if value.ndim == 1 else 0)).astype(dtype)
        candidate = _candidate(backend, **config)
        candidate.params = reference.params.numpy()
        outputs = "all" if pattern in PREFIX_STABLE else "last"
        k = length if outputs == "all" else 1
        dy = rng.standard_normal((batch, k, output_size)).astype(dtype)

        first_case = len(report.cases)

        def add(quantity, got, want):
            max_abs, rel = compare(got, want)
            report.cases.append(ParityCase(cell, pattern, num_layers, quantity, max_abs, rel, tol))

        want_states = reference.encode(x, lengths, outputs)
        got_states = candidate.encode(x, lengths, outputs)
        for state_name, got, want in zip(("h", "c"), got_states, want_states):
            add(f"state {state_name}", got, want)
        add("logits", candidate.forward(x, lengths, outputs), reference.forward(x, lengths, outputs))
        want_y, want_grads = reference.forward_backward(x, dy, lengths, outputs)
        got_y, got_grads = candidate.forward_backward(x, dy, lengths, outputs)
        for param in reference.param_shapes:
            add(f"grad {param}", got_grads.get(param), want_grads[param])
        if progress is not None:
            worst = max((c.rel_error for c in report.cases[first_case:]), key=_sort_key)
            progress(f"{cell} {pattern} layers={num_layers}: worst relative error {worst:.2e}")
    report.seconds = time.perf_counter() - started
    return report


__all__ = ["run_parity", "ParityReport", "ParityCase", "compare", "TOLERANCES"]

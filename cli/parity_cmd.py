"""``treesched parity``: compare a backend with the NumPy reference."""

from __future__ import annotations

import json

import click

from treesched.errors import TreeschedError
from treesched.fileio import write_text
from treesched.limits import MAX_BATCH, MAX_HIDDEN, MAX_LENGTH, MAX_SEED
from treesched.validation import parse_int
from treesched.parity import BATCHES, DTYPES, LENGTHS, TOLERANCES, run_parity


def _ints(text: str, what: str) -> tuple:
    """``"1,3,13"`` -> (1, 3, 13)."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(parts):
        raise TreeschedError(f"{what} must be positive integers separated by commas, "
                             f"got {text!r}")
    most = MAX_LENGTH if what == "length" else MAX_BATCH
    return tuple(parse_int(part, what, most=most) for part in parts)


def _dtypes(text: str) -> tuple:
    names = DTYPES if text == "both" else tuple(part.strip() for part in text.split(","))
    for name in names:
        if name not in TOLERANCES:
            raise TreeschedError(f"--dtype must be one of {', '.join(TOLERANCES)} or both, "
                                 f"got {text!r}")
    return names


def _joined(values) -> str:
    return ",".join(str(v) for v in values)


@click.command("parity")
@click.option("--backend", "-b", required=True, metavar="NAME",
              help="Backend to check against numpy: cupy or numba.")
@click.option("--dtype", default="both", show_default=True,
              help="float32 (tolerance 1e-4), float64 (1e-10), or both.")
@click.option("--length", "-n", default=_joined(LENGTHS), show_default=True,
              help="Padded sequence length(s) T, comma-separated.")
@click.option("--batch", default=_joined(BATCHES), show_default=True,
              help="Batch size(s), comma-separated; every (batch, length) pair runs.")
@click.option("--hidden", default="16", show_default=True, help="Hidden size.")
@click.option("--seed", default="0", show_default=True, help="Seed of weights, inputs, lengths.")
@click.option("--verbose", "-v", is_flag=True, help="One line per compared array.")
@click.option("--json", "json_path", default=None, metavar="FILE",
              help="Also write the full report as JSON to FILE.")
@click.option("--force", is_flag=True,
              help="Write over a symbolic link (replacing it), a FIFO, device or read-only "
                   "file at the output path; refused without it.")
def command(backend, dtype, length, batch, hidden, seed, verbose, json_path, force):
    """Compare BACKEND with the NumPy reference: outputs and every gradient.

    Random weights, both cells (lstm, rnn), every schedule pattern, 1-3
    layers, both dtypes, a sweep of batch sizes and padded lengths (odd ones
    included: shape-dependent bugs hide at a single shape), each batch
    right-padded with random lengths, and every code path the backend has
    (numba: both GEMM paths).  Prints one table per dtype (the worst error
    of each configuration over the sweep, and where) and PASS or FAIL; exits
    with status 1 on failure.

    \b
    Examples:
      treesched parity --backend numba
      treesched parity --backend numba --dtype float64 --batch 3 --length 7
      treesched parity --backend cupy --dtype float64 --length 200 --batch 8
    """
    dtypes = _dtypes(dtype)
    seed_value = parse_int(seed, "--seed", minimum=0, most=MAX_SEED)
    report = run_parity(backend, dtype=dtypes, length=_ints(length, "length"),
                        batch=_ints(batch, "batch"), hidden=parse_int(hidden, "hidden", most=MAX_HIDDEN),
                        seed=seed_value, progress=lambda line: click.echo(line, err=True))
    click.echo(report.format_table(verbose=verbose), nl=False)
    if json_path is not None:
        write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n", replace=force)
    if not report.passed:
        raise SystemExit(1)

"""``treesched parity``: compare a backend with the NumPy reference."""

from __future__ import annotations

import json

import click

from treesched.errors import TreeschedError
from treesched.fileio import write_text
from treesched.parity import TOLERANCES, run_parity


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise TreeschedError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise TreeschedError(f"{what} must be a positive integer, got {value}")
    return value


@click.command("parity")
@click.option("--backend", "-b", required=True, metavar="NAME",
              help="Backend to check against numpy: cupy or numba.")
@click.option("--dtype", default="float32", show_default=True,
              help="float32 (tolerance 1e-4) or float64 (1e-10).")
@click.option("--length", "-n", default="41", show_default=True, help="Padded sequence length T.")
@click.option("--batch", default="4", show_default=True, help="Batch size.")
@click.option("--hidden", default="16", show_default=True, help="Hidden size.")
@click.option("--seed", default="0", show_default=True, help="Seed of weights, inputs, lengths.")
@click.option("--verbose", "-v", is_flag=True, help="One line per compared array.")
@click.option("--json", "json_path", default=None, metavar="FILE",
              help="Also write the full report as JSON to FILE.")
def command(backend, dtype, length, batch, hidden, seed, verbose, json_path):
    """Compare BACKEND with the NumPy reference: outputs and every gradient.

    Random weights, both cells (lstm, rnn), every schedule pattern, 1-3
    layers, a padded batch with random lengths.  Prints a table and PASS or
    FAIL; exits with status 1 on failure.

    \b
    Examples:
      treesched parity --backend cupy
      treesched parity --backend cupy --dtype float64 --length 200 --batch 8
    """
    if dtype not in TOLERANCES:
        raise TreeschedError(f"--dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
    try:
        seed_value = int(seed)
    except ValueError:
        raise TreeschedError(f"seed must be an integer, got {seed!r}") from None
    report = run_parity(backend, dtype=dtype, length=_int(length, "length"),
                        batch=_int(batch, "batch"), hidden=_int(hidden, "hidden"),
                        seed=seed_value, progress=lambda line: click.echo(line, err=True))
    click.echo(report.format_table(verbose=verbose), nl=False)
    if json_path is not None:
        write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.passed:
        raise SystemExit(1)

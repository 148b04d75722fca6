"""``treesched sweep``: train and evaluate one task at several seeds and
learning rates, and write one summary (``sweep.json``)."""

from __future__ import annotations

import click

from treesched.cli.train_cmd import parse_backend, parse_float
from treesched.errors import TreeschedError
from treesched.limits import (MAX_BATCH, MAX_HIDDEN, MAX_INTERVAL, MAX_LAYERS, MAX_LENGTH,
                              MAX_SAMPLES, MAX_SEED, MAX_STEPS)
from treesched.validation import parse_int


def parse_learning_rates(text) -> list[float]:
    """``"1e-3,3e-4"`` -> ``[0.001, 0.0003]`` (positive numbers, comma-separated)."""
    parts = [part for part in str(text).split(",")]
    if not any(part.strip() for part in parts):
        raise TreeschedError(f"--lrs must list learning rates, e.g. 1e-3,3e-4; got {text!r}")
    return [parse_float(part, "--lrs entry", strict=True) for part in parts]


@click.command("sweep")
@click.option("--task", metavar="NAME", default=None, help="Task name (see `treesched tasks`).")
@click.option("--out", default=None, metavar="DIR",
              help="Sweep folder: one run folder per seed and learning rate, and sweep.json "
                   "(required; an earlier sweep there is continued).")
@click.option("--seeds", metavar="N", default="1", show_default=True,
              help="Train seeds 0..N-1 (seed 0 is the paper's run).")
@click.option("--lrs", metavar="X,Y,...", default="1e-3", show_default=True,
              help="Adam learning rates, comma-separated.")
@click.option("--steps", metavar="N", default="1000000", show_default=True,
              help="Training steps of every run.")
@click.option("--hidden", metavar="H", default="256", show_default=True, help="Hidden size H.")
@click.option("--num-layers", metavar="N", default="2", show_default=True,
              help="1 merge layer + unary refinements (2: PR-LSTM).")
@click.option("--batch", metavar="N", default="128", show_default=True, help="Batch size.")
@click.option("--clip", metavar="X", default="1.0", show_default=True,
              help="Global-norm gradient clipping (0 disables).")
@click.option("--max-length", metavar="N", default="40", show_default=True,
              help="Training lengths are drawn uniformly from 1..max-length.")
@click.option("--lengths", metavar="RANGES", default="41-500", show_default=True,
              help="Test lengths: a range 41-500, a list 41,100,500, or both.")
@click.option("--stride", metavar="N", default="1", show_default=True,
              help="Step through ranges in --lengths by this much.")
@click.option("--samples", metavar="N", default="512", show_default=True,
              help="Sequences per test length.")
@click.option("--eval-batch", metavar="N", default="64", show_default=True,
              help="Sub-batch size of the evaluation.")
@click.option("--eval-seed", metavar="N", default="1", show_default=True,
              help="Seed of the test sequences.")
@click.option("--backend", metavar="NAME", default=None,
              help="numpy, numba or cupy [default: numba if available, else numpy].")
@click.option("--checkpoint-every", metavar="N", default="1000", show_default=True,
              help="Write each run's checkpoint every N steps (and at the end).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(task, out, seeds, lrs, steps, hidden, num_layers, batch, clip, max_length, lengths,
            stride, samples, eval_batch, eval_seed, backend, checkpoint_every, quiet):
    """Train and evaluate TASK once per seed and learning rate; one summary.

    Each combination is an ordinary run folder DIR/seed<S>-lr<LR>
    (treesched train, then treesched eval over --lengths), and DIR/sweep.json
    lists every run's score with, per learning rate, the seed-0 score (the
    paper's: one run, seed 0) beside the mean, spread, minimum and maximum
    over seeds.  Running the same command again continues an interrupted
    sweep: finished runs are kept, unfinished ones resumed exactly.

    \b
    Examples:
      treesched sweep --task cycle_navigation --seeds 3 --lrs 1e-3,3e-4 \\
          --steps 40000 --hidden 64 --out runs/sweep_cycle
      treesched table runs/sweep_cycle --out docs/results
    """
    from treesched.evaluation import parse_lengths
    from treesched.sweep import run_sweep
    from treesched.training import TrainConfig

    if task is None:
        raise TreeschedError("--task is required (see `treesched tasks`)")
    if out is None:
        raise TreeschedError("--out DIR is required: the sweep folder")
    seed_count = parse_int(seeds, "--seeds", most=min(MAX_SEED, 10_000))
    config = TrainConfig(
        task=task, steps=parse_int(steps, "--steps", most=MAX_STEPS),
        hidden=parse_int(hidden, "--hidden", most=MAX_HIDDEN),
        num_layers=parse_int(num_layers, "--num-layers", most=MAX_LAYERS),
        batch=parse_int(batch, "--batch", most=MAX_BATCH), clip=parse_float(clip, "--clip"),
        max_length=parse_int(max_length, "--max-length", most=MAX_LENGTH))
    wanted = parse_lengths(lengths, parse_int(stride, "--stride", most=MAX_INTERVAL))
    run_sweep(config, range(seed_count), parse_learning_rates(lrs), out, lengths=wanted,
              samples=parse_int(samples, "--samples", most=MAX_SAMPLES),
              eval_batch=parse_int(eval_batch, "--eval-batch", most=MAX_BATCH),
              eval_seed=parse_int(eval_seed, "--eval-seed", minimum=0, most=MAX_SEED),
              backend=parse_backend(backend),
              checkpoint_every=parse_int(checkpoint_every, "--checkpoint-every",
                                         most=MAX_INTERVAL),
              progress=not quiet, report=lambda line: click.echo(line, err=True))

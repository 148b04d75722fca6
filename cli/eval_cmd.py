"""``treesched eval``: range evaluation of a trained run."""

from __future__ import annotations

import click

from treesched.cli.train_cmd import parse_backend
from treesched.limits import MAX_BATCH, MAX_INTERVAL, MAX_SAMPLES, MAX_SEED
from treesched.validation import parse_int


@click.command("eval")
@click.argument("run", metavar="RUN_DIR")
@click.option("--lengths", metavar="RANGES", default="41-500", show_default=True,
              help="Test lengths: a range 41-500, a list 41,100,500, or both.")
@click.option("--stride", metavar="N", default="1", show_default=True,
              help="Step through ranges in --lengths by this much.")
@click.option("--samples", metavar="N", default="512", show_default=True,
              help="Sequences per test length (the public protocol: 512).")
@click.option("--eval-batch", metavar="N", default="64", show_default=True,
              help="Sub-batch size (the public protocol: 64).")
@click.option("--seed", metavar="N", default="1", show_default=True,
              help="Seed of the test sequences (the public evaluation uses 1).")
@click.option("--backend", metavar="NAME", default=None,
              help="numpy, numba or cupy [default: numba if available, else numpy].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(run, lengths, stride, samples, eval_batch, seed, backend, quiet):
    """Evaluate a run over test lengths; print the score.

    The score is the mean over test lengths of the accuracy at each length.
    Writes metrics.json (per-length accuracies) and accuracy_vs_length.png
    into RUN_DIR.

    \b
    Examples:
      treesched eval runs/parity
      treesched eval runs/parity --lengths 41-500 --stride 10 --samples 128
    """
    from treesched.distributed import world
    from treesched.evaluation import evaluate_run, parse_lengths, METRICS_FILE

    wanted = parse_lengths(lengths, parse_int(stride, "--stride", most=MAX_INTERVAL))
    samples = parse_int(samples, "--samples", most=MAX_SAMPLES)
    eval_batch = parse_int(eval_batch, "--eval-batch", most=MAX_BATCH)
    seed = parse_int(seed, "--seed", minimum=0, most=MAX_SEED)
    backend = parse_backend(backend)
    metrics = evaluate_run(run, wanted, samples=samples, eval_batch=eval_batch, seed=seed,
                           backend=backend, progress=not quiet)
    if not world().is_root:   # under mpiexec: rank 0 speaks for the job
        return
    accuracies = metrics["accuracies"]
    worst = min(range(len(accuracies)), key=accuracies.__getitem__)
    click.echo(f"{metrics['task']}: score {100 * metrics['score']:.2f}% (mean accuracy over "
               f"{len(accuracies)} lengths {metrics['lengths'][0]}..{metrics['lengths'][-1]}, "
               f"{samples} samples each; lowest {100 * accuracies[worst]:.2f}% at length "
               f"{metrics['lengths'][worst]}) -> {run}/{METRICS_FILE}")

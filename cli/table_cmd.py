"""``treesched table``: the results table and the fifteen-panel figure from
evaluated run folders and sweeps."""

from __future__ import annotations

import click


@click.command("table")
@click.argument("runs", metavar="RUN_DIR...", nargs=-1)
@click.option("--out", default=None, metavar="DIR",
              help="Where to write results_table.md, results_table.json and "
                   "accuracy_vs_length_all_tasks.png (required; created).")
def command(runs, out):
    """Build the results table from run folders and sweep folders.

    Every RUN_DIR is a run folder evaluated with `treesched eval`, or a sweep
    folder of `treesched sweep` (all its runs).  Runs of one task with the
    same settings but the seed form one row: the score of the seed-0 run
    (the paper's definition) beside the mean over seeds, the lowest
    per-length accuracy and the training time.  The figure has one panel per
    task (all fifteen): accuracy against test length for every run.

    \b
    Examples:
      treesched table runs/even_pairs runs/sweep_cycle --out docs/results
    """
    from treesched.errors import TreeschedError
    from treesched.results_table import FIGURE_FILE, JSON_FILE, MARKDOWN_FILE, \
        write_results_table

    if not runs:
        raise TreeschedError("give at least one run folder or sweep folder (RUN_DIR...)")
    if out is None:
        raise TreeschedError("--out DIR is required: where the table and figure go")
    table = write_results_table(runs, out)
    click.echo(f"{len(table['rows'])} rows ({sum(len(row['runs']) for row in table['rows'])} "
               f"runs; not run: {len(table['not_run'])} tasks) -> {out}/{MARKDOWN_FILE}, "
               f"{out}/{JSON_FILE}, {out}/{FIGURE_FILE}")

"""``treesched tasks``: the 15 formal-language tasks of the benchmark."""

from __future__ import annotations

import json

import click

from treesched import tasks as tasks_lib

LEVEL_NAMES = {"regular": "regular", "dcf": "context-free (deterministic)",
               "cs": "context-sensitive"}
PAPER_SCORES = tasks_lib.PUBLISHED_PR_LSTM_SCORES


def output_length_formula(task) -> str:
    """``1``, ``n``, ``2n``, ``n+1``, ``n/2`` … from the task's output lengths."""
    a, b = task.output_length(40), task.output_length(80)
    if a == b:
        return str(a)
    slope, intercept = (b - a) / 40, a - (b - a) / 40 * 40
    if slope == int(slope):
        head = "n" if slope == 1 else f"{int(slope)}n"
    else:
        head = f"n/{int(round(1 / slope))}" if slope and (1 / slope) == int(1 / slope) \
            else f"{slope:g}n"
        odd = task.output_length(41)
        exact = slope * 41 + intercept
        if odd != exact and intercept == 0:
            return f"ceil({head})" if odd > exact else f"floor({head})"
    if intercept == 0:
        return head
    return f"{head}{'+' if intercept > 0 else '-'}{abs(intercept):g}"


def rows():
    for name in tasks_lib.names():
        task = tasks_lib.get(name)
        yield {"name": name, "level": task.level, "chomsky_level": LEVEL_NAMES[task.level],
               "input_size": task.input_size, "model_input_size": task.input_size + 1,
               "output_size": task.output_size, "output_length": output_length_formula(task),
               "accuracy_mask": task.has_accuracy_mask,
               "paper_pr_lstm_score": PAPER_SCORES.get(name)}


@click.command("tasks")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json):
    """List the 15 formal-language tasks (Delétang et al., ICLR 2023).

    \b
    input   input symbols (the model reads one more: the blank of the tape)
    output  output classes per position
    outlen  output positions for an input of length n
    paper   the paper's PR-LSTM score, % over lengths 41..500 (SPEC §4)
    """
    table = list(rows())
    if as_json:
        click.echo(json.dumps(table, indent=1))
        return
    header = f"{'task':<28}{'Chomsky level':<31}{'input':>6}{'output':>7}{'outlen':>10}" \
             f"{'mask':>6}{'paper':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for row in table:
        paper = "" if row["paper_pr_lstm_score"] is None else f"{row['paper_pr_lstm_score']:.1f}"
        click.echo(f"{row['name']:<28}{row['chomsky_level']:<31}{row['input_size']:>6}"
                   f"{row['output_size']:>7}{row['output_length']:>10}"
                   f"{'yes' if row['accuracy_mask'] else 'no':>6}{paper:>8}")

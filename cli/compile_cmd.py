"""``treesched compile``: print or export a compiled schedule."""

from __future__ import annotations

import json

import click

import treesched
from treesched.errors import TreeschedError
from treesched.fileio import write_text
from treesched.limits import MAX_BATCH, MAX_HIDDEN, MAX_LAYERS, MAX_LENGTH
from treesched.lowering import activation_memory
from treesched.validation import parse_int


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def render_text(schedule: treesched.Schedule, stats: dict) -> str:
    memory = stats["memory"]
    lines = [
        f"schedule   length {schedule.length}, pattern {schedule.pattern}, "
        f"outputs {schedule.outputs}",
        f"nodes      {schedule.num_nodes} ({schedule.num_leaves} leaves, "
        f"{schedule.num_merges} merges)",
        f"depth      {schedule.depth} levels, widest level {schedule.widest} merges",
        f"memory     forward {format_bytes(memory['forward_bytes'])}, forward+backward "
        f"{format_bytes(memory['forward_backward_bytes'])} (activations; batch "
        f"{memory['batch']}, hidden {memory['hidden']}, {memory['dtype']}, "
        f"{memory['cell']}, {memory['num_layers']} layers)",
        "",
        "level  merges  cumulative",
    ]
    total = 0
    widths = schedule.widths
    shown = range(len(widths)) if len(widths) <= 64 else [*range(32), None, *range(len(widths) - 32, len(widths))]
    cumulative = widths.cumsum()
    for index in shown:
        if index is None:
            lines.append(f"  ... {len(widths) - 64} levels not shown ...")
            continue
        total = int(cumulative[index])
        lines.append(f"{index + 1:>5}  {int(widths[index]):>6}  {total:>10}")
    return "\n".join(lines) + "\n"


@click.command("compile")
@click.option("--length", "-n", required=True, metavar="T", help="Sequence length (positions).")
@click.option("--pattern", "-p", default="odd-even", show_default=True,
              help="Prefix network: " + ", ".join(treesched.PATTERN_NAMES) + ".")
@click.option("--outputs", default="all", show_default=True,
              help="Positions to answer: all, last, or k (the last k).")
@click.option("--format", "fmt", default="text", show_default=True,
              help="Output format: text, json or dot.")
@click.option("-o", "--output", "path", default=None, metavar="FILE",
              help="Write to FILE (atomically) instead of standard output.")
@click.option("--batch", default="128", show_default=True, help="Batch size for the memory estimate.")
@click.option("--hidden", default="256", show_default=True, help="Hidden size for the memory estimate.")
@click.option("--dtype", default="float32", show_default=True,
              help="float32 or float64, for the memory estimate.")
@click.option("--num-layers", default="2", show_default=True,
              help="Merge layers (1 + unary refinements), for the memory estimate.")
@click.option("--force", is_flag=True,
              help="Write over a symbolic link (replacing it), a FIFO, device or read-only "
                   "file at the output path; refused without it.")
def command(length, pattern, outputs, fmt, path, batch, hidden, dtype, num_layers, force):
    """Compile a sequence length into a level-wise merge schedule.

    \b
    Examples:
      treesched compile --length 512
      treesched compile -n 41 --outputs last --format dot -o tree.dot
      treesched compile -n 500 --pattern sklansky --format json
    """
    if fmt not in ("text", "json", "dot"):
        raise TreeschedError(f"unknown format {fmt!r}; choose text, json or dot")
    # every option is checked before the compile, which is the slow part
    length = parse_int(length, "length", most=MAX_LENGTH)
    batch = parse_int(batch, "batch", most=MAX_BATCH)
    hidden = parse_int(hidden, "hidden", most=MAX_HIDDEN)
    num_layers = parse_int(num_layers, "num-layers", most=MAX_LAYERS)
    if dtype not in ("float32", "float64"):
        raise TreeschedError(f"dtype must be float32 or float64, got {dtype!r}")
    schedule = treesched.compile(length, pattern, outputs)
    stats = schedule.stats()
    stats["memory"] = activation_memory(schedule, batch, hidden, dtype, num_layers=num_layers)
    if fmt == "text":
        text = render_text(schedule, stats)
    elif fmt == "json":
        document = json.loads(schedule.to_json())
        document["stats"] = stats
        text = json.dumps(document) + "\n"
    else:
        text = schedule.to_dot()
    if path is None:
        click.echo(text, nl=False)
    else:
        write_text(path, text, replace=force)
        click.echo(f"wrote {path} ({fmt}, {schedule.num_merges} merges, depth {schedule.depth})",
                   err=True)

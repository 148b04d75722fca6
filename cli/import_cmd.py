"""``treesched import-checkpoint``: a paper checkpoint (Haiku + flax msgpack) → treesched ``.npz``."""

from __future__ import annotations

import click

import treesched
from treesched.compiler import validate_pattern
from treesched.errors import TreeschedError
from treesched.fileio import check_replaceable
from treesched.haiku_import import load_haiku_msgpack


@click.command("import-checkpoint")
@click.argument("file", metavar="FILE")
@click.option("--out", "-o", "out", required=True, metavar="MODEL.npz",
              help="Where to write the treesched checkpoint (atomically).")
@click.option("--pattern", "-p", default="odd-even", show_default=True,
              help="Schedule stored with the model: " + ", ".join(treesched.PATTERN_NAMES)
              + ". Only odd-even reproduces the paper's outputs.")
@click.option("--dtype", default="auto", show_default=True,
              help="float32, float64, or auto (float64 only if every tensor is float64).")
@click.option("--force", is_flag=True,
              help="Write over a symbolic link (replacing it), a FIFO, device or read-only "
                   "file at the output path; refused without it.")
def command(file, out, pattern, dtype, force):
    """Import a checkpoint written by the paper's code (JAX + Haiku).

    FILE holds the parameters of hk.transform(model).init(...) saved with
    flax.serialization.to_bytes (a .msgpack file). Cell (lstm or rnn), sizes and number of
    layers are read from the tensors; anything that is not the paper's
    PR-LSTM / PR-RNN with a read-out head is refused. JAX is not needed.

    \b
    Examples:
      treesched import-checkpoint saved/parity_check-parallel_recursive.msgpack --out parity.npz
      treesched import-checkpoint ckpt.msgpack -o model.npz --dtype float64
    """
    if dtype not in ("auto", "float32", "float64"):
        raise TreeschedError(f"--dtype must be auto, float32 or float64, got {dtype!r}")
    validate_pattern(pattern)
    check_replaceable(out, force)   # before the (slower) import
    found = load_haiku_msgpack(file)
    model = treesched.PRLSTM.from_haiku(found, pattern=pattern,
                                        dtype=None if dtype == "auto" else dtype,
                                        source=f"checkpoint {file}")
    model.save(out, replace=force)
    config = found.config
    click.echo(f"{file}: PR-{config['cell'].upper()} with input_size {config['input_size']}, "
               f"hidden_size {config['hidden_size']}, output_size {config['output_size']}, "
               f"num_layers {config['num_layers']} ({model.dtype})")
    width = max(len(name) for name in found.mapping)
    for name, source in found.mapping.items():
        shape = tuple(found.params[name].shape)
        click.echo(f"  {name:<{width}}  {str(shape):<12}  <- {source}")
    click.echo(f"wrote {out} (pattern {pattern})", err=True)
    if pattern != "odd-even":
        click.echo("note: the paper's code computes the odd-even schedule; with pattern "
                   f"{pattern!r} the same weights compute another function", err=True)

"""``treesched train``: train a PR-LSTM on a formal-language task or as a
character language model (``--task lm --corpus FILE``)."""

from __future__ import annotations

import math

import click

from treesched.errors import TreeschedError
from treesched.limits import (MAX_BATCH, MAX_HIDDEN, MAX_INTERVAL, MAX_LAYERS, MAX_LENGTH,
                              MAX_SEED, MAX_STEPS)
from treesched.validation import parse_int


def parse_float(text, what: str, minimum: float = 0.0, strict: bool = False) -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        raise TreeschedError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise TreeschedError(f"{what} must be a finite number {bound}, got {text!r}")
    return value


def parse_backend(name):
    from treesched.backends import BACKENDS, why_unavailable
    from treesched.training import default_backend
    if name is None:
        return default_backend()
    if name not in BACKENDS:
        raise TreeschedError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    reason = why_unavailable(name)
    if reason is not None:
        raise TreeschedError(f"backend {name!r} is not available here: {reason}")
    return name


@click.command("train")
@click.option("--task", metavar="NAME", default=None,
              help="Task name (see `treesched tasks`), or lm: a character language model.")
@click.option("--corpus", metavar="FILE", default=None,
              help="lm: the UTF-8 text to train on (the last 5% is held out for validation).")
@click.option("--context", metavar="N", default=None,
              help="lm: training windows of N characters [default: 128].")
@click.option("--out", default=None, metavar="DIR", help="Run folder (created; required).")
@click.option("--steps", metavar="N", default="1000000", show_default=True, help="Training steps.")
@click.option("--hidden", metavar="H", default="256", show_default=True, help="Hidden size H.")
@click.option("--num-layers", metavar="N", default="2", show_default=True,
              help="1 merge layer + unary refinements (2: PR-LSTM; 1, 3: 0R, 2R).")
@click.option("--pattern", metavar="NAME", default="odd-even", show_default=True, help="Merge schedule pattern.")
@click.option("--cell", metavar="NAME", default="lstm", show_default=True, help="lstm or rnn.")
@click.option("--dtype", metavar="NAME", default="float32", show_default=True, help="float32 or float64.")
@click.option("--lr", metavar="X", default="1e-3", show_default=True, help="Adam learning rate.")
@click.option("--batch", metavar="N", default="128", show_default=True, help="Batch size.")
@click.option("--clip", metavar="X", default="1.0", show_default=True,
              help="Global-norm gradient clipping (0 disables).")
@click.option("--max-length", metavar="N", default=None,
              help="Formal tasks: training lengths are drawn uniformly from 1..max-length "
                   "[default: 40].")
@click.option("--seed", metavar="N", default="0", show_default=True, help="Seeds the init and the data.")
@click.option("--backend", metavar="NAME", default=None,
              help="numpy, numba or cupy [default: numba if available, else numpy].")
@click.option("--checkpoint-every", metavar="N", default="1000", show_default=True,
              help="Write the checkpoint every N steps (and at the end).")
@click.option("--log-every", metavar="N", default="10", show_default=True,
              help="Append to train_log.jsonl every N steps.")
@click.option("--eval-every", metavar="N", default=None,
              help="lm: validation bits per character every N steps and at the end "
                   "[default: 200].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx, task, corpus, context, out, steps, hidden, num_layers, pattern, cell, dtype, lr,
            batch, clip, max_length, seed, backend, checkpoint_every, log_every, eval_every,
            resume, quiet):
    """Train a PR-LSTM on a formal-language task (SPEC §4 protocol), or a
    character language model on a text (--task lm --corpus FILE).

    Writes config.json, model.npz, train_state.npz (checkpoints),
    train_log.jsonl and training_curve.png into --out (lm: also
    vocabulary.json, and validation bits per character in the log).  A
    killed run continues with --resume to the same result as an
    uninterrupted one.

    \b
    Examples:
      treesched train --task parity_check --steps 5000 --hidden 64 --out runs/parity
      treesched train --out runs/parity --resume
      treesched train --out runs/parity --resume --steps 8000
      treesched train --task lm --corpus text.txt --hidden 128 --steps 600 --out runs/lm
    """
    import dataclasses

    from treesched.language_model import LM_TASK
    from treesched.distributed import world
    from treesched.training import TrainConfig, read_run_config, train

    if out is None:
        raise TreeschedError("--out DIR is required: the run folder")
    backend = parse_backend(backend)
    settings = dict(
        steps=parse_int(steps, "--steps", most=MAX_STEPS),
        hidden=parse_int(hidden, "--hidden", most=MAX_HIDDEN),
        num_layers=parse_int(num_layers, "--num-layers", most=MAX_LAYERS), pattern=pattern,
        cell=cell, dtype=dtype, lr=parse_float(lr, "--lr", strict=True),
        batch=parse_int(batch, "--batch", most=MAX_BATCH), clip=parse_float(clip, "--clip"),
        seed=parse_int(seed, "--seed", minimum=0, most=MAX_SEED))
    # settings of one kind of run: given or left to the configuration's default
    if max_length is not None:
        settings["max_length"] = parse_int(max_length, "--max-length", most=MAX_LENGTH)
    if context is not None:
        settings["context"] = parse_int(context, "--context", most=MAX_LENGTH)
    if corpus is not None:
        settings["corpus"] = corpus
    every = parse_int(checkpoint_every, "--checkpoint-every", most=MAX_INTERVAL)
    log_every = parse_int(log_every, "--log-every", most=MAX_INTERVAL)
    eval_every = 200 if eval_every is None else parse_int(eval_every, "--eval-every",
                                                          most=MAX_INTERVAL)
    if resume:
        stored = TrainConfig.from_dict(dict(read_run_config(out)["train"]))
        if task is not None and task != stored.task:
            raise TreeschedError(f"cannot resume: {out} trains {stored.task!r}, not {task!r}")
        # options given on the command line must agree with the run (steps may grow)
        given = {name: value for name, value in settings.items()
                 if ctx.get_parameter_source(name) is None
                 or ctx.get_parameter_source(name).name == "COMMANDLINE"}
        config = dataclasses.replace(stored, **given)
    else:
        if task is None:
            raise TreeschedError("--task is required (see `treesched tasks`), or --task "
                                 f"{LM_TASK} --corpus FILE for a language model")
        config = TrainConfig(task=task, **settings)
    if ctx.get_parameter_source("eval_every").name == "COMMANDLINE" \
            and config.task != LM_TASK:
        raise TreeschedError(f"--eval-every applies to --task {LM_TASK} (the formal tasks are "
                             f"scored afterwards with `treesched eval`)")
    result = train(config, out, resume=resume, backend=backend, checkpoint_every=every,
                   log_every=log_every, eval_every=eval_every, progress=not quiet)
    if not world().is_root:   # under mpiexec: rank 0 speaks for the job
        return
    rate = (result.step / result.seconds) if result.seconds > 0 else float("nan")
    held_out = result.held_out
    validation = (f", validation {held_out['valid_bpc']:.4f} bits per character"
                  if "valid_bpc" in held_out else "")
    click.echo(f"{config.task}: step {result.step}/{result.steps}, loss {result.loss:.4f}, "
               f"train accuracy {100 * result.accuracy:.1f}%{validation}, "
               f"{result.seconds:.0f} s of training ({rate:.2f} steps/s); run folder {result.out}")

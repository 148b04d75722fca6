"""``treesched generate``: continue a prompt with a trained character language model."""

from __future__ import annotations

import time

import click

from treesched.cli.train_cmd import parse_backend, parse_float
from treesched.limits import MAX_FEATURES, MAX_SEED, MAX_TOKENS
from treesched.validation import checked_int, parse_int


@click.command("generate")
@click.argument("run", metavar="RUN_DIR")
@click.option("--prompt", metavar="TEXT", required=True,
              help="The text to continue (characters of the run's vocabulary).")
@click.option("--tokens", metavar="N", default="200", show_default=True,
              help="Characters to generate.")
@click.option("--temperature", metavar="T", default="1.0", show_default=True,
              help="Softmax temperature; 0 is greedy (the most likely character).")
@click.option("--top-k", metavar="K", default="0", show_default=True,
              help="Draw among the K most likely characters only (0: all).")
@click.option("--seed", metavar="N", default="0", show_default=True,
              help="Seeds the sampling: the same seed gives the same text.")
@click.option("--backend", metavar="NAME", default=None,
              help="numpy, numba or cupy [default: numba if available, else numpy].")
@click.option("--quiet", is_flag=True, help="No summary line on stderr.")
def command(run, prompt, tokens, temperature, top_k, seed, backend, quiet):
    """Continue --prompt with the language model of RUN_DIR (a run of
    `treesched train --task lm`), printing each character as it is drawn.

    The prompt is prefilled in one parallel pass, then every character
    costs one streaming step (the model is never re-run on the text).
    Prints the prompt, then the continuation.

    \b
    Examples:
      treesched generate runs/lm --prompt "def " --tokens 300
      treesched generate runs/lm --prompt "import " --temperature 0.8 --top-k 10 --seed 3
    """
    from treesched.generation import generate_characters, load_language_model

    tokens = parse_int(tokens, "--tokens", most=MAX_TOKENS)
    temperature = parse_float(temperature, "--temperature")
    top_k = parse_int(top_k, "--top-k", minimum=0, most=MAX_FEATURES)
    seed = parse_int(seed, "--seed", minimum=0, most=MAX_SEED)
    backend = parse_backend(backend)
    model, vocabulary, _ = load_language_model(run, backend)
    top_k = checked_int("--top-k", top_k, 0, most=vocabulary.size)
    characters = generate_characters(model, vocabulary, prompt, tokens,
                                     temperature=temperature, top_k=top_k, seed=seed)
    started = time.perf_counter()
    click.echo(prompt, nl=False)
    for character in characters:
        click.echo(character, nl=False)   # click.echo flushes: each character shows at once
    click.echo()
    if not quiet:
        seconds = max(time.perf_counter() - started, 1e-9)
        click.echo(f"{tokens} characters in {seconds:.2f} s ({tokens / seconds:.1f} per second; "
                   f"temperature {temperature:g}, top-k {top_k or 'all'}, seed {seed}, backend "
                   f"{model.backend.name})", err=True)

"""A character language model of Python source: train for a few minutes, then generate.

The corpus is text every machine with Python has: the standard library's
own source.  The files named in ``MODULES`` (found with
``sysconfig.get_paths()["stdlib"]``; a name missing from this Python is
skipped) are concatenated in that (sorted) order and cut to
``--corpus-chars`` characters, so the corpus is the same on every machine
with the same Python version.  It is written to ``WORKDIR/corpus.txt`` and
a PR-LSTM is trained on it with ``treesched.training.train``, exactly what
``treesched train --task lm`` runs (the equivalent command is printed);
then ``treesched.generation`` continues a prompt, printing characters as
they are drawn.

    python examples/char_lm.py                  # the default run, a few minutes on 2 cores
    python examples/char_lm.py --tiny           # seconds: a smoke test, gibberish out
    python examples/char_lm.py --steps 2000 --hidden 256 --workdir runs/char_lm_big

WORKDIR (default ``runs/char_lm``) must not hold a run yet.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import sysconfig
import time
from pathlib import Path

from treesched.errors import TreeschedError
from treesched.generation import generate_characters, load_language_model
from treesched.training import TrainConfig, train

MODULES = ("argparse", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv",
           "dataclasses", "fnmatch", "fractions", "functools", "heapq", "random", "shlex",
           "statistics", "string", "textwrap", "tokenize")

DEFAULTS = dict(corpus_chars=400_000, hidden=128, context=128, batch=128, steps=600,
                eval_every=100, tokens=400)
TINY = dict(corpus_chars=20_000, hidden=8, context=16, batch=8, steps=4, eval_every=2,
            tokens=40)


def build_corpus(characters: int) -> str:
    """The first ``characters`` characters of the MODULES' sources, concatenated."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in MODULES:
        path = stdlib / f"{name}.py"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= characters:
            break
    corpus = "".join(parts)[:characters]
    if len(corpus) < characters:
        print(f"note: the standard library here gives {len(corpus)} characters, fewer than "
              f"{characters}", file=sys.stderr)
    return corpus


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny corpus, model and run (seconds): for tests")
    parser.add_argument("--workdir", default="runs/char_lm",
                        help="gets corpus.txt and the run folder run/")
    parser.add_argument("--corpus-chars", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--context", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--tokens", type=int, help="characters to generate")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, data and sampling")
    parser.add_argument("--backend", default=None, help="numpy, numba or cupy")
    args = parser.parse_args(argv)
    settings = dict(TINY if args.tiny else DEFAULTS)
    for name in settings:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)

    workdir = Path(args.workdir)
    corpus_path, run = workdir / "corpus.txt", workdir / "run"
    try:
        if run.exists():
            raise TreeschedError(f"{run} already exists: remove it or choose another --workdir")
        workdir.mkdir(parents=True, exist_ok=True)
        corpus_path.write_text(build_corpus(settings["corpus_chars"]), encoding="utf-8")
        config = TrainConfig(task="lm", corpus=str(corpus_path), context=settings["context"],
                             hidden=settings["hidden"], batch=settings["batch"],
                             steps=settings["steps"], seed=args.seed)
        command = ["treesched", "train", "--task", "lm", "--corpus", corpus_path,
                   "--context", config.context, "--hidden", config.hidden, "--batch",
                   config.batch, "--steps", config.steps, "--eval-every",
                   settings["eval_every"], "--seed", args.seed, "--out", run]
        if args.backend:
            command += ["--backend", args.backend]
        print("same as: " + " ".join(shlex.quote(str(part)) for part in command))
        result = train(config, run, backend=args.backend, eval_every=settings["eval_every"],
                       checkpoint_every=max(1, settings["steps"] // 4),
                       progress_interval=15.0)
        bpc = result.held_out["valid_bpc"]
        print(f"trained {result.step} steps in {result.seconds:.0f} s on the "
              f"{result.model.backend.name} backend; validation {bpc:.4f} bits per character "
              f"(the last 5% of {corpus_path})")
        print(f"sample (prompt {args.prompt!r}, {settings['tokens']} characters, temperature "
              f"{args.temperature:g}, top-k {args.top_k or 'all'}, seed {args.seed}):")
        # what `treesched generate` loads: the run's checkpoint and vocabulary
        model, vocabulary, _ = load_language_model(run, backend=result.model.backend.name)
        characters = generate_characters(model, vocabulary, args.prompt,
                                         settings["tokens"], temperature=args.temperature,
                                         top_k=args.top_k, seed=args.seed)
        started = time.perf_counter()
        sys.stdout.write(args.prompt)
        for character in characters:
            sys.stdout.write(character)
            sys.stdout.flush()
        seconds = time.perf_counter() - started
        print(f"\n[{settings['tokens']} characters in {seconds:.2f} s]")
    except TreeschedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generating text from a trained character language model, one character at a time.

:func:`generate_characters` runs the model as a stream
(:class:`treesched.streaming.Stream`): the prompt is prefilled in one
``stream.extend`` (about the cost of one parallel forward), then each new
character is drawn from the logits of the last position and fed back with
``stream.push``, so every character costs one incremental step, not a
forward over the whole text, and the logits are those ``model.forward``
gives on the whole text so far.  Characters are yielded as they are drawn.

Sampling (:func:`sample_next`), from the logits ``z`` of the last position:

* ``temperature == 0``: greedy, ``argmax z`` (the first maximum);
* otherwise, with ``top_k`` (0: every character) keeping only the ``k``
  largest logits (ties at the cut kept in id order), the character is drawn
  from ``softmax(z / temperature)`` over the kept ones, in float64, by
  inverting the cumulative distribution at one ``rng.random()`` draw;
  ``top_k == 1`` is greedy for every temperature.

The generator is ``numpy.random.default_rng(seed)``, one draw per sampled
character, so a seed fixes the text (for a given model, backend and
prompt).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import TreeschedError
from .evaluation import load_run_model
from .language_model import LM_TASK, VOCABULARY_FILE, Vocabulary
from .limits import MAX_SEED, MAX_TOKENS
from .validation import checked_int


def check_sampling(temperature, top_k, vocabulary_size: int) -> tuple[float, int]:
    """``(temperature, top_k)`` checked: temperature a finite number >= 0,
    top_k an integer in ``0 .. vocabulary_size`` (0: no cut)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise TreeschedError(f"temperature must be a finite number >= 0, got {temperature!r}")
    top_k = checked_int("top_k", top_k, 0, most=vocabulary_size)
    return float(temperature), top_k


def sample_next(logits, rng: np.random.Generator, temperature: float = 1.0,
                top_k: int = 0) -> int:
    """One id drawn from ``logits`` ``(V,)`` (the module docstring says how)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature == 0 or top_k == 1:
        return int(np.argmax(logits))
    kept = np.arange(logits.size)
    if 0 < top_k < logits.size:
        kept = np.sort(np.argsort(-logits, kind="stable")[:top_k])
    scaled = logits[kept] / temperature
    weights = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(weights)
    position = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
    return int(kept[min(position, kept.size - 1)])


def generate_characters(model, vocabulary: Vocabulary, prompt: str, tokens: int, *,
                        temperature: float = 1.0, top_k: int = 0, seed: int = 0):
    """Yield ``tokens`` characters continuing ``prompt``, each as soon as it is drawn.

    The prompt must be non-empty (the first character is drawn from its
    last position) and made of vocabulary characters.
    """
    tokens = checked_int("tokens", tokens, 0, most=MAX_TOKENS)
    seed = checked_int("seed", seed, 0, most=MAX_SEED)
    temperature, top_k = check_sampling(temperature, top_k, vocabulary.size)
    if model.input_size != vocabulary.size or model.output_size != vocabulary.size:
        raise TreeschedError(f"the model (input {model.input_size}, output {model.output_size}) "
                             f"does not fit a vocabulary of {vocabulary.size} characters")
    if not isinstance(prompt, str) or not prompt:
        raise TreeschedError("the prompt is empty: give at least one character to continue")
    ids = vocabulary.encode(prompt, "the prompt")
    return _generate(model, vocabulary, ids, tokens, temperature, top_k, seed)


def _generate(model, vocabulary, ids, tokens, temperature, top_k, seed):
    # a generator of its own, so the checks above run when generate_characters is called
    rng = np.random.default_rng(seed)
    stream = model.stream(batch=1)
    logits = stream.extend(vocabulary.one_hot(ids)[None])[0, -1]
    for index in range(tokens):
        next_id = sample_next(model.backend.to_numpy(logits), rng, temperature, top_k)
        yield vocabulary.characters[next_id]
        if index + 1 < tokens:   # the last character needs no logits after it
            logits = stream.push(vocabulary.one_hot([next_id]))[0]


def generate(model, vocabulary: Vocabulary, prompt: str, tokens: int, **sampling) -> str:
    """The ``tokens`` characters :func:`generate_characters` yields, as one string."""
    return "".join(generate_characters(model, vocabulary, prompt, tokens, **sampling))


def load_language_model(folder, backend: str | None = None):
    """``(model, vocabulary, run_config)`` of an lm run folder."""
    folder = Path(folder)
    model, run = load_run_model(folder, backend)
    task = run["train"].get("task")
    if task != LM_TASK:
        raise TreeschedError(f"run {folder} trains task {task!r}, not a language model: "
                             f"generation needs a run of --task {LM_TASK}")
    return model, Vocabulary.load(folder / VOCABULARY_FILE), run


__all__ = ["sample_next", "check_sampling", "generate_characters", "generate",
           "load_language_model"]

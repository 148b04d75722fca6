"""Character-level language modelling: vocabulary, corpus, training windows, bits per character.

``treesched train --task lm --corpus FILE`` trains a PR-LSTM to predict the
next character of a text; this module holds what that needs besides the
shared training loop (:mod:`treesched.training`).

Vocabulary (:class:`Vocabulary`): the distinct Unicode characters (code
points) of the corpus, id ``i`` being the ``i``-th in code-point order.
Characters rather than UTF-8 bytes because the unit of the model is then
the unit a reader sees: every generated id is a whole, printable character
(a byte model can emit half of a multi-byte character, which cannot be
printed as it is produced), bits per *character* are measured per
character, and the one-hot width is the corpus's alphabet (about 100 for
source code) rather than 256.  The price: text with a character the corpus
does not contain cannot be fed to the model (:meth:`Vocabulary.encode` says
which characters).  The vocabulary is built from the whole corpus
(validation part included, so validation never meets an unknown
character) and saved in the run folder (``vocabulary.json``), so
generation and evaluation use exactly the training ids.

Corpus (:class:`CharacterCorpus`): a UTF-8 file read as is (no newline
translation).  The last ``VALIDATION_FRACTION`` (5 %, rounded down, at least
2 characters) is held out for validation; the rest is the training part.

Training (:class:`NextCharacterData`, a
:class:`treesched.training_data.TrainingData`): each step draws ``B`` windows
of ``context + 1`` consecutive characters of the training part, their
starts uniform over every possible start; the input is the one-hot of the
first ``context`` characters and the target at every position ``t`` is the
character at ``t + 1``, so the loss (the benchmark's: mean over batch and
positions of the cross-entropy, in nats) trains every context length
``1 .. context`` at once, on the parallel schedule.

Validation (:func:`bits_per_character`): the held-out text is cut into
consecutive, non-overlapping windows of ``context`` predictions (the last
one shorter), each read from a fresh state like a training window, so that
every character but the first is predicted exactly once from the
characters before it in its window; bits per character is the mean
cross-entropy over those predictions divided by ``ln 2``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from .errors import TreeschedError
from .fileio import read_json, write_text
from .tasks.base import one_hot
from .training_data import Batch, TrainingData

LM_TASK = "lm"
DEFAULT_CONTEXT = 128
VALIDATION_FRACTION = 0.05
VOCABULARY_FILE = "vocabulary.json"
VOCABULARY_FORMAT = "treesched-vocabulary"
VOCABULARY_VERSION = 1


def _describe_character(character: str) -> str:
    return f"{character!r} (U+{ord(character):04X})"


# ================================================================ vocabulary
class Vocabulary:
    """Characters <-> ids: id ``i`` is ``characters[i]``, in code-point order."""

    def __init__(self, characters):
        characters = tuple(characters)
        if not characters:
            raise TreeschedError("a vocabulary needs at least one character")
        if not all(isinstance(c, str) and len(c) == 1 for c in characters):
            raise TreeschedError("a vocabulary holds single characters")
        if list(characters) != sorted(set(characters)):
            raise TreeschedError("a vocabulary's characters must be distinct and in code-point "
                                 "order")
        self.characters = characters
        self._ids = {character: index for index, character in enumerate(characters)}

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        """Every distinct character of ``text``."""
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        return len(self.characters)

    def __len__(self):
        return len(self.characters)

    def __contains__(self, character):
        return character in self._ids

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and other.characters == self.characters

    def __hash__(self):
        return hash(self.characters)

    def __repr__(self):
        return f"Vocabulary({self.size} characters)"

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str, what: str = "text") -> np.ndarray:
        """int64 ids of ``text``; TreeschedError naming every unknown character."""
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(_describe_character(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise TreeschedError(f"{what} has {len(missing)} character(s) outside the "
                                 f"vocabulary of {self.size}: {shown}{more}")
        return np.fromiter((self._ids[c] for c in text), np.int64, count=len(text))

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise TreeschedError(f"ids must lie in 0..{self.size - 1}")
        return "".join(self.characters[i] for i in ids.tolist())

    def one_hot(self, ids) -> np.ndarray:
        """float32 one-hot ``ids.shape + (size,)``."""
        return one_hot(ids, self.size)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": VOCABULARY_FORMAT, "version": VOCABULARY_VERSION,
                "unit": "unicode character", "characters": list(self.characters)}

    def save(self, path) -> None:
        """Write ``vocabulary.json`` atomically (ASCII JSON: escapes keep it
        readable whatever the characters)."""
        write_text(path, json.dumps(self.to_dict(), ensure_ascii=True) + "\n")

    @classmethod
    def load(cls, path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise TreeschedError(f"vocabulary {path} does not exist")
        data = read_json(path, "vocabulary")
        if not isinstance(data, dict) or data.get("format") != VOCABULARY_FORMAT:
            raise TreeschedError(f"{path} is not a treesched vocabulary")
        if data.get("version") != VOCABULARY_VERSION:
            raise TreeschedError(f"vocabulary {path} has unsupported version "
                                 f"{data.get('version')!r}")
        try:
            return cls(data["characters"])
        except (KeyError, TypeError, TreeschedError) as error:
            raise TreeschedError(f"vocabulary {path} is corrupt: {error}") from None


# ==================================================================== corpus
def read_corpus(path) -> tuple[str, str]:
    """``(text, sha256 of the file's bytes)`` of a UTF-8 text file; clear
    errors for a missing, unreadable, non-UTF-8 or empty file."""
    path = Path(path)
    if not path.exists():
        raise TreeschedError(f"corpus {path} does not exist")
    if not path.is_file():
        raise TreeschedError(f"corpus {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TreeschedError(f"cannot read corpus {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TreeschedError(f"corpus {path} is not UTF-8 text: byte {data[error.start]:#04x} "
                             f"at offset {error.start} ({error.reason})") from None
    if not text:
        raise TreeschedError(f"corpus {path} is empty")
    return text, hashlib.sha256(data).hexdigest()


def validation_size(characters: int) -> int:
    """Characters held out for validation: the last 5 %, rounded down, at least 2."""
    return max(2, int(characters * VALIDATION_FRACTION))


class CharacterCorpus:
    """A corpus file as ids: its vocabulary, training part and validation part.

    Attributes: ``path`` (absolute), ``sha256`` (of the file's bytes),
    ``vocabulary``, ``train_ids``, ``valid_ids`` (int64), ``characters``.
    """

    def __init__(self, path, text: str, sha256: str):
        self.path = str(Path(path).resolve())
        self.sha256 = sha256
        self.characters = len(text)
        self.vocabulary = Vocabulary.from_text(text)
        ids = self.vocabulary.encode(text)
        held_out = validation_size(len(ids))
        self.train_ids, self.valid_ids = ids[:-held_out], ids[-held_out:]

    @classmethod
    def read(cls, path) -> "CharacterCorpus":
        text, sha256 = read_corpus(path)
        return cls(path, text, sha256)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "characters": self.characters,
                "train_characters": int(self.train_ids.size),
                "valid_characters": int(self.valid_ids.size)}


# ================================================================== training
class NextCharacterData(TrainingData):
    """Next-character prediction on windows of a corpus (the module docstring
    states the protocol exactly)."""

    progress_fields = ("bpc", "valid_bpc")

    def __init__(self, corpus: CharacterCorpus, context: int, eval_batch: int = 64):
        self.corpus = corpus
        self.vocabulary = corpus.vocabulary
        self.context = int(context)
        self.eval_batch = int(eval_batch)
        self.name = LM_TASK
        self.input_size = self.output_size = self.vocabulary.size
        needed = self.context + 1
        if corpus.train_ids.size < needed:
            raise TreeschedError(
                f"corpus {corpus.path} is too short for context {self.context}: its training "
                f"part has {corpus.train_ids.size} characters (of {corpus.characters}; the last "
                f"{corpus.valid_ids.size} are held out for validation), a window needs "
                f"{needed}; use a smaller --context or a longer corpus")

    @classmethod
    def from_file(cls, path, context: int) -> "NextCharacterData":
        return cls(CharacterCorpus.read(path), context)

    def windows(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """int64 ``(B, context + 1)`` windows of the training part, starts uniform."""
        starts = rng.integers(0, self.corpus.train_ids.size - self.context, size=batch_size)
        return self.corpus.train_ids[starts[:, None] + np.arange(self.context + 1)]

    def draw(self, rng, batch_size):
        windows = self.windows(rng, batch_size)
        x = self.vocabulary.one_hot(windows[:, :-1])
        targets = self.vocabulary.one_hot(windows[:, 1:])
        return Batch(x, targets, np.ones(windows[:, 1:].shape, np.float32), {})

    def batch_metrics(self, loss, logits, batch):
        return {"bpc": loss / math.log(2), **super().batch_metrics(loss, logits, batch)}

    @property
    def has_held_out(self) -> bool:
        return True

    def held_out_metrics(self, model) -> dict:
        nats = mean_cross_entropy(model, self.corpus.valid_ids, self.context, self.eval_batch)
        return {"valid_loss": nats, "valid_bpc": nats / math.log(2)}

    def description(self, config):
        corpus = self.corpus
        return {"task": {"name": LM_TASK, "level": "character language model",
                         "input_size": self.vocabulary.size,
                         "output_size": self.vocabulary.size,
                         "vocabulary": f"{self.vocabulary.size} unicode characters of the corpus, "
                                       f"in code-point order ({VOCABULARY_FILE})",
                         "corpus": corpus.describe()},
                "protocol": {"windows": f"{config.batch} windows of {self.context} + 1 "
                                        f"consecutive characters per step, starts uniform over "
                                        f"the training part",
                             "targets": "the next character at every position",
                             "loss": "mean_over_batch_and_positions (cross-entropy, nats)",
                             "optimizer": f"clip_by_global_norm({config.clip}) then "
                                          f"adam({config.lr}, b1=0.9, b2=0.999, eps=1e-8)",
                             "validation": f"the last {VALIDATION_FRACTION:.0%} of the corpus "
                                           f"({corpus.valid_ids.size} characters) in "
                                           f"consecutive windows of {self.context} predictions; "
                                           f"bits per character = mean cross-entropy / ln 2"}}

    def start_message(self, config, backend, out):
        corpus = self.corpus
        return (f"training a character language model on {corpus.path} "
                f"({corpus.train_ids.size} training + {corpus.valid_ids.size} validation "
                f"characters, vocabulary {self.vocabulary.size}): hidden {config.hidden}, "
                f"{config.steps} steps, batch {config.batch}, context {self.context}, "
                f"backend {backend} -> {out}")

    def write_run_files(self, folder) -> None:
        self.vocabulary.save(Path(folder) / VOCABULARY_FILE)

    def check_resumable(self, folder, run_config) -> None:
        recorded = (run_config.get("task") or {}).get("corpus") or {}
        if recorded.get("sha256") != self.corpus.sha256:
            raise TreeschedError(
                f"cannot resume: corpus {self.corpus.path} is not the text run {folder} was "
                f"trained on (its sha256 differs from the one recorded in config.json); exact "
                f"resumption needs the same corpus")
        if Vocabulary.load(Path(folder) / VOCABULARY_FILE) != self.vocabulary:
            raise TreeschedError(f"cannot resume: {Path(folder) / VOCABULARY_FILE} is not the "
                                 f"vocabulary of corpus {self.corpus.path}")


# ================================================================ evaluation
def _host(model, array) -> np.ndarray:
    return np.asarray(model.backend.to_numpy(array))


def _window_nats(model, windows: np.ndarray) -> float:
    """Summed cross-entropy (nats, float64) of predicting ``windows[:, 1:]``
    from ``windows[:, :-1]``."""
    logits = _host(model, model.forward(one_hot(windows[:, :-1], model.input_size)))
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_normalizer = np.log(np.exp(shifted).sum(axis=-1))
    chosen = np.take_along_axis(shifted, windows[:, 1:, None], axis=-1)[..., 0]
    return float((log_normalizer - chosen).sum())


def mean_cross_entropy(model, ids, context: int, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats) of predicting ``ids[1:]``, in consecutive
    windows of ``context`` predictions each read from a fresh state (the
    module docstring); ``batch_size`` windows per forward call."""
    ids = np.asarray(ids, dtype=np.int64)
    predictions = ids.size - 1
    if predictions < 1:
        raise TreeschedError("bits per character need at least 2 characters")
    if ids.min() < 0 or ids.max() >= model.input_size or model.output_size != model.input_size:
        raise TreeschedError(f"the ids do not fit the model (input {model.input_size}, "
                             f"output {model.output_size})")
    full = predictions // context
    total = 0.0
    starts = np.arange(full) * context
    for first in range(0, full, batch_size):
        chunk = starts[first:first + batch_size]
        total += _window_nats(model, ids[chunk[:, None] + np.arange(context + 1)])
    rest = predictions - full * context
    if rest:
        total += _window_nats(model, ids[None, full * context:])
    return total / predictions


def bits_per_character(model, ids, context: int, batch_size: int = 64) -> float:
    """:func:`mean_cross_entropy` in bits: divided by ``ln 2``."""
    return mean_cross_entropy(model, ids, context, batch_size) / math.log(2)


__all__ = ["LM_TASK", "DEFAULT_CONTEXT", "VALIDATION_FRACTION", "VOCABULARY_FILE", "Vocabulary",
           "read_corpus", "validation_size", "CharacterCorpus", "NextCharacterData",
           "mean_cross_entropy", "bits_per_character"]

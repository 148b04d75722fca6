"""The shared base classes of the formal-language tasks.

Every task draws integer token ids with :meth:`Task.sample_tokens` and
:meth:`Task.sample` one-hot encodes them.  Randomness comes only from the
``numpy.random.Generator`` passed in, so the same seed gives identical arrays.
"""

from __future__ import annotations

import numbers

import numpy as np

from treesched.errors import TreeschedError

LEVELS = ("regular", "dcf", "cs")


def one_hot(ids: np.ndarray, size: int) -> np.ndarray:
    """One-hot float32 encoding: ids ``(...,)`` -> ``(..., size)``."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(ids.shape + (size,), dtype=np.float32)
    np.put_along_axis(out, ids[..., None], np.float32(1.0), axis=-1)
    return out


def termination_mask(labels: np.ndarray) -> np.ndarray:
    """Accuracy mask of the tasks with a termination token.

    Mirrors the public definition: the termination position is the argmax
    over positions of the class ids (i.e. the first position holding the
    largest class id, which is the termination token), and every position up
    to and including it counts.  Returns float32 ``(B, O)``.
    """
    labels = np.asarray(labels)
    stop = np.argmax(labels, axis=-1)[:, None]
    return (np.arange(labels.shape[1])[None, :] <= stop).astype(np.float32)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Task:
    """One task of Delétang et al. (ICLR 2023), with the public semantics.

    Attributes:
      name: the task's name (as in the public ``TASK_BUILDERS``).
      level: ``"regular"``, ``"dcf"`` or ``"cs"``.
      input_size: number of input symbols (one-hot width of ``inputs``).
      output_size: number of output classes (one-hot width of ``targets``).
      has_accuracy_mask: whether accuracy ignores positions after a
        termination token (otherwise the mask is all ones).
      min_length: the smallest length :meth:`sample` accepts.

    A task defines the attributes above and :meth:`_labels`; it overrides
    :meth:`_output_length` when its output is a sequence,
    :meth:`_draw_inputs` when its inputs are not uniform independent symbols
    (or :meth:`_draw` when inputs and labels are drawn together), and
    :meth:`input_length` when the input length differs from the requested
    one.  Argument checking stays in the public methods.
    """

    name: str = ""
    level: str = ""
    input_size: int = 0
    output_size: int = 0
    has_accuracy_mask: bool = False
    min_length: int = 1

    # -- lengths ----
    def check_length(self, n) -> None:
        """Raise :class:`TreeschedError` unless ``n`` is a possible length."""
        if not _is_int(n) or int(n) < self.min_length:
            raise TreeschedError(
                f"task {self.name!r}: length must be an integer in "
                f"[{self.min_length}, inf), got {n!r}")

    def input_length(self, n: int) -> int:
        """Length of the sampled input for requested length ``n``.

        Equal to ``n`` for every task except ``modular_arithmetic``, whose
        public definition drops one symbol from even lengths.
        """
        self.check_length(n)
        return int(n)

    def output_length(self, n: int) -> int:
        """Number of output positions for requested length ``n``.

        Raises :class:`TreeschedError` unless ``n`` passes
        :meth:`check_length`; otherwise returns ``_output_length(int(n))``.
        """
        self.check_length(n)
        return self._output_length(int(n))

    def _output_length(self, n: int) -> int:
        """:meth:`output_length` of an already checked ``int`` length ``n``.

        The default, 1, is a single class per sequence; tasks with a
        sequence as output override this with their formula.
        """
        return 1

    # -- targets as a function of the input ----
    def labels(self, tokens) -> np.ndarray:
        """Target class ids ``(B, output_length(T))`` of input ids ``(B, T)``.

        Every task's target is a deterministic function of its input; this
        computes it for any well-formed input (hand-made ones included).
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise TreeschedError(
                f"task {self.name!r}: labels() needs integer ids of shape "
                f"(B, T), got {tokens.dtype} {tokens.shape}")
        self.check_length(tokens.shape[1])
        if tokens.size and (tokens.min() < 0
                            or tokens.max() >= self.input_size):
            raise TreeschedError(
                f"task {self.name!r}: input ids must be in "
                f"[0, {self.input_size - 1}]")
        return np.asarray(self._labels(tokens.astype(np.int64)),
                          dtype=np.int64)

    def _labels(self, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- sampling ----
    def _draw_inputs(self, rng: np.random.Generator, batch_size: int,
                     length: int) -> np.ndarray:
        """Input ids; by default every symbol uniformly and independently
        (tasks with a grammar or structure override this)."""
        return rng.integers(0, self.input_size, size=(batch_size, length))

    def _draw(self, rng: np.random.Generator, batch_size: int,
              length: int) -> tuple[np.ndarray, np.ndarray]:
        """Input ids and their label ids for checked arguments; by default
        :meth:`_draw_inputs` then :meth:`_labels` of those inputs (tasks
        that know the label while generating override this)."""
        tokens = self._draw_inputs(rng, batch_size, length)
        return tokens, self._labels(tokens)

    def _check_sample_args(self, rng, batch_size, length) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TreeschedError(
                f"task {self.name!r}: rng must be a numpy.random.Generator, "
                f"got {type(rng).__name__}")
        if not _is_int(batch_size) or int(batch_size) < 1:
            raise TreeschedError(
                f"task {self.name!r}: batch_size must be an integer >= 1, "
                f"got {batch_size!r}")
        self.check_length(length)

    def sample_tokens(self, rng: np.random.Generator, batch_size: int,
                      length: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer ids: inputs ``(B, input_length(length))`` and labels
        ``(B, output_length(length))`` (both int64)."""
        self._check_sample_args(rng, batch_size, length)
        tokens, labels = self._draw(rng, int(batch_size), int(length))
        return (np.asarray(tokens, dtype=np.int64),
                np.asarray(labels, dtype=np.int64))

    def mask_from_labels(self, labels: np.ndarray) -> np.ndarray:
        """Accuracy mask float32 ``(B, O)`` for integer labels ``(B, O)``."""
        labels = np.asarray(labels)
        if self.has_accuracy_mask:
            return termination_mask(labels)
        return np.ones(labels.shape, dtype=np.float32)

    def sample(self, rng: np.random.Generator, batch_size: int, length: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw a batch: ``(inputs, targets, mask)``.

        ``inputs`` float32 one-hot ``(B, input_length(length), input_size)``,
        ``targets`` float32 one-hot ``(B, output_length(length),
        output_size)``, ``mask`` float32 ``(B, output_length(length))`` with
        1.0 where accuracy counts.
        """
        tokens, labels = self.sample_tokens(rng, batch_size, length)
        return (one_hot(tokens, self.input_size),
                one_hot(labels, self.output_size),
                self.mask_from_labels(labels))

    def __repr__(self) -> str:
        return (f"<Task {self.name} level={self.level} "
                f"input_size={self.input_size} "
                f"output_size={self.output_size}>")


class EqualLengthOutputTask(Task):
    """A :class:`Task` with as many output positions as input symbols:
    ``output_length(n) = n``."""

    def _output_length(self, n: int) -> int:
        return n

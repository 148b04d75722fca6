"""Context-sensitive tasks: duplicate_string, missing_duplicate_string,
odds_first, binary_addition, binary_multiplication, compute_sqrt,
bucket_sort."""

from __future__ import annotations

import math

import numpy as np

from treesched.errors import TreeschedError
from treesched.tasks.base import EqualLengthOutputTask, Task

# -- binary helpers ----


def random_nonzero_bits(rng: np.random.Generator, lengths: np.ndarray,
                        width: int) -> np.ndarray:
    """Rows of uniform bits, row ``b`` using its first ``lengths[b]`` columns
    (zeros after), redrawn until each row is nonzero: i.e. the little-endian
    bits of an integer uniform in ``[1, 2**lengths[b] - 1]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    valid = np.arange(width)[None, :] < lengths[:, None]
    bits = rng.integers(0, 2, size=(lengths.size, width)) * valid
    bad = np.flatnonzero(~bits.any(axis=1))
    while bad.size:
        bits[bad] = rng.integers(0, 2, size=(bad.size, width)) * valid[bad]
        bad = bad[~bits[bad].any(axis=1)]
    return bits


def little_endian_int(bits: np.ndarray) -> int:
    """Python int of one little-endian 0/1 row (empty -> 0)."""
    if bits.size == 0:
        return 0
    # The row as an ASCII string of '0'/'1' (48 is ord('0')), most
    # significant bit first, parsed by int() in base 2: exact at any width.
    return int((bits[::-1] + 48).astype(np.uint8).tobytes(), 2)


def bits_to_ints(bits: np.ndarray) -> list[int]:
    """Python ints of little-endian bit rows ``(B, W)`` (``W == 0`` -> 0)."""
    return [little_endian_int(row) for row in bits]


def int_to_bits(value: int) -> np.ndarray:
    """Little-endian bits of ``value`` without trailing (leading) zeros;
    ``0`` -> ``[0]``."""
    text = format(value, "b").encode()
    return (np.frombuffer(text, dtype=np.uint8)[::-1] - 48).astype(np.int64)


def _two_operands(rng, batch_size, length):
    """Expression ``n 2 m`` of the binary arithmetic tasks (``length >= 3``).

    ``len(n)`` uniform in ``[1, length-2]``, ``len(m) = length - 1 - len(n)``;
    each operand uniform in ``[1, 2**len - 1]`` and written little-endian,
    zero-padded to its length.  Returns the token ids.
    """
    len_n = rng.integers(1, length - 1, size=batch_size)
    len_m = length - 1 - len_n
    bits_n = random_nonzero_bits(rng, len_n, length - 2)
    bits_m = random_nonzero_bits(rng, len_m, length - 2)
    pos = np.arange(length)[None, :]
    rows = np.arange(batch_size)[:, None]
    ln = len_n[:, None]
    tokens = np.where(
        pos < ln, bits_n[rows, np.minimum(pos, length - 3)],
        np.where(pos == ln, 2, bits_m[rows, np.clip(pos - ln - 1, 0, None)]))
    return tokens


def _split_operands(tokens: np.ndarray, task: str) -> list[tuple[int, int]]:
    """The two little-endian operands of each row ``a 2 b``."""
    is_sep = tokens == 2
    if np.any(is_sep.sum(axis=1) != 1):
        raise TreeschedError(
            f"task {task!r}: an expression holds exactly one separator 2")
    seps = np.argmax(is_sep, axis=1)
    return [(little_endian_int(row[:k]), little_endian_int(row[k + 1:]))
            for row, k in zip(tokens, seps.tolist())]


def _check_bits(tokens: np.ndarray, task: str) -> None:
    if np.any(tokens > 1):
        raise TreeschedError(
            f"task {task!r}: inputs of length <= 2 are bits only")


def _short_operand(rng, batch_size, length):
    """Inputs for ``length <= 2``: an integer uniform in ``[0, 2**length - 2]``
    (the public ``randint(0, 2**length - 1)``) as ``length`` little-endian
    bits, without a separator."""
    values = rng.integers(0, 2 ** length - 1, size=batch_size)
    return (values[:, None] >> np.arange(length)[None, :]) & 1


def _terminated_labels(results: list[np.ndarray], width: int) -> np.ndarray:
    """Labels ``(len(results), width)``: row ``b`` is the bits
    ``results[b]``, then the termination token ``2``, then ``0`` padding
    (each result must have fewer than ``width`` bits)."""
    labels = np.zeros((len(results), width), dtype=np.int64)
    for b, bits in enumerate(results):
        labels[b, :bits.size] = bits
        labels[b, bits.size] = 2
    return labels


# -- tasks ----


class DuplicateString(Task):
    """Binary string ``s`` (uniform bits); output ``s s`` (output_length
    ``2n``)."""

    name = "duplicate_string"
    level = "cs"
    input_size = 2
    output_size = 2

    def _output_length(self, n):
        return 2 * n

    def _labels(self, tokens):
        return np.concatenate([tokens, tokens], axis=1)


class MissingDuplicateString(Task):
    """Predict the symbol hidden in a duplicated binary string.

    Input ids (input_size 4): bits 0/1, ``2`` = the hidden symbol's
    placeholder, ``3`` = padding.  For ``n >= 2``: a uniform bit string ``w``
    of length ``n // 2`` is written twice (``w w``), one position of the
    ``2 * (n // 2)`` is chosen uniformly and replaced by ``2`` (its bit is the
    label), and an odd ``n`` gets one trailing ``3``.  For ``n == 1`` (as in
    the public code) the input is the single id ``1`` and the label is 1.
    """

    name = "missing_duplicate_string"
    level = "cs"
    input_size = 4
    output_size = 2

    def _draw_inputs(self, rng, batch_size, length):
        if length == 1:
            return np.ones((batch_size, 1), dtype=np.int64)
        half = length // 2
        word = rng.integers(0, 2, size=(batch_size, half))
        doubled = np.concatenate([word, word], axis=1)
        hidden = rng.integers(0, 2 * half, size=batch_size)
        doubled[np.arange(batch_size), hidden] = 2
        pad = np.full((batch_size, length % 2), 3)
        return np.concatenate([doubled, pad], axis=1)

    def _labels(self, tokens):
        batch, length = tokens.shape
        if length == 1:
            return np.ones((batch, 1), dtype=np.int64)
        half = length // 2
        body = tokens[:, :2 * half]
        hole = body == 2
        if np.any(hole.sum(axis=1) != 1):
            raise TreeschedError(
                f"task {self.name!r}: the duplicated string hides exactly "
                "one symbol (id 2)")
        where = np.argmax(hole, axis=1)
        twin = np.where(where < half, where + half, where - half)
        return body[np.arange(batch), twin][:, None]


class OddsFirst(EqualLengthOutputTask):
    """Binary string ``s`` (uniform bits); output the symbols at 0-based odd
    positions first, then those at even positions: ``s[1::2] + s[0::2]``,
    e.g. ``00110101`` -> ``01110100``.  This follows the public code; its
    docstring's example reads the other way round."""

    name = "odds_first"
    level = "cs"
    input_size = 2
    output_size = 2

    def _labels(self, tokens):
        return np.concatenate([tokens[:, 1::2], tokens[:, 0::2]], axis=1)


class BinaryArithmeticTask(Task):
    """The shared definition of binary_addition and binary_multiplication.

    Input ids (input_size 3): bits, ``2`` = the operator separating the
    operands.  For ``n >= 3`` the input is ``a 2 b`` (see the operand
    distribution in :func:`_two_operands`: the ``n - 1`` digits are split
    with ``len(a)`` uniform in ``[1, n-2]``; each operand uniform in
    ``[1, 2**len - 1]``, little-endian, padded with zeros at the end to its
    length).  For ``n <= 2`` the input is just ``n`` little-endian bits of a
    number uniform in ``[0, 2**n - 2]`` (no separator, see
    :func:`_short_operand`).

    Output (output_size 3, output_length ``_output_length(n)``): the
    result's bits, then the termination token ``2``, then ``0`` padding.
    For ``n >= 3`` the result is ``_combine(a, b)`` little-endian without
    trailing zeros (``0`` is ``[0]``); for ``n <= 2`` its bits are
    ``_short_result_bits`` of the input row.  Accuracy mask: up to and
    including the termination token.
    """

    level = "cs"
    input_size = 3
    output_size = 3
    has_accuracy_mask = True

    def _combine(self, a: int, b: int) -> int:
        """The result of the operation on the operands ``a`` and ``b``."""
        raise NotImplementedError

    def _short_result_bits(self, bits: np.ndarray) -> np.ndarray:
        """The result's little-endian bits for an input row of ``<= 2`` bits
        (such an input holds no operator)."""
        raise NotImplementedError

    def _draw_inputs(self, rng, batch_size, length):
        if length <= 2:
            return _short_operand(rng, batch_size, length)
        return _two_operands(rng, batch_size, length)

    def _labels(self, tokens):
        length = tokens.shape[1]
        if length <= 2:
            _check_bits(tokens, self.name)
            results = [self._short_result_bits(row) for row in tokens]
        else:
            results = [int_to_bits(self._combine(a, b))
                       for a, b in _split_operands(tokens, self.name)]
        return _terminated_labels(results, self.output_length(length))


class BinaryAddition(BinaryArithmeticTask):
    """Sum of two little-endian binary numbers (see
    :class:`BinaryArithmeticTask`; ``2`` is the ``+`` separator).

    Output length ``n + 1``.  For ``n <= 2`` the "sum" is the number the
    input bits encode.  Example: ``001 2 01101`` (4 + 22) ->
    ``0101120000`` (26, then ``2``, then padding).
    """

    name = "binary_addition"

    def _output_length(self, n):
        return n + 1

    def _combine(self, a, b):
        return a + b

    def _short_result_bits(self, bits):
        return int_to_bits(little_endian_int(bits))


class BinaryMultiplication(BinaryArithmeticTask):
    """Product of two little-endian binary numbers (see
    :class:`BinaryArithmeticTask`; ``2`` is the ``*`` separator).

    Output length ``n`` (the product has at most ``n - 1`` bits).  For
    ``n <= 2`` the public code fixes the result to ``n - 1`` zero bits, so
    the output is ``[2]`` for ``n == 1`` and ``[0, 2]`` for ``n == 2``
    whatever the input.  Example: ``001 2 01101`` (4 * 22) -> ``000110120``
    (88, then ``2``, then padding).
    """

    name = "binary_multiplication"

    def _output_length(self, n):
        return n

    def _combine(self, a, b):
        return a * b

    def _short_result_bits(self, bits):
        return np.zeros(bits.size - 1, dtype=np.int64)


class ComputeSqrt(Task):
    """Floor of the square root of a binary number, big-endian.

    Input (input_size 2): ``n`` bits, big-endian (leading zeros allowed), of
    an integer uniform in ``[1, 2**n - 1]``.  Output (output_size 2,
    output_length ``ceil(n / 2)``): ``isqrt`` of it, big-endian, zero-padded
    on the left to ``ceil(n / 2)`` bits.  No accuracy mask.
    """

    name = "compute_sqrt"
    level = "cs"
    input_size = 2
    output_size = 2

    def _output_length(self, n):
        return math.ceil(n / 2)

    def _draw_inputs(self, rng, batch_size, length):
        little = random_nonzero_bits(
            rng, np.full(batch_size, length), length)
        return little[:, ::-1].copy()

    def _labels(self, tokens):
        batch, length = tokens.shape
        out_len = self.output_length(length)
        roots = [math.isqrt(v) for v in bits_to_ints(tokens[:, ::-1])]
        labels = np.zeros((batch, out_len), dtype=np.int64)
        for b, root in enumerate(roots):
            if root:
                bits = int_to_bits(root)[::-1]
                labels[b, out_len - bits.size:] = bits
        return labels


class BucketSort(EqualLengthOutputTask):
    """String over ``{0..4}`` (uniform symbols); output: the same symbols
    sorted ascending, e.g. ``10204112`` -> ``00111224``."""

    name = "bucket_sort"
    level = "cs"
    input_size = 5
    output_size = 5

    def _labels(self, tokens):
        return np.sort(tokens, axis=1)

"""Regular tasks: even_pairs, modular_arithmetic, parity_check,
cycle_navigation.  All have a single output position (``output_length = 1``)
and no accuracy mask."""

from __future__ import annotations

import numpy as np

from treesched.errors import TreeschedError
from treesched.tasks.base import Task


class EvenPairs(Task):
    """Binary string; class 1 iff the number of unequal neighbour pairs
    (``01`` or ``10``) is odd, else 0.  Bits are uniform.  Length 1 has no
    pairs (class 0).  Example: ``001110`` -> one ``01`` + one ``10`` -> 0."""

    name = "even_pairs"
    level = "regular"
    input_size = 2
    output_size = 2

    def _labels(self, tokens):
        changes = np.count_nonzero(tokens[:, 1:] != tokens[:, :-1], axis=1)
        return (changes % 2)[:, None]


class ModularArithmetic(Task):
    """Expression ``n op n op ... n`` without brackets, evaluated modulo 5.

    Vocabulary (input_size 9): digits ``0..4`` are ids 0..4, then ``+`` = 5,
    ``-`` = 6, ``*`` = 7 and a blank ``_`` = 8 that is in the vocabulary but
    never sampled.  Digits are uniform in 0..4; operators uniform over
    ``{+, *, -}``.  The value uses the usual precedence: ``*`` binds tighter
    than ``+``/``-``, which associate left to right (``a - b * c`` =
    ``a + (-b) * c``); the label is the value mod 5 (output_size 5).

    Length semantics (as in the public code): the expression must have odd
    length, so an even requested length ``n`` yields an input of length
    ``n - 1`` (see :meth:`input_length`); ``n // 2`` operators.

    Note: the public JAX code multiplies in int32 before reducing mod 5, so
    a product of ~20 or more consecutive factors would overflow there; this
    implementation is exact mod 5 (such chains occur with probability about
    3**-20 per position).
    """

    name = "modular_arithmetic"
    level = "regular"
    modulus = 5
    PLUS, MINUS, TIMES, BLANK = 5, 6, 7, 8
    input_size = 9
    output_size = 5

    def input_length(self, n):
        self.check_length(n)
        n = int(n)
        return n if n % 2 == 1 else n - 1

    def _draw_inputs(self, rng, batch_size, length):
        m = self.modulus
        length = self.input_length(length)
        n_ops = length // 2
        nums = rng.integers(0, m, size=(batch_size, n_ops + 1))
        choice = rng.integers(0, 3, size=(batch_size, n_ops))
        ops = np.array([self.PLUS, self.TIMES, self.MINUS])[choice]
        tokens = np.empty((batch_size, length), dtype=np.int64)
        tokens[:, 0::2] = nums
        tokens[:, 1::2] = ops
        return tokens

    def _labels(self, tokens):
        """Blanks are read as in the public code: ``_`` at an operator
        position is ``+`` and at a number position is ``0``."""
        if tokens.shape[1] % 2 != 1:
            raise TreeschedError(
                f"task {self.name!r}: an expression has odd length, got "
                f"{tokens.shape[1]}")
        nums, ops = tokens[:, 0::2], tokens[:, 1::2]
        if (np.any((nums >= self.modulus) & (nums != self.BLANK))
                or np.any((ops < self.modulus))):
            raise TreeschedError(
                f"task {self.name!r}: expected digit, operator, digit, ... "
                "(ids 0-4 at even positions, 5-8 at odd positions)")
        nums = np.where(nums == self.BLANK, 0, nums)
        ops = np.where(ops == self.BLANK, self.PLUS, ops)
        return self.evaluate(nums, ops)[:, None]

    @classmethod
    def evaluate(cls, nums: np.ndarray, ops: np.ndarray) -> np.ndarray:
        """Values mod 5 of expressions ``nums[:,0] ops[:,0] nums[:,1] ...``
        (``ops`` ids 5 = ``+``, 6 = ``-``, 7 = ``*``)."""
        m = cls.modulus
        total = np.zeros(nums.shape[0], dtype=np.int64)
        term = nums[:, 0].astype(np.int64) % m
        for k in range(ops.shape[1]):
            op, x = ops[:, k], nums[:, k + 1]
            times = op == cls.TIMES
            signed = np.where(op == cls.MINUS, -x, x)
            total = np.where(times, total, total + term) % m
            term = np.where(times, term * x, signed) % m
        return (total + term) % m


class ParityCheck(Task):
    """Binary string; class = (number of ``1`` symbols) mod 2."""

    name = "parity_check"
    level = "regular"
    input_size = 2
    output_size = 2

    def _labels(self, tokens):
        return (tokens.sum(axis=1) % 2)[:, None]


class CycleNavigation(Task):
    """Walk on a cycle of 5 states starting at 0.

    Input ids (uniform over 3, the default draw): 0 = step left (-1),
    1 = stay, 2 = step right (+1).  Class = (sum of (id - 1)) mod 5.
    """

    name = "cycle_navigation"
    level = "regular"
    cycle_length = 5
    input_size = 3
    output_size = 5

    def _labels(self, tokens):
        return ((tokens - 1).sum(axis=1) % self.cycle_length)[:, None]

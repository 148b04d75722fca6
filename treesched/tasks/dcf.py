"""Deterministic context-free tasks: stack_manipulation, reverse_string,
modular_arithmetic_brackets, solve_equation."""

from __future__ import annotations

import numpy as np

from treesched.errors import TreeschedError
from treesched.tasks.base import EqualLengthOutputTask, Task


class StackManipulation(Task):
    """Execute stack instructions and output the final stack, top first.

    Input ids (input_size 5): the initial stack bottom-to-top as bits
    ``0``/``1``, then actions ``2`` = POP, ``3`` = PUSH 0, ``4`` = PUSH 1.
    POP on an empty stack is ignored.  For length ``n >= 2`` the initial
    stack length ``k`` is uniform in ``[1, n-1]``, its bits uniform, and the
    ``n - k`` actions uniform over {2, 3, 4}.  For ``n == 1`` the input is one
    uniform bit and the final stack is that bit.

    Output (output_size 3, output_length ``n + 1``): the final stack
    top-to-bottom, then the termination token ``2``, then ``0`` padding.
    Accuracy mask: positions up to and including the termination token.
    """

    name = "stack_manipulation"
    level = "dcf"
    input_size = 5
    output_size = 3
    has_accuracy_mask = True
    POP = 2

    def _output_length(self, n):
        return n + 1

    def _draw_inputs(self, rng, batch_size, length):
        if length == 1:
            return rng.integers(0, 2, size=(batch_size, 1))
        stack_len = rng.integers(1, length, size=batch_size)
        stack = rng.integers(0, 2, size=(batch_size, length))
        actions = rng.integers(2, 5, size=(batch_size, length))
        pos = np.arange(length)[None, :]
        return np.where(pos < stack_len[:, None], stack, actions)

    def _labels(self, tokens):
        return self.final_stacks(tokens)

    @classmethod
    def final_stacks(cls, tokens: np.ndarray) -> np.ndarray:
        """Labels ``(B, T + 1)`` for token rows ``(B, T)`` (any 0/1/2/3/4 mix:
        0, 1, 3, 4 push ``id % 3``, 2 pops)."""
        batch, length = tokens.shape
        pop = tokens == cls.POP
        step = np.where(pop, -1, 1)
        walk = np.cumsum(step, axis=1)
        # Height of the stack where pops on an empty stack are ignored.
        height = walk - np.minimum(np.minimum.accumulate(walk, axis=1), 0)
        # A push survives iff the height never drops below its level later.
        after = np.full((batch, length), np.iinfo(np.int64).max)
        suffix_min = np.minimum.accumulate(height[:, ::-1], axis=1)[:, ::-1]
        after[:, :-1] = suffix_min[:, 1:]
        survive = ~pop & (after >= height)
        top = height[:, -1]
        labels = np.zeros((batch, length + 1), dtype=np.int64)
        rows, cols = np.nonzero(survive)
        labels[rows, top[rows] - height[rows, cols]] = tokens[rows, cols] % 3
        labels[np.arange(batch), top] = 2
        return labels


class ReverseString(EqualLengthOutputTask):
    """Binary string (uniform bits); output: the string reversed, e.g.
    ``011010`` -> ``010110``."""

    name = "reverse_string"
    level = "dcf"
    input_size = 2
    output_size = 2

    def _labels(self, tokens):
        return tokens[:, ::-1].copy()


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "neg": 3}


def evaluate_infix(ids, modulus: int, symbols: dict, task: str = "") -> int:
    """Value mod ``modulus`` of an infix expression given as ids.

    Ids below ``modulus`` are digits; ``symbols`` maps the other ids to
    ``+ - * ( )``.  Usual precedence: unary minus, then ``*``, then
    left-associative ``+``/``-``.  Malformed input raises TreeschedError.
    """
    values: list[int] = []
    ops: list[str] = []

    def fail(why):
        raise TreeschedError(f"task {task!r}: malformed expression ({why})")

    def apply():
        op = ops.pop()
        if op == "neg":
            if not values:
                fail("dangling minus")
            values.append(-values.pop() % modulus)
            return
        if len(values) < 2:
            fail("missing operand")
        right, left = values.pop(), values.pop()
        result = {"+": left + right, "-": left - right, "*": left * right}[op]
        values.append(result % modulus)

    expect_operand = True
    for tok in np.asarray(ids).tolist():
        sym = symbols.get(tok) if tok >= modulus else None
        if tok < modulus:
            if not expect_operand:
                fail("two operands in a row")
            values.append(tok)
            expect_operand = False
        elif sym == "(":
            if not expect_operand:
                fail("'(' after an operand")
            ops.append("(")
        elif sym == ")":
            if expect_operand:
                fail("')' without an operand")
            while ops and ops[-1] != "(":
                apply()
            if not ops:
                fail("unbalanced ')'")
            ops.pop()
        elif sym == "-" and expect_operand:
            ops.append("neg")
        elif sym in ("+", "-", "*"):
            if expect_operand:
                fail(f"'{sym}' without a left operand")
            while (ops and ops[-1] != "("
                   and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[sym]):
                apply()
            ops.append(sym)
            expect_operand = True
        else:
            fail(f"unexpected id {tok}")
    if expect_operand:
        fail("missing final operand")
    while ops:
        if ops[-1] == "(":
            fail("unbalanced '('")
        apply()
    if len(values) != 1:
        fail("missing operator")
    return values[0] % modulus


# The codes bracket_expressions writes, for modulus m, are the digits 0..m-1
# followed by these symbols: '+' = m, '-' = m+1, '*' = m+2, '(' = m+3,
# ')' = m+4.  This is modular_arithmetic_brackets' own vocabulary;
# solve_equation re-maps them to its alphabet.
BRACKET_SYMBOLS = ("+", "-", "*", "(", ")")


def _symbol_table(modulus: int, symbols) -> dict:
    """The ``symbols`` argument of :func:`evaluate_infix` for an alphabet of
    the digits ``0..modulus-1`` followed by ``symbols``: ``{modulus:
    symbols[0], modulus + 1: symbols[1], ...}``."""
    return dict(enumerate(symbols, start=modulus))


def bracket_expressions(rng: np.random.Generator, batch_size: int,
                        length: int, modulus: int, mult: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Random bracketed expressions of exactly ``length`` symbols, and values.

    The grammar of the public generator, sampled for the whole batch level by
    level: a segment of length 1 is a digit ``d``, 2 is ``-d``, 3 is
    ``(d)``, 4 is ``(-d)`` (``d`` uniform in ``0..modulus-1``); a segment of
    length ``L >= 5`` is ``(A op B)`` with ``len(A)`` uniform in
    ``[1, L-4]``, ``len(B) = L - 3 - len(A)`` and ``op`` uniform over
    ``+, -`` (and ``*`` if ``mult``).  Returns codes ``(B, length)`` and the
    values mod ``modulus`` ``(B,)``.
    """
    m = modulus
    plus, minus, lpar, rpar = m, m + 1, m + 3, m + 4
    codes = np.full((batch_size, length), -1, dtype=np.int64)
    values = np.zeros(batch_size * length + 1, dtype=np.int64)
    rows = np.arange(batch_size)
    starts = np.zeros(batch_size, dtype=np.int64)
    lens = np.full(batch_size, length, dtype=np.int64)
    nodes = np.arange(batch_size)
    next_id = batch_size
    merges = []
    while rows.size:
        leaf = lens <= 4
        if leaf.any():
            r, s, n, nd = rows[leaf], starts[leaf], lens[leaf], nodes[leaf]
            digit = rng.integers(0, m, size=r.size)
            neg = (n == 2) | (n == 4)
            par = n >= 3
            codes[r, s + par + neg] = digit
            codes[r[par], s[par]] = lpar
            codes[r[par], s[par] + n[par] - 1] = rpar
            codes[r[neg], s[neg] + par[neg]] = minus
            values[nd] = np.where(neg, -digit, digit) % m
        inner = ~leaf
        if not inner.any():
            break
        r, s, n, nd = rows[inner], starts[inner], lens[inner], nodes[inner]
        k = r.size
        left = rng.integers(1, n - 3)
        right = n - 3 - left
        op = rng.integers(0, 3 if mult else 2, size=k)
        codes[r, s] = lpar
        codes[r, s + 1 + left] = plus + op
        codes[r, s + n - 1] = rpar
        lid = next_id + np.arange(k)
        rid = lid + k
        next_id += 2 * k
        merges.append((nd, op, lid, rid))
        rows = np.concatenate([r, r])
        starts = np.concatenate([s + 1, s + 2 + left])
        lens = np.concatenate([left, right])
        nodes = np.concatenate([lid, rid])
    for nd, op, lid, rid in reversed(merges):
        a, b = values[lid], values[rid]
        values[nd] = np.where(op == 0, a + b,
                              np.where(op == 1, a - b, a * b)) % m
    return codes, values[:batch_size]


class ModularArithmeticBrackets(Task):
    """Bracketed expression over digits 0..4 with ``+ - *``, value mod 5.

    Vocabulary (input_size 11 = modulus + 6): digits 0..4, ``+`` = 5,
    ``-`` = 6, ``*`` = 7, ``(`` = 8, ``)`` = 9; id 10 (``x`` in the public
    alphabet) is never used.  The expression has exactly ``n`` symbols and is
    drawn from the public recursive grammar (see
    :func:`bracket_expressions`, with multiplication enabled as in the
    public ``TASK_BUILDERS``).  Binary operations are always fully
    bracketed; ``-`` also appears as unary minus on digits (``-d``,
    ``(-d)``).  Label = value mod 5.
    """

    name = "modular_arithmetic_brackets"
    level = "dcf"
    modulus = 5
    mult = True
    input_size = 11
    output_size = 5

    def _draw(self, rng, batch_size, length):
        codes, values = bracket_expressions(
            rng, batch_size, length, self.modulus, self.mult)
        return codes, values[:, None]

    def _labels(self, tokens):
        m = self.modulus
        symbols = _symbol_table(m, BRACKET_SYMBOLS)
        return np.array([[evaluate_infix(row, m, symbols, self.name)]
                         for row in tokens], dtype=np.int64).reshape(-1, 1)


class SolveEquation(Task):
    """Solve ``expression(x) = v`` (mod 5) for the digit replaced by ``x``.

    Vocabulary (input_size 11): digits 0..4, ``+`` = 5, ``-`` = 6, ``(`` = 7,
    ``)`` = 8, ``x`` = 9, ``=`` = 10.  For length ``n >= 3``: a bracketed
    expression of ``n - 2`` symbols is drawn from the same grammar as
    modular_arithmetic_brackets but WITHOUT ``*`` (so the solution is
    unique), its value ``v`` computed, then a position is drawn uniformly in
    ``[0, n-3]`` and moved forward (cyclically) to the first digit; that
    digit becomes ``x`` and is the label.  The input is the expression, ``=``
    and the digit ``v``.  For ``n < 3`` (as in the public code) the input is
    all digit ``0`` and the label is 0.
    """

    name = "solve_equation"
    level = "dcf"
    modulus = 5
    input_size = 11
    output_size = 5
    # The symbols after the digits, in id order; then x and =.
    SYMBOLS = ("+", "-", "(", ")")
    X, EQUALS = 9, 10

    def _labels(self, tokens):
        m = self.modulus
        batch, length = tokens.shape
        if length < 3:
            return np.zeros((batch, 1), dtype=np.int64)
        symbols = _symbol_table(m, self.SYMBOLS)
        labels = np.zeros((batch, 1), dtype=np.int64)
        for b, row in enumerate(tokens):
            if row[-2] != self.EQUALS or row[-1] >= m:
                raise TreeschedError(
                    f"task {self.name!r}: an equation ends with '=' and a "
                    "digit")
            expr, rhs = row[:-2].copy(), int(row[-1])
            unknown = expr == self.X
            solutions = []
            for digit in range(m):
                expr[unknown] = digit
                if evaluate_infix(expr, m, symbols, self.name) == rhs:
                    solutions.append(digit)
            if not solutions:
                raise TreeschedError(
                    f"task {self.name!r}: equation {b} has no solution")
            labels[b, 0] = solutions[0]
        return labels

    def _draw(self, rng, batch_size, length):
        m = self.modulus
        if length < 3:
            return (np.zeros((batch_size, length), dtype=np.int64),
                    np.zeros((batch_size, 1), dtype=np.int64))
        expr_len = length - 2
        codes, values = bracket_expressions(
            rng, batch_size, expr_len, m, mult=False)
        # Re-map the bracket codes to this task's alphabet, symbol by symbol
        # ('*' is not in it, and mult=False never generates it).
        lut = np.arange(m + len(BRACKET_SYMBOLS))
        for code, symbol in _symbol_table(m, BRACKET_SYMBOLS).items():
            if symbol in self.SYMBOLS:
                lut[code] = m + self.SYMBOLS.index(symbol)
        codes = lut[codes]
        start = rng.integers(0, expr_len, size=batch_size)
        big = np.iinfo(np.int64).max
        pos = np.where(codes < m, np.arange(expr_len)[None, :], big)
        next_digit = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1]
        rows = np.arange(batch_size)
        where = next_digit[rows, start]
        where = np.where(where == big, next_digit[:, 0], where)
        solution = codes[rows, where].copy()
        codes[rows, where] = self.X
        tokens = np.concatenate(
            [codes, np.full((batch_size, 1), self.EQUALS), values[:, None]],
            axis=1)
        return tokens, solution[:, None]

"""Tests of treesched.tasks: the 15 tasks of Delétang et al. (ICLR 2023).

Hand-worked examples (mostly the examples in the public task docstrings,
recomputed), independent loop-based references for sampled batches,
shapes / one-hot / dtype / reproducibility / mask properties, the input
tape, the accuracy and loss helpers, and the error paths.
"""

import functools
import math
import time

import numpy as np
import pytest

import treesched.tasks as tasks
from treesched.errors import TreeschedError

NAMES = [
    "even_pairs", "modular_arithmetic", "parity_check", "cycle_navigation",
    "stack_manipulation", "reverse_string", "modular_arithmetic_brackets",
    "solve_equation",
    "duplicate_string", "missing_duplicate_string", "odds_first",
    "binary_addition", "binary_multiplication", "compute_sqrt",
    "bucket_sort",
]

# name: (level, input_size, output_size, output_length(n) for n = 1..6, 41)
SPECS = {
    "even_pairs": ("regular", 2, 2, lambda n: 1),
    "modular_arithmetic": ("regular", 9, 5, lambda n: 1),
    "parity_check": ("regular", 2, 2, lambda n: 1),
    "cycle_navigation": ("regular", 3, 5, lambda n: 1),
    "stack_manipulation": ("dcf", 5, 3, lambda n: n + 1),
    "reverse_string": ("dcf", 2, 2, lambda n: n),
    "modular_arithmetic_brackets": ("dcf", 11, 5, lambda n: 1),
    "solve_equation": ("dcf", 11, 5, lambda n: 1),
    "duplicate_string": ("cs", 2, 2, lambda n: 2 * n),
    "missing_duplicate_string": ("cs", 4, 2, lambda n: 1),
    "odds_first": ("cs", 2, 2, lambda n: n),
    "binary_addition": ("cs", 3, 3, lambda n: n + 1),
    "binary_multiplication": ("cs", 3, 3, lambda n: n),
    "compute_sqrt": ("cs", 2, 2, lambda n: (n + 1) // 2),
    "bucket_sort": ("cs", 5, 5, lambda n: n),
}
MASKED = {"stack_manipulation", "binary_addition", "binary_multiplication"}


def labels(name, rows):
    """Target ids for hand-written input rows (all of one length)."""
    return tasks.get(name).labels(np.array(rows, dtype=np.int64)).tolist()


# The input alphabets of the expression tasks, character i being id i.
BRACKETS_ALPHABET = "01234+-*()"  # modular_arithmetic_brackets
EQUATION_ALPHABET = "01234+-()x="  # solve_equation


def text_labels(name, alphabet, text):
    """Target ids for one input written as text over ``alphabet``."""
    return labels(name, [[alphabet.index(c) for c in text]])


def decode(onehot):
    """Ids of a one-hot array, checking it is one-hot."""
    assert onehot.dtype == np.float32
    assert np.all((onehot == 0) | (onehot == 1))
    assert np.all(onehot.sum(axis=-1) == 1)
    return onehot.argmax(axis=-1)


# -- registry ----


def test_names_order_and_registry():
    assert tasks.names() == NAMES
    for name in NAMES:
        task = tasks.get(name)
        assert isinstance(task, tasks.Task)
        level, n_in, n_out, out_len = SPECS[name]
        assert (task.name, task.level) == (name, level)
        assert (task.input_size, task.output_size) == (n_in, n_out)
        assert task.has_accuracy_mask == (name in MASKED)
        for n in (1, 2, 3, 4, 5, 6, 41, 500):
            assert task.output_length(n) == out_len(n)


def test_unknown_task_lists_known_names():
    with pytest.raises(TreeschedError) as info:
        tasks.get("no_such_task")
    assert isinstance(info.value, ValueError)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_check_length_errors(name):
    task = tasks.get(name)
    task.check_length(1)
    task.check_length(np.int64(7))
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(TreeschedError, match=name) as info:
            task.check_length(bad)
        assert "[1, inf)" in str(info.value)
    with pytest.raises(TreeschedError):
        task.output_length(0)
    with pytest.raises(TreeschedError):
        task.sample(np.random.default_rng(0), 4, 0)
    with pytest.raises(TreeschedError):
        task.sample(np.random.default_rng(0), 0, 5)
    with pytest.raises(TreeschedError):
        task.sample(np.random.RandomState(0), 4, 5)
    with pytest.raises(TreeschedError):
        task.labels(np.full((1, 3), task.input_size))


# -- generic properties of sampled batches ----

LENGTHS = (1, 2, 3, 4, 5, 6, 7, 12, 40)


@pytest.mark.parametrize("name", NAMES)
def test_sample_shapes_onehot_mask_reproducible(name):
    task = tasks.get(name)
    for n in LENGTHS:
        inputs, targets, mask = task.sample(np.random.default_rng(n), 9, n)
        t_in = n - 1 if (name == "modular_arithmetic" and n % 2 == 0) else n
        assert task.input_length(n) == t_in
        assert inputs.shape == (9, t_in, task.input_size)
        assert targets.shape == (9, task.output_length(n), task.output_size)
        assert mask.shape == targets.shape[:2] and mask.dtype == np.float32
        ids, lab = decode(inputs), decode(targets)
        assert np.array_equal(task.labels(ids), lab)
        if name in MASKED:
            stop = [list(row).index(2) for row in lab]
            want = [[1.0 if t <= s else 0.0 for t in range(lab.shape[1])]
                    for s in stop]
            assert mask.tolist() == want
            assert all(set(row[s + 1:]) <= {0} for row, s in
                       zip(lab.tolist(), stop))
        else:
            assert np.all(mask == 1.0)
        again = task.sample(np.random.default_rng(n), 9, n)
        for a, b in zip((inputs, targets, mask), again):
            assert np.array_equal(a, b)
        tok, lab2 = task.sample_tokens(np.random.default_rng(n), 9, n)
        assert np.array_equal(tok, ids) and np.array_equal(lab2, lab)
    one = task.sample(np.random.default_rng(1), 16, 40)[0]
    two = task.sample(np.random.default_rng(2), 16, 40)[0]
    assert not np.array_equal(one, two)


@pytest.mark.parametrize("name", NAMES)
def test_sample_speed_128x500(name):
    task = tasks.get(name)
    task.sample(np.random.default_rng(0), 128, 20)
    start = time.perf_counter()
    inputs, targets, _ = task.sample(np.random.default_rng(0), 128, 500)
    assert time.perf_counter() - start < 0.5
    assert inputs.shape[0] == targets.shape[0] == 128


# -- independent references on sampled data ----

REF_LENGTHS = (1, 2, 3, 4, 5, 6, 9, 13, 41)


def sampled(name, n, batch=24, seed=0):
    inputs, targets, mask = tasks.get(name).sample(
        np.random.default_rng(seed + 1000 * n), batch, n)
    return decode(inputs).tolist(), decode(targets).tolist(), mask


def little_int(bits):
    return sum(b << i for i, b in enumerate(bits))


def little_bits(value):
    out = []
    while True:
        out.append(value % 2)
        value //= 2
        if value == 0:
            return out


def test_reference_regular():
    for n in REF_LENGTHS:
        for s, (y,) in zip(*sampled("even_pairs", n)[:2]):
            pairs = sum(1 for i in range(n - 1) if s[i] != s[i + 1])
            assert y == pairs % 2
        for s, (y,) in zip(*sampled("parity_check", n)[:2]):
            assert y == s.count(1) % 2
        for s, (y,) in zip(*sampled("cycle_navigation", n)[:2]):
            pos = 0
            for a in s:
                pos = (pos + {0: -1, 1: 0, 2: 1}[a]) % 5
            assert y == pos
        for s, (y,) in zip(*sampled("modular_arithmetic", n)[:2]):
            assert len(s) % 2 == 1
            assert all(c < 5 for c in s[0::2])
            assert all(c in (5, 6, 7) for c in s[1::2])
            text = "".join("01234+-*"[c] for c in s)
            assert y == eval(text) % 5  # Python precedence == theirs


def simulate_stack(ids):
    stack = []
    for tok in ids:
        if tok == 2:
            if stack:
                stack.pop()
        else:
            stack.append(tok % 3)
    return stack[::-1]


def test_reference_stack_manipulation():
    for n in REF_LENGTHS:
        for s, y, m in zip(*sampled("stack_manipulation", n)):
            k = next((i for i, c in enumerate(s) if c >= 2), n)
            if n == 1:
                assert s[0] in (0, 1)
            else:
                assert 1 <= k <= n - 1 and all(c >= 2 for c in s[k:])
            final = simulate_stack(s)
            want = final + [2] + [0] * (n - len(final))
            assert y == want
            assert m.tolist() == [1.0] * (len(final) + 1) + [0.0] * (
                n - len(final))
    ids = tasks.get("stack_manipulation").sample_tokens(
        np.random.default_rng(5), 3000, 6)[0]
    prefix = np.argmax(ids >= 2, axis=1)
    assert set(prefix.tolist()) == {1, 2, 3, 4, 5}


def test_reference_strings():
    for n in REF_LENGTHS:
        for s, y, _ in zip(*sampled("reverse_string", n)):
            assert y == s[::-1]
        for s, y, _ in zip(*sampled("duplicate_string", n)):
            assert y == s + s
        for s, y, _ in zip(*sampled("odds_first", n)):
            assert y == [s[i] for i in range(1, n, 2)] + [
                s[i] for i in range(0, n, 2)]
        for s, y, _ in zip(*sampled("bucket_sort", n)):
            assert set(s) <= set(range(5))
            assert y == sorted(s)
        for s, (y,), _ in zip(*sampled("missing_duplicate_string", n)):
            if n == 1:
                assert s == [1] and y == 1
                continue
            half = n // 2
            assert s[2 * half:] == [3] * (n % 2)
            body = s[:2 * half]
            assert body.count(2) == 1 and set(body) <= {0, 1, 2}
            filled = [y if c == 2 else c for c in body]
            assert filled[:half] == filled[half:]


def bracket_text(ids, alphabet):
    return "".join(alphabet[c] for c in ids)


def test_reference_modular_arithmetic_brackets():
    for n in REF_LENGTHS:
        for s, (y,), _ in zip(*sampled("modular_arithmetic_brackets", n)):
            assert len(s) == n and max(s) <= 9
            text = bracket_text(s, BRACKETS_ALPHABET)
            assert y == eval(text) % 5
            if n >= 5:
                assert text[0] == "(" and text[-1] == ")"
    ops = tasks.get("modular_arithmetic_brackets").sample_tokens(
        np.random.default_rng(3), 200, 30)[0]
    assert {5, 6, 7} <= set(ops.ravel().tolist())


def test_reference_solve_equation():
    for n in REF_LENGTHS:
        for s, (y,), _ in zip(*sampled("solve_equation", n)):
            if n < 3:
                assert s == [0] * n and y == 0
                continue
            text = bracket_text(s, EQUATION_ALPHABET)
            assert text[-2] == "=" and text.count("x") == 1
            assert "*" not in text and text[-1] in "01234"
            lhs, rhs = text[:-2], int(text[-1])
            sols = [d for d in range(5)
                    if eval(lhs.replace("x", str(d))) % 5 == rhs]
            assert sols == [y]


def test_reference_binary_addition_and_multiplication():
    for name in ("binary_addition", "binary_multiplication"):
        add = name == "binary_addition"
        for n in REF_LENGTHS:
            for s, y, m in zip(*sampled(name, n)):
                assert len(y) == (n + 1 if add else n)
                if n <= 2:
                    assert 2 not in s
                    value = little_int(s)
                    assert value <= 2 ** n - 2
                    res = little_bits(value) if add else [0] * (n - 1)
                else:
                    sep = s.index(2)
                    a, b = s[:sep], s[sep + 1:]
                    assert 2 not in b and a and b
                    x, z = little_int(a), little_int(b)
                    assert x >= 1 and z >= 1
                    res = little_bits(x + z if add else x * z)
                assert y == res + [2] + [0] * (len(y) - len(res) - 1)
                assert m.tolist() == [1.0] * (len(res) + 1) + [0.0] * (
                    len(y) - len(res) - 1)
        ids = tasks.get(name).sample_tokens(
            np.random.default_rng(9), 3000, 6)[0]
        assert set(np.argmax(ids == 2, axis=1).tolist()) == {1, 2, 3, 4}


def test_reference_compute_sqrt():
    for n in REF_LENGTHS:
        for s, y, _ in zip(*sampled("compute_sqrt", n)):
            value = int("".join(map(str, s)), 2)
            assert 1 <= value <= 2 ** n - 1
            lo, hi = 0, value + 1  # largest r with r*r <= value
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if mid * mid <= value else (lo, mid)
            want = [int(c) for c in format(lo, "b").zfill(math.ceil(n / 2))]
            assert y == want


# -- hand-worked examples ----


def test_hand_even_pairs_parity_cycle():
    assert labels("even_pairs", [[0, 0, 1, 1, 1, 0]]) == [[0]]
    assert labels("even_pairs", [[0, 1, 0, 1, 0, 0, 1]]) == [[1]]
    assert labels("even_pairs", [[1], [0]]) == [[0], [0]]
    assert labels("parity_check", [[1, 0, 1, 0, 1, 0, 0]]) == [[1]]
    assert labels("parity_check", [[0, 1, 1, 1, 1]]) == [[0]]
    # Ids are action + 1: "1 -1 0 -1 -1" ends at -2 = 3, "1 1 1 -1" at 2.
    assert labels("cycle_navigation", [[2, 0, 1, 0, 0]]) == [[3]]
    assert labels("cycle_navigation", [[2, 2, 2, 0]]) == [[2]]


def test_hand_modular_arithmetic():
    P, M, T, B = 5, 6, 7, 8  # + - * _
    assert labels("modular_arithmetic", [[1, P, 2, T, 3]]) == [[2]]
    assert labels("modular_arithmetic", [[1, M, 1, M, 1]]) == [[4]]
    assert labels("modular_arithmetic",
                  [[0, T, 1, P, 4, T, 3, M, 2]]) == [[0]]
    assert labels("modular_arithmetic", [[2, M, 3, T, 4]]) == [[0]]  # 2-12
    assert labels("modular_arithmetic", [[1, B, 2], [B, P, 3]]) == [[3], [3]]
    assert labels("modular_arithmetic", [[4]]) == [[4]]
    with pytest.raises(TreeschedError):
        tasks.get("modular_arithmetic").labels(np.array([[1, P]]))


def test_hand_stack_manipulation():
    # 0 1 1 0 PUSH1 POP POP -> stack 0 1 1, output top first.
    assert labels("stack_manipulation", [[0, 1, 1, 0, 4, 2, 2]]) == [
        [1, 1, 0, 2, 0, 0, 0, 0]]
    assert labels("stack_manipulation", [[1, 1, 0, 2, 2, 2]]) == [
        [2, 0, 0, 0, 0, 0, 0]]
    # POP on the empty stack is ignored.
    assert labels("stack_manipulation", [[1, 2, 2, 3]]) == [[0, 2, 0, 0, 0]]
    assert labels("stack_manipulation", [[1, 0, 3, 4]]) == [
        [1, 0, 0, 1, 2]]
    assert labels("stack_manipulation", [[1]]) == [[1, 2]]
    mask = tasks.get("stack_manipulation").mask_from_labels(
        np.array([[1, 1, 0, 2, 0, 0, 0, 0]]))
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_hand_reverse_duplicate_odds_sort():
    assert labels("reverse_string", [[0, 1, 1, 0, 1, 0]]) == [
        [0, 1, 0, 1, 1, 0]]
    assert labels("duplicate_string", [[1, 0, 1]]) == [[1, 0, 1, 1, 0, 1]]
    # 0-based odd positions first (the public code; its docstring differs).
    assert labels("odds_first", [[0, 0, 1, 1, 0, 1, 0, 1]]) == [
        [0, 1, 1, 1, 0, 1, 0, 0]]
    assert labels("odds_first", [[1, 1, 0]]) == [[1, 1, 0]]
    assert labels("odds_first", [[1, 0, 0]]) == [[0, 1, 0]]
    assert labels("bucket_sort", [[1, 0, 2, 0, 4, 1, 1, 2]]) == [
        [0, 0, 1, 1, 1, 2, 2, 4]]


def test_hand_missing_duplicate_string():
    assert labels("missing_duplicate_string",
                  [[0, 1, 1, 0, 0, 2, 1, 0]]) == [[1]]
    assert labels("missing_duplicate_string", [[1, 0, 1, 1, 2, 1, 3]]) == [
        [0]]
    assert labels("missing_duplicate_string", [[2, 1, 0, 1]]) == [[0]]
    assert labels("missing_duplicate_string", [[1]]) == [[1]]


def test_hand_modular_arithmetic_brackets():
    # Ids: digits, + 5, - 6, * 7, ( 8, ) 9.
    lab = functools.partial(text_labels, "modular_arithmetic_brackets",
                            BRACKETS_ALPHABET)
    assert lab("((1+2)*(-3))") == [[1]]
    assert lab("(3-(-4))") == [[2]]
    assert lab("((-2)+3)") == [[1]]
    assert lab("(((-2)+3)*((0-0)-2))") == [[3]]
    assert lab("-4") == [[1]]
    assert lab("1+2*3") == [[2]]  # usual precedence if unbracketed
    with pytest.raises(TreeschedError):
        lab("(1+2")


def test_hand_solve_equation():
    # Ids: digits, + 5, - 6, ( 7, ) 8, x 9, = 10.
    lab = functools.partial(text_labels, "solve_equation", EQUATION_ALPHABET)
    assert lab("((x)-(-1))=0") == [[4]]
    assert lab("(x+3)=1") == [[3]]
    assert lab("-x=2") == [[3]]
    assert lab("(4-x)=4") == [[0]]
    assert labels("solve_equation", [[0, 0]]) == [[0]]


def test_hand_binary_addition():
    # 001 + 01101 (4 + 22 = 26 = 01011 little-endian), output length n + 1.
    ids = [0, 0, 1, 2, 0, 1, 1, 0, 1]
    assert labels("binary_addition", [ids]) == [[0, 1, 0, 1, 1, 2, 0, 0, 0,
                                                 0]]
    # 1001 + 000001 (9 + 32 = 41 = 100101).
    ids = [1, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1]
    assert labels("binary_addition", [ids]) == [
        [1, 0, 0, 1, 0, 1, 2, 0, 0, 0, 0, 0]]
    assert labels("binary_addition", [[1, 2, 1]]) == [[0, 1, 2, 0]]
    # Lengths <= 2: no separator, the "sum" is the number itself.
    assert labels("binary_addition", [[0, 1], [0, 0]]) == [[0, 1, 2],
                                                           [0, 2, 0]]
    assert labels("binary_addition", [[0]]) == [[0, 2]]
    mask = tasks.get("binary_addition").mask_from_labels(
        np.array([[0, 1, 0, 1, 1, 2, 0, 0, 0, 0]]))
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]


def test_hand_binary_multiplication():
    # 001 * 01101 = 4 * 22 = 88 = 0001101 little-endian; output length n.
    assert labels("binary_multiplication",
                  [[0, 0, 1, 2, 0, 1, 1, 0, 1]]) == [[0, 0, 0, 1, 1, 0, 1,
                                                      2, 0]]
    # 1001 * 000001 = 9 * 32 = 288 = 000001001.
    assert labels("binary_multiplication",
                  [[1, 0, 0, 1, 2, 0, 0, 0, 0, 0, 1]]) == [
        [0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 0]]
    assert labels("binary_multiplication", [[1, 1, 2, 1, 1]]) == [
        [1, 0, 0, 1, 2]]  # 3 * 3 = 9
    assert labels("binary_multiplication", [[1]]) == [[2]]
    assert labels("binary_multiplication", [[1, 0]]) == [[0, 2]]


def test_hand_compute_sqrt():
    # 100101 = 37 -> floor(sqrt) = 6 = 110, padded to ceil(6/2) = 3 bits.
    assert labels("compute_sqrt", [[1, 0, 0, 1, 0, 1]]) == [[1, 1, 0]]
    assert labels("compute_sqrt", [[1, 1, 1]]) == [[1, 0]]  # 7 -> 2
    assert labels("compute_sqrt", [[0, 0, 1, 0, 0]]) == [[0, 1, 0]]  # 4 -> 2
    assert labels("compute_sqrt", [[1]]) == [[1]]
    assert labels("compute_sqrt", [[1, 0, 0, 0, 0, 0, 0, 0]]) == [
        [1, 0, 1, 1]]  # 128 -> 11


# -- tape, accuracy, loss ----


def test_build_tape():
    task = tasks.get("binary_addition")
    inputs, targets, _ = task.sample(np.random.default_rng(0), 5, 7)
    out_len = task.output_length(inputs.shape[1])
    tape = tasks.build_tape(inputs, out_len)
    assert tape.dtype == np.float32
    assert tape.shape == (5, 7 + 8, 3 + 1)
    assert np.array_equal(tape[:, :7, :3], inputs)
    assert np.all(tape[:, :7, 3] == 0)
    assert np.all(tape[:, 7:, :3] == 0) and np.all(tape[:, 7:, 3] == 1)
    assert tape.shape[1] - out_len == inputs.shape[1]
    empty = tasks.build_tape(inputs, 0)
    assert np.array_equal(empty[..., :3], inputs)
    with pytest.raises(TreeschedError):
        tasks.build_tape(inputs[0], 3)
    with pytest.raises(TreeschedError):
        tasks.build_tape(inputs, -1)


def test_accuracy_pooled_like_public_code():
    targets = tasks.one_hot(np.array([[0, 1, 2, 0], [1, 2, 0, 0]]), 3)
    logits = targets.copy()
    logits[1, 0] = [3.0, 0.0, 0.0]  # sequence 1: first position wrong
    logits[1, 2] = [0.0, 0.0, 5.0]  # wrong but masked out
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=np.float32)
    per_seq, mean = tasks.accuracy(logits, targets, mask)
    assert per_seq.tolist() == [1.0, 0.0]
    assert mean == pytest.approx(4 / 5)  # pooled, not (1 + 0) / 2
    per_seq, mean = tasks.accuracy(logits, targets, np.ones((2, 4)))
    assert per_seq.tolist() == [1.0, 0.5] and mean == pytest.approx(6 / 8)
    # Single-output (B, C) logits are accepted.
    per_seq, mean = tasks.accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]),
                                   tasks.one_hot(np.array([1, 1]), 2),
                                   np.ones(2))
    assert per_seq.tolist() == [1.0, 0.0] and mean == 0.5
    with pytest.raises(TreeschedError):
        tasks.accuracy(logits[:, :3], targets, mask)


def test_loss_reduction_mean_over_batch_and_positions():
    assert tasks.LOSS_REDUCTION == "mean_over_batch_and_positions"
    assert "mask" in tasks.LOSS_EXPLANATION
    targets = tasks.one_hot(np.array([[0, 1, 2], [2, 2, 2]]), 3)
    zeros = np.zeros((2, 3, 3))
    assert tasks.cross_entropy_loss(zeros, targets) == pytest.approx(
        math.log(3))
    logits = np.zeros((1, 2, 2))
    logits[0, 0] = [10.0, 0.0]
    targets = tasks.one_hot(np.array([[0, 1]]), 2)
    first = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert tasks.cross_entropy_loss(logits, targets) == pytest.approx(
        (first + math.log(2)) / 2)

"""Streaming inference (``treesched.streaming``): exact, bounded, forkable, savable.

* the incremental generators build, node for node, the trees of the schedule
  ``treesched.compile`` builds (compared structurally for every position);
* pushing token by token, extending by random chunk sizes, or mixing the
  two gives ``model.forward`` on the whole sequence at every position
  (1e-6 relative in float32, 1e-12 in float64) for every prefix-stable
  pattern, both cells, 1-3 layers, on every backend, T up to a few thousand;
* the live states stay within the stated bounds, the stores do not grow with
  t, and the merges equal the schedule's own count;
* forks are independent; a saved stream continues in another process and is
  refused by another model.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
from cuda_emulation import emulated_backend
from cuda_on_cpu import cpu_backend
from cuda_on_cpu import why_unavailable as why_no_compiler

import treesched
from treesched.backends import get_backend, why_unavailable
from treesched.errors import TreeschedError
from treesched.streaming import GENERATORS, expected_live_states, generator_for

PATTERNS = tuple(GENERATORS)
TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


def _tree(schedule, node):
    return schedule.tree(int(node))


def _stream_trees(pattern, length):
    """Run a generator symbolically: the tree (nested tuples of positions) of
    every position's answer, exactly as the stream would compute it."""
    generator = generator_for(pattern)
    trees = {}

    def emit(left, right):
        node = ("m", len(trees))
        trees[node] = (trees[left], trees[right])
        return node

    answers = []
    for t in range(length):
        leaf = ("leaf", t)
        trees[leaf] = t
        answers.append(trees[generator.push(leaf, emit)])
    return answers, generator


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generators_build_the_schedules_trees(pattern):
    answers, _ = _stream_trees(pattern, 200)
    for length in (1, 2, 3, 7, 64, 200):
        schedule = treesched.compile(length, pattern, "all")
        for t in range(length):
            assert answers[t] == _tree(schedule, schedule.output_nodes[t]), (pattern, length, t)


def test_non_streaming_patterns_are_refused():
    with pytest.raises(TreeschedError, match="not prefix-stable"):
        treesched.PRLSTM(3, 4, 2, pattern="reduce").stream()
    with pytest.raises(TreeschedError, match="batch"):
        treesched.PRLSTM(3, 4, 2).stream(batch=0)


def _model(pattern, cell, layers, dtype, backend=None, seed=0, inputs=3, hidden=5):
    model = treesched.PRLSTM(inputs, hidden, 4, num_layers=layers, cell=cell, pattern=pattern,
                             dtype=dtype, seed=seed)
    if backend is not None:
        model.backend, model.xp = backend, backend.xp
    return model


def _feed(stream, x, rng, mode):
    """Feed x (B, T, D) token by token, by random chunks, or mixing both."""
    outputs, t, length = [], 0, x.shape[1]
    while t < length:
        if mode == "push" or (mode == "mixed" and rng.random() < 0.5):
            outputs.append(np.asarray(stream.push(x[:, t]))[:, None])
            t += 1
        else:
            n = int(min(length - t, rng.integers(1, 24)))
            outputs.append(np.asarray(stream.extend(x[:, t:t + n])))
            t += n
    return np.concatenate(outputs, axis=1)


def _relative(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_stream_equals_the_parallel_forward(pattern, cell, layers, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{pattern} {cell} {layers}".encode()))
    model = _model(pattern, cell, layers, dtype, seed=layers)
    x = rng.standard_normal((2, 61, 3)).astype(dtype)
    want = model.forward(x)
    for mode in ("push", "chunks", "mixed"):
        got = _feed(model.stream(batch=2), x, rng, mode)
        assert _relative(got, want) <= TOLERANCE[dtype], (mode, _relative(got, want))


def _backend(name):
    if name == "numba":
        reason = why_unavailable("numba")
        if reason:
            pytest.skip(reason)
        return get_backend("numba")
    if name == "cupy-on-cpu":
        if why_no_compiler():
            pytest.skip(why_no_compiler())
        return cpu_backend()[0]
    return emulated_backend()


@pytest.mark.parametrize("backend_name", ["numba", "cupy-on-cpu", "cupy-emulated"])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_every_backend_streams_exactly(backend_name, cell):
    backend = _backend(backend_name)
    rng = np.random.default_rng(2)
    for pattern, dtype in (("odd-even", "float32"), ("sklansky", "float64"),
                           ("kogge-stone", "float64"), ("sequential", "float32")):
        model = _model(pattern, cell, 2, dtype, backend)
        x = rng.standard_normal((3, 45, 3)).astype(dtype)
        want = np.asarray(_model(pattern, cell, 2, dtype).forward(x))
        got = _feed(model.stream(batch=3), x, rng, "mixed")
        assert _relative(got, want) <= TOLERANCE[dtype], (backend_name, pattern)


@pytest.mark.parametrize("pattern,length", [("odd-even", 3000), ("sklansky", 2000)])
def test_thousands_of_tokens_on_numba(pattern, length):
    backend = _backend("numba")
    rng = np.random.default_rng(5)
    model = _model(pattern, "lstm", 2, "float32", backend, hidden=16)
    x = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (2, length))]
    want = model.forward(x)
    got = _feed(model.stream(batch=2), x, rng, "mixed")
    assert _relative(got, want) <= TOLERANCE["float32"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_live_states_merges_and_memory_are_bounded(pattern):
    model = _model(pattern, "lstm", 1, "float32", hidden=2, inputs=1)
    stream = model.stream()
    token = np.ones((1, 1), np.float32)
    capacities = []
    for t in range(1, 1025):
        stream.push(token)
        assert stream.live_states <= expected_live_states(pattern, t), (t, stream.live_states)
        if t & (t - 1) == 0 or t == 1000:
            assert stream.merges == treesched.compile(t, pattern).num_merges
        capacities.append(stream.capacity)
    if pattern == "kogge-stone":
        assert stream.live_states > 1024   # the pattern's own window: it grows with t
    else:
        assert max(capacities) <= 64       # nothing grows with t beyond the frontier
    if pattern == "odd-even":
        assert stream.live_states <= 2 * 10 + 2
        assert stream.merges == 2 * 1024 - 2 - 10   # 2n - 2 - log2 n


def test_a_long_prompt_leaves_only_the_frontier():
    model = _model("odd-even", "lstm", 2, "float32")
    stream = model.stream(batch=2)
    stream.extend(np.ones((2, 1500, 3), np.float32))
    assert stream.live_states <= expected_live_states("odd-even", 1500)
    assert stream.capacity <= 64


def test_states_forks_and_return_state():
    rng = np.random.default_rng(7)
    model = _model("odd-even", "lstm", 2, "float64")
    x = rng.standard_normal((2, 30, 3))
    h, c = model.encode(x)
    stream = model.stream(batch=2)
    with pytest.raises(TreeschedError, match="no token"):
        stream.state()
    logits, (h_chunk, c_chunk) = stream.extend(x[:, :20], return_state=True)
    assert _relative(h_chunk, h[:, :20]) <= 1e-12 and _relative(c_chunk, c[:, :20]) <= 1e-12
    assert _relative(stream.state()[1], c[:, 19]) <= 1e-12
    fork = stream.copy()
    tail = stream.extend(x[:, 20:])
    other = rng.standard_normal((2, 10, 3))
    forked = fork.extend(other)                  # the fork goes its own way ...
    again = model.forward(np.concatenate([x[:, :20], other], axis=1))[:, 20:]
    assert _relative(forked, again) <= 1e-12
    assert _relative(tail, model.forward(x)[:, 20:]) <= 1e-12  # ... and leaves the original
    logits, (h_step, c_step) = stream.push(x[:, 0], return_state=True)
    assert logits.shape == (2, 4) and h_step.shape == c_step.shape == (2, 5)
    assert stream.position == 31 and fork.position == 30


def test_bad_input_leaves_the_stream_usable():
    model = _model("odd-even", "lstm", 2, "float64")
    stream = model.stream(batch=2)
    x = np.random.default_rng(0).standard_normal((2, 9, 3))
    stream.extend(x[:, :4])
    for bad, message in ((np.full((2, 2, 3), np.nan), "NaN"), (np.ones((3, 2, 3)), "shape"),
                         (np.ones((2, 0, 3)), "n >= 1"), (np.ones((2, 3)), "shape")):
        with pytest.raises(TreeschedError, match=message):
            stream.extend(bad)
    with pytest.raises(TreeschedError, match="shape"):
        stream.push(np.ones((2, 1, 3)))
    rest = stream.extend(x[:, 4:])
    assert _relative(rest, model.forward(x)[:, 4:]) <= 1e-12


def test_save_and_continue_in_another_process(tmp_path):
    rng = np.random.default_rng(9)
    model = _model("sklansky", "rnn", 2, "float64", seed=4)
    x = rng.standard_normal((2, 40, 3))
    model.save(tmp_path / "model.npz")
    np.save(tmp_path / "x.npy", x)
    stream = model.stream(batch=2)
    stream.extend(x[:, :25])
    stream.save(tmp_path / "stream.npz")
    code = (
        "import numpy as np, treesched\n"
        f"model = treesched.PRLSTM.load({str(tmp_path / 'model.npz')!r})\n"
        f"stream = model.load_stream({str(tmp_path / 'stream.npz')!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "assert stream.position == 25\n"
        f"np.save({str(tmp_path / 'tail.npy')!r}, stream.extend(x[:, 25:]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    tail = np.load(tmp_path / "tail.npy")
    assert _relative(tail, model.forward(x)[:, 25:]) <= 1e-12


def test_a_stream_is_refused_by_another_model(tmp_path):
    model = _model("odd-even", "lstm", 2, "float32", seed=1)
    stream = model.stream()
    stream.push(np.ones((1, 3), np.float32))
    path = tmp_path / "stream.npz"
    stream.save(path)
    with pytest.raises(TreeschedError, match="other weights"):
        _model("odd-even", "lstm", 2, "float32", seed=2).load_stream(path)
    with pytest.raises(TreeschedError, match="another model"):
        _model("odd-even", "lstm", 3, "float32", seed=1).load_stream(path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TreeschedError, match="corrupt"):
        model.load_stream(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(TreeschedError, match="no header"):
        model.load_stream(tmp_path / "other.npz")
    assert model.load_stream(path).position == 1

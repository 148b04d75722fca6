"""Import of checkpoints written by the paper's code (Haiku params saved with flax).

The reference model below is written for this test with the module structure
of the paper's ``src/pr_lstm/haiku`` (a ``ParallelRecursive`` core whose
``NaryLSTM``/``NaryRNN`` cells are created, vmapped over time, before the
leaf ``hk.Linear``; a read-out ``hk.Linear`` on ``relu(h)`` outside the core),
so Haiku gives the same parameter names. Outputs must match treesched's.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

import treesched
from treesched.errors import TreeschedError
from treesched.haiku_import import (decode_msgpack, from_haiku_msgpack, load_haiku_msgpack,
                                    read_haiku_msgpack)

ROOT = Path(__file__).resolve().parents[1]
D, H, O = 5, 16, 3
LENGTHS = (1, 2, 7, 41)
CONFIGS = [("lstm", 1), ("lstm", 2), ("lstm", 3), ("rnn", 2)]


# --------------------------------------------------------- the Haiku reference
def _haiku_reference():
    """Import-time-free construction of the Haiku model (None if not installed)."""
    jax = pytest.importorskip("jax")
    hk = pytest.importorskip("haiku")
    serialization = pytest.importorskip("flax.serialization")
    jnp = jax.numpy
    jax.config.update("jax_platforms", "cpu")

    class NaryLSTM(hk.Module):
        """N-ary LSTM layer: gates [i, g, o, f_1..f_N] from concat(h_1..h_N)."""

        def __init__(self, hidden_size, name=None):
            super().__init__(name=name)
            self.hidden_size = hidden_size

        def __call__(self, *states):
            n = len(states)
            pre = hk.Linear((3 + n) * self.hidden_size)(jnp.concatenate([s.hidden for s in states], -1))
            blocks = jnp.split(pre, 3 + n, axis=-1)
            cell = jax.nn.sigmoid(blocks[0]) * jnp.tanh(blocks[1])
            for forget, state in zip(blocks[3:], states):
                cell = cell + jax.nn.sigmoid(forget) * state.cell
            hidden = jax.nn.sigmoid(blocks[2]) * jnp.tanh(cell)
            return hidden, hk.LSTMState(hidden, cell)

    class NaryRNN(hk.Module):
        def __init__(self, hidden_size, name=None):
            super().__init__(name=name)
            self.hidden_size = hidden_size

        def __call__(self, *states):
            hidden = jax.nn.relu(hk.Linear(self.hidden_size)(jnp.concatenate(states, -1)))
            return hidden, hidden

    class ParallelRecursive(hk.Module):
        def __init__(self, hidden_size, cell="lstm", num_layers=2, name=None):
            super().__init__(name=name)
            self.hidden_size, self.cell, self.num_layers = hidden_size, cell, num_layers

        def __call__(self, xs):
            cell_type = NaryLSTM if self.cell == "lstm" else NaryRNN
            # Cells first (as the paper's get_cell), each vmapped over time.
            layers = [jax.vmap(cell_type(self.hidden_size), in_axes=1, out_axes=1)
                      for _ in range(self.num_layers)]

            def merge(left, right):
                _, state = layers[0](left, right)
                for layer in layers[1:]:
                    _, state = layer(state)
                return state

            if self.cell == "lstm":
                i, g, o = jnp.split(hk.Linear(3 * self.hidden_size)(xs), 3, axis=-1)
                c = jax.nn.sigmoid(i) * jnp.tanh(g)
                leaves = hk.LSTMState(jax.nn.sigmoid(o) * jnp.tanh(c), c)
            else:
                leaves = hk.Linear(self.hidden_size)(xs)
            return jax.lax.associative_scan(merge, leaves, axis=1)

    def build(cell, num_layers, hidden=H, outputs=O):
        def model(x):
            states = ParallelRecursive(hidden, cell, num_layers)(x)
            h = states.hidden if cell == "lstm" else states
            return hk.Linear(outputs)(jax.nn.relu(h)), states

        return hk.without_apply_rng(hk.transform(model))

    return jax, build, serialization


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(jax, function, *args):
    """jit ``function`` with XLA's cheap compile settings (3x faster to build here)."""
    try:
        compiled = jax.jit(function).lower(*args).compile(FAST_COMPILE)
    except Exception:  # noqa: BLE001 - an XLA without these options: default settings
        compiled = jax.jit(function)
    return compiled(*args)


@pytest.fixture(scope="module")
def haiku_env():
    return _haiku_reference()


def _write_checkpoint(tmp_path, haiku_env, cell, num_layers, seed=0, name=None, **sizes):
    jax, build, serialization = haiku_env
    model = build(cell, num_layers, **sizes)
    params = _run(jax, model.init, jax.random.PRNGKey(seed), np.zeros((1, 2, D), np.float32))
    path = tmp_path / (name or f"{cell}{num_layers}.msgpack")
    path.write_bytes(serialization.to_bytes(params))
    return path, model, params


# ------------------------------------------------------------ numerical match
def _compare(model, cell, x, reference, context):
    """treesched's logits and states on ``x`` against Haiku's ``(logits, states)``."""
    want_y, want_states = reference
    length = x.shape[1]
    np.testing.assert_allclose(model.forward(x), np.asarray(want_y)[:, :length],
                               rtol=1e-5, atol=1e-6, err_msg=context)
    want = (want_states.hidden, want_states.cell) if cell == "lstm" else (want_states,)
    states = model.encode(x)
    assert len(states) == len(want)
    for got, expected in zip(states, want):
        np.testing.assert_allclose(got, np.asarray(expected)[:, :length], rtol=1e-5, atol=1e-6,
                                   err_msg=context)


@pytest.mark.parametrize("cell,num_layers", CONFIGS)
def test_outputs_match_haiku(tmp_path, haiku_env, cell, num_layers):
    """Lengths 1, 2, 7, 41 against the Haiku model (float32).

    Haiku is compiled once per length for the main model (lstm, 2 layers).
    For the others, one Haiku run at length 41 is the reference for every
    length: the odd-even recursion is prefix-stable (SPEC §2), which the
    main model's per-length runs check; treesched still runs each length on
    its own schedule.
    """
    jax = haiku_env[0]
    path, reference, params = _write_checkpoint(tmp_path, haiku_env, cell, num_layers)
    model = from_haiku_msgpack(path)
    assert (model.input_size, model.hidden_size, model.output_size) == (D, H, O)
    assert (model.num_layers, model.cell_name, model.dtype) == (num_layers, cell, "float32")
    def apply(params, x):
        return _run(jax, reference.apply, params, x)

    x = np.random.default_rng(num_layers).normal(size=(3, max(LENGTHS), D)).astype(np.float32)
    full = apply(params, x)
    for length in LENGTHS:
        context = f"{cell} num_layers={num_layers} T={length}"
        if (cell, num_layers) == ("lstm", 2):
            _compare(model, cell, x[:, :length], apply(params, x[:, :length]), context)
        _compare(model, cell, x[:, :length], full, context + " (prefix of T=41)")


def test_mapping_and_classmethod(tmp_path, haiku_env):
    path, _, params = _write_checkpoint(tmp_path, haiku_env, "lstm", 3)
    assert set(params) == {"parallel_recursive/linear", "parallel_recursive/nary_lstm/linear",
                           "parallel_recursive/nary_lstm_1/linear",
                           "parallel_recursive/nary_lstm_2/linear", "linear"}
    found = load_haiku_msgpack(path)
    assert found.core == "parallel_recursive"
    assert found.mapping == {
        "leaf/w": "parallel_recursive/linear/w", "leaf/b": "parallel_recursive/linear/b",
        "merge/w": "parallel_recursive/nary_lstm/linear/w",
        "merge/b": "parallel_recursive/nary_lstm/linear/b",
        "unary_1/w": "parallel_recursive/nary_lstm_1/linear/w",
        "unary_1/b": "parallel_recursive/nary_lstm_1/linear/b",
        "unary_2/w": "parallel_recursive/nary_lstm_2/linear/w",
        "unary_2/b": "parallel_recursive/nary_lstm_2/linear/b",
        "head/w": "linear/w", "head/b": "linear/b"}
    for name, source in found.mapping.items():
        module, tensor = source.rsplit("/", 1)
        np.testing.assert_array_equal(found.params[name], np.asarray(params[module][tensor]))
    if hasattr(treesched.PRLSTM, "from_haiku_msgpack"):
        model = treesched.PRLSTM.from_haiku_msgpack(path, pattern="odd-even")
        assert isinstance(model, treesched.PRLSTM) and model.num_layers == 3


def test_decoder_matches_flax(tmp_path, haiku_env):
    """Our msgpack decoder agrees with flax's own, incl. scalars, complex and chunking."""
    _, _, serialization = haiku_env
    import flax.serialization as fs

    tree = {"a": {"w": np.arange(6, dtype=np.float16).reshape(2, 3), "s": np.float64(2.5)},
            "b": {"c": 1 + 2j, "i": np.arange(4, dtype=np.int32), "e": np.zeros((0, 3), np.float32)}}
    data = serialization.to_bytes(tree)
    ours, theirs = decode_msgpack(data), serialization.msgpack_restore(data)
    assert ours["b"]["c"] == theirs["b"]["c"] == 1 + 2j
    assert ours["a"]["s"] == 2.5
    for module in ("a", "b"):
        for key in ("w", "i", "e"):
            if key in theirs[module]:
                np.testing.assert_array_equal(ours[module][key], theirs[module][key])
                assert ours[module][key].dtype == theirs[module][key].dtype
    # Chunked arrays (flax splits leaves over MAX_CHUNK_SIZE bytes).
    old = fs.MAX_CHUNK_SIZE
    fs.MAX_CHUNK_SIZE = 16
    try:
        big = {"m": {"w": np.arange(30, dtype=np.float32).reshape(5, 6)}}
        data = serialization.to_bytes(big)
    finally:
        fs.MAX_CHUNK_SIZE = old
    assert b"__msgpack_chunked_array__" in data
    np.testing.assert_array_equal(decode_msgpack(data)["m"]["w"], big["m"]["w"])


def test_bfloat16_and_float64(tmp_path, haiku_env):
    jax, _, serialization = haiku_env
    path, _, params = _write_checkpoint(tmp_path, haiku_env, "lstm", 2)
    as_bf16 = jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jax.numpy.bfloat16)), params)
    (tmp_path / "bf16.msgpack").write_bytes(serialization.to_bytes(as_bf16))
    model = from_haiku_msgpack(tmp_path / "bf16.msgpack")
    want = np.asarray(as_bf16["linear"]["w"].astype(np.float32))
    np.testing.assert_array_equal(model.params["head/w"], want)
    as_f64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    (tmp_path / "f64.msgpack").write_bytes(serialization.to_bytes(as_f64))
    assert from_haiku_msgpack(tmp_path / "f64.msgpack").dtype == "float64"
    assert from_haiku_msgpack(tmp_path / "f64.msgpack", dtype="float32").dtype == "float32"


# ------------------------------------------------------------- no JAX needed
def test_reader_needs_no_jax(tmp_path, haiku_env):
    path, _, _ = _write_checkpoint(tmp_path, haiku_env, "lstm", 2)
    script = textwrap.dedent(f"""
        import sys
        for name in ("jax", "jaxlib", "haiku", "flax", "torch"):
            sys.modules[name] = None  # any import of these now fails
        from treesched.haiku_import import from_haiku_msgpack
        import numpy as np
        model = from_haiku_msgpack({str(path)!r})
        y = model.forward(np.ones((1, 4, {D}), np.float32))
        assert y.shape == (1, 4, {O})
        assert not any(sys.modules.get(n) for n in ("jax", "haiku", "flax"))
        print("ok", model.num_layers)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 2"


# ------------------------------------------------------------- refusals
def _pack(tree):
    """flax's wire format, written with msgpack alone."""
    def ext(value):
        if isinstance(value, np.ndarray):
            record = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")),
                                   use_bin_type=True)
            return msgpack.ExtType(1, record)
        raise TypeError(type(value))
    return msgpack.packb(tree, default=ext, strict_types=True)


def _paper_tree(cell="lstm", num_layers=2, d=D, h=H, o=O, dtype=np.float32):
    rng = np.random.default_rng(0)
    widths = {"lstm": (3, 5, 4), "rnn": (1, 1, 1)}[cell]
    kind = f"nary_{cell}"

    def linear(rows, cols):
        return {"w": rng.normal(size=(rows, cols)).astype(dtype), "b": np.zeros(cols, dtype)}

    tree = {"parallel_recursive/linear": linear(d, widths[0] * h),
            f"parallel_recursive/{kind}/linear": linear(2 * h, widths[1] * h)}
    for k in range(1, num_layers):
        tree[f"parallel_recursive/{kind}_{k}/linear"] = linear(h, widths[2] * h)
    tree["linear"] = linear(h, o)
    return tree


def _refused(tmp_path, tree_or_bytes, *fragments):
    data = tree_or_bytes if isinstance(tree_or_bytes, bytes) else _pack(tree_or_bytes)
    path = tmp_path / "bad.msgpack"
    path.write_bytes(data)
    with pytest.raises(TreeschedError) as info:
        from_haiku_msgpack(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_handwritten_tree_imports(tmp_path):
    for cell, layers in (("lstm", 1), ("lstm", 3), ("rnn", 1), ("rnn", 2)):
        path = tmp_path / "ok.msgpack"
        path.write_bytes(_pack(_paper_tree(cell, layers)))
        model = from_haiku_msgpack(path)
        assert (model.cell_name, model.num_layers, model.hidden_size) == (cell, layers, H)
    # Nested under an outer module and wrapped as {"params": ...}: still found.
    tree = {f"net/{k}": v for k, v in _paper_tree().items()}
    path.write_bytes(_pack({"params": tree}))
    assert load_haiku_msgpack(path).mapping["head/w"] == "net/linear/w"


def test_refuses_missing_and_extra_modules(tmp_path):
    tree = _paper_tree()
    del tree["linear"]
    _refused(tmp_path, tree, "missing module", "read-out head")
    tree = _paper_tree()
    del tree["parallel_recursive/linear"]
    _refused(tmp_path, tree, "missing module 'parallel_recursive/linear'")
    tree = _paper_tree(num_layers=3)
    del tree["parallel_recursive/nary_lstm_1/linear"]
    _refused(tmp_path, tree, "missing module 'parallel_recursive/nary_lstm_1/linear'")
    _refused(tmp_path, {"linear": _paper_tree()["linear"]}, "no PR-LSTM cell found")
    tree = _paper_tree()
    tree["linear_1"] = tree["linear"]
    _refused(tmp_path, tree, "unexpected extra modules", "'linear_1'")
    tree = _paper_tree()
    tree["parallel_recursive/gru"] = {"w_i": np.zeros((3, 3), np.float32)}
    _refused(tmp_path, tree, "unexpected extra module", "parallel_recursive/gru")
    tree = _paper_tree()
    tree.update({k.replace("lstm", "rnn"): v for k, v in _paper_tree("rnn").items() if "nary" in k})
    _refused(tmp_path, tree, "more than one recursive core")


def test_refuses_bad_tensors(tmp_path):
    tree = _paper_tree()
    tree["parallel_recursive/nary_lstm_1/linear"]["w"] = np.zeros((H, 3 * H), np.float32)
    _refused(tmp_path, tree, "tensor 'parallel_recursive/nary_lstm_1/linear/w'", "unary_1/w",
             f"({H}, {4 * H})")
    tree = _paper_tree()
    tree["linear"]["w"] = np.zeros((H + 1, O), np.float32)
    _refused(tmp_path, tree, "tensor 'linear/w' (-> head/w)", f"expected ({H}, {O})")
    tree = _paper_tree()
    tree["parallel_recursive/linear"]["b"] = np.zeros(3 * H, np.int32)
    _refused(tmp_path, tree, "'parallel_recursive/linear/b'", "int32", "floating point")
    tree = _paper_tree()
    del tree["linear"]["b"]
    _refused(tmp_path, tree, "module 'linear'", "no bias")
    tree = _paper_tree()
    tree["linear"]["scale"] = np.ones(O, np.float32)
    _refused(tmp_path, tree, "unexpected tensors", "'scale'")
    tree = _paper_tree()
    tree["parallel_recursive/nary_lstm/linear"]["w"] = np.zeros((2 * H + 1, 5 * H), np.float32)
    _refused(tmp_path, tree, "merge/w", "2 * hidden_size")
    tree = _paper_tree()
    tree["linear"]["w"][0, 0] = np.nan
    _refused(tmp_path, tree, "'linear/w'", "NaN")
    tree = _paper_tree()
    tree["linear"]["w"] = np.zeros((2, H, O), np.float32)
    _refused(tmp_path, tree, "'linear/w'", "rank-2")


def test_refuses_corrupt_files(tmp_path):
    data = _pack(_paper_tree())
    _refused(tmp_path, data[: len(data) // 2], "truncated")
    _refused(tmp_path, data + b"\x00", "trailing bytes")
    _refused(tmp_path, b"PK\x03\x04 not msgpack at all", "not a valid msgpack file")
    _refused(tmp_path, msgpack.packb([1, 2, 3]), "not a Haiku parameter dict")
    _refused(tmp_path, msgpack.packb({}), "no parameters")
    _refused(tmp_path, _pack({"linear": np.zeros(3, np.float32)}), "'linear' is an array")
    # A truncated array record inside an intact msgpack map.
    record = msgpack.packb(((4, 4), "float32", b"\x00" * 10), use_bin_type=True)
    bad = msgpack.packb({"linear": {"w": msgpack.ExtType(1, record)}})
    _refused(tmp_path, bad, "linear/w", "truncated data")
    _refused(tmp_path, b"", "empty")
    with pytest.raises(TreeschedError, match="does not exist"):
        from_haiku_msgpack(tmp_path / "nope.msgpack")
    with pytest.raises(TreeschedError, match="folder"):
        read_haiku_msgpack(tmp_path)


# ------------------------------------------------------------------- the CLI
def test_cli_import_checkpoint(tmp_path):
    from treesched.cli.main import cli

    source = tmp_path / "paper.msgpack"
    source.write_bytes(_pack(_paper_tree(num_layers=3)))
    out = tmp_path / "model.npz"
    result = CliRunner().invoke(cli, ["import-checkpoint", str(source), "--out", str(out),
                                      "--pattern", "odd-even"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "parallel_recursive/nary_lstm_2/linear/w" in result.output and "unary_2/w" in result.output
    model = treesched.PRLSTM.load(out)
    assert (model.num_layers, model.hidden_size, model.pattern) == (3, H, "odd-even")
    direct = from_haiku_msgpack(source)
    x = np.random.default_rng(1).normal(size=(2, 9, D)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), direct.forward(x))

    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x93\x01")
    result = CliRunner().invoke(cli, ["import-checkpoint", str(bad), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.npz").exists()
    result = CliRunner().invoke(cli, ["import-checkpoint", str(source), "--out", str(out),
                                      "--pattern", "zigzag"])
    assert result.exit_code == 1 and "unknown pattern" in result.output

"""Import of checkpoints written by the paper's code (Haiku params saved with flax).

The reference model (``tests/haiku_reference.py``, shared with the protocol
test) is written for the tests with the module structure of the published ``src/pr_lstm/haiku/model.py`` of tristangaudreault/pr-lstm:
a ``ParallelRecursive`` core whose method ``get_elems`` creates the leaf
``hk.Linear`` and whose method ``get_cell`` creates the ``NaryLSTM`` /
``NaryRNN`` cells (each ``jax.vmap``-ed over time) that
``jax.lax.associative_scan`` applies as the merge, then a read-out
``hk.Linear`` on ``relu(h)`` outside the core. Haiku therefore names the
parameters exactly as the paper's checkpoints do — the test pins those names —
and treesched's outputs must match Haiku's.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

import haiku_reference
import treesched
from treesched.errors import TreeschedError
from treesched.haiku_import import decode_msgpack, load_haiku_msgpack, read_haiku_msgpack

from_haiku_msgpack = treesched.PRLSTM.from_haiku_msgpack
build_model = treesched.PRLSTM.from_haiku

ROOT = Path(__file__).resolve().parents[1]
D, H, O = 5, 16, 3
LENGTHS = (1, 2, 7, 41)
CONFIGS = [("lstm", 1), ("lstm", 2), ("lstm", 3), ("rnn", 1), ("rnn", 2)]
# float32 on both sides; XLA and NumPy sum the GEMMs in different orders.
RTOL, ATOL = 1e-6, 1e-6

# The module names of the paper's checkpoints (PR-LSTM with two unary layers,
# PR-RNN with one), written out so that neither the reference model nor the
# importer can drift from them unnoticed.
PUBLISHED_LSTM3 = {
    "parallel_recursive/~get_elems/linear",
    "parallel_recursive/~get_cell/nary_lstm/linear",
    "parallel_recursive/~get_cell/nary_lstm_1/linear",
    "parallel_recursive/~get_cell/nary_lstm_2/linear",
    "linear",
}
PUBLISHED_RNN2 = {
    "parallel_recursive/~get_elems/linear",
    "parallel_recursive/~get_cell/nary_rnn/linear",
    "parallel_recursive/~get_cell/nary_rnn_1/linear",
    "linear",
}


# --------------------------------------------------------- the Haiku reference
def _haiku_reference():
    """``(jax, build, serialization, NTR)`` from the shared reference
    (``tests/haiku_reference.py``; skips if JAX or Haiku is not installed):
    ``build(cell, num_layers, core)`` is the core plus read-out at D, H, O."""
    modules = haiku_reference.paper_modules()

    def build(cell, num_layers, core=None):
        return haiku_reference.readout_model(H, O, cell, num_layers, core=core)

    return modules.jax, build, modules.serialization, modules.NTR


def _run(jax, function, *args):
    """jit ``function`` with XLA's cheap compile settings (3x faster to build here)."""
    return haiku_reference.run_compiled(jax, function, *args)


@pytest.fixture(scope="module")
def haiku_env():
    return _haiku_reference()


def _init(haiku_env, cell, num_layers, seed=0, core=None):
    jax, build, _, _ = haiku_env
    model = build(cell, num_layers) if core is None else build(cell, num_layers, core)
    params = _run(jax, model.init, jax.random.PRNGKey(seed), np.zeros((1, 2, D), np.float32))
    return model, params


def _write_checkpoint(tmp_path, haiku_env, cell, num_layers, seed=0):
    """Save as the paper's training code does: ``serialization.to_bytes(params)``."""
    serialization = haiku_env[2]
    model, params = _init(haiku_env, cell, num_layers, seed)
    path = tmp_path / f"{cell}{num_layers}.msgpack"
    path.write_bytes(serialization.to_bytes(params))
    return path, model, params


def _import_with_cli(source, out):
    from treesched.cli.main import cli

    result = CliRunner().invoke(cli, ["import-checkpoint", str(source), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return treesched.PRLSTM.load(out)


# ------------------------------------------------------------ names and bytes
def test_reference_has_the_published_parameter_names(haiku_env):
    serialization = haiku_env[2]
    _, lstm = _init(haiku_env, "lstm", 3)
    _, rnn = _init(haiku_env, "rnn", 2)
    assert set(lstm) == PUBLISHED_LSTM3
    assert set(rnn) == PUBLISHED_RNN2
    shapes = {module: tuple(lstm[module]["w"].shape) for module in lstm}
    assert shapes == {"parallel_recursive/~get_elems/linear": (D, 3 * H),
                      "parallel_recursive/~get_cell/nary_lstm/linear": (2 * H, 5 * H),
                      "parallel_recursive/~get_cell/nary_lstm_1/linear": (H, 4 * H),
                      "parallel_recursive/~get_cell/nary_lstm_2/linear": (H, 4 * H),
                      "linear": (H, O)}
    assert all(set(tensors) == {"w", "b"} for tensors in lstm.values())
    # The paper saves with to_bytes; for a dict of arrays that is msgpack_serialize.
    assert serialization.to_bytes(lstm) == serialization.msgpack_serialize(lstm)
    # The hand-written trees of the refusal tests below use the same names.
    assert set(_paper_tree("lstm", 3)) == PUBLISHED_LSTM3
    assert set(_paper_tree("rnn", 2)) == PUBLISHED_RNN2


# ------------------------------------------------------------ numerical match
def _compare(model, cell, x, reference, context):
    """treesched's logits and states on ``x`` against Haiku's ``(logits, states)``.

    Returns the largest absolute difference seen.
    """
    want_y, want_states = reference
    got_y = model.forward(x)
    np.testing.assert_allclose(got_y, np.asarray(want_y), rtol=RTOL, atol=ATOL, err_msg=context)
    worst = float(np.abs(got_y - np.asarray(want_y)).max())
    want = (want_states.hidden, want_states.cell) if cell == "lstm" else (want_states,)
    states = model.encode(x)
    assert len(states) == len(want)
    for got, expected in zip(states, want):
        np.testing.assert_allclose(got, np.asarray(expected), rtol=RTOL, atol=ATOL,
                                   err_msg=context + " (states)")
        worst = max(worst, float(np.abs(got - np.asarray(expected)).max()))
    return worst


@pytest.mark.parametrize("cell,num_layers", CONFIGS)
def test_outputs_match_haiku(tmp_path, haiku_env, cell, num_layers):
    """Lengths 1, 2, 7, 41 against the Haiku model, each compiled at its own length (float32).

    The checkpoint is imported both with ``PRLSTM.from_haiku_msgpack`` and
    with ``treesched import-checkpoint`` (then ``PRLSTM.load``).
    """
    jax = haiku_env[0]
    path, reference, params = _write_checkpoint(tmp_path, haiku_env, cell, num_layers)
    direct = treesched.PRLSTM.from_haiku_msgpack(path)
    via_cli = _import_with_cli(path, tmp_path / "model.npz")
    for model in (direct, via_cli):
        assert (model.input_size, model.hidden_size, model.output_size) == (D, H, O)
        assert (model.num_layers, model.cell_name, model.dtype) == (num_layers, cell, "float32")
        assert model.pattern == "odd-even"

    x = np.random.default_rng(num_layers).normal(size=(3, max(LENGTHS), D)).astype(np.float32)
    for length in LENGTHS:
        prefix = x[:, :length]
        want = _run(jax, reference.apply, params, prefix)
        context = f"{cell} num_layers={num_layers} T={length}"
        _compare(direct, cell, prefix, want, context)
        _compare(via_cli, cell, prefix, want, context + " (import-checkpoint)")


def test_mapping_of_the_published_names(tmp_path, haiku_env):
    path, _, params = _write_checkpoint(tmp_path, haiku_env, "lstm", 3)
    found = load_haiku_msgpack(path)
    assert found.core == "parallel_recursive"
    assert found.mapping == {
        "leaf/w": "parallel_recursive/~get_elems/linear/w",
        "leaf/b": "parallel_recursive/~get_elems/linear/b",
        "merge/w": "parallel_recursive/~get_cell/nary_lstm/linear/w",
        "merge/b": "parallel_recursive/~get_cell/nary_lstm/linear/b",
        "unary_1/w": "parallel_recursive/~get_cell/nary_lstm_1/linear/w",
        "unary_1/b": "parallel_recursive/~get_cell/nary_lstm_1/linear/b",
        "unary_2/w": "parallel_recursive/~get_cell/nary_lstm_2/linear/w",
        "unary_2/b": "parallel_recursive/~get_cell/nary_lstm_2/linear/b",
        "head/w": "linear/w", "head/b": "linear/b"}
    for name, source in found.mapping.items():
        module, tensor = source.rsplit("/", 1)
        np.testing.assert_array_equal(found.params[name], np.asarray(params[module][tensor]))
    model = treesched.PRLSTM.from_haiku_msgpack(path, pattern="odd-even")
    assert isinstance(model, treesched.PRLSTM) and model.num_layers == 3


def test_earlier_core_name_ntr(tmp_path, haiku_env):
    """The same core named NTR (commit 3c9b6d2): found by its cells, not by its name."""
    serialization, ntr_class = haiku_env[2], haiku_env[3]
    _, params = _init(haiku_env, "lstm", 2, core=ntr_class)
    assert set(params) == {"ntr/~get_elems/linear", "ntr/~get_cell/nary_lstm/linear",
                           "ntr/~get_cell/nary_lstm_1/linear", "linear"}
    path = tmp_path / "ntr.msgpack"
    path.write_bytes(serialization.to_bytes(params))
    found = load_haiku_msgpack(path)
    assert found.core == "ntr"
    assert found.mapping["unary_1/w"] == "ntr/~get_cell/nary_lstm_1/linear/w"
    np.testing.assert_array_equal(found.params["merge/w"],
                                  np.asarray(params["ntr/~get_cell/nary_lstm/linear"]["w"]))


def test_decoder_matches_flax(tmp_path, haiku_env):
    """Our msgpack decoder agrees with flax's own, incl. scalars, complex and chunking."""
    serialization = haiku_env[2]
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
    jax, _, serialization, _ = haiku_env
    _, _, params = _write_checkpoint(tmp_path, haiku_env, "lstm", 2)
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
        from treesched import PRLSTM
        import numpy as np
        model = PRLSTM.from_haiku_msgpack({str(path)!r})
        y = model.forward(np.ones((1, 4, {D}), np.float32))
        assert y.shape == (1, 4, {O})
        assert not any(sys.modules.get(n) for n in ("jax", "haiku", "flax"))
        print("ok", model.num_layers)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 2"


# ---------------------------------------------- hand-written trees, refusals
def _pack(tree):
    """flax's wire format, written with msgpack alone."""
    def ext(value):
        if isinstance(value, np.ndarray):
            record = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")),
                                   use_bin_type=True)
            return msgpack.ExtType(1, record)
        raise TypeError(type(value))
    return msgpack.packb(tree, default=ext, strict_types=True)


def _paper_tree(cell="lstm", num_layers=2, core="parallel_recursive", dtype=np.float32):
    """Random parameters under the published module names."""
    rng = np.random.default_rng(0)
    leaf_width, merge_width, unary_width = {"lstm": (3, 5, 4), "rnn": (1, 1, 1)}[cell]

    def linear(rows, cols):
        return {"w": rng.normal(size=(rows, cols)).astype(dtype),
                "b": rng.normal(size=cols).astype(dtype)}

    tree = {f"{core}/~get_elems/linear": linear(D, leaf_width * H),
            f"{core}/~get_cell/nary_{cell}/linear": linear(2 * H, merge_width * H)}
    for k in range(1, num_layers):
        tree[f"{core}/~get_cell/nary_{cell}_{k}/linear"] = linear(H, unary_width * H)
    tree["linear"] = linear(H, O)
    return tree


def _write(tmp_path, tree, name="tree.msgpack"):
    path = tmp_path / name
    path.write_bytes(_pack(tree))
    return path


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


def test_handwritten_published_trees_import(tmp_path):
    for cell, layers in (("lstm", 1), ("lstm", 3), ("rnn", 1), ("rnn", 3)):
        model = from_haiku_msgpack(_write(tmp_path, _paper_tree(cell, layers)))
        assert (model.cell_name, model.num_layers, model.hidden_size) == (cell, layers, H)
    # Nested under an outer module and wrapped as {"params": ...}: still found.
    tree = {f"net/{k}": v for k, v in _paper_tree().items()}
    found = load_haiku_msgpack(_write(tmp_path, {"params": tree}))
    assert found.mapping["head/w"] == "net/linear/w" and found.core == "net/parallel_recursive"


def test_scope_free_layout_still_accepted(tmp_path):
    """Leaf and cells directly in the core (modules built in __call__), as accepted before."""
    published = _paper_tree("lstm", 3)
    scope_free = {module.replace("~get_elems/", "").replace("~get_cell/", ""): tensors
                  for module, tensors in published.items()}
    assert set(scope_free) == {"parallel_recursive/linear", "parallel_recursive/nary_lstm/linear",
                               "parallel_recursive/nary_lstm_1/linear",
                               "parallel_recursive/nary_lstm_2/linear", "linear"}
    found = load_haiku_msgpack(_write(tmp_path, scope_free))
    assert found.mapping["leaf/w"] == "parallel_recursive/linear/w"
    want = from_haiku_msgpack(_write(tmp_path, published, "published.msgpack"))
    got = build_model(found)
    assert got.num_layers == 3
    x = np.random.default_rng(2).normal(size=(2, 9, D)).astype(np.float32)
    np.testing.assert_array_equal(got.forward(x), want.forward(x))


def test_refuses_missing_tensors(tmp_path):
    tree = _paper_tree(num_layers=3)
    del tree["parallel_recursive/~get_cell/nary_lstm_1/linear"]
    _refused(tmp_path, tree, "missing module 'parallel_recursive/~get_cell/nary_lstm_1/linear'")
    tree = _paper_tree()
    del tree["parallel_recursive/~get_elems/linear"]
    _refused(tmp_path, tree, "missing module 'parallel_recursive/~get_elems/linear'", "leaf")
    tree = _paper_tree()
    del tree["linear"]
    _refused(tmp_path, tree, "missing module", "read-out head")
    tree = _paper_tree()
    del tree["linear"]["b"]
    _refused(tmp_path, tree, "missing tensor 'linear/b' (-> head/b)", "no bias")
    tree = _paper_tree()
    del tree["parallel_recursive/~get_cell/nary_lstm/linear"]["w"]
    _refused(tmp_path, tree, "missing tensor 'parallel_recursive/~get_cell/nary_lstm/linear/w'",
             "merge/w")
    _refused(tmp_path, {"linear": _paper_tree()["linear"]}, "no PR-LSTM cell found")


def test_refuses_wrong_shapes(tmp_path):
    tree = _paper_tree()
    tree["parallel_recursive/~get_cell/nary_lstm_1/linear"]["w"] = np.zeros((H, 3 * H), np.float32)
    _refused(tmp_path, tree, "tensor 'parallel_recursive/~get_cell/nary_lstm_1/linear/w'",
             "unary_1/w", f"({H}, {4 * H})")
    tree = _paper_tree()
    tree["parallel_recursive/~get_elems/linear"]["w"] = np.zeros((D, 4 * H), np.float32)
    _refused(tmp_path, tree, "tensor 'parallel_recursive/~get_elems/linear/w' (-> leaf/w)",
             f"expected ({D}, {3 * H})")
    tree = _paper_tree()
    tree["linear"]["w"] = np.zeros((H + 1, O), np.float32)
    _refused(tmp_path, tree, "tensor 'linear/w' (-> head/w)", f"expected ({H}, {O})")
    tree = _paper_tree()
    tree["linear"]["b"] = np.zeros(O + 1, np.float32)
    _refused(tmp_path, tree, "tensor 'linear/b' (-> head/b)", f"expected ({O},)")
    tree = _paper_tree()
    tree["parallel_recursive/~get_cell/nary_lstm/linear"]["w"] = np.zeros((2 * H + 1, 5 * H),
                                                                          np.float32)
    _refused(tmp_path, tree, "'parallel_recursive/~get_cell/nary_lstm/linear/w' (-> merge/w)",
             "2 * hidden_size")
    tree = _paper_tree()
    tree["linear"]["w"] = np.zeros((2, H, O), np.float32)
    _refused(tmp_path, tree, "'linear/w'", "rank-2")
    # An LSTM-sized merge under an RNN cell name: the shapes say it is not a PR-RNN.
    tree = _paper_tree("rnn", 1)
    tree["parallel_recursive/~get_cell/nary_rnn/linear"]["w"] = np.zeros((2 * H, 5 * H), np.float32)
    _refused(tmp_path, tree, "'parallel_recursive/~get_cell/nary_rnn/linear/w' (-> merge/w)",
             f"expected ({2 * H}, {H})")


def test_refuses_unknown_tensors_and_modules(tmp_path):
    tree = _paper_tree()
    tree["parallel_recursive/~get_cell/nary_lstm/linear"]["scale"] = np.ones(5 * H, np.float32)
    _refused(tmp_path, tree,
             "unexpected tensor 'parallel_recursive/~get_cell/nary_lstm/linear/scale'")
    tree = _paper_tree()
    tree["parallel_recursive/~get_cell/layer_norm"] = {"scale": np.ones(H, np.float32),
                                                       "offset": np.zeros(H, np.float32)}
    _refused(tmp_path, tree, "unexpected extra module inside the core 'parallel_recursive'",
             "'parallel_recursive/~get_cell/layer_norm/offset'",
             "'parallel_recursive/~get_cell/layer_norm/scale'")
    tree = _paper_tree()
    tree["linear_1"] = tree["linear"]
    _refused(tmp_path, tree, "unexpected extra modules outside the core", "'linear_1/w'")
    tree = _paper_tree()
    tree["parallel_recursive/linear"] = tree["parallel_recursive/~get_elems/linear"]
    _refused(tmp_path, tree, "more than one leaf encoder", "'parallel_recursive/linear/w'")
    tree = _paper_tree()
    tree.update({k.replace("lstm", "rnn"): v for k, v in _paper_tree("rnn").items() if "nary" in k})
    _refused(tmp_path, tree, "more than one recursive core")
    tree = _paper_tree()
    merge = tree["parallel_recursive/~get_cell/nary_lstm/linear"]
    tree["parallel_recursive/nary_lstm/linear"] = merge
    _refused(tmp_path, tree, "more than one recursive core", "'parallel_recursive/~get_cell'")


def test_refuses_bad_values(tmp_path):
    tree = _paper_tree()
    tree["parallel_recursive/~get_elems/linear"]["b"] = np.zeros(3 * H, np.int32)
    _refused(tmp_path, tree, "'parallel_recursive/~get_elems/linear/b'", "int32", "floating point")
    tree = _paper_tree()
    tree["linear"]["w"][0, 0] = np.nan
    _refused(tmp_path, tree, "'linear/w'", "NaN")


def test_refuses_other_models_of_the_repository(tmp_path):
    """The GRU core and the SCM/LSCM prototypes (pr-lstm commit 5efc5a7) are not PR-LSTMs."""
    rnn = _paper_tree("rnn")
    gru = {"parallel_recursive/~get_elems/linear": rnn["parallel_recursive/~get_elems/linear"],
           "parallel_recursive/~get_cell/gru": {name: np.zeros((H, H), np.float32)
                                                for name in ("w_i", "u_i", "w_h", "u_h")},
           "linear": rnn["linear"]}
    _refused(tmp_path, gru, "'parallel_recursive/~get_cell/gru'", "GRU")
    published = _paper_tree()
    lscm = {"lscm/~get_elems/linear": published["parallel_recursive/~get_elems/linear"],
            "lscm/~get_cell/linear": published["parallel_recursive/~get_cell/nary_lstm/linear"],
            "lscm/~get_cell/linear_1": published["parallel_recursive/~get_cell/nary_lstm_1/linear"],
            "linear": published["linear"]}
    _refused(tmp_path, lscm, "'lscm/~get_cell/linear'", "LSCM", "gate order")


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

    source = _write(tmp_path, _paper_tree(num_layers=3), "paper.msgpack")
    out = tmp_path / "model.npz"
    result = CliRunner().invoke(cli, ["import-checkpoint", str(source), "--out", str(out),
                                      "--pattern", "odd-even"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "parallel_recursive/~get_cell/nary_lstm_2/linear/w" in result.output
    assert "unary_2/w" in result.output
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


def test_cli_refusal_names_the_tensor(tmp_path):
    from treesched.cli.main import cli

    tree = _paper_tree()
    tree["parallel_recursive/~get_cell/nary_lstm_1/linear"]["w"] = np.zeros((H, 3 * H), np.float32)
    source = _write(tmp_path, tree, "wrong.msgpack")
    result = CliRunner().invoke(cli, ["import-checkpoint", str(source), "--out",
                                      str(tmp_path / "x.npz")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1
    assert "'parallel_recursive/~get_cell/nary_lstm_1/linear/w' (-> unary_1/w)" in lines[0]
    assert not (tmp_path / "x.npz").exists()

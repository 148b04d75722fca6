"""PRLSTM on the NumPy reference backend: gradients, semantics, checkpoints, errors."""

import numpy as np
import pytest

import treesched
from treesched import PRLSTM, TreeschedError

PATTERNS = list(treesched.PATTERN_NAMES)


def outputs_for(pattern):
    return "last" if pattern == "reduce" else "all"


def random_model(pattern="odd-even", cell="lstm", num_layers=2, dtype="float64", seed=0,
                 input_size=3, hidden=4, output=2):
    model = PRLSTM(input_size, hidden, output, num_layers=num_layers, cell=cell,
                   pattern=pattern, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    # biases non-zero so that every parameter's gradient is exercised
    for name, value in model.params.items():
        model.params[name] = value + 0.3 * rng.standard_normal(value.shape)
    return model


def directional_check(model, x, dy, lengths, outputs, rng):
    """Central differences along a random direction, one parameter tensor at a time."""
    _, grads = model.forward_backward(x, dy, lengths=lengths, outputs=outputs)
    assert set(grads) == set(model.params)
    eps = 1e-6
    for name in list(model.params):
        base = model.params[name].copy()
        direction = rng.standard_normal(base.shape)
        model.params[name] = base + eps * direction
        plus = np.sum(model.forward(x, lengths=lengths, outputs=outputs) * dy)
        model.params[name] = base - eps * direction
        minus = np.sum(model.forward(x, lengths=lengths, outputs=outputs) * dy)
        model.params[name] = base
        numeric = (plus - minus) / (2 * eps)
        analytic = np.sum(grads[name] * direction)
        scale = max(1.0, abs(numeric), abs(analytic))
        assert abs(numeric - analytic) / scale < 1e-6, (name, numeric, analytic)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_finite_differences_whole_model(pattern, cell, num_layers):
    rng = np.random.default_rng(7)
    model = random_model(pattern, cell, num_layers)
    outputs = outputs_for(pattern)
    for length in (1, 2, 3, 7, 41):
        x = rng.standard_normal((2, length, 3))
        k = length if outputs == "all" else 1
        dy = rng.standard_normal((2, k, 2))
        directional_check(model, x, dy, None, outputs, rng)
        if length > 2:
            lengths = np.array([length, max(1, length - 2)])
            directional_check(model, x, dy, lengths, outputs, rng)


# ------------------------------------------------------------ JAX parity
def jax_reference():
    """The paper's formulation (``treesched.jax_reference``): leaf encoder,
    ``jax.lax.associative_scan`` over the merge cell, read-out head; written
    independently of treesched's ops and backends."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from treesched import jax_reference as reference
    return jax, reference


def relative(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-300)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_matches_paper_formulation_in_jax(cell, num_layers):
    jax, reference = jax_reference()
    rng = np.random.default_rng(3)
    outputs_and_grads = reference.jitted(reference.logits_and_vjp, cell, num_layers)

    shapes = [(2, 4, 1), (3, 5, 2), (2, 3, 7), (1, 4, 16)]
    if (cell, num_layers) == ("lstm", 2):  # the paper's model: a long odd length too
        shapes.append((2, 5, 41))
    for batch, hidden, length in shapes:
        model = random_model(cell=cell, num_layers=num_layers, hidden=hidden, seed=length)
        x = rng.standard_normal((batch, length, 3))
        dy = rng.standard_normal((batch, length, 2))
        params = {k: jax.numpy.asarray(v) for k, v in model.params.items()}
        expected, expected_grads = outputs_and_grads(params, jax.numpy.asarray(x),
                                                     jax.numpy.asarray(dy))
        y, grads = model.forward_backward(x, dy)
        assert relative(y, expected) < 1e-9
        assert relative(model.forward(x), expected) < 1e-9
        for name in model.params:
            assert relative(grads[name], expected_grads[name]) < 1e-9, name


@pytest.mark.parametrize("cell,num_layers", [("lstm", 2), ("rnn", 3)])
def test_jax_reference_loss_and_padding_match(cell, num_layers):
    """The reference's loss, mask and lengths conventions are PRLSTM's."""
    _, reference = jax_reference()
    rng = np.random.default_rng(6)
    model = random_model(cell=cell, num_layers=num_layers, hidden=5)
    params = model.params.numpy()
    x = rng.standard_normal((3, 9, 3))
    lengths = np.array([9, 6, 4])
    targets = np.eye(2)[rng.integers(0, 2, (3, 3))]
    mask = (rng.random((3, 3)) > 0.3).astype(float)
    np.testing.assert_allclose(reference.logits(params, x, cell, num_layers, lengths=lengths),
                               model.forward(x, lengths=lengths), rtol=1e-12, atol=1e-14)
    for got, want in zip(reference.encode(params, x, cell, lengths=lengths),
                         model.encode(x, lengths=lengths), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    value_and_grad = reference.jitted(reference.loss_value_and_grad, cell, num_layers)
    for row_mask, row_lengths in [(None, None), (mask, None), (mask, lengths)]:
        loss, grads = value_and_grad(params, x, targets, row_mask, lengths=row_lengths)
        want_loss, want_grads, _ = model.loss_and_grads(x, targets, row_mask, lengths=row_lengths)
        assert float(loss) == pytest.approx(want_loss, rel=1e-12)
        for name in want_grads:
            assert relative(grads[name], want_grads[name]) < 1e-9, name


# ------------------------------------------------------------ semantics
@pytest.mark.parametrize("pattern", PATTERNS)
def test_training_and_inference_paths_agree(pattern):
    model = random_model(pattern, dtype="float32")
    x = np.random.default_rng(1).standard_normal((3, 23, 3)).astype(np.float32)
    outputs = outputs_for(pattern)
    y = model.forward(x, outputs=outputs)
    y2, _ = model.forward_backward(x, np.ones_like(y), outputs=outputs)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_lengths_match_unpadded_sequences(pattern):
    rng = np.random.default_rng(2)
    model = random_model(pattern)
    lengths = np.array([9, 4, 1, 6])
    x = rng.standard_normal((4, 9, 3))
    outputs = outputs_for(pattern)
    padded = model.forward(x, lengths=lengths, outputs=outputs)
    for row, length in enumerate(lengths):
        alone = model.forward(x[row:row + 1, :length], outputs=outputs)[0]
        if outputs == "all":
            np.testing.assert_allclose(padded[row, :length], alone, rtol=1e-12, atol=1e-12)
            assert np.all(padded[row, length:] == 0)
        else:
            np.testing.assert_allclose(padded[row], alone, rtol=1e-12, atol=1e-12)
    last2 = model.forward(x, lengths=lengths, outputs=2) if lengths.min() >= 2 else None
    assert last2 is None or last2.shape == (4, 2, 2)


def test_padded_positions_get_zero_gradient():
    rng = np.random.default_rng(4)
    model = random_model()
    x = rng.standard_normal((2, 8, 3))
    lengths = np.array([8, 5])
    dy = rng.standard_normal((2, 8, 2))
    _, grads = model.forward_backward(x, dy, lengths=lengths)
    dy_clean = dy.copy()
    dy_clean[1, 5:] = 0
    noisy_x = x.copy()
    noisy_x[1, 5:] = 1e3 * rng.standard_normal((3, 3))  # padding content must not matter
    _, clean = model.forward_backward(noisy_x, dy_clean, lengths=lengths)
    for name in grads:
        np.testing.assert_allclose(grads[name], clean[name], rtol=1e-12, atol=1e-14)


def test_loss_and_grads_matches_forward_backward():
    rng = np.random.default_rng(5)
    model = random_model()
    x = rng.standard_normal((3, 10, 3))
    targets = np.eye(2)[rng.integers(0, 2, (3, 4))]
    mask = (rng.random((3, 4)) > 0.3).astype(float)
    loss, grads, logits = model.loss_and_grads(x, targets, mask)
    assert logits.shape == (3, 4, 2)
    np.testing.assert_allclose(logits, model.forward(x)[:, -4:], rtol=1e-12)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(mask * (targets * log_softmax).sum(-1)).sum() / (3 * 4)
    assert loss == pytest.approx(expected, rel=1e-12)
    # gradient of the loss by finite differences along one direction
    name = "merge/w"
    direction = rng.standard_normal(model.params[name].shape)
    base = model.params[name].copy()
    values = []
    for sign in (1, -1):
        model.params[name] = base + sign * 1e-6 * direction
        values.append(model.loss_and_grads(x, targets, mask)[0])
    model.params[name] = base
    assert (values[0] - values[1]) / 2e-6 == pytest.approx(np.sum(grads[name] * direction), rel=1e-6)


def test_parameters_follow_the_spec_layout():
    model = PRLSTM(5, 8, 3, num_layers=3)
    shapes = {name: value.shape for name, value in model.params.items()}
    assert shapes == {"leaf/w": (5, 24), "leaf/b": (24,), "merge/w": (16, 40), "merge/b": (40,),
                      "unary_1/w": (8, 32), "unary_1/b": (32,), "unary_2/w": (8, 32),
                      "unary_2/b": (32,), "head/w": (8, 3), "head/b": (3,)}
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert np.all(model.params["merge/b"] == 0)
    w = model.params["merge/w"]
    assert np.abs(w).max() <= 2 / np.sqrt(16) + 1e-7  # truncated at two stddevs
    assert 0.7 / np.sqrt(16) < w.std() < 1.0 / np.sqrt(16)
    rnn = PRLSTM(5, 8, 3, cell="rnn")
    assert {n: v.shape for n, v in rnn.params.items()}["merge/w"] == (16, 8)
    same = PRLSTM(5, 8, 3, num_layers=3)
    assert all(np.array_equal(same.params[n], model.params[n]) for n in shapes)


def test_assigning_weights():
    model = PRLSTM(2, 3, 2, dtype="float64")
    model.params["head/b"] = np.array([1, 2])  # ints are cast to the model dtype
    assert model.params["head/b"].dtype == np.float64
    with pytest.raises(TreeschedError, match=r"'head/w' must have shape \(3, 2\)"):
        model.params["head/w"] = np.zeros((2, 3))
    with pytest.raises(TreeschedError, match="unknown parameter 'unary_1/w'"):
        PRLSTM(2, 3, 2, num_layers=1).params["unary_1/w"] = np.zeros((3, 12))
    with pytest.raises(TreeschedError, match="NaN"):
        model.params["head/b"] = np.array([np.nan, 0])
    with pytest.raises(TreeschedError, match="missing"):
        model.params = {"head/b": np.zeros(2)}


# ---------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    model = random_model("sklansky", "rnn", 3, dtype="float32")
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = PRLSTM.load(path)
    assert loaded.config == model.config
    x = np.random.default_rng(0).standard_normal((2, 11, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_corrupt_checkpoints_are_refused(tmp_path):
    model = random_model()
    path = tmp_path / "model.npz"
    model.save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TreeschedError, match="corrupt"):
        PRLSTM.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(TreeschedError, match="corrupt"):
        PRLSTM.load(garbage)
    with pytest.raises(TreeschedError, match="does not exist"):
        PRLSTM.load(tmp_path / "missing.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(TreeschedError, match="no configuration"):
        PRLSTM.load(foreign)
    params = dict(np.load(path))
    params["merge/w"] = np.zeros((3, 3))
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, **params)
    with pytest.raises(TreeschedError, match="merge/w"):
        PRLSTM.load(mismatched)
    del params["merge/w"]
    missing = tmp_path / "missing_param.npz"
    np.savez(missing, **params)
    with pytest.raises(TreeschedError, match="missing"):
        PRLSTM.load(missing)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    model = random_model()
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()
    import os

    def broken_replace(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TreeschedError, match="No space left"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,message", [
    ({"cell": "gru"}, "unknown cell"),
    ({"pattern": "zigzag"}, "unknown pattern"),
    ({"backend": "tpu"}, "unknown backend"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(TreeschedError, match=message):
        PRLSTM(3, 4, 2, **kwargs)


def test_bad_inputs():
    model = PRLSTM(3, 4, 2)
    good = np.zeros((2, 5, 3), np.float32)
    cases = [
        (np.zeros((5, 3)), "x must have shape"),
        (np.zeros((2, 5, 4)), "4 features per position but the model's input_size is 3"),
        (np.zeros((2, 0, 3)), "at least one"),
        (np.full((2, 5, 3), np.nan), "NaN"),
        (np.full((2, 5, 3), np.inf), "NaN or infinity"),
        (np.zeros((2, 5, 3), complex), "real numbers"),
        (np.array([["a"]]), "real numbers"),
    ]
    for x, message in cases:
        with pytest.raises(TreeschedError, match=message):
            model.forward(x)
    for lengths, message in [([5], "lengths must have shape"), ([0, 5], "lengths must lie in 1..5"),
                             ([6, 5], "lengths must lie"), ([2.5, 5], "integers")]:
        with pytest.raises(TreeschedError, match=message):
            model.forward(good, lengths=np.array(lengths))
    with pytest.raises(TreeschedError, match="dy must have shape"):
        model.forward_backward(good, np.zeros((2, 4, 2)))
    with pytest.raises(TreeschedError, match="targets cover 6 positions"):
        model.loss_and_grads(good, np.zeros((2, 6, 2)))
    with pytest.raises(TreeschedError, match="mask must have shape"):
        model.loss_and_grads(good, np.zeros((2, 2, 2)), mask=np.ones((2, 3)))
    with pytest.raises(TreeschedError, match="only the last position"):
        PRLSTM(3, 4, 2, pattern="reduce").forward(good)


def test_integer_and_bool_inputs_are_accepted():
    model = PRLSTM(3, 4, 2)
    tokens = np.eye(3, dtype=bool)[[[0, 1, 2, 1]]]
    np.testing.assert_array_equal(model.forward(tokens), model.forward(tokens.astype(np.float32)))

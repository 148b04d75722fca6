"""Arrays from other libraries in and out (DLPack), and the encoder API."""

import inspect

import numpy as np
import pytest

import treesched
from treesched import interop
from treesched.backends import get_backend
from treesched.errors import TreeschedError

D, H, O = 4, 8, 3
PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")


def _inputs(batch=3, length=9, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(batch, length, D)).astype(dtype)


@pytest.fixture(scope="module")
def model():
    return treesched.PRLSTM(D, H, O, seed=1)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def jnp():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_platforms", "cpu")
    return jax.numpy


NUMPY = get_backend("numpy")


# ------------------------------------------------------------------ intake
def test_numpy_and_lists_pass_through():
    x = _inputs()
    assert interop.to_backend_array(x, NUMPY) is x
    np.testing.assert_array_equal(interop.to_backend_array([[1.0, 2.0]], NUMPY), [[1.0, 2.0]])
    with pytest.raises(TreeschedError, match="x is not an array"):
        interop.to_backend_array({"a": 1}, NUMPY, "x")


def test_torch_cpu_tensor_is_taken_without_copy(torch):
    tensor = torch.from_numpy(_inputs())
    array = interop.to_backend_array(tensor, NUMPY, "x")
    assert isinstance(array, np.ndarray) and np.shares_memory(array, tensor.numpy())
    needs_grad = tensor.clone().requires_grad_()
    np.testing.assert_array_equal(interop.to_backend_array(needs_grad, NUMPY), tensor.numpy())
    as_bf16 = interop.to_backend_array(tensor.to(torch.bfloat16), NUMPY)
    assert as_bf16.dtype == np.float32
    np.testing.assert_allclose(as_bf16, tensor.numpy(), rtol=1e-2, atol=1e-2)


def test_jax_cpu_array_intake(jnp):
    x = _inputs()
    array = interop.to_backend_array(jnp.asarray(x), NUMPY, "x")
    assert isinstance(array, np.ndarray)
    np.testing.assert_array_equal(array, x)
    widened = interop.to_backend_array(jnp.asarray(x).astype(jnp.bfloat16), NUMPY)
    assert widened.dtype == np.float32


def test_model_accepts_torch_and_jax_inputs(model, torch, jnp):
    x = _inputs()
    want = model.forward(x)
    tensor = torch.from_numpy(x.copy()).requires_grad_()
    np.testing.assert_array_equal(model.forward(tensor), want)
    np.testing.assert_array_equal(tensor.detach().numpy(), x)  # input untouched
    np.testing.assert_array_equal(model.forward(jnp.asarray(x)), want)
    lengths = torch.tensor([9, 4, 1])
    np.testing.assert_array_equal(model.forward(torch.from_numpy(x), lengths=lengths),
                                  model.forward(x, lengths=np.array([9, 4, 1])))
    h, c = model.encode(jnp.asarray(x))
    np.testing.assert_array_equal(h, model.encode(x)[0])
    # Integer one-hot tensors are cast to the model's dtype.
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 3]]), D)
    np.testing.assert_allclose(model.forward(onehot), model.forward(np.eye(D, dtype=np.float32)[None]))


# ------------------------------------------------------------------ output
def test_to_library_numpy_to_torch_and_jax(torch, jnp):
    y = np.arange(12, dtype=np.float32).reshape(3, 4)
    as_torch = interop.to_library(y, "torch")
    assert isinstance(as_torch, torch.Tensor) and np.shares_memory(as_torch.numpy(), y)
    like = torch.zeros(1)
    assert isinstance(interop.to_library(y, like), torch.Tensor)
    assert isinstance(interop.to_library(y, torch), torch.Tensor)
    as_jax = interop.to_library(y, jnp)
    assert type(as_jax).__module__.startswith("jax")
    np.testing.assert_array_equal(np.asarray(as_jax), y)
    assert type(interop.to_library(y, jnp.zeros(2))).__module__.startswith("jax")
    back = interop.to_library(as_torch, "numpy")
    assert isinstance(back, np.ndarray) and np.shares_memory(back, y)
    np.testing.assert_array_equal(interop.to_library(as_jax, np), y)
    assert interop.to_library(y, "numpy") is y


def test_to_library_containers_and_errors(torch):
    h, c = np.ones((2, 3)), np.zeros((2, 3))
    out = interop.to_library((h, c), "torch")
    assert isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)
    out = interop.to_library({"h": h, "list": [c]}, "torch")
    assert isinstance(out["h"], torch.Tensor) and isinstance(out["list"][0], torch.Tensor)
    with pytest.raises(TreeschedError, match="unknown array library"):
        interop.to_library(h, "tensorflow")
    with pytest.raises(TreeschedError, match="unknown array library"):
        interop.to_library(h, object())


def test_returned_as_and_wrappers(model, torch, jnp):
    x = _inputs()
    tensor = torch.from_numpy(x)
    y = model.forward(x)
    assert interop.returned_as(y, None, tensor) is y
    assert isinstance(interop.returned_as(y, "input", tensor), torch.Tensor)
    assert isinstance(interop.returned_as(y, "input", x.tolist()), np.ndarray)
    logits = interop.forward(model, tensor)
    assert isinstance(logits, torch.Tensor)
    np.testing.assert_array_equal(logits.numpy(), y)
    h, c = interop.encode(model, jnp.asarray(x), outputs=2)
    assert type(h).__module__.startswith("jax") and h.shape == (3, 2, H)
    h, c = interop.last_state(model, tensor, like="numpy")
    assert isinstance(h, np.ndarray) and h.shape == (3, H)


@pytest.mark.skipif("like" not in inspect.signature(treesched.PRLSTM.forward).parameters,
                    reason="PRLSTM.forward has no like= option in this build")
def test_model_like_option(model, torch):
    x = _inputs()
    tensor = torch.from_numpy(x)
    assert isinstance(model.forward(tensor, like="input"), torch.Tensor)
    assert isinstance(model.forward(x, like="torch"), torch.Tensor)
    assert isinstance(model.forward(tensor), np.ndarray)  # default: the backend's arrays
    h, c = model.encode(tensor, like="input")
    assert isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor)


# ------------------------------------------------------------------ encoder
@pytest.mark.parametrize("cell,num_layers", [("lstm", 1), ("lstm", 2), ("lstm", 3), ("rnn", 2)])
def test_encode_shapes_and_head(cell, num_layers):
    model = treesched.PRLSTM(D, H, O, num_layers=num_layers, cell=cell, seed=2)
    x = _inputs(length=11)
    states = model.encode(x)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, 11, H) and s.dtype == np.float32 for s in states)
    p = model.params
    head = np.maximum(states[0], 0) @ p["head/w"] + p["head/b"]
    np.testing.assert_allclose(head, model.forward(x), rtol=1e-5, atol=1e-6)
    for outputs, sl in (("last", slice(-1, None)), (1, slice(-1, None)), (4, slice(-4, None))):
        part = model.encode(x, outputs=outputs)
        for got, full in zip(part, states):
            np.testing.assert_allclose(got, full[:, sl], rtol=1e-6, atol=1e-7)


def test_encode_position_zero_is_the_leaf():
    model = treesched.PRLSTM(D, H, O, seed=3, dtype="float64")
    x = _inputs(dtype=np.float64)
    h, c = model.encode(x)
    p = model.params
    a = x[:, 0] @ p["leaf/w"] + p["leaf/b"]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    c0 = sig(a[:, :H]) * np.tanh(a[:, H:2 * H])
    np.testing.assert_allclose(c[:, 0], c0, rtol=1e-12)
    np.testing.assert_allclose(h[:, 0], sig(a[:, 2 * H:]) * np.tanh(c0), rtol=1e-12)


def test_encode_with_lengths_equals_unpadded_runs():
    model = treesched.PRLSTM(D, H, O, seed=4)
    lengths = np.array([13, 1, 7, 2, 13, 8])
    x = _inputs(batch=len(lengths), length=13, seed=5)
    for b, n in enumerate(lengths):
        x[b, n:] = 1e3  # garbage in the padding must not leak
    h, c = model.encode(x, lengths=lengths)
    assert h.shape == (6, 13, H)
    for b, n in enumerate(lengths):
        alone_h, alone_c = model.encode(x[b:b + 1, :n])
        np.testing.assert_allclose(h[b, :n], alone_h[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c[b, :n], alone_c[0], rtol=1e-5, atol=1e-6)
        assert not h[b, n:].any() and not c[b, n:].any()  # zero at padded positions


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_last_state_equals_unpadded_runs(pattern, cell):
    model = treesched.PRLSTM(D, H, O, cell=cell, pattern=pattern, seed=6)
    lengths = np.array([5, 12, 1, 12, 3])
    x = _inputs(batch=len(lengths), length=12, seed=7)
    for b, n in enumerate(lengths):
        x[b, n:] = -7.0
    states = interop.last_state(model, x, lengths)
    assert len(states) == (2 if cell == "lstm" else 1)
    for b, n in enumerate(lengths):
        alone = model.encode(x[b:b + 1, :n], outputs="last")
        for got, want in zip(states, alone):
            assert got.shape == (len(lengths), H)
            np.testing.assert_allclose(got[b], want[0, 0], rtol=1e-5, atol=1e-6)
    # Without lengths: the state at the last position of the padded array.
    full = interop.last_state(model, x)
    np.testing.assert_allclose(full[0], model.encode(x, outputs="last")[0][:, 0])


def test_encode_refuses_bad_input(model):
    with pytest.raises(TreeschedError, match="features"):
        model.encode(np.zeros((1, 3, D + 1), np.float32))
    with pytest.raises(TreeschedError, match="lengths"):
        model.encode(_inputs(), lengths=np.array([10, 1, 1]))
    with pytest.raises(TreeschedError, match="lengths"):
        interop.last_state(model, _inputs(), lengths=[1, 2])


# ------------------------------------------------------------------ GPU (CuPy)
def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except Exception:  # noqa: BLE001
        pytest.skip("no CUDA GPU")
    return cupy


class _CupyXp:
    """A stand-in backend exposing cupy as ``xp`` (intake does not need kernels)."""

    def __init__(self, cupy):
        self.xp = cupy


@pytest.mark.gpu
def test_cupy_intake_and_output_stay_on_device():
    cupy = _cupy()
    backend = _CupyXp(cupy)
    x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    assert interop.to_backend_array(x, backend) is x
    uploaded = interop.to_backend_array(np.ones((2, 2), np.float32), backend)
    assert isinstance(uploaded, cupy.ndarray)
    host = interop.to_backend_array(x, NUMPY)
    assert isinstance(host, np.ndarray) and host[2, 3] == 11
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        tensor = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
        taken = interop.to_backend_array(tensor, backend)
        assert taken.data.ptr == tensor.data_ptr()  # zero copy, no host round trip
        given = interop.to_library(x, tensor)
        assert given.is_cuda and given.data_ptr() == x.data.ptr
        assert isinstance(interop.to_library(given, "cupy"), cupy.ndarray)


@pytest.mark.gpu
def test_cupy_model_encode_matches_numpy():
    cupy = _cupy()
    reason = treesched.backends.why_unavailable("cupy")
    if reason:
        pytest.skip(f"cupy backend: {reason}")
    reference = treesched.PRLSTM(D, H, O, seed=8)
    model = treesched.PRLSTM(D, H, O, seed=8, backend="cupy")
    x = _inputs()
    h_gpu, c_gpu = model.encode(cupy.asarray(x), lengths=np.array([9, 3, 1]))
    assert isinstance(h_gpu, cupy.ndarray)
    h, c = reference.encode(x, lengths=np.array([9, 3, 1]))
    np.testing.assert_allclose(h_gpu.get(), h, rtol=1e-4, atol=1e-5)
    states = interop.last_state(model, cupy.asarray(x))
    assert isinstance(states[0], cupy.ndarray)

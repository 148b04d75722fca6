"""Arrays in and out: NumPy, CuPy and any DLPack producer (PyTorch, JAX, ...).

Intake (:func:`to_backend_array`, used by :class:`treesched.PRLSTM` for every
``x``, ``dy``, target and parameter):

* arrays of the backend's own library pass through untouched;
* any object with ``__dlpack__`` whose memory is on the backend's device is
  taken over **without a copy** (``numpy.from_dlpack`` for CPU tensors on the
  numpy/numba backends, ``cupy.from_dlpack`` for CUDA tensors on the cupy
  backend) — on the GPU there is no host round trip;
* data on the other side of the PCIe bus is moved once, explicitly (a CuPy
  or CUDA PyTorch array given to a CPU backend is copied to the host; a CPU
  array given to the cupy backend is uploaded);
* PyTorch tensors that require grad are read as constants (treesched does
  not take part in PyTorch's autograd);
* anything else goes through ``xp.asarray`` (lists, ``__array__`` objects).

Output (:func:`to_library`): hand results back in the caller's library —
``to_library(y, like=x_torch)`` is a ``torch.Tensor`` on ``x_torch``'s
device; on the GPU the hand-over is a DLPack view, not a copy.

Encoder helpers: :func:`encode`, :func:`forward` (the model's methods with
the result in the caller's library) and :func:`last_state` (each sequence's
last state, ``(B, H)``, the usual feature vector for a downstream model).
"""

from __future__ import annotations

import numpy as np

from .errors import TreeschedError

# DLPack device types (dlpack.h, DLDeviceType)
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_ROCM, KDL_CUDA_MANAGED = 1, 2, 3, 10, 13
_HOST_READABLE = (KDL_CPU, KDL_CUDA_HOST)
_CUDA_READABLE = (KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED)

LIBRARIES = ("numpy", "cupy", "torch", "jax")


def _module_name(value) -> str:
    """Top-level package of ``value``'s type (``"torch"``, ``"jaxlib"`` → ``"jax"``)."""
    name = type(value).__module__.split(".")[0]
    return "jax" if name in ("jaxlib", "jax") else name


def dlpack_device(value):
    """``(device_type, device_id)`` from ``value.__dlpack_device__()``, or None."""
    probe = getattr(value, "__dlpack_device__", None)
    if probe is None or isinstance(value, type):
        return None
    try:
        device_type, device_id = probe()
        return int(device_type), int(device_id)
    except Exception:  # noqa: BLE001 - a broken producer: treat as "no DLPack"
        return None


def _constant(value):
    """A PyTorch tensor that requires grad → its detached view (no copy)."""
    if getattr(value, "requires_grad", False) and callable(getattr(value, "detach", None)):
        return value.detach()
    return value


def _not_an_array(what, value, error=None):
    detail = f": {error}" if error else ""
    return TreeschedError(
        f"{what} is not an array treesched can read (got {type(value).__module__}."
        f"{type(value).__name__}){detail}")


def to_host(value, what="array"):
    """Any array → NumPy: the one host copy of treesched (zero-copy for NumPy
    arrays and CPU DLPack producers; CuPy and CUDA tensors are copied once)."""
    if isinstance(value, np.ndarray):
        return value
    library = _module_name(value)
    if library == "cupy":
        return value.get()  # device → host, explicit
    if library == "torch":
        value = _constant(value)
        if value.device.type != "cpu":
            value = value.cpu()  # device → host, explicit
        if value.dtype.is_floating_point and value.element_size() < 4 and str(value.dtype) != "torch.float16":
            value = value.float()  # bfloat16 & co: NumPy has no such dtype
    device = dlpack_device(value)
    dlpack_error = None
    if device is not None and device[0] in _HOST_READABLE:
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError) as error:
            dlpack_error = error  # e.g. bfloat16, which NumPy has no dtype for
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise _not_an_array(what, value, dlpack_error or error) from None
    if array.dtype.name == "bfloat16":  # ml_dtypes (JAX): widen exactly
        array = array.astype(np.float32)
    elif array.dtype.hasobject:
        raise _not_an_array(what, value, "it holds Python objects, not numbers")
    return array


def to_backend_array(value, backend, what="array"):
    """Any array-like → an array of ``backend.xp``, without a copy where possible.

    Args:
      value: a NumPy/CuPy array, any ``__dlpack__`` producer (PyTorch, JAX,
        ...), or anything ``xp.asarray`` accepts.
      backend: a treesched backend (its ``xp`` is ``numpy`` or ``cupy``).
      what: the argument's name, for error messages.
    Raises:
      TreeschedError: ``value`` is not an array.
    """
    xp = backend.xp
    if isinstance(value, xp.ndarray):
        return value
    if xp is np:
        return to_host(value, what)
    # A CUDA backend (cupy): zero-copy DLPack for device memory, else one upload.
    value = _constant(value)
    device = dlpack_device(value)
    if device is not None and device[0] in _CUDA_READABLE and not isinstance(value, np.ndarray):
        try:
            return xp.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # e.g. a dtype CuPy lacks: fall through to a converted copy
    value = to_host(value, what)
    try:
        return xp.asarray(value)
    except (TypeError, ValueError) as error:
        raise _not_an_array(what, value, error) from None


# ------------------------------------------------------------------ output
def _target_library(like) -> str:
    if isinstance(like, str):
        name = like.lower()
        name = {"np": "numpy", "cp": "cupy", "pytorch": "torch", "jax.numpy": "jax",
                "jnp": "jax", "jaxlib": "jax"}.get(name, name)
    elif type(like).__name__ == "module":
        name = like.__name__.split(".")[0]
        name = "jax" if name == "jaxlib" else name
    else:
        name = _module_name(like)
    if name not in LIBRARIES:
        raise TreeschedError(
            f"unknown array library {name!r} for like=: use numpy, cupy, torch or jax, or an "
            "array of one of them")
    return name


def _convert(array, target, like):
    source = _module_name(array)
    like_is_array = not isinstance(like, str) and type(like).__name__ != "module"
    if target == "numpy":
        return to_host(array, "array")
    if target == "cupy":
        import cupy
        if source == "cupy":
            return array
        device = dlpack_device(array)
        if device is not None and device[0] in _CUDA_READABLE:
            return cupy.from_dlpack(array)
        return cupy.asarray(to_host(array, "array"))
    if target == "torch":
        import torch
        if source != "torch":
            try:
                array = torch.from_dlpack(array)
            except (BufferError, RuntimeError, TypeError, ValueError):
                array = torch.as_tensor(to_host(array, "array"))
        if like_is_array and array.device != like.device:
            array = array.to(like.device)
        return array
    # jax
    import jax
    import jax.numpy as jnp
    if source != "jax":
        device = dlpack_device(array)
        try:
            array = (jnp.asarray(array) if isinstance(array, np.ndarray)
                     else jnp.from_dlpack(array))
        except (BufferError, RuntimeError, TypeError, ValueError):
            if device is not None and device[0] not in _HOST_READABLE:
                raise
            array = jnp.asarray(to_host(array, "array"))
    if like_is_array:
        devices = getattr(like, "devices", None)
        target_devices = devices() if callable(devices) else None
        if target_devices and array.devices() != target_devices:
            array = jax.device_put(array, next(iter(target_devices)))
    return array


def to_library(array, like):
    """Return ``array`` in the array library of ``like``.

    Args:
      array: a NumPy/CuPy/PyTorch/JAX array, or a tuple, list or dict of them
        (e.g. the ``(h, c)`` of :meth:`PRLSTM.encode`), converted element-wise.
      like: an array of the target library (the result then also lands on
        ``like``'s device, for torch and jax), the library's module
        (``torch``, ``jax.numpy``) or its name: ``"numpy"``, ``"cupy"``,
        ``"torch"``, ``"jax"``.
    Returns:
      The same values in the target library. CPU↔CPU and GPU↔GPU hand-overs
      are DLPack views (no copy); only a host↔device move copies. NumPy
      results are always on the host.

    Example:
      >>> y = model.forward(x_torch)                 # NumPy (numpy backend)
      >>> y = treesched.interop.to_library(y, x_torch)  # torch.Tensor, no copy
    """
    target = _target_library(like)
    if isinstance(array, tuple):
        return tuple(to_library(item, like) for item in array)
    if isinstance(array, list):
        return [to_library(item, like) for item in array]
    if isinstance(array, dict):
        return {key: to_library(item, like) for key, item in array.items()}
    if _module_name(array) == target and target != "torch" and target != "jax":
        return array
    return _convert(array, target, like)


def returned_as(result, like, x=None):
    """What a model method with a ``like=`` option returns.

    ``like=None``: ``result`` as the backend made it (NumPy or CuPy);
    ``like="input"``: in the library (and device) of the input ``x``;
    otherwise as :func:`to_library`.
    """
    if like is None:
        return result
    if isinstance(like, str) and like == "input":
        if x is None:
            raise TreeschedError("like='input' needs the input array")
        like = x if _module_name(x) in LIBRARIES else "numpy"
    return to_library(result, like)


# ------------------------------------------------------------------ encoder helpers
def forward(model, x, lengths=None, outputs="all", like="input"):
    """``model.forward`` with the logits returned in ``like``'s library (default: ``x``'s)."""
    return returned_as(model.forward(x, lengths=lengths, outputs=outputs), like, x)


def encode(model, x, lengths=None, outputs="all", like="input"):
    """``model.encode`` with the states returned in ``like``'s library (default: ``x``'s).

    Returns ``(h, c)`` (``(h,)`` for the rnn cell), each ``(B, K, H)``.
    """
    return returned_as(model.encode(x, lengths=lengths, outputs=outputs), like, x)


def last_state(model, x, lengths=None, like="input"):
    """Each sequence's final state, without the head: ``(h, c)`` (``(h,)`` for rnn), each ``(B, H)``.

    With ``lengths`` (a right-padded batch), row ``b`` is the state of
    ``x[b, :lengths[b]]`` computed on that length's own schedule, exactly what
    running the unpadded sequence alone gives, for every pattern.

    Example (features for scikit-learn):
      >>> h, c = treesched.interop.last_state(model, x, lengths, like="numpy")
      >>> LogisticRegression().fit(h, labels)
    """
    if lengths is not None and getattr(model, "pattern_prefix_stable", False):
        # One run over the padded batch: with a prefix-stable pattern the state
        # at position n-1 is the state of the length-n prefix (SPEC §2).
        lengths = np.asarray(lengths.get() if _module_name(lengths) == "cupy" else
                             to_host(lengths, "lengths"))
        states = model.encode(x, lengths=lengths, outputs="all")
        xp = getattr(model, "xp", np)
        rows = xp.arange(states[0].shape[0])
        last = xp.asarray(lengths.astype(np.int64) - 1)
        return returned_as(tuple(state[rows, last] for state in states), like, x)
    states = model.encode(x, lengths=lengths, outputs="last")
    return returned_as(tuple(state[:, -1] for state in states), like, x)


__all__ = ["to_host", "to_backend_array", "to_library", "returned_as", "dlpack_device", "forward", "encode",
           "last_state", "LIBRARIES"]

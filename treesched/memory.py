"""Memory checks before allocation: a pass that cannot fit is refused with
both figures and the largest batch that would fit, instead of dying in
NumPy's ``MemoryError`` after allocating what it could (or being killed by
the kernel).

:func:`pass_bytes` estimates one pass of a model: the executor's workspace
(:func:`treesched.lowering.activation_memory`: state stores, activations,
level buffers, the answers) plus what the model adds around it: the
input's staged copy, the logits, and with gradients the head's cache, the
logits' gradient and the parameter gradients.  :func:`available_bytes` is
what the machine can still give: host RAM (``MemAvailable``, within a
cgroup's limit) for numpy / numba, free GPU memory (plus the idle blocks of
CuPy's pool) for cupy.  ``tests/test_memory.py`` checks the estimate
against the measured peak (within 25 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TreeschedError
from .lowering import activation_memory


class InsufficientMemoryError(TreeschedError):
    """A pass needs more memory than is available."""


def _format(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_host_bytes() -> int | None:
    """Bytes of RAM this process can still get (None if unknown)."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        found = None
    if found is None:
        try:
            found = os_available_pages()
        except (ValueError, OSError, AttributeError):
            found = None
    # a cgroup (container) limit below the machine's memory
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), \
        _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        inside = max(limit - used, 0)
        found = inside if found is None else min(found, inside)
    return found


def os_available_pages() -> int:
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_device_bytes() -> int | None:
    """Free memory of the current CUDA device plus CuPy's idle pool blocks."""
    try:
        import cupy
        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free) + int(cupy.get_default_memory_pool().free_bytes())
    except Exception:  # noqa: BLE001 - no GPU or no driver: unknown
        return None


def available_bytes(backend) -> int | None:
    """What the backend's pass can allocate: GPU memory for cupy, else host RAM."""
    return available_device_bytes() if backend.name == "cupy" else available_host_bytes()


def pass_bytes(model, schedule, batch: int, need_grad: bool) -> int:
    """Estimated peak bytes of one ``model`` pass over ``schedule`` for ``batch`` sequences."""
    item = np.dtype(model.dtype).itemsize
    memory = activation_memory(schedule, batch, model.hidden_size, model.dtype,
                               num_layers=model.num_layers, cell=model.cell_name,
                               inputs=model.input_size)
    outputs = len(schedule.output_positions)
    total = memory["forward_backward_bytes" if need_grad else "forward_bytes"]
    total += batch * schedule.length * model.input_size * item          # the input's copy
    total += batch * outputs * model.output_size * item                 # the logits
    # a level's temporaries (its gate pre-activations and their nonlinear
    # images) outside the workspace: two of the widest level's gate blocks
    widest_gates = max(layer.blocks for layer in model.cell.layers)
    total += 2 * max(schedule.widest, 1) * batch * widest_gates * model.hidden_size * item
    if need_grad:
        parameters = sum(int(np.prod(shape)) for shape in model.param_shapes.values())
        total += batch * outputs * model.hidden_size * item             # the head's cache
        total += 2 * batch * outputs * model.output_size * item         # loss terms, dlogits
        total += batch * outputs * model.hidden_size * item             # dh of the head
        total += 2 * parameters * item                                  # gradients, staged
    return int(total)


def largest_fitting_batch(model, schedule, need_grad: bool, available: int) -> int:
    """The largest batch whose :func:`pass_bytes` is within ``available`` (0: none)."""
    one = pass_bytes(model, schedule, 1, need_grad)
    if one > available:
        return 0
    per_sequence = max(pass_bytes(model, schedule, 2, need_grad) - one, 1)
    return int(1 + (available - one) // per_sequence)


def check_pass_fits(model, schedule, batch: int, need_grad: bool, what: str = "this pass",
                    release=None) -> None:
    """Raise :class:`InsufficientMemoryError` if the pass cannot fit.

    ``release``: called once to free cached memory (idle workspaces) before
    the check is repeated.  Nothing is checked when the available memory
    cannot be read.
    """
    required = pass_bytes(model, schedule, batch, need_grad)
    available = available_bytes(model.backend)
    if available is None or required <= available:
        return
    if release is not None:
        release()
        available = available_bytes(model.backend)
        if available is None or required <= available:
            return
    where = "free GPU memory" if model.backend.name == "cupy" else "available host memory"
    fits = largest_fitting_batch(model, schedule, need_grad, available)
    advice = (f"the largest batch that fits is {fits}" if fits else
              "not even a batch of 1 fits: use a shorter length or a smaller hidden size")
    raise InsufficientMemoryError(
        f"{what} needs about {_format(required)} (batch {batch}, length {schedule.length}, "
        f"hidden {model.hidden_size}, {model.dtype}) but only {_format(available)} of {where} "
        f"is left; {advice}")


__all__ = ["InsufficientMemoryError", "available_bytes", "available_host_bytes",
           "available_device_bytes", "pass_bytes", "largest_fitting_batch", "check_pass_fits"]

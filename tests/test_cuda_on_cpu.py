"""The CuPy backend with the real CUDA C, compiled by g++ and run on the CPU.

Nothing here is a replica: the kernels are ``backends/cuda/*.cu`` as
``cupy.RawModule`` receives them, the launcher and graph runtime are the
production ``CudaLauncher`` / ``CudaGraphs``, and only the CUDA runtime
underneath is a CPU stand-in (``tests/cuda_on_cpu.py``) that refuses every
argument a GPU would misread.  Launch shapes are small (2 blocks of 32
threads), so the grid-stride loops wrap as they do on a GPU at full size.

* the sources compile as C++ with ``-Wall -Wextra -Werror``, each file alone
  and as the one translation unit NVRTC sees;
* the backend with the real kernels equals the NumPy reference over
  patterns x cells x num_layers 1-3 x T in {1, 2, 3, 7, 41, 64} x B in {1, 3}
  x float32 / float64 x outputs all / last / k, inference and training; so
  do toy cells registered by name and described only by their layers;
* per launch, each kernel equals its NumPy transcription
  (``tests/cuda_emulation.py``) on identical memory, bit for bit, when both
  use the kernels' tanh; the transcriptions also check every access and race;
* the thread order and launch shape change no bit; graph replay equals eager;
* no argument tuple handed to the runtime holds ``None`` or a scalar of the
  wrong width;
* deliberately broken copies of the source are caught.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import cuda_emulation
from backend_checks import TOY_CELLS, make_params, registered, rel
from cuda_on_cpu import (
    CudaCallError,
    cpu_backend,
    cpu_launcher,
    kernel_library,
    syntax_check,
    why_unavailable,
)

import treesched
from treesched.backends import cuda_source
from treesched.backends.numpy_backend import NumpyBackend
from treesched.ops import LSTMCell, RNNCell, get_cell

pytestmark = pytest.mark.skipif(why_unavailable() is not None,
                                reason=f"cannot build the kernels: {why_unavailable()}")

PATTERNS = ("odd-even", "sequential", "sklansky", "kogge-stone", "reduce")
LENGTHS = (1, 2, 3, 7, 41, 64)
BATCHES = (1, 3)
REALS = {"float32": "float", "float64": "double"}
TOLERANCE = {"float32": 1e-4, "float64": 1e-12}  # relative to the largest entry
INPUTS, HIDDEN = 3, 4


TOY_NAMES = tuple(cls.name for cls in TOY_CELLS)

#: The kernels a pass of each kind of cell launches (the union is all of them).
KERNELS_OF = {
    "gated": {"ts_gather_pairs", "ts_gated_forward", "ts_copy_answers", "ts_scatter_answers",
              "ts_zero_locations", "ts_gated_cells", "ts_hidden_from_cells",
              "ts_gated_backward", "ts_accumulate_operands"},
    "affine": {"ts_gather_pairs", "ts_affine_forward", "ts_copy_answers",
               "ts_scatter_answers", "ts_zero_locations", "ts_relu_backward",
               "ts_accumulate_operands"},
}


@pytest.fixture(autouse=True)
def toy_cells():
    with registered(*TOY_CELLS):
        yield


def _cell(name, layers):
    return get_cell(name, layers)


def _outputs(pattern, length):
    if pattern == "reduce":
        return ("last",)
    return ("all", "last", min(3, length))


def _run(backend, cell, params, x, schedule, dstates_seed, need_dx=True):
    """Inference states, training states, gradients and dx of one case."""
    inference, _ = backend.encode(cell, params, x, schedule, need_grad=False)
    states, tape = backend.encode(cell, params, x, schedule, need_grad=True)
    rng = np.random.default_rng(dstates_seed)
    dstates = tuple(rng.standard_normal(s.shape).astype(x.dtype) for s in states)
    grads, dx = backend.encode_backward(cell, params, tape, dstates, need_dx)
    return inference, states, grads, dx


def _compare(got, want, tol, what):
    g_inf, g_states, g_grads, g_dx = got
    w_inf, w_states, w_grads, w_dx = want
    worst = 0.0
    pairs = [(f"inference state {i}", g, w) for i, (g, w) in enumerate(zip(g_inf, w_inf))]
    pairs += [(f"training state {i}", g, w) for i, (g, w) in enumerate(zip(g_states, w_states))]
    pairs += [(f"grad {name}", g_grads[name], w) for name, w in w_grads.items()]
    pairs += [("dx", g_dx, w_dx)]
    for name, g, w in pairs:
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        error = rel(g, w)
        assert error <= tol, f"{what} {name}: relative error {error:.3g} > {tol}"
        worst = max(worst, error)
    for name, value in g_grads.items():
        if name not in w_grads:  # the reference leaves out parameters no level used
            assert not np.any(value), f"{what} grad {name} should be zero"
    return worst


# ================================================================== compiling
@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("name", cuda_source.KERNEL_FILES)
def test_each_file_compiles_alone_as_cpp_with_warnings_as_errors(name, real):
    result = syntax_check(cuda_source.CUDA_DIR / name, real, include_dir=cuda_source.CUDA_DIR)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("real", ["float", "double"])
def test_the_nvrtc_translation_unit_builds_unchanged(real):
    library = kernel_library(real)  # -Wall -Wextra -Werror; raises with g++'s log
    built = (library.path.parent / "module.cu").read_text()
    assert built == cuda_source.module_source()
    assert set(library.signatures) == set(cuda_source.kernel_names())


def test_a_warning_fails_the_build():
    source = cuda_source.module_source() + (
        '\nextern "C" __global__ void ts_probe(real* x) { int unused = 1; x[0] = 0; }\n')
    with pytest.raises(RuntimeError, match="unused"):
        kernel_library("float", source)


# ===================================================== host code + real kernels
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_real_kernels_match_the_numpy_reference(pattern, cell_name, layers, dtype):
    cell = _cell(cell_name, layers)
    backend, runtime = cpu_backend(use_graphs=False)
    reference = NumpyBackend()
    rng = np.random.default_rng(zlib.crc32(f"{pattern} {cell_name} {layers} {dtype}".encode()))
    params = make_params(cell, INPUTS, HIDDEN, rng, dtype)
    cases = 0
    for length in LENGTHS:
        for batch in BATCHES:
            x = rng.standard_normal((batch, length, INPUTS)).astype(dtype)
            for outputs in _outputs(pattern, length):
                schedule = treesched.compile(length, pattern, outputs)
                seed = int(rng.integers(2**31))
                got = _run(backend, cell, params, x, schedule, seed)
                want = _run(reference, cell, params, x, schedule, seed)
                _compare(got, want, TOLERANCE[dtype],
                         f"{pattern} {cell_name} L={layers} T={length} B={batch} {outputs}")
                cases += 1
    assert cases == len(LENGTHS) * len(BATCHES) * (1 if pattern == "reduce" else 3)
    # the launch shape is the small one: grids are capped at 2 blocks of 32
    # threads, so every launch over more than 64 elements wraps
    assert {grid for _, grid, _ in runtime.launches} == {1, 2}
    assert {block for _, _, block in runtime.launches} == {32}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell_name", TOY_NAMES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_registered_toy_cells_match_the_numpy_reference(pattern, cell_name, dtype):
    """A cell no backend knows by name (registered with ``register_cell``,
    described by its layers) runs on the real kernels: the gated toy's merge
    gates no previous cell (num_prev = 0), the affine toy rectifies its leaf."""
    backend, runtime = cpu_backend(use_graphs=False)
    reference = NumpyBackend()
    rng = np.random.default_rng(zlib.crc32(f"{pattern} {cell_name} {dtype}".encode()))
    for layers in (1, 2, 3):
        cell = _cell(cell_name, layers)
        params = make_params(cell, INPUTS, HIDDEN, rng, dtype)
        for length in (1, 7, 41):
            for batch in BATCHES:
                x = rng.standard_normal((batch, length, INPUTS)).astype(dtype)
                for outputs in _outputs(pattern, length)[:2]:
                    schedule = treesched.compile(length, pattern, outputs)
                    seed = int(rng.integers(2**31))
                    _compare(_run(backend, cell, params, x, schedule, seed),
                             _run(reference, cell, params, x, schedule, seed),
                             TOLERANCE[dtype],
                             f"{pattern} {cell_name} L={layers} T={length} B={batch} {outputs}")
    assert {name for name, _, _ in runtime.launches} == KERNELS_OF[cell.kind]


@pytest.mark.parametrize("cell_name", ("lstm", "rnn") + TOY_NAMES)
def test_graph_replay_equals_eager_with_new_inputs_each_call(cell_name):
    cell = _cell(cell_name, 2)
    schedule = treesched.compile(23, "odd-even", "all")
    graphed, runtime = cpu_backend(use_graphs=True)
    eager, _ = cpu_backend(use_graphs=False)
    reference = NumpyBackend()
    rng = np.random.default_rng(7)
    for call in range(4):  # eager, capture, replay, replay
        params = make_params(cell, INPUTS, HIDDEN, rng, np.float64)
        x = rng.standard_normal((3, 23, INPUTS))
        got = _run(graphed, cell, params, x, schedule, call)
        plain = _run(eager, cell, params, x, schedule, call)
        _compare(got, _run(reference, cell, params, x, schedule, call), 1e-12, f"call {call}")
        for g, p in zip(_flat(got), _flat(plain)):
            assert np.array_equal(g, p), f"call {call}: graph and eager results differ"
    # inference forward, training forward, backward: each captured once (call
    # 2), launched right after the capture and replayed by calls 3 and 4
    assert runtime.captures == 3 and runtime.replays == 3 * 3
    assert graphed.stats()["graphs"] == 3


def _flat(result):
    inference, states, grads, dx = result
    return [*inference, *states, *(grads[k] for k in sorted(grads)), dx]


@pytest.mark.parametrize("cell_name", ["lstm", "rnn"])
def test_thread_order_and_launch_shape_change_no_bit(cell_name):
    cell = _cell(cell_name, 3)
    rng = np.random.default_rng(3)
    params = make_params(cell, INPUTS, 8, rng, np.float32)
    x = rng.standard_normal((3, 41, INPUTS)).astype(np.float32)
    results = []
    for shape in (dict(threads_per_block=32, blocks_per_sm=1, multiprocessors=2),
                  dict(threads_per_block=32, blocks_per_sm=1, multiprocessors=2,
                       reverse_threads=True),
                  dict(threads_per_block=1, blocks_per_sm=1, multiprocessors=1),
                  dict(threads_per_block=256, blocks_per_sm=32, multiprocessors=132,
                       reverse_threads=True)):
        for pattern in ("kogge-stone", "odd-even"):
            backend, _ = cpu_backend(use_graphs=False, **shape)
            schedule = treesched.compile(41, pattern, "all")
            results.append(_flat(_run(backend, cell, params, x, schedule, 1)))
    for runs in (results[0::2], results[1::2]):  # per pattern, across launch shapes
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert a.tobytes() == b.tobytes()


# ============================================== per launch: C vs transcription
def _root(array):
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class TwinLaunches:
    """Runs every launch twice on identical memory: the compiled kernel on the
    real buffers and its transcription on copies of them (aliasing kept:
    each underlying buffer is copied once and every argument becomes the same
    view of the copy), then requires every buffer to agree bit for bit."""

    def __init__(self, runtime):
        self.compared = {}
        runtime.observer = self

    def __call__(self, kernel, args, execute):
        roots, copies = {}, {}
        for value in args:
            if isinstance(value, np.ndarray):
                root = _root(value)
                assert root.flags.c_contiguous
                if id(root) not in roots:
                    roots[id(root)], copies[id(root)] = root, root.copy()
        twin_args = []
        for param, value in zip(kernel.params, args):
            if isinstance(value, np.ndarray):
                root = _root(value)
                offset = value.ctypes.data - root.ctypes.data
                twin_args.append(np.ndarray(value.shape, value.dtype, buffer=copies[id(root)],
                                            offset=offset, strides=value.strides))
            elif param.kind.endswith("*"):
                twin_args.append(None)   # the 64-bit zero the launcher passes for NULL
            else:
                twin_args.append(value)
        execute()
        cuda_emulation.KERNELS[kernel.name](*twin_args)
        for key, root in roots.items():
            assert root.tobytes() == copies[key].tobytes(), (
                f"{kernel.name}: the compiled kernel and its transcription disagree")
        self.compared[kernel.name] = self.compared.get(kernel.name, 0) + 1


@pytest.fixture
def kernels_tanh():
    """Transcriptions use the kernels' own tanh (libm's), per dtype."""
    libraries = {np.dtype(np.float32): kernel_library("float"),
                 np.dtype(np.float64): kernel_library("double")}
    cuda_emulation.set_tanh(lambda x: libraries[x.dtype].tanh(x).reshape(x.shape))
    yield
    cuda_emulation.set_tanh(None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell_name", ("lstm", "rnn") + TOY_NAMES)
def test_every_launch_equals_its_transcription_bitwise(cell_name, dtype, kernels_tanh):
    backend, runtime = cpu_backend(use_graphs=True)
    twins = TwinLaunches(runtime)
    rng = np.random.default_rng(11)
    for layers in (1, 2, 3):
        cell = _cell(cell_name, layers)
        params = make_params(cell, INPUTS, HIDDEN, rng, dtype)
        for pattern, length, batch, outputs in (("odd-even", 41, 3, "all"),
                                                ("kogge-stone", 13, 1, 3),
                                                ("reduce", 7, 3, "last"),
                                                ("sequential", 5, 2, "last"),
                                                ("odd-even", 1, 2, "all")):  # no merges
            schedule = treesched.compile(length, pattern, outputs)
            x = rng.standard_normal((batch, length, INPUTS)).astype(dtype)
            for call in range(3):  # eager, capture + replay, replay
                _run(backend, cell, params, x, schedule, call)
    assert set(twins.compared) == KERNELS_OF[cell.kind]
    assert runtime.replays > 0


def test_the_kernels_of_both_kinds_are_every_kernel():
    assert KERNELS_OF["gated"] | KERNELS_OF["affine"] == set(cuda_source.kernel_names())


# ========================================================= launch arguments
def test_arguments_handed_to_the_runtime_hold_no_none_and_have_kernel_widths():
    launcher, runtime = cpu_launcher()
    seen = []

    def record(kernel, args, execute):
        seen.append((kernel.name, args))
        execute()

    runtime.observer = record
    from treesched.backends.cupy_backend import CupyBackend
    backend = CupyBackend(use_graphs=False, xp=np, launcher=launcher)
    rng = np.random.default_rng(0)
    for cell in (LSTMCell(3), RNNCell(3)):
        params = make_params(cell, INPUTS, HIDDEN, rng, np.float32)
        x = rng.standard_normal((2, 9, INPUTS)).astype(np.float32)
        for outputs in ("all", 2):
            _run(backend, cell, params, x, treesched.compile(9, "odd-even", outputs), 0)
        # length 1: no merge ran, so the merge gradients are zeroed by a kernel
        _run(backend, cell, params, x[:, :1], treesched.compile(1, "odd-even", "all"), 0)
    assert {name for name, _ in seen} == set(cuda_source.kernel_names())
    nulls = 0
    for name, args in seen:
        signature = cuda_source.kernel_signatures()[name]
        assert len(args) == len(signature)
        for param, value in zip(signature, args):
            assert value is not None, f"{name}({param.name}) is None"
            if param.kind.endswith("*"):
                if isinstance(value, np.ndarray):
                    continue
                assert type(value) is np.uint64 and value == 0, (name, param.name, value)
                nulls += 1
            else:
                width = 4 if param.kind == "int" else 8
                assert isinstance(value, np.integer) and value.dtype.itemsize == width, (
                    name, param.name, type(value))
    assert nulls > 0  # the optional pointers really were passed as NULL


def test_the_runtime_refuses_what_a_gpu_would_misread():
    launcher, runtime = cpu_launcher()
    function = launcher._functions(np.float32)["ts_gather_pairs"]
    store = np.zeros((4, 2), np.float32)
    index = np.zeros(1, np.int32)
    good = (store, index, index, np.zeros((1, 4), np.float32), np.int32(1), np.int32(1),
            np.int32(2))
    function((1,), (32,), good)
    with pytest.raises(CudaCallError, match="0xffffffff"):
        function((1,), (32,), (store, None, index, *good[3:]))
    with pytest.raises(CudaCallError, match="4-byte integer"):
        function((1,), (32,), (*good[:4], np.int64(1), *good[5:]))
    with pytest.raises(CudaCallError, match="4-byte integer"):
        function((1,), (32,), (*good[:4], 1, *good[5:]))   # a Python int is 64 bits
    with pytest.raises(CudaCallError, match="float64"):
        function((1,), (32,), (store.astype(np.float64), *good[1:]))


# ============================================================ broken kernels
MUTATIONS = {
    "gather takes the wrong half": ("const int side = at.col >= hidden ? 1 : 0;",
                                    "const int side = at.col > hidden ? 1 : 0;"),
    "the forward forgets the second cell": (
        "if (num_prev > 1) c += gates[4 * hidden + j]",
        "if (num_prev > 1) c -= gates[4 * hidden + j]"),
    "the cell gate is a sigmoid": ("gates[column] = block == 1 ? ts_tanh(a) : ts_sigmoid(a);",
                                   "gates[column] = ts_sigmoid(a);"),
    "backward subtracts dc from above": ("if (dc) dct += dc[e];", "if (dc) dct -= dc[e];"),
    "hidden recomputed from the wrong gate": ("act[(r * (3 + num_prev) + 2) * hidden + j]",
                                              "act[(r * (3 + num_prev) + 1) * hidden + j]"),
    "accumulation skips the last consumer": (
        "for (int p = consumer_ptr[at.major]; p < stop; ++p)",
        "for (int p = consumer_ptr[at.major]; p + 1 < stop; ++p)"),
    "operand cell gradients swap sides": ("(side ? dc_right : dc_left)",
                                          "(side ? dc_left : dc_right)"),
    "answer gradients are dropped": ("values ? values[e] : (real)0;",
                                     "values ? (real)0 : (real)0;"),
    "answers come from the wrong batch element": (
        "* batch + at.major) * hidden + at.col;", "* batch + 0) * hidden + at.col;"),
    "grid stride ignores the grid": ("e += (index_t)blockDim.x * gridDim.x)",
                                     "e += (index_t)blockDim.x)"),
    "relu backward passes negatives": ("if (!(h[e] > (real)0)) dh[e] = (real)0;",
                                       "if (!(h[e] >= (real)-1)) dh[e] = (real)0;"),
    "affine forward forgets the relu": ("if (relu && h < (real)0) h = (real)0;",
                                        "if (relu && h < (real)-1e9) h = (real)0;"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_kernel_is_caught(mutation, monkeypatch):
    old, new = MUTATIONS[mutation]
    source = cuda_source.module_source()
    assert old in source, "the mutation no longer applies to the source"  # headers appear once per file
    broken = source.replace(old, new)
    monkeypatch.setattr(cuda_source, "module_source", lambda: broken)
    reference = NumpyBackend()
    rng = np.random.default_rng(5)
    failures = []
    for cell_name in ("lstm", "rnn"):
        cell = _cell(cell_name, 2)
        params = make_params(cell, INPUTS, HIDDEN, rng, np.float64)
        x = rng.standard_normal((3, 41, INPUTS))
        schedule = treesched.compile(41, "kogge-stone", "all")
        backend, _ = cpu_backend(use_graphs=False)
        try:
            with np.errstate(all="ignore"):  # a broken kernel may well make NaNs
                got = _run(backend, cell, params, x, schedule, 1)
            _compare(got, _run(reference, cell, params, x, schedule, 1), 1e-10, cell_name)
        except AssertionError as error:
            failures.append(str(error))
    assert failures, f"the mutation '{mutation}' went unnoticed"

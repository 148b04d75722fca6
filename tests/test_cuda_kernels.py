"""The CUDA kernels compile with NVRTC, for sm_90 (H100) and sm_80 (A100),
in float32 and float64, with no error and no warning.  No GPU is needed:
NVRTC only compiles.  The source and options are exactly what the CuPy
backend hands to ``cupy.RawModule`` (``treesched.backends.cuda_source``),
plus what CuPy itself appends (``-ftz=true``) and the architecture.

Also checks that the kernel parameter lists parsed from the source are what
the host code and the test emulator assume.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from treesched.backends import cuda_source

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc",
    reason="cuda-bindings (NVRTC) is not installed: pip install 'treesched[test]'")

ARCHS = ("sm_90", "sm_80")
DTYPES = ("float32", "float64")


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(err)
        raise AssertionError(f"{what} failed: {message!r}")
    return result[1:] if isinstance(result, tuple) else ()


def compile_source(source: str, name: str, options) -> tuple:
    """Compile with NVRTC -> (ok, log, cubin or ptx bytes)."""
    (program,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                        "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        result = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        err = result[0] if isinstance(result, tuple) else result
        (size,) = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
        log = log.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return False, log, b""
        real_arch = any(o.startswith("--gpu-architecture=sm_") for o in options)
        if real_arch:
            (size,) = _check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            binary = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(program, binary), "nvrtcGetCUBIN")
        else:
            (size,) = _check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            binary = b" " * size
            _check(nvrtc.nvrtcGetPTX(program, binary), "nvrtcGetPTX")
        return True, log, binary
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def options_for(dtype, arch):
    return (f"--gpu-architecture={arch}", *cuda_source.nvrtc_options(dtype),
            *cuda_source.CUPY_IMPLICIT_OPTIONS, "--display-error-number")


def test_nvrtc_is_usable():
    _, major, minor = nvrtc.nvrtcVersion()
    assert (major, minor) >= (12, 0)
    _, archs = nvrtc.nvrtcGetSupportedArchs()
    for arch in ARCHS:
        assert int(arch[3:]) in archs, f"this NVRTC cannot target {arch}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_compiles_without_warnings(arch, dtype):
    ok, log, cubin = compile_source(cuda_source.module_source(), "treesched_kernels.cu",
                                    options_for(dtype, arch))
    assert ok, f"NVRTC error ({dtype}, {arch}):\n{log}"
    assert "warning" not in log.lower(), f"NVRTC warning ({dtype}, {arch}):\n{log}"
    assert "error" not in log.lower(), log
    assert len(cubin) > 1000


@pytest.mark.parametrize("name", cuda_source.KERNEL_FILES)
def test_each_file_compiles_alone(name):
    # each .cu file is self-contained (its includes resolve on their own)
    ok, log, _ = compile_source(cuda_source.expand(name), name, options_for("float32", "sm_90"))
    assert ok and "warning" not in log.lower(), log


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_is_an_unmangled_entry_point(dtype):
    # PTX for a virtual arch lists the entry points by their extern "C" names
    options = ("--gpu-architecture=compute_90", *cuda_source.nvrtc_options(dtype),
               *cuda_source.CUPY_IMPLICIT_OPTIONS)
    ok, log, ptx = compile_source(cuda_source.module_source(), "k.cu", options)
    assert ok, log
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx.decode(errors="replace")))
    assert entries == set(cuda_source.kernel_names())
    # the float64 instantiation computes in double, the float32 one never does
    assert (".f64" in ptx.decode(errors="replace")) == (dtype == "float64")


def test_a_warning_is_caught():
    # the check above is not vacuous: NVRTC reports warnings in the log
    source = cuda_source.module_source() + (
        '\nextern "C" __global__ void ts_probe(float* x) { int unused = 1; x[0] = 0.f; }\n')
    ok, log, _ = compile_source(source, "probe.cu", options_for("float32", "sm_90"))
    assert ok and "warning" in log.lower()


def test_missing_type_macro_is_an_error():
    ok, log, _ = compile_source(cuda_source.module_source(), "k.cu", ("--gpu-architecture=sm_90",))
    assert not ok and "TS_REAL" in log


def test_kernel_signatures_are_what_the_host_launches():
    sig = cuda_source.kernel_signatures()
    # one kernel per executor primitive that is not a GEMM (backends/cupy_backend.py)
    assert set(sig) == {"ts_gather_pairs", "ts_gated_forward", "ts_affine_forward",
                        "ts_copy_answers", "ts_scatter_answers", "ts_zero_locations",
                        "ts_gated_cells", "ts_hidden_from_cells", "ts_gated_backward",
                        "ts_relu_backward", "ts_accumulate_operands"}
    for name, params in sig.items():
        assert all(p.kind in ("real*", "int*", "int", "index") for p in params), name
        assert len({p.name for p in params}) == len(params), name
    # the backend's own launch-time check uses these signatures
    fake = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        cuda_source.check_arguments("ts_gather_pairs", (fake,), "float32", lambda a: True)
    with pytest.raises(TypeError, match="must be int32"):
        cuda_source.check_arguments(
            "ts_gather_pairs", (fake, None, None, fake, 1, np.int32(1), np.int32(1)),
            "float32", lambda a: isinstance(a, np.ndarray))


def test_sources_are_package_data():
    # pyproject ships backends/cuda/*.cu and *.cuh; the loader finds them
    names = {p.name for p in cuda_source.CUDA_DIR.iterdir()}
    assert set(cuda_source.KERNEL_FILES) <= names
    assert "common.cuh" in names
    assert '#include "' not in cuda_source.module_source()


def test_no_atomics_and_no_shared_memory():
    # the determinism argument (docs/gpu.md): every output element is written
    # by one thread and every sum runs in a fixed order; the CPU runs of
    # tests/test_cuda_on_cpu.py also rely on threads being independent
    source = re.sub(r"//[^\n]*", "", cuda_source.module_source())  # code, not comments
    for word in ("atomic", "__shared__", "__syncthreads", "__shfl"):
        assert word not in source, word

"""``treesched info``: what can run here — backends, GPU, compilers."""

from __future__ import annotations

import json
import os
import platform

import click

import treesched
from treesched.backends import availability


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # noqa: BLE001 - absent or broken: just not listed
        return None
    return getattr(module, "__version__", "unknown version")


def nvrtc_versions() -> dict:
    """NVRTC as seen by cuda-bindings and by CuPy (each only if present)."""
    found = {}
    try:
        from cuda.bindings import nvrtc
        result = nvrtc.nvrtcVersion()
        if int(result[0]) == 0:
            found["cuda-bindings"] = f"{result[1]}.{result[2]}"
    except Exception:  # noqa: BLE001
        pass
    try:
        import cupy
        major, minor = cupy.cuda.nvrtc.getVersion()
        found["cupy"] = f"{major}.{minor}"
    except Exception:  # noqa: BLE001
        pass
    return found


def gpu_devices() -> tuple[list, str | None]:
    """([{name, memory_bytes, compute_capability, multiprocessors}], why none)."""
    try:
        import cupy
    except ImportError:
        return [], "cupy is not installed"
    except Exception as error:  # noqa: BLE001
        return [], f"cupy failed to import: {error}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - no driver
        return [], f"no usable CUDA driver: {error}"
    devices = []
    for index in range(count):
        try:
            props = cupy.cuda.runtime.getDeviceProperties(index)
            name = props.get("name", b"?")
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            devices.append({
                "index": index,
                "name": name.rstrip("\x00"),
                "memory_bytes": int(props.get("totalGlobalMem", 0)),
                "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
                "multiprocessors": int(props.get("multiProcessorCount", 0)),
            })
        except Exception as error:  # noqa: BLE001
            devices.append({"index": index, "error": str(error)})
    try:
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        driver = cupy.cuda.runtime.driverGetVersion()
        for device in devices:
            device["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
            device["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}"
    except Exception:  # noqa: BLE001
        pass
    return devices, (None if devices else "no CUDA GPU is visible")


def collect() -> dict:
    backends = availability()
    devices, no_gpu = gpu_devices()
    return {
        "treesched": treesched.__version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "cupy": _version("cupy"),
        "backends": {name: {"available": reason is None, "reason": reason}
                     for name, reason in backends.items()},
        "gpus": devices,
        "gpu_missing_reason": no_gpu,
        "nvrtc": nvrtc_versions(),
        "environment": {name: os.environ.get(name) for name in
                        ("TREESCHED_TF32", "TREESCHED_CUDA_GRAPHS", "CUDA_VISIBLE_DEVICES")},
    }


def render(info: dict) -> str:
    lines = [f"treesched {info['treesched']}  (python {info['python']})", "", "backends:"]
    width = max(len(name) for name in info["backends"])
    for name, entry in info["backends"].items():
        status = "available" if entry["available"] else f"not available: {entry['reason']}"
        lines.append(f"  {name:<{width}}  {status}")
    lines += ["", "libraries:"]
    for name in ("numpy", "numba", "cupy"):
        lines.append(f"  {name:<6} {info[name] or 'not installed'}")
    nvrtc = info["nvrtc"]
    lines.append("  nvrtc  " + (", ".join(f"{v} ({k})" for k, v in nvrtc.items())
                               if nvrtc else "not found"))
    lines += ["", "GPU:"]
    if not info["gpus"]:
        lines.append(f"  none ({info['gpu_missing_reason']})")
    for gpu in info["gpus"]:
        if "error" in gpu:
            lines.append(f"  [{gpu['index']}] unreadable: {gpu['error']}")
            continue
        extra = ""
        if "cuda_runtime" in gpu:
            extra = f", CUDA runtime {gpu['cuda_runtime']}, driver {gpu['cuda_driver']}"
        lines.append(f"  [{gpu['index']}] {gpu['name']}, {gpu['memory_bytes'] / 2**30:.1f} GiB, "
                     f"compute capability {gpu['compute_capability']}, "
                     f"{gpu['multiprocessors']} SMs{extra}")
    env = {k: v for k, v in info["environment"].items() if v is not None}
    if env:
        lines += ["", "environment:"] + [f"  {k}={v}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
def command(as_json):
    """Show which backends can run here, the GPU, and compiler versions.

    \b
    Examples:
      treesched info
      treesched info --json
    """
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(render(info), nl=False)

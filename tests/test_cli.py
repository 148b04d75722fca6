"""``treesched`` CLI: happy paths, bad input, atomic output, real install."""

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

import treesched
from treesched.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_compile_text_summary():
    result = run("compile", "--length", "512")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "pattern odd-even" in out and "1013 merges" in out and "depth      16 levels" in out
    assert "widest level 256" in out and "memory" in out
    table = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in table] == list(range(1, 17))
    assert int(table[-1][2]) == 1013


def test_compile_json_and_dot(tmp_path):
    result = run("compile", "-n", "41", "--pattern", "sklansky", "--format", "json",
                 "--batch", "2", "--hidden", "8", "--dtype", "float64")
    assert result.exit_code == 0
    document = json.loads(result.output)
    assert document["pattern"] == "sklansky" and document["stats"]["memory"]["dtype"] == "float64"
    assert treesched.Schedule.from_json(result.output) == treesched.compile(41, "sklansky")
    target = tmp_path / "tree.dot"
    result = run("compile", "-n", "9", "--outputs", "last", "--format", "dot", "-o", str(target))
    assert result.exit_code == 0
    assert target.read_text().startswith("digraph")
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would


def test_help_and_version():
    assert run("--help").exit_code == 0
    assert "compile" in run("--help").output
    result = run("--version")
    assert result.exit_code == 0 and treesched.__version__ in result.output


@pytest.mark.parametrize("args,message", [
    (["-n", "0"], "length must be a positive integer"),
    (["-n", "-4"], "length must be a positive integer"),
    (["-n", "3.5"], "length must be a positive integer"),
    (["-n", "ten"], "length must be a positive integer"),
    (["-n", "8", "--pattern", "zigzag"], "unknown pattern 'zigzag'"),
    (["-n", "8", "--outputs", "9"], "more positions than the length 8"),
    (["-n", "8", "--outputs", "half"], "outputs must be"),
    (["-n", "8", "--format", "yaml"], "unknown format"),
    (["-n", "8", "--dtype", "int3"], "dtype"),
    (["-n", "8", "--batch", "0"], "batch must be a positive integer"),
    (["-n", "8", "-o", "/nonexistent-dir/x.json"], "cannot write"),
])
def test_bad_input_is_one_line(args, message):
    result = CliRunner().invoke(cli, ["compile", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a_directory"
    target.mkdir()  # os.replace onto a directory fails after the data is written
    result = CliRunner().invoke(cli, ["compile", "-n", "64", "--format", "json", "-o", str(target)])
    assert result.exit_code != 0 and "cannot write" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory"]
    assert list(target.iterdir()) == []


def test_entry_point_exits_nonzero_without_traceback():
    process = subprocess.run([sys.executable, "-m", "treesched.cli.main", "compile", "-n", "0"],
                             capture_output=True, text=True)
    assert process.returncode == 1
    assert process.stderr.strip() == "Error: length must be a positive integer, got 0"


def _site_directories() -> list:
    """Where this interpreter finds its installed packages (venv, system, user)."""
    found = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return [path for path in found if Path(path).is_dir()]


@pytest.mark.slow
def test_non_editable_install_runs_the_cli(tmp_path):
    """A wheel built from a copy of the source, installed into a fresh venv, gives
    a working CLI from elsewhere.

    The build uses only what the test extra declares (setuptools >= 70.1, which
    builds wheels without the separate ``wheel`` package), through the running
    interpreter, so it works the same in a fresh venv and with a bare system
    Python.  The new venv sees the test environment's packages through a
    ``.pth`` file (plain path lines: it does not activate their ``.pth``
    hooks, so an editable treesched there stays invisible), and nothing else.
    """
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", "runs", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), str(source)],
        capture_output=True, text=True, env=environment)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("treesched-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site_dir = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site_dir / "test_environment.pth").write_text("\n".join(_site_directories()) + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
         "--quiet", str(wheel)],
        capture_output=True, text=True, env=environment)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import treesched, treesched.ops, treesched.backends, "
         "treesched.cli; print(treesched.__file__); print(treesched.ops.__file__)"],
        capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert str(env_dir) in line, f"imported from outside the venv: {line}"
    result = subprocess.run([str(env_dir / "bin" / "treesched"), "compile", "--length", "512"],
                            capture_output=True, text=True, cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    assert "1013 merges" in result.stdout
    # the CUDA sources are package data of the wheel (the CuPy backend reads them)
    kernels = subprocess.run(
        [str(python), "-c", "from treesched.backends import cuda_source; "
         "print(len(cuda_source.module_source()))"], capture_output=True, text=True, cwd=work,
        env=env)
    assert kernels.returncode == 0 and int(kernels.stdout) > 1000, kernels.stderr
    # one namespace: no generic top-level packages were installed
    installed = {p.name for p in site_dir.iterdir()}
    assert not installed & {"ops", "backends", "cli", "tests"}

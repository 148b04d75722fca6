"""Every script in examples/ runs (as a user would run it, in a subprocess)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from treesched.backends import why_unavailable

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name, *args, timeout=120):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def load_module(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numpy_pipeline():
    pytest.importorskip("sklearn")
    result = run_example("numpy_pipeline.py")
    assert result.returncode == 0, result.stderr
    match = re.search(r"test accuracy ([0-9.]+) \(majority class ([0-9.]+)\)", result.stdout)
    assert match, result.stdout
    accuracy, majority = map(float, match.groups())
    assert accuracy > majority + 0.05  # the frozen encoder's features carry the counts


def test_cupy_pipeline_without_gpu_exits_cleanly():
    if why_unavailable("cupy") is None:
        pytest.skip("a GPU is present: covered by test_cupy_pipeline_on_gpu")
    result = run_example("cupy_pipeline.py")
    assert result.returncode == 0, result.stderr
    assert "no GPU backend here" in result.stdout


def test_cupy_pipeline_helpers_on_numpy():
    """The example's data and classifier code is array-module generic: check it on NumPy."""
    module = load_module("cupy_pipeline.py")
    x, lengths, labels = module.make_dataset(np, 600, 16, seed=0)
    assert x.shape == (600, 16, module.VOCAB) and not x[np.arange(16)[None] >= lengths[:, None]].any()
    features = np.stack([(x[..., 0] - x[..., 1]).sum(1), np.random.default_rng(1).normal(size=600)], 1)
    predict = module.fit_logistic(np, features[:450], labels[:450])
    assert (predict(features[450:]) == labels[450:]).mean() > 0.95


@pytest.mark.gpu
def test_cupy_pipeline_on_gpu():
    reason = why_unavailable("cupy")
    if reason is not None:
        pytest.skip(f"no GPU backend: {reason}")
    result = run_example("cupy_pipeline.py", "--samples", "4000", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "cupy" in result.stdout


def test_load_paper_checkpoint_builds_demo():
    for name in ("jax", "haiku", "flax"):
        pytest.importorskip(name)
    result = run_example("load_paper_checkpoint.py", "--length", "9")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parallel_recursive/~get_cell/nary_lstm_1/linear/w" in result.stdout
    difference = float(re.search(r"max \|treesched - haiku\| = (\S+)", result.stdout).group(1))
    assert difference < 1e-5


def _pack(tree):
    def ext(value):
        record = msgpack.packb((value.shape, value.dtype.name, value.tobytes()), use_bin_type=True)
        return msgpack.ExtType(1, record)
    return msgpack.packb(tree, default=ext, strict_types=True)


def test_load_paper_checkpoint_from_path(tmp_path):
    rng = np.random.default_rng(0)
    d, h, o = 3, 4, 2

    def linear(rows, cols):
        return {"w": rng.normal(size=(rows, cols)).astype(np.float32), "b": np.zeros(cols, np.float32)}

    tree = {"parallel_recursive/linear": linear(d, h),
            "parallel_recursive/nary_rnn/linear": linear(2 * h, h),
            "linear": linear(h, o)}
    path = tmp_path / "rnn.msgpack"
    path.write_bytes(_pack(tree))
    result = run_example("load_paper_checkpoint.py", path)
    assert result.returncode == 0, result.stderr
    assert "cell='rnn'" in result.stdout and "num_layers=1" in result.stdout
    assert "logits (2, 12, 2)" in result.stdout
    (tmp_path / "bad.msgpack").write_bytes(b"\x81\xa1a")
    result = run_example("load_paper_checkpoint.py", tmp_path / "bad.msgpack")
    assert result.returncode == 1 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_char_lm_tiny(tmp_path):
    """The language-model example end to end on its tiny settings: corpus from
    the standard library, training, validation bits per character, a sample."""
    result = run_example("char_lm.py", "--tiny", "--backend", "numpy", "--workdir",
                         tmp_path / "work", "--prompt", "import ")
    assert result.returncode == 0, result.stderr
    corpus = (tmp_path / "work" / "corpus.txt").read_text(encoding="utf-8")
    assert len(corpus) == 20_000 and "def " in corpus
    bpc = float(re.search(r"validation ([0-9.]+) bits per character", result.stdout).group(1))
    assert 0 < bpc < 10
    sample = result.stdout.split("seed 0):\n", 1)[1]
    assert sample.startswith("import ") and "[40 characters in" in sample
    assert "same as: treesched train --task lm" in result.stdout
    again = run_example("char_lm.py", "--tiny", "--backend", "numpy", "--workdir",
                        tmp_path / "work")
    assert again.returncode == 1 and "already exists" in again.stderr

"""The numpy_pipeline example on an NVIDIA GPU: CuPy arrays in, CuPy arrays out.

The batch is built on the GPU, the PR-LSTM encoder (cupy backend) takes it
without a host copy and returns CuPy states, and a logistic regression is
fitted on the GPU too (a few Newton steps in CuPy), so nothing but the final
accuracy crosses the PCIe bus. Without a GPU it says so and exits with
status 0:

    python examples/cupy_pipeline.py [--samples 20000] [--hidden 128]
"""

from __future__ import annotations

import argparse
import sys
import time

import treesched
from treesched.backends import why_unavailable
from treesched.interop import last_state

VOCAB = 4  # symbols a, b, c, d


def make_dataset(xp, samples: int, max_length: int, seed: int):
    """Right-padded one-hot batch ``(N, T, VOCAB)``, lengths and labels, built with ``xp``."""
    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random
    lengths = rng.integers(4, max_length + 1, size=samples)
    tokens = rng.integers(0, VOCAB, size=(samples, max_length))
    real = xp.arange(max_length)[None, :] < lengths[:, None]
    counts_a = ((tokens == 0) & real).sum(axis=1)
    counts_b = ((tokens == 1) & real).sum(axis=1)
    labels = (counts_a > counts_b).astype(xp.float32)
    x = xp.eye(VOCAB, dtype=xp.float32)[tokens] * real[..., None]
    return x, lengths, labels


def fit_logistic(xp, features, labels, steps: int = 15, l2: float = 1e-2):
    """L2-regularised logistic regression by Newton's method, entirely in ``xp``.

    Returns ``predict(features) -> 0/1 array``.
    """
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    design = xp.concatenate([(features - mean) / std, xp.ones((len(features), 1), features.dtype)], 1)
    design = design.astype(xp.float64)
    weights = xp.zeros(design.shape[1], xp.float64)
    ridge = l2 * xp.eye(design.shape[1])
    for _ in range(steps):
        p = 1 / (1 + xp.exp(-(design @ weights)))
        gradient = design.T @ (p - labels) / len(labels) + l2 * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(labels) + ridge
        weights -= xp.linalg.solve(hessian, gradient)

    def predict(new):
        z = ((new - mean) / std) @ weights[:-1].astype(new.dtype) + weights[-1]
        return (z > 0).astype(xp.float32)

    return predict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    reason = why_unavailable("cupy")
    if reason is not None:
        print(f"cupy_pipeline: no GPU backend here ({reason}); nothing to do.")
        return 0
    import cupy

    x, lengths, labels = make_dataset(cupy, args.samples, args.max_length, args.seed)
    model = treesched.PRLSTM(VOCAB, args.hidden, 1, backend="cupy", seed=args.seed)
    start = time.perf_counter()
    h, c = last_state(model, x, lengths)  # CuPy in, CuPy out (like="input")
    features = cupy.concatenate([h, c], axis=1)
    cupy.cuda.get_current_stream().synchronize()
    seconds = time.perf_counter() - start
    assert isinstance(features, cupy.ndarray)

    split = int(0.75 * args.samples)
    predict = fit_logistic(cupy, features[:split], labels[:split])
    accuracy = float((predict(features[split:]) == labels[split:]).mean())
    majority = float(labels[split:].mean())
    print(f"encoded {args.samples} sequences (lengths 4..{args.max_length}, hidden {args.hidden}) "
          f"in {seconds:.2f} s on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"features {tuple(features.shape)} ({type(features).__module__}), test accuracy "
          f"{accuracy:.3f} (majority class {max(majority, 1 - majority):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

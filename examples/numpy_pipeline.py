"""Feature extraction with the PR-LSTM encoder, then scikit-learn (CPU, NumPy).

A frozen, randomly initialised PR-LSTM turns variable-length token
sequences into fixed-size vectors (each sequence's last hidden state); a
LogisticRegression is fitted on them. Synthetic task: does symbol "a"
occur more often than symbol "b"?  Runs in a few seconds:

    python examples/numpy_pipeline.py [--samples 2000] [--hidden 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import treesched
from treesched.interop import last_state

VOCAB = 4  # symbols a, b, c, d


def make_dataset(samples: int, max_length: int, rng: np.random.Generator):
    """Right-padded one-hot batch ``(N, T, VOCAB)``, real lengths and labels."""
    lengths = rng.integers(4, max_length + 1, size=samples)
    tokens = rng.integers(0, VOCAB, size=(samples, max_length))
    positions = np.arange(max_length)[None, :]
    real = positions < lengths[:, None]
    counts_a = ((tokens == 0) & real).sum(axis=1)
    counts_b = ((tokens == 1) & real).sum(axis=1)
    labels = (counts_a > counts_b).astype(np.int64)
    x = np.eye(VOCAB, dtype=np.float32)[tokens] * real[..., None]  # zeros past the end
    return x, lengths, labels


def featurize(model, x, lengths, batch: int = 512):
    """Last hidden state and cell of every sequence: ``(N, 2H)`` features."""
    parts = []
    for start in range(0, len(x), batch):
        h, c = last_state(model, x[start:start + batch], lengths[start:start + batch])
        parts.append(np.concatenate([h, c], axis=1))
    return np.concatenate(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(args.seed)
    x, lengths, labels = make_dataset(args.samples, args.max_length, rng)
    # A frozen encoder; the head (output_size 1) is never used.
    model = treesched.PRLSTM(VOCAB, args.hidden, 1, seed=args.seed)

    start = time.perf_counter()
    features = featurize(model, x, lengths)
    seconds = time.perf_counter() - start
    split = int(0.75 * len(features))
    classifier = LogisticRegression(max_iter=2000, C=10.0)
    classifier.fit(features[:split], labels[:split])
    accuracy = classifier.score(features[split:], labels[split:])
    majority = max(labels[split:].mean(), 1 - labels[split:].mean())
    print(f"encoded {len(x)} sequences (lengths {lengths.min()}..{lengths.max()}, hidden "
          f"{args.hidden}) in {seconds:.2f} s on the {model.backend.name} backend")
    print(f"features {features.shape}, test accuracy {accuracy:.3f} (majority class {majority:.3f})")
    return accuracy


if __name__ == "__main__":
    main()

"""Load a checkpoint written by the paper's code (JAX + Haiku, saved with flax) and run it.

    python examples/load_paper_checkpoint.py saved/parity_check-parallel_recursive.msgpack
    python examples/load_paper_checkpoint.py            # builds a tiny demo checkpoint

Reading the file needs only msgpack and NumPy. With no path, and JAX, Haiku
and flax installed, the script first builds a small model with the module
structure of the paper's ``ParallelRecursive`` (the leaf ``hk.Linear`` made in
``get_elems``, vmapped n-ary LSTM cells made in ``get_cell`` and merged by
``jax.lax.associative_scan``, a read-out ``hk.Linear`` on ``relu(h)``), so its
parameters carry the paper's names
(``parallel_recursive/~get_cell/nary_lstm_1/linear/w``, ...).  It saves
``hk.transform(...).init`` with ``flax.serialization.to_bytes``, imports it
and checks treesched's outputs against Haiku's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from treesched.errors import TreeschedError
from treesched import PRLSTM
from treesched.haiku_import import load_haiku_msgpack


def build_demo_checkpoint(path: Path, input_size=3, hidden=8, outputs=2, num_layers=2):
    """Write a tiny checkpoint of the paper's model; return a function giving Haiku's logits."""
    import haiku as hk
    import jax
    import jax.numpy as jnp
    from flax import serialization

    class NaryLSTM(hk.Module):  # one gated layer over N child states
        def __init__(self, hidden_size, name=None):
            super().__init__(name=name)
            self.hidden_size = hidden_size

        def __call__(self, *children):
            n = len(children)
            z = hk.Linear((3 + n) * self.hidden_size)(jnp.concatenate([s.hidden for s in children], -1))
            i, g, o, *forget = jnp.split(z, 3 + n, axis=-1)
            c = jax.nn.sigmoid(i) * jnp.tanh(g)
            c = c + sum(jax.nn.sigmoid(f) * s.cell for f, s in zip(forget, children))
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return h, hk.LSTMState(h, c)

    class ParallelRecursive(hk.Module):
        def get_elems(self, xs):  # the leaf encoder: one state per position
            i, g, o = jnp.split(hk.Linear(3 * hidden)(xs), 3, axis=-1)
            c = jax.nn.sigmoid(i) * jnp.tanh(g)
            return hk.LSTMState(jax.nn.sigmoid(o) * jnp.tanh(c), c)

        def get_cell(self):  # the merge cell: binary layer, then unary refinements
            layers = [jax.vmap(NaryLSTM(hidden), in_axes=1, out_axes=1)
                      for _ in range(num_layers)]

            def merge(left, right):
                _, state = layers[0](left, right)
                for layer in layers[1:]:
                    _, state = layer(state)
                return state
            return merge

        def __call__(self, xs):
            return jax.lax.associative_scan(self.get_cell(), self.get_elems(xs), axis=1).hidden

    def network(x):
        return hk.Linear(outputs)(jax.nn.relu(ParallelRecursive()(x)))

    model = hk.without_apply_rng(hk.transform(network))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 2, input_size), np.float32))
    path.write_bytes(serialization.to_bytes(params))
    return lambda x: np.asarray(jax.jit(model.apply)(params, x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="a .msgpack of Haiku params (default: build a demo)")
    parser.add_argument("--pattern", default="odd-even", help="schedule (odd-even = the paper's)")
    parser.add_argument("--length", type=int, default=12, help="length of the random input")
    args = parser.parse_args(argv)

    reference = None
    with tempfile.TemporaryDirectory() as folder:
        path = args.path
        if path is None:
            try:
                import flax  # noqa: F401
                import haiku  # noqa: F401
                import jax  # noqa: F401
            except ImportError as error:
                print(f"give a checkpoint path; building a demo needs JAX, Haiku and flax "
                      f"({error.name} is not installed)", file=sys.stderr)
                return 2
            path = Path(folder) / "demo.msgpack"
            reference = build_demo_checkpoint(path)
            print(f"built a demo checkpoint with Haiku: {path.stat().st_size} bytes")
        try:
            found = load_haiku_msgpack(path)
            model = PRLSTM.from_haiku(found, pattern=args.pattern, source=f"checkpoint {path}")
        except TreeschedError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    print(f"imported {model!r}")
    for name, source in found.mapping.items():
        print(f"  {name:<10} {str(found.params[name].shape):<10} <- {source}")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.input_size, size=(2, args.length))
    x = np.eye(model.input_size, dtype=np.float32)[tokens]
    logits = model.forward(x)
    print(f"logits {logits.shape}; predictions at the last position: {logits[:, -1].argmax(-1)}")
    if reference is not None:
        difference = float(np.abs(logits - reference(x)).max())
        print(f"max |treesched - haiku| = {difference:.2e}")
        if difference > 1e-5:
            print("error: outputs differ from Haiku's", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's PR-LSTM in Haiku, with the published module structure, and
the paper's training step: the references the Haiku-import and protocol
tests hold treesched against.

Written for the tests from the published code, not copied from it:

* the model: ``src/pr_lstm/haiku/model.py`` and ``layers.py`` of
  tristangaudreault/pr-lstm (bfd273af553be3c5bcaccf55ebeb6fa00351b369; the
  same class in ``src/pr_lstm/jax/model.py`` at
  145d4637c7e87600f9ba8c0357b282c754896252, the commit whose README lists
  the paper's runs): a ``ParallelRecursive`` core whose method ``get_elems``
  creates the leaf ``hk.Linear`` and whose method ``get_cell`` creates the
  ``NaryLSTM`` / ``NaryRNN`` cells (each ``jax.vmap``-ed over time) that
  ``jax.lax.associative_scan`` applies as the merge; the read-out
  ``hk.Linear`` on ``relu(h)`` outside the core.  Haiku therefore names the
  parameters exactly as the paper's checkpoints do.
* the benchmark wrapper and training step, as the paper's NNCH plugin
  (``experiments/plugins/nnch.py``, 3c9b6d2186096c7db68b0f02135e87a6f22bf169;
  ``experiments/neural_networks_chomsky_hierarchy/plugins/nnch.py``,
  4e4fd8282395b2b6f80f86e452df7ec18f99031a) builds them from the NNCH
  harness (its fork tristangaudreault/neural_networks_chomsky_hierarchy,
  ``experiments/training.py`` at 8532f95508f9c42c2716aaa348d65ce6782a8dc5,
  and ``experiments/utils.py`` of google-deepmind/neural_networks_chomsky_hierarchy
  at 8084451db60389ebf61a6bf72342c586946a6944):

  - the model sees ``[one-hot input (one extra zero channel), output_length
    blank tokens]``, the blank being the one-hot of channel ``input_size``
    (``make_model_with_empty_targets`` with no computation steps); the core
    returns every position (``return_all_outputs=True``), the read-out is
    ``hk.Linear(output_size)(relu(h))``, the last ``output_length``
    positions are kept, and squeezed for single-output tasks;
  - loss ``mean(sum(-target * log_softmax(output), axis=-1))`` (the
    accuracy mask is not applied), accuracy ``sum(mask * correct) /
    sum(mask)``;
  - ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))``, the
    update ``jax.value_and_grad`` of the loss, then ``optimizer.update``
    and ``optax.apply_updates``, under ``jax.jit``.

Every function imports JAX, Haiku and optax when called and skips the
calling test when one is missing.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest

# XLA's cheap compile settings: the same results, built ~3x faster on the
# test machine (the reference's compile time would dominate these tests).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_compiled(jax, function, *args):
    """``jax.jit(function)(*args)``, compiled with :data:`FAST_COMPILE` where
    this XLA accepts those options."""
    try:
        compiled = jax.jit(function).lower(*args).compile(FAST_COMPILE)
    except Exception:  # noqa: BLE001 - an XLA without these options: default settings
        compiled = jax.jit(function)
    return compiled(*args)


@functools.lru_cache(maxsize=None)
def paper_modules() -> types.SimpleNamespace:
    """JAX, Haiku, flax.serialization and the paper's module classes.

    Returns a namespace with ``jax``, ``jnp``, ``hk``, ``serialization``,
    ``NaryLSTM``, ``NaryRNN``, ``ParallelRecursive`` and ``NTR`` (the same
    core under its earlier class name, pr-lstm commit 3c9b6d2).  The core's
    ``__call__`` returns the scanned states of every position (``LSTMState``
    for the lstm cell, the hidden array for the rnn cell); the paper's core
    returns ``states.hidden`` of them, which callers take themselves.
    """
    jax = pytest.importorskip("jax")
    hk = pytest.importorskip("haiku")
    serialization = pytest.importorskip("flax.serialization")
    jnp = jax.numpy
    jax.config.update("jax_platforms", "cpu")

    class NaryLSTM(hk.Module):
        """One LSTM layer over N child states: gates [i, g, o, f_1 .. f_N]."""

        def __init__(self, hidden_size, name=None):
            super().__init__(name=name)
            self.hidden_size = hidden_size

        def __call__(self, *children):
            count = len(children)
            hiddens = jnp.concatenate([child.hidden for child in children], axis=-1)
            blocks = jnp.split(hk.Linear((3 + count) * self.hidden_size)(hiddens), 3 + count,
                               axis=-1)
            input_gate, candidate, output_gate, *forgets = blocks
            # The published cell adds the forget terms with Python's sum(),
            # i.e. (0 + f_1 c_1 + f_2 c_2) after i*g: the same float32 order.
            cell = jax.nn.sigmoid(input_gate) * jnp.tanh(candidate) + sum(
                jax.nn.sigmoid(forget) * child.cell for forget, child in zip(forgets, children))
            hidden = jax.nn.sigmoid(output_gate) * jnp.tanh(cell)
            return hidden, hk.LSTMState(hidden, cell)

    class NaryRNN(hk.Module):
        """relu(Linear(concat(children)))."""

        def __init__(self, hidden_size, name=None):
            super().__init__(name=name)
            self.hidden_size = hidden_size

        def __call__(self, *children):
            hidden = jax.nn.relu(hk.Linear(self.hidden_size)(jnp.concatenate(children, axis=-1)))
            return hidden, hidden

    class ParallelRecursive(hk.Module):
        """Leaves from get_elems, merge from get_cell, combined by an associative scan."""

        def __init__(self, hidden_size, cell, num_layers, name=None):
            super().__init__(name=name)
            self.hidden_size, self.cell, self.num_layers = hidden_size, cell, num_layers

        def __call__(self, xs):
            merge = self.get_cell()
            return jax.lax.associative_scan(merge, self.get_elems(xs), axis=1)

        def get_cell(self):
            # Modules built here are named "<core>/~get_cell/nary_lstm[_k]"; the
            # first is the binary merge, the others the unary layers in order.
            cell_type = NaryLSTM if self.cell == "lstm" else NaryRNN
            layers = [jax.vmap(cell_type(self.hidden_size), in_axes=1, out_axes=1)
                      for _ in range(self.num_layers)]

            def merge(left, right):
                _, state = layers[0](left, right)
                for layer in layers[1:]:
                    _, state = layer(state)
                return state

            return merge

        def get_elems(self, xs):
            if self.cell == "rnn":
                return hk.Linear(self.hidden_size)(xs)
            input_gate, candidate, output_gate = jnp.split(
                hk.Linear(3 * self.hidden_size)(xs), 3, axis=-1)
            cell = jax.nn.sigmoid(input_gate) * jnp.tanh(candidate)
            return hk.LSTMState(jax.nn.sigmoid(output_gate) * jnp.tanh(cell), cell)

    class NTR(ParallelRecursive):
        """The same core under its earlier class name (pr-lstm commit 3c9b6d2)."""

    return types.SimpleNamespace(jax=jax, jnp=jnp, hk=hk, serialization=serialization,
                                 NaryLSTM=NaryLSTM, NaryRNN=NaryRNN,
                                 ParallelRecursive=ParallelRecursive, NTR=NTR)


def readout_model(hidden_size, output_size, cell, num_layers, core=None):
    """``hk.without_apply_rng(hk.transform(f))`` with ``f(x) = (logits, states)``:
    the core on ``x`` and the read-out ``hk.Linear(output_size)(relu(h))`` at
    every position; ``core`` defaults to ``ParallelRecursive``."""
    modules = paper_modules()
    jax, hk = modules.jax, modules.hk
    core = core or modules.ParallelRecursive

    def model(x):
        states = core(hidden_size, cell, num_layers)(x)
        hidden = states.hidden if cell == "lstm" else states
        return hk.Linear(output_size)(jax.nn.relu(hidden)), states

    return hk.without_apply_rng(hk.transform(model))


def nnch_tape(inputs: np.ndarray, output_length: int) -> np.ndarray:
    """The tape NNCH's ``make_model_with_empty_targets`` (no computation
    steps) feeds the model, in NumPy: the one-hot ``inputs`` ``(B, T, I)``
    with one more zero channel, then ``output_length`` blanks, each the
    one-hot of channel ``I``."""
    batch, length, size = inputs.shape
    padded = np.concatenate([inputs, np.zeros((batch, length, 1), inputs.dtype)], axis=-1)
    blanks = np.zeros((batch, output_length, size + 1), inputs.dtype)
    blanks[..., size] = 1
    return np.concatenate([padded, blanks], axis=1)


def nnch_model(output_length, hidden_size, output_size, single_output, cell="lstm",
               num_layers=2):
    """The model the paper trains: ``hk.transform`` of the core and read-out
    wrapped as NNCH's ``make_model_with_empty_targets`` (no computation
    steps) wraps it.

    ``output_length(input_length)`` is the task's number of output
    positions.  ``apply(params, rng, inputs)`` takes the raw one-hot inputs
    ``(B, T, input_size)`` and returns ``(B, output_length, output_size)``
    logits, or ``(B, output_size)`` when ``single_output``.
    """
    modules = paper_modules()
    jax, jnp, hk = modules.jax, modules.jnp, modules.hk

    def model(inputs):
        batch, length, size = inputs.shape
        count = output_length(length)
        # one extra one-hot channel; the blank output token is that channel
        padded = jnp.concatenate([inputs, jnp.zeros((batch, length, 1), inputs.dtype)], axis=-1)
        blanks = jax.nn.one_hot(jnp.full((batch, count), size), size + 1, dtype=inputs.dtype)
        tape = jnp.concatenate([padded, blanks], axis=1)
        states = modules.ParallelRecursive(hidden_size, cell, num_layers)(tape)
        hidden = states.hidden if cell == "lstm" else states
        logits = hk.Linear(output_size)(jax.nn.relu(hidden))[:, -count:]
        return jnp.squeeze(logits, axis=1) if single_output else logits

    return hk.transform(model)


class PaperTraining:
    """The paper's training state and jitted step (see the module docstring).

    Args:
      model: a :func:`nnch_model`.
      params: the Haiku parameter tree to start from.
      learning_rate, max_grad_norm: as ``ClassicTrainingParams`` (1e-3 in
        the paper's runs, 1.0).

    ``step(inputs, targets, mask)`` applies one update and returns ``(loss,
    accuracy)`` of the batch before the update.  Shapes that have been seen
    reuse their compiled update (one compilation per input length).
    """

    def __init__(self, model, params, learning_rate=1e-3, max_grad_norm=1.0):
        modules = paper_modules()
        optax = pytest.importorskip("optax")
        jax, jnp = modules.jax, modules.jnp
        self.jax = jax
        self.optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm),
                                     optax.adam(learning_rate))
        self.params = params
        self.opt_state = self.optimizer.init(params)
        self.rng = jax.random.PRNGKey(0)

        def loss_and_accuracy(params, rng, inputs, targets, mask):
            outputs = model.apply(params, rng, inputs)
            loss = jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(outputs), axis=-1))
            correct = (jnp.argmax(outputs, -1) == jnp.argmax(targets, -1)).astype(jnp.float32)
            return loss, jnp.sum(mask * correct) / jnp.sum(mask)

        def update(params, opt_state, rng, inputs, targets, mask):
            (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(
                params, rng, inputs, targets, mask)
            updates, opt_state = self.optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss, accuracy

        self._update = update
        self._compiled = {}

    def step(self, inputs, targets, mask):
        args = (self.params, self.opt_state, self.rng, inputs, targets, mask)
        key = tuple(np.shape(value) for value in (inputs, targets, mask))
        if key not in self._compiled:
            try:
                self._compiled[key] = self.jax.jit(self._update).lower(*args).compile(
                    FAST_COMPILE)
            except Exception:  # noqa: BLE001 - an XLA without these options
                self._compiled[key] = self.jax.jit(self._update)
        self.params, self.opt_state, loss, accuracy = self._compiled[key](*args)
        return float(loss), float(accuracy)


def haiku_params_from_spec(spec_params: dict, like: dict, mapping: dict) -> dict:
    """A Haiku tree shaped like ``like`` holding ``spec_params`` (SPEC.md §1
    names), placed by ``mapping`` (``{SPEC name: "module/tensor"}``, as
    :func:`treesched.haiku_import.map_haiku_params` reports it)."""
    tree = {module: dict(tensors) for module, tensors in like.items()}
    for name, source in mapping.items():
        module, tensor = source.rsplit("/", 1)
        value = np.asarray(spec_params[name])
        assert value.shape == tuple(like[module][tensor].shape), (name, source)
        tree[module][tensor] = value.copy()
    return tree


def spec_params_from_haiku(tree: dict, mapping: dict) -> dict:
    """The inverse of :func:`haiku_params_from_spec`: ``{SPEC name: np.ndarray}``."""
    out = {}
    for name, source in mapping.items():
        module, tensor = source.rsplit("/", 1)
        out[name] = np.asarray(tree[module][tensor])
    return out

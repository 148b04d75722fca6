"""The cell interface: what a tree-structured recurrent cell must provide.

A cell is three learned maps over *rows* (rows are independent, so a whole
level of a schedule, batch x merges-in-level, runs as one call):

* the leaf encoder  x -> state                     (every position)
* the merge         (left state, right state) -> state, i.e. the binary
                    merge m(L, R) followed by ``num_layers - 1`` unary
                    refinement layers (SPEC section 1)

and, for each, a hand-written backward. A state is a tuple of ``(R, H)``
arrays in ``state_names`` order; a ``dstate`` is a tuple of the same length
whose entries are the loss gradients w.r.t. those arrays, or None for zero.

Parameters live in a flat dict keyed ``"leaf/w"``, ``"merge/b"``,
``"unary_1/w"``, ... (SPEC section 1). Backward functions return *fresh*
gradient dicts for exactly the parameters they touched; summing over calls
(levels) is the caller's job.

Caches hold references, not copies: the arrays passed to a forward (x, the
operand states) must not be overwritten before the matching backward.

``num_layers`` is fixed per cell instance: ``Cell(num_layers)``. It is the
number of layers in one merge (1 binary + ``num_layers - 1`` unary), so
1, 2 (the default, the paper's PR-LSTM) and 3 are the paper's 0R / main / 2R.
"""

from abc import ABC, abstractmethod

from ..errors import TreeschedError


class Cell(ABC):
    """Abstract tree cell. Subclasses set ``name`` and ``state_names``."""

    name: str = ""
    state_names: tuple = ()

    def __init__(self, num_layers=2):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise TreeschedError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        self.num_layers = num_layers
        # Parameter names of the unary layers, built once (not per call).
        self._unary_names = tuple((f"unary_{k}/w", f"unary_{k}/b") for k in range(1, num_layers))
        # A params dict holding this name was built for more layers than we have.
        self._extra_unary = f"unary_{num_layers}/w"

    def __repr__(self):
        return f"{type(self).__name__}(num_layers={self.num_layers})"

    def _check_layers(self, params):
        if self._extra_unary in params:
            raise TreeschedError(
                f"params contain {self._extra_unary!r} but this {self.name} cell has "
                f"num_layers={self.num_layers} (unary layers 1..{self.num_layers - 1})"
            )

    @abstractmethod
    def param_shapes(self, input_size, hidden_size, num_layers=None):
        """``{name: shape}`` for the leaf, merge and unary params (not the head).

        ``num_layers`` defaults to this cell's own.
        """

    @abstractmethod
    def leaf_forward(self, params, x, need_cache=True):
        """``x`` (R, D) -> ``(state, cache)``; cache is None if not need_cache."""

    @abstractmethod
    def leaf_backward(self, params, cache, dstate, need_dx=True):
        """-> ``(grads, dx)``: grads for leaf/*, dx (R, D) (None if not need_dx)."""

    @abstractmethod
    def merge_forward(self, params, left_state, right_state, need_cache=True):
        """m(L, R) then the unary layers, row-wise -> ``(state, cache)``."""

    @abstractmethod
    def merge_backward(self, params, cache, dstate):
        """-> ``(dleft_state, dright_state, grads)``; grads for merge/* and unary_k/*."""

"""The reference backend: the executor's primitives as plain array operations.

Every primitive is a few NumPy expressions over the layer math of
``treesched.ops`` (``ops.gated``, ``ops.affine``), so the reference computes
exactly what the ops define and is the ground truth every other backend is
tested against.  It works in float32 and float64 and with any array module
that has the NumPy API (``xp``).  Gathers are fancy indexing, the operand
gradient accumulation a segment sum over the plan's consumer table
(``add.reduceat``), so results never depend on timing.
"""

from __future__ import annotations

import numpy as np

from treesched.executor import Backend
from treesched.ops import affine, gated


class NumpyBackend(Backend):
    """Reference backend over ``xp`` (NumPy by default)."""

    name = "numpy"

    def __init__(self, xp=np, max_workspaces: int = 8, max_workspace_bytes: int = 4 << 30):
        super().__init__(max_workspaces, max_workspace_bytes)
        self.xp = xp

    # ----------------------------------------------------- memory, staging
    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype)

    def index(self, table):
        return self.xp.asarray(table)

    def load_rows(self, x, rows):
        length, batch = x.shape[1], x.shape[0]
        rows.reshape(length, batch, -1)[...] = x.transpose(1, 0, 2)

    def stage(self, workspace, name, value):
        return self.xp.ascontiguousarray(value)

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _rows(store, index):
        """``store[index[j], b]`` as rows ``j * B + b``."""
        return store[index].reshape(-1, store.shape[-1])

    @staticmethod
    def _write(values, store, index, batch):
        if store is not None:
            store[index] = values.reshape(len(index), batch, values.shape[-1])

    @staticmethod
    def _write_answers(values, answer_store, answer_index, batch):
        merges = np.flatnonzero(np.asarray(answer_index) >= 0)
        if len(merges):
            by_merge = values.reshape(-1, batch, values.shape[-1])
            answer_store[:, answer_index[merges]] = by_merge[merges].transpose(1, 0, 2)

    # ------------------------------------------------------------ forward
    def gather_pairs(self, store, left, right, out):
        hidden = store.shape[-1]
        out[:, :hidden] = self._rows(store, left)
        out[:, hidden:] = self._rows(store, right)

    def gated_forward(self, X, weight, bias, act, batch, cells, h_out, c_out, out_index,
                      answers=None, keep=True):
        hidden = weight.shape[1] // (3 + len(cells))
        gates = X @ weight
        gated.activations(gates, bias, hidden, out=gates)
        sources = [self._rows(store, index) for store, index in cells]
        c = gated.cell_state(gates, sources, hidden)
        h = gated.hidden_state(gates, c, hidden)
        if keep:
            act[...] = gates
        self._write(h, h_out, out_index, batch)
        self._write(c, c_out, out_index, batch)
        if answers is not None:
            answer_h, answer_c, answer_index = answers
            self._write_answers(h, answer_h, answer_index, batch)
            self._write_answers(c, answer_c, answer_index, batch)

    def affine_forward(self, X, weight, bias, out, batch, relu, h_out=None, out_index=None,
                       answers=None):
        affine.forward(X, weight, bias, relu, out=out)
        self._write(out, h_out, out_index, batch)
        if answers is not None:
            self._write_answers(out, answers[0], answers[1], batch)

    def copy_answers(self, store, locations, out):
        out[...] = store[locations].transpose(1, 0, 2)

    def zero(self, array):
        array[...] = 0

    # ----------------------------------------------------------- backward
    def scatter_answers(self, values, locations, store):
        store[locations] = 0 if values is None else values.transpose(1, 0, 2)

    def zero_locations(self, store, locations):
        store[locations] = 0

    def gated_cells(self, act, batch, cells, c_out):
        sources = [self._rows(store, index) for store, index in cells]
        gated.cell_state(act, sources, c_out.shape[1], out=c_out)

    def hidden_from_cells(self, act, c, h_out):
        gated.hidden_state(act, c, c.shape[1], out=h_out)

    def gated_backward(self, act, c, batch, cells, dh, dc, dcells):
        sources = [self._rows(store, index) for store, index in cells]
        _, gradients = gated.preactivation_gradient(act, c, sources, dh, dc, out=act)
        for out, value in zip(dcells, gradients):
            out[...] = value

    def relu_backward(self, dh, h):
        affine.preactivation_gradient(dh, h, True, out=dh)

    def input_gradient(self, dA, weight, out):
        self.xp.matmul(dA, weight.T, out=out)

    def weight_gradient(self, X, dA, grad_weight_t, grad_bias, accumulate):
        if accumulate:
            grad_weight_t += dA.T @ X
            grad_bias += dA.sum(axis=0)
        else:
            self.xp.matmul(dA.T, X, out=grad_weight_t)
            grad_bias[...] = dA.sum(axis=0)

    def accumulate_operands(self, level, d_pair, batch, dh_store, dc_pair=None, dc_store=None):
        xp = self.xp
        hidden = dh_store.shape[-1]
        merge, side = level.consumers >> 1, level.consumers & 1
        starts = level.consumer_ptr[:-1]
        first = level.first_gradient
        by_operand = d_pair.reshape(level.width, batch, 2, hidden)
        sums = xp.add.reduceat(by_operand[merge, :, side], starts, axis=0)
        targets = level.targets
        dh_store[targets[first]] = sums[first]
        dh_store[targets[~first]] += sums[~first]
        if dc_store is None:
            return
        if dc_pair is None:
            dc_store[targets[first]] = 0
            return
        cells = xp.stack([d.reshape(level.width, batch, hidden) for d in dc_pair], axis=2)
        sums = xp.add.reduceat(cells[merge, :, side], starts, axis=0)
        dc_store[targets[first]] = sums[first]
        dc_store[targets[~first]] += sums[~first]


__all__ = ["NumpyBackend"]

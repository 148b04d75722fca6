"""treesched.ops: the model's operations, forward and backward by hand.

Cells described by their layers (``cell``), the layer math (``gated``: the
N-ary LSTM layer; ``affine``: the PR-RNN's layer), the read-out head and the
loss.  Every op works on NumPy or CuPy arrays (``array_module``) in float32
or float64, keeping the input dtype.  See docs/backward.md for the
derivations.
"""

from .cell import Cell, Layer
from .head import head_backward, head_forward, head_param_shapes
from .loss import softmax_cross_entropy
from .lstm import LSTMCell
from .registry import cell_names, get_cell, register_cell, unregister_cell
from .rnn import RNNCell
from .xp import array_module, sigmoid

__all__ = [
    "Cell",
    "Layer",
    "LSTMCell",
    "RNNCell",
    "get_cell",
    "cell_names",
    "register_cell",
    "unregister_cell",
    "head_forward",
    "head_backward",
    "head_param_shapes",
    "softmax_cross_entropy",
    "array_module",
    "sigmoid",
]

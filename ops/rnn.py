"""The PR-RNN cell: the paper's ablation (pr-lstm, src/pr_lstm/haiku/model.py
and layers.py, ``NaryRNN``).  The state is h alone; every layer is the affine
layer of ``ops.affine``:

    leaf encoder : h = x @ leaf/w + leaf/b                          (no nonlinearity)
    merge        : h = relu(concat(h_l, h_r) @ merge/w + merge/b)
    unary layer k: h = relu(h @ unary_k/w + unary_k/b)

    leaf/w (D, H)   merge/w (2H, H)   unary_k/w (H, H)   biases (H,)
"""

from .cell import Cell, Layer


class RNNCell(Cell):
    """PR-RNN cell: state (h,); linear leaf, relu merge and unary layers."""

    name = "rnn"
    kind = "affine"

    def build_layers(self, num_layers):
        return (Layer("leaf", "affine", "input"),
                Layer("merge", "affine", "pair", relu=True),
                *(Layer(f"unary_{k}", "affine", "below", relu=True)
                  for k in range(1, num_layers)))

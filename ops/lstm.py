"""The PR-LSTM cell (SPEC section 1): every layer is the N-ary gated layer of
``ops.gated`` (the paper's ``NaryLSTM``), differing only in what it reads and
how many previous cells it gates:

    leaf encoder : N = 0, X = x,                 W = leaf/w    (D, 3H)
    merge        : N = 2, X = concat(h_l, h_r),  W = merge/w   (2H, 5H), c_1 = c_l, c_2 = c_r
    unary layer k: N = 1, X = h,                 W = unary_k/w (H, 4H),  c_1 = c

docs/backward.md derives the backward.
"""

from .cell import Cell, Layer


class LSTMCell(Cell):
    """PR-LSTM cell: state (h, c); gated leaf encoder, gated merge, gated unary layers."""

    name = "lstm"
    kind = "gated"

    def build_layers(self, num_layers):
        return (Layer("leaf", "gated", "input"),
                Layer("merge", "gated", "pair", num_prev=2),
                *(Layer(f"unary_{k}", "gated", "below", num_prev=1)
                  for k in range(1, num_layers)))

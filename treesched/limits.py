"""Upper bounds of every size a user can pass, checked before anything is allocated.

A bound is far above anything the model is run at (the paper trains at
lengths up to 40 and tests up to 500; its hidden size is 256), and low
enough that the check is reached before an allocation can take the
machine's memory: ``compile(10**7)`` alone builds ~5 GB of tables, and an
unbounded ``--lengths 41-10**23`` would build a list of 10^23 lengths.
Whether a size within its bound fits is a separate question, answered by
:mod:`treesched.memory` against the memory actually available.

The bounds (each is also named in the error that refuses a size above it):
"""

from __future__ import annotations

#: positions of one sequence (``compile``, the length of ``x``, test lengths,
#: ``--max-length``, ``--context``): the schedule tables of 2**20 positions
#: take about 0.5 GB.
MAX_LENGTH = 1 << 20
#: hidden size ``H``: a merge weight is ``2H x 5H``, 5.4 GB in float32 at 2**14.
MAX_HIDDEN = 1 << 14
#: input features ``D`` and output classes ``O`` (a character vocabulary fits).
MAX_FEATURES = 1 << 20
#: merge layers of a cell (1 binary + unary refinements).
MAX_LAYERS = 64
#: sequences in one batch (training ``--batch``, ``--eval-batch``, compile ``--batch``).
MAX_BATCH = 1 << 20
#: training steps of one run (the benchmark's protocol uses 10**6).
MAX_STEPS = 10 ** 9
#: test lengths of one evaluation (41..500 is 460).
MAX_TEST_LENGTHS = 100_000
#: sequences per test length in an evaluation (the protocol's is 512).
MAX_SAMPLES = 10 ** 7
#: characters ``treesched generate`` draws in one call.
MAX_TOKENS = 10 ** 8
#: seeds (NumPy's SeedSequence takes any non-negative int; JSON and the
#: run files keep them exact up to 2**63 - 1).
MAX_SEED = 2 ** 63 - 1
#: ``--checkpoint-every``, ``--log-every``, ``--eval-every``, ``--stride``.
MAX_INTERVAL = MAX_STEPS

__all__ = ["MAX_LENGTH", "MAX_HIDDEN", "MAX_FEATURES", "MAX_LAYERS", "MAX_BATCH", "MAX_STEPS",
           "MAX_TEST_LENGTHS", "MAX_SAMPLES", "MAX_TOKENS", "MAX_SEED", "MAX_INTERVAL"]

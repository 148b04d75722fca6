"""A tiny data-parallel training in which one rank fails on purpose.

Started under ``mpiexec`` by ``tests/test_distributed.py`` (not a test
itself)::

    mpiexec -n 2 python tests/distributed_worker.py OUT --fail kill --rank 1 --at-step 5

Trains parity_check (hidden 8, batch 16, lengths 1..10, numpy backend,
checkpoints every 3 steps) for ``--steps`` steps into ``OUT``.  Rank
``--rank`` sends itself SIGKILL (``--fail kill``: it dies) or SIGSTOP
(``--fail stop``: it hangs) as it starts computing step ``--at-step``.  The
training runs inside ``ProcessGroup.stop_job_on_error``, as the command
line's does, so what the job prints and how it ends is what a user sees.
"""

from __future__ import annotations

import argparse
import os
import signal

from treesched.distributed import world
from treesched.model import PRLSTM
from treesched.training import TrainConfig, train

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--fail", choices=sorted(SIGNALS), required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--at-step", type=int, default=5)
    args = parser.parse_args()

    group = world()
    computing = PRLSTM.loss_and_grads
    calls = []

    def failing_loss_and_grads(model, *arrays, **options):
        calls.append(None)
        if group.rank == args.rank and len(calls) == args.at_step:
            os.kill(os.getpid(), SIGNALS[args.fail])
        return computing(model, *arrays, **options)

    PRLSTM.loss_and_grads = failing_loss_and_grads
    config = TrainConfig(task="parity_check", steps=args.steps, hidden=8, batch=16,
                         max_length=10)
    with group.stop_job_on_error():
        train(config, args.out, backend="numpy", checkpoint_every=3, log_every=1,
              progress=False, plot=False, group=group)


if __name__ == "__main__":
    main()

"""Data-parallel training in a loop of one's own, with ``treesched.distributed``.

    python examples/distributed_training.py              # one process
    mpiexec -n 2 python examples/distributed_training.py # two ranks (pip install 'treesched[mpi]')

Every rank draws the same global batch of parity_check sequences from a
generator seeded alike, keeps its rows (``ShardedBatchSampler``), and
computes the mean loss and gradients of those rows; each rank weights its
gradients by its share of the batch and ``allreduce_grads`` sums them in
rank order, so every rank holds the gradients of the whole batch and takes
the same Adam step.  Rank 0 prints the loss every 5 steps: the same, to
float32 rounding, with any number of ranks, because the ranks together see
exactly the single process's batches.  (``treesched train`` does the same
inside its loop: ``ProcessGroup.data_parallel_loss_and_grads``.)  A few
seconds on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from treesched import PRLSTM
from treesched.distributed import ShardedBatchSampler, allreduce_grads, world
from treesched.optim import Adam
from treesched.training_data import FormalTaskData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="global batch, split over ranks")
    args = parser.parse_args()

    group = world()   # MPI.COMM_WORLD under mpiexec/srun, else this process alone
    data = FormalTaskData("parity_check", max_length=12)
    model = PRLSTM(data.input_size, 16, data.output_size, backend="numpy", seed=0)
    optimizer = Adam(lr=1e-3, clip=1.0)
    optimizer.init(model.params)
    sampler = ShardedBatchSampler(data, args.batch, group.rank, group.size)
    rng = np.random.default_rng(0)   # seeded alike on every rank: the same global batches

    for step in range(1, args.steps + 1):
        shard = sampler.draw(rng)
        loss, grads, _ = model.loss_and_grads(shard.batch.x, shard.batch.targets)
        # the global loss is the mean over all rows: each shard weighs by its share
        weighted = {name: value * value.dtype.type(shard.share) for name, value in grads.items()}
        grads = allreduce_grads(weighted, group.comm)
        total_loss = sum(group.allgather_json(float(loss) * shard.share))
        optimizer.step(model.params, grads)
        if group.is_root and step % 5 == 0:
            print(f"step {step} loss {total_loss:.7f}")

    digest = hashlib.blake2b(digest_size=8)
    for value in model.params.numpy().values():
        digest.update(value.tobytes())
    if group.is_root:
        ranks = f"{group.size} rank" + ("s" if group.size > 1 else "")
        print(f"{ranks}, global batch {args.batch}: parameter digest {digest.hexdigest()} "
              f"(bitwise the same for the same number of ranks)")


if __name__ == "__main__":
    main()

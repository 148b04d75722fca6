"""Data-parallel training and sharded evaluation with real MPI ranks.

Every multi-rank test starts ``mpiexec -n 2 python …`` in a subprocess
(with a timeout, so a hang fails the test instead of the suite) and compares
what the ranks wrote with a single process's run made here, in-process.
The sizes are tiny (hidden 8, batch 16, a few steps) so the whole file takes
seconds.  The tests that need ranks skip, with the reason, where mpi4py or
``mpiexec`` is missing (``pip install 'treesched[mpi]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from treesched import distributed
from treesched.distributed import (ProcessGroup, RanksFailed, ShardedBatchSampler,
                                   allreduce_grads, shard_batch, shard_bounds)
from treesched.errors import TreeschedError
from treesched.evaluation import METRICS_FILE, evaluate_run
from treesched.model import PRLSTM
from treesched.training import MODEL_FILE, STATE_FILE, TrainConfig, load_state, read_log, train
from treesched.training_data import FormalTaskData

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
EXAMPLE = ROOT / "examples" / "distributed_training.py"
STEPS = 6
TRAIN = ["--task", "parity_check", "--hidden", "8", "--batch", "16", "--max-length", "10",
         "--backend", "numpy", "--checkpoint-every", "3", "--log-every", "1", "--quiet"]
EVAL = ["--lengths", "11-30", "--stride", "3", "--samples", "12", "--eval-batch", "5",
        "--backend", "numpy", "--quiet"]
LAUNCH_TIMEOUT = 120   # seconds; a run here takes 1-3


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"   # the MPI wheel's, matching mpi4py
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def _why_no_mpi() -> str | None:
    reason = distributed.mpi_unavailable_reason()
    if reason is not None:
        return f"{reason} (pip install 'treesched[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec found (pip install 'treesched[mpi]' brings MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_why_no_mpi() is not None, reason=str(_why_no_mpi()))


def launch(ranks: int, *arguments, timeout: float = LAUNCH_TIMEOUT, cwd=None, **environment):
    """``mpiexec -n ranks python arguments…``: the finished process (stdout, stderr, returncode)."""
    env = {name: value for name, value in os.environ.items()
           if name not in distributed.LAUNCHER_VARIABLES}
    # one thread per rank: two ranks share the two cores of CI
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", **environment)
    return subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, *map(str, arguments)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd or ROOT)


def cli(ranks: int, *arguments, **environment):
    return launch(ranks, "-m", "treesched.cli.main", *arguments, **environment)


def params(folder) -> dict:
    return PRLSTM.load(Path(folder) / MODEL_FILE).params.numpy()


def assert_params_close(left, right):
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_allclose(left[name], right[name], rtol=2e-5, atol=2e-6, err_msg=name)


def single_process_run(out, steps=STEPS, stop_at=None):
    config = TrainConfig(task="parity_check", steps=steps, hidden=8, batch=16, max_length=10)
    return train(config, out, backend="numpy", checkpoint_every=3, log_every=1, progress=False,
                 plot=False, stop_at=stop_at, group=ProcessGroup(None))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: parity_check, 6 steps, in this process."""
    folder = tmp_path_factory.mktemp("distributed") / "one"
    single_process_run(folder)
    return folder


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The same run by ``mpiexec -n 2 treesched train``."""
    if _why_no_mpi() is not None:
        pytest.skip(_why_no_mpi())
    folder = tmp_path_factory.mktemp("distributed") / "two"
    result = cli(2, "train", *TRAIN, "--steps", STEPS, "--out", folder)
    assert result.returncode == 0, result.stderr
    return folder, result


# ----------------------------------------------------------- no MPI needed
def test_shard_bounds_cover_the_rows_in_rank_order():
    for total, size in ((16, 2), (10, 3), (7, 7), (128, 5)):
        bounds = [shard_bounds(total, rank, size) for rank in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_sharded_sampler_splits_exactly_the_single_process_batch():
    data = FormalTaskData("parity_check", 10)
    whole = data.draw(np.random.default_rng(3), 10)
    shards = [ShardedBatchSampler(data, 10, rank, 3).draw(np.random.default_rng(3))
              for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate([s.batch.x for s in shards]), whole.x)
    np.testing.assert_array_equal(np.concatenate([s.batch.targets for s in shards]),
                                  whole.targets)
    assert [s.share for s in shards] == [0.4, 0.3, 0.3]
    with pytest.raises(TreeschedError, match="cannot be split over 3 ranks"):
        shard_batch(data.draw(np.random.default_rng(0), 2), 0, 3)


def test_single_process_group_leaves_gradients_untouched():
    group = ProcessGroup(None)
    assert (group.rank, group.size, group.is_root, group.is_distributed) == (0, 1, True, False)
    grads = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    summed = allreduce_grads(grads, None)
    assert summed["w"] is grads["w"]
    assert group.allgather_json({"a": 1.5}) == [{"a": 1.5}]
    assert group.owns(0) and group.owns(7)
    group.check_replicas(grads, 100)   # nothing to compare with
    with pytest.raises(RanksFailed, match="broken"):
        group.agree("broken")


def test_without_a_launcher_the_world_is_this_process(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_mpi()
    assert distributed.launcher_size({"PMI_SIZE": "4"}) == 4
    assert distributed.launcher_size({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}) == 8
    # the batch script of an sbatch job is a step numbered near 2**32, not a launch
    assert distributed.launcher_size({"SLURM_STEP_ID": "4294967294",
                                      "SLURM_STEP_NUM_TASKS": "1"}) is None


def test_srun_tasks_without_mpi_are_refused(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setattr(distributed, "_WORLD", None)
    with pytest.raises(TreeschedError, match="srun --mpi=pmix"):
        distributed.world()


def test_host_arrays_travel_through_host_buffers(monkeypatch):
    assert distributed.gradient_transport(np.zeros(3, np.float32))[0] == "host"
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "soon")
    with pytest.raises(TreeschedError, match="TREESCHED_MPI_TIMEOUT"):
        distributed.collective_timeout()


def test_gpu_transport_choice_follows_the_mpi_library(monkeypatch):
    """The selection for CuPy arrays, with a stand-in array module (no GPU here)."""
    class FakeDeviceArray:
        pass

    monkeypatch.setattr(distributed, "array_module", lambda array: object())
    monkeypatch.setattr(distributed, "mpi_cuda_aware", lambda: False)
    assert distributed.gradient_transport(FakeDeviceArray())[0] == "host"
    monkeypatch.setenv(distributed.GPU_TRANSPORT_VARIABLE, "cuda-aware-mpi")
    with pytest.raises(TreeschedError, match="does not report CUDA support"):
        distributed.gradient_transport(FakeDeviceArray())
    monkeypatch.setattr(distributed, "mpi_cuda_aware", lambda: True)
    assert distributed.gradient_transport(FakeDeviceArray())[0] == "cuda-aware-mpi"
    monkeypatch.setenv(distributed.GPU_TRANSPORT_VARIABLE, "host")
    assert distributed.gradient_transport(FakeDeviceArray())[0] == "host"
    monkeypatch.setenv(distributed.GPU_TRANSPORT_VARIABLE, "carrier-pigeon")
    with pytest.raises(TreeschedError, match="must be one of"):
        distributed.gradient_transport(FakeDeviceArray())


# ------------------------------------------------------------- real ranks
@needs_mpi
def test_two_ranks_train_to_the_single_process_parameters(one_process, two_ranks):
    folder, result = two_ranks
    assert_params_close(params(folder), params(one_process))
    mine, reference = read_log(folder / "train_log.jsonl"), read_log(one_process / "train_log.jsonl")
    assert [r["step"] for r in mine] == list(range(1, STEPS + 1))
    for ours, theirs in zip(mine, reference):
        assert ours["length"] == theirs["length"]   # the same data, step by step
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1 / 16)
    config = json.loads((folder / "config.json").read_text())
    assert config["data_parallel"]["ranks"] == 2
    assert config["data_parallel"]["gradient_transport"] == "host"
    # rank 0 alone speaks: one start line, one summary line
    assert result.stdout.count("parity_check: step 6/6") == 1, result.stdout


@needs_mpi
def test_the_same_rank_count_gives_bitwise_the_same_run(two_ranks, tmp_path):
    folder, _ = two_ranks
    again = tmp_path / "again"
    result = cli(2, "train", *TRAIN, "--steps", STEPS, "--out", again)
    assert result.returncode == 0, result.stderr
    first, second = params(folder), params(again)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@needs_mpi
def test_a_single_process_checkpoint_resumes_on_two_ranks(one_process, tmp_path):
    out = tmp_path / "resumed"
    single_process_run(out, stop_at=3)
    assert int(load_state(out / STATE_FILE)[0]["step"]) == 3
    result = cli(2, "train", "--out", out, "--resume", "--backend", "numpy", "--log-every", "1",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    assert_params_close(params(out), params(one_process))
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == list(range(1, STEPS + 1))


@needs_mpi
def test_sharded_evaluation_writes_the_single_process_metrics(two_ranks, tmp_path):
    folder, _ = two_ranks
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    result = cli(2, "eval", folder, *EVAL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("score") == 1, result.stdout
    evaluate_run(copy, range(11, 31, 3), samples=12, eval_batch=5, backend="numpy",
                 plot=False, group=ProcessGroup(None))
    sharded = json.loads((folder / METRICS_FILE).read_text())
    single = json.loads((copy / METRICS_FILE).read_text())
    for metrics in (sharded, single):
        metrics.pop("seconds")
    assert sharded == single


@needs_mpi
def test_a_killed_rank_ends_the_job_and_leaves_the_checkpoint(one_process, tmp_path):
    out = tmp_path / "killed"
    started = time.monotonic()
    result = launch(2, WORKER, out, "--fail", "kill", "--rank", 1, "--at-step", 5, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - started < 30, "the surviving rank was not stopped promptly"
    assert int(load_state(out / STATE_FILE)[0]["step"]) == 3   # the last checkpoint, intact
    resumed = train(None, out, resume=True, backend="numpy", progress=False, plot=False,
                    group=ProcessGroup(None))
    assert resumed.step == STEPS
    assert_params_close(params(out), params(one_process))


@needs_mpi
def test_a_hanging_rank_times_out_with_a_clear_message(tmp_path):
    out = tmp_path / "hung"
    result = launch(2, WORKER, out, "--fail", "stop", "--rank", 1, "--at-step", 5, timeout=60,
                    TREESCHED_MPI_TIMEOUT="2")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "rank 0 of 2 waited 2 s for the other ranks" in errors[0]
    assert "Traceback" not in result.stderr
    assert int(load_state(out / STATE_FILE)[0]["step"]) == 3


@needs_mpi
def test_an_error_every_rank_meets_is_printed_once(two_ranks):
    folder, _ = two_ranks
    result = cli(2, "train", *TRAIN, "--steps", STEPS, "--out", folder)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "already holds a run" in lines[0]


@needs_mpi
def test_example_trains_alike_on_one_and_two_ranks():
    one = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT, cwd=ROOT,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    two = launch(2, EXAMPLE)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)

    def losses(output):
        return [float(line.split()[-1]) for line in output.splitlines()
                if line.startswith("step")]

    assert len(losses(one.stdout)) == 4
    np.testing.assert_allclose(losses(two.stdout), losses(one.stdout), rtol=1e-5)
    assert "2 ranks" in two.stdout and "1 rank" in one.stdout

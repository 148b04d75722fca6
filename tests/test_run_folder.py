"""Run folders and outputs that survive people: no writing over links,
FIFOs or read-only files, leftovers of killed writes removed, checkpoints
that belong to their run, a model never ahead of its training state, torn
log lines skipped, and one writer per run folder (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from treesched.cli.main import cli
from treesched.errors import TreeschedError
from treesched.evaluation import evaluate_run, load_run_model
from treesched.fileio import write_text
from treesched.runlock import LOCK_FILE, RunFolderBusy, RunLock
from treesched.training import (LOG_FILE, MODEL_FILE, STATE_FILE, TrainConfig, load_state,
                                read_log, train)

TINY = dict(hidden=4, batch=4, max_length=6)
TRAIN = [sys.executable, "-m", "treesched.cli.main", "train"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def tiny_run(folder, steps=6, checkpoint_every=2, seed=0, lr=1e-3, **options):
    config = TrainConfig("parity_check", steps=steps, seed=seed, lr=lr, **TINY)
    return train(config, folder, backend="numpy", progress=False, plot=False,
                 checkpoint_every=checkpoint_every, log_every=1, **options)


# ------------------------------------------------------------ output files
def test_output_onto_a_symlink_is_refused_without_force(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    result = invoke("compile", "-n", "5", "-o", link)
    assert result.exit_code == 1 and "symbolic link" in result.output
    assert link.is_symlink() and target.read_text() == "keep me"
    result = invoke("compile", "-n", "5", "-o", link, "--force")
    assert result.exit_code == 0 and not link.is_symlink() and "schedule" in link.read_text()
    assert target.read_text() == "keep me"


def test_output_onto_a_fifo_is_refused_and_the_fifo_stays(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in (("compile", "-n", "5", "-o", fifo),
                 ("parity", "--backend", "numpy", "--length", "3", "--batch", "1",
                  "--json", fifo)):
        result = invoke(*args)
        assert result.exit_code == 1 and "FIFO" in result.output, result.output
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(TreeschedError, match="FIFO"):
        write_text(fifo, "x")


def test_read_only_output_is_refused_and_force_keeps_its_mode(tmp_path):
    path = tmp_path / "schedule.txt"
    path.write_text("old")
    path.chmod(0o444)
    result = invoke("compile", "-n", "5", "-o", path)
    assert result.exit_code == 1 and "read-only" in result.output
    assert path.read_text() == "old" and stat.S_IMODE(path.stat().st_mode) == 0o444
    assert invoke("compile", "-n", "5", "-o", path, "--force").exit_code == 0
    assert "schedule" in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o444
    msgpack_out = tmp_path / "model.npz"
    msgpack_out.write_text("old")
    msgpack_out.chmod(0o444)
    result = invoke("import-checkpoint", tmp_path / "missing.msgpack", "--out", msgpack_out)
    assert result.exit_code == 1 and "read-only" in result.output
    assert list(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# -------------------------------------------------------------- run folders
def test_leftover_temporary_files_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, steps=4, stop_at=2)
    orphans = [run / ".model.npz.ab12cd34.tmp", run / ".train_state.npz.zz99yy88.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a write")
    keep = run / ".hidden-notes.txt"       # not a treesched temporary file
    keep.write_text("mine")
    tiny_run(run, steps=4, resume=True)
    assert not any(orphan.exists() for orphan in orphans) and keep.exists()
    assert not (run / LOCK_FILE).exists()


def test_resume_refuses_a_training_state_of_another_run(tmp_path):
    tiny_run(tmp_path / "a", steps=4, stop_at=2, lr=1e-3, seed=0)
    tiny_run(tmp_path / "b", steps=4, stop_at=2, lr=3e-3, seed=5)
    tiny_run(tmp_path / "c", steps=4, stop_at=2, lr=1e-3, seed=0)   # same settings as a
    shutil.copy(tmp_path / "b" / STATE_FILE, tmp_path / "a" / STATE_FILE)
    with pytest.raises(TreeschedError, match="belongs to another run"):
        tiny_run(tmp_path / "a", steps=4, resume=True)
    shutil.copy(tmp_path / "c" / STATE_FILE, tmp_path / "a" / STATE_FILE)
    with pytest.raises(TreeschedError, match="run id"):
        tiny_run(tmp_path / "a", steps=4, resume=True)


def test_eval_refuses_a_model_of_another_run_of_the_same_sizes(tmp_path):
    tiny_run(tmp_path / "a", steps=2)
    tiny_run(tmp_path / "b", steps=2, seed=1)
    shutil.copy(tmp_path / "b" / MODEL_FILE, tmp_path / "a" / MODEL_FILE)
    with pytest.raises(TreeschedError, match="does not belong to this run"):
        load_run_model(tmp_path / "a")
    result = invoke("eval", tmp_path / "a", "--lengths", "7", "--samples", "2", "--quiet",
                    "--backend", "numpy")
    assert result.exit_code == 1 and "does not belong" in result.output
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_a_model_one_checkpoint_behind_its_state_is_never_used(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, steps=4, checkpoint_every=2, stop_at=2)
    older_model = (run / MODEL_FILE).read_bytes()
    tiny_run(run, steps=4, checkpoint_every=2, resume=True)
    state_step = int(load_state(run / STATE_FILE)[0]["step"])
    (run / MODEL_FILE).write_bytes(older_model)    # as if killed between the two writes
    model, _ = load_run_model(run, backend="numpy")
    _, arrays = load_state(run / STATE_FILE)
    for name, value in model.params.numpy().items():
        np.testing.assert_array_equal(value, arrays[f"param/{name}"])
    metrics = evaluate_run(run, [7], samples=2, eval_batch=2, backend="numpy", plot=False)
    assert metrics["step"] == state_step == 4
    # a resume with more steps puts the model file back in step with the state
    tiny_run(run, steps=6, checkpoint_every=100, resume=True)
    config = json.loads(str(np.load(run / MODEL_FILE)["__config__"]))
    assert config["metadata"]["step"] == 6 == int(load_state(run / STATE_FILE)[0]["step"])


def test_torn_and_non_utf8_log_lines_are_skipped_not_the_records_after_them(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, steps=8, checkpoint_every=8, stop_at=8)
    lines = (run / LOG_FILE).read_bytes().splitlines(keepends=True)
    assert len(lines) == 8
    lines[2] = lines[2][:9] + b"\n"                     # torn in the middle of the file
    lines[4] = b"\xff\xfe not utf-8 \xc3\n"             # bit-flipped bytes
    (run / LOG_FILE).write_bytes(b"".join(lines))
    result = tiny_run(run, steps=10, checkpoint_every=100, resume=True)
    assert result.step == 10
    steps = [record["step"] for record in read_log(run / LOG_FILE)]
    assert steps == [1, 2, 4, 6, 7, 8, 9, 10]


def test_cli_resume_reports_skipped_log_lines(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, steps=4, checkpoint_every=4)
    with open(run / LOG_FILE, "ab") as log:
        log.write(b'{"step": 3, "lo')
    result = invoke("train", "--out", run, "--resume", "--steps", "5", "--backend", "numpy")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable line" in result.output


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    with pytest.raises(TreeschedError):
        train(TrainConfig("parity_check", steps=1, hidden=4, batch=4, max_length=6,
                          dtype="float16"), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------- lock
def test_second_lock_is_refused_naming_the_holder_and_released_locks_are_reusable(tmp_path):
    with RunLock(tmp_path, "treesched train --out x") as lock:
        assert lock.held and (tmp_path / LOCK_FILE).exists()
        with pytest.raises(RunFolderBusy, match=rf"PID {os.getpid()} on host .*started .*"
                                                 rf"treesched train --out x"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path) as lock:
        assert lock.taken_over is None


def _start_training(out, steps, *extra):
    return subprocess.Popen([*TRAIN, "--task", "parity_check", "--steps", str(steps),
                             "--hidden", "4", "--batch", "4", "--max-length", "6",
                             "--backend", "numpy", "--quiet", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_concurrent_trainings_on_one_folder_exactly_one_writes(tmp_path):
    out = tmp_path / "run"
    processes = [_start_training(out, 30, "--seed", str(seed), "--checkpoint-every", "5")
                 for seed in (0, 1)]
    results = [(process.wait(timeout=300), *process.communicate()) for process in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (winner,) = [index for index, (code, _, _) in enumerate(results) if code == 0]
    refused = results[1 - winner][2]
    assert "in use by PID" in refused or "already holds a run" in refused, refused
    assert "Traceback" not in refused
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == winner
    steps = [record["step"] for record in read_log(out / LOG_FILE)]
    assert steps == [10, 20, 30]            # one run's log, not two interleaved
    assert int(load_state(out / STATE_FILE)[0]["step"]) == 30


def test_live_holder_is_named_and_a_killed_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _start_training(out, 1_000_000, "--checkpoint-every", "5")
    try:
        assert _wait_for(lambda: (out / STATE_FILE).exists())
        second = subprocess.run([*TRAIN, "--out", str(out), "--resume", "--backend", "numpy"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"in use by PID {holder.pid} on host" in second.stderr, second.stderr
        evaluation = subprocess.run([sys.executable, "-m", "treesched.cli.main", "eval",
                                     str(out), "--lengths", "7", "--samples", "2", "--quiet",
                                     "--backend", "numpy"],
                                    capture_output=True, text=True, timeout=120)
        assert evaluation.returncode == 1 and f"PID {holder.pid}" in evaluation.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).exists()          # left behind by the killed holder
    resumed = subprocess.run([*TRAIN, "--out", str(out), "--resume", "--backend", "numpy",
                              "--steps", str(int(load_state(out / STATE_FILE)[0]["step"]) + 3),
                              "--quiet"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of {out}" in resumed.stderr and f"PID {holder.pid}" in \
        resumed.stderr
    assert not (out / LOCK_FILE).exists()

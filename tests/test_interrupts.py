"""SIGINT / SIGTERM finish the step, checkpoint and say how to continue; a
second signal stops at once; SIGKILL at random moments leaves a folder that
resumes to the bitwise result of an uninterrupted run.  Real signals to
real ``treesched train`` processes."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from treesched.runlock import LOCK_FILE
from treesched.training import (CONFIG_FILE, LOG_FILE, MODEL_FILE, STATE_FILE, TrainConfig,
                                load_state, read_log, train)

STEPS = 400
MAX_KILLS = 8
OPTIONS = ["--task", "parity_check", "--hidden", "4", "--batch", "4", "--max-length", "6",
           "--backend", "numpy", "--quiet", "--log-every", "1"]
TRAIN = [sys.executable, "-m", "treesched.cli.main", "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final parameters and log (step, loss) pairs."""
    out = tmp_path_factory.mktemp("reference") / "run"
    config = TrainConfig("parity_check", steps=STEPS, hidden=4, batch=4, max_length=6)
    train(config, out, backend="numpy", progress=False, plot=False, log_every=1,
          checkpoint_every=7)
    return final_state(out)


def final_state(out):
    meta, arrays = load_state(out / STATE_FILE)
    params = {name: value for name, value in arrays.items() if name.startswith("param/")}
    log = [(record["step"], record["loss"]) for record in read_log(out / LOG_FILE)]
    return meta["step"], params, log


def assert_same_run(out, reference):
    step, params, log = final_state(out)
    ref_step, ref_params, ref_log = reference
    assert step == ref_step and log == ref_log
    assert sorted(params) == sorted(ref_params)
    for name in params:
        assert np.array_equal(params[name], ref_params[name]), name   # bitwise


def start(out, *extra, steps=STEPS):
    return subprocess.Popen([*TRAIN, *OPTIONS, "--steps", str(steps), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def resume(out, steps=STEPS):
    return subprocess.Popen([*TRAIN, "--out", str(out), "--resume", "--backend", "numpy",
                             "--quiet", "--log-every", "1", "--steps", str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log_lines(out, count, seconds=120.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if len((out / LOG_FILE).read_bytes().splitlines()) >= count:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{out / LOG_FILE} never reached {count} lines")


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130),
                                                   (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_says_how_to_continue(
        tmp_path, reference, signal_number, status):
    out = tmp_path / "run"
    process = start(out, "--checkpoint-every", "1000", steps=1_000_000)
    wait_for_log_lines(out, 3)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    match = re.search(r"interrupted at step (\d+); checkpoint written; continue with: "
                      r"treesched train --out (\S+) --resume", stderr)
    assert match and match.group(2) == str(out), stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    step = int(match.group(1))
    assert int(load_state(out / STATE_FILE)[0]["step"]) == step
    assert max(record["step"] for record in read_log(out / LOG_FILE)) == step
    assert not (out / LOCK_FILE).exists()
    assert step < STEPS      # then the resumed run must end as the reference does
    finished = resume(out)
    finished.communicate(timeout=120)
    assert finished.returncode == 0
    assert_same_run(out, reference)


def test_second_sigint_stops_at_once_and_the_run_still_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    process = start(out, "--checkpoint-every", "5", steps=1_000_000)
    wait_for_log_lines(out, 2)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert ("stopped at once by a second signal" in stderr
            or "interrupted at step" in stderr), stderr   # the step may end in between
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if int(load_state(out / STATE_FILE)[0]["step"]) >= STEPS:
        pytest.skip("the first signal's checkpoint already passed the reference's end")
    finished = resume(out)
    _, stderr = finished.communicate(timeout=120)
    assert finished.returncode == 0, stderr
    assert_same_run(out, reference)


def check_consistent(out):
    """What a killed run may leave: nothing, or a config; and any checkpoint is
    whole, its model never ahead of its state."""
    if not (out / CONFIG_FILE).exists():
        return
    json.loads((out / CONFIG_FILE).read_text())
    if (out / STATE_FILE).exists():
        state_step = int(load_state(out / STATE_FILE)[0]["step"])
        model_config = json.loads(str(np.load(out / MODEL_FILE)["__config__"])) \
            if (out / MODEL_FILE).exists() else {"metadata": {"step": 0}}
        assert model_config["metadata"]["step"] <= state_step


def test_sigkill_at_random_moments_then_resume_ends_bitwise_equal(tmp_path, reference):
    """Kill, check, resume, kill again ... until the run completes; a few
    tens of seconds of kills, at moments spread over start-up, steps and
    checkpoint writes (every step checkpoints)."""
    out = tmp_path / "run"
    chooser = random.Random(int(os.environ.get("TREESCHED_KILL_SEED", "15")))
    kills = 0
    process = start(out, "--checkpoint-every", "1")
    deadline = time.monotonic() + 240
    while True:
        time.sleep(chooser.uniform(0.2, 1.6))
        if process.poll() is None and kills < MAX_KILLS:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        else:
            _, stderr = process.communicate(timeout=120)
            if not (process.returncode == 0 or f"already finished step {STEPS}" in stderr):
                raise AssertionError(f"a resumed run failed after {kills} kills: {stderr}")
            # (a run killed after its last checkpoint has nothing left to do)
            if kills >= 3:
                break
            # it finished before three kills (a fast machine, long sleeps): check
            # it, then kill a fresh run too, so every seed tests at least three
            assert_same_run(out, reference)
            shutil.rmtree(out)
            process = start(out, "--checkpoint-every", "1")
            continue
        check_consistent(out)
        assert time.monotonic() < deadline, f"no finish after {kills} kills"
        # a run killed before writing its config starts afresh (the leftovers of
        # its killed writes are removed under the lock); any other resumes
        process = resume(out) if (out / CONFIG_FILE).exists() else \
            start(out, "--checkpoint-every", "1")
    assert kills >= 3
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert_same_run(out, reference)
    report = os.environ.get("TREESCHED_RELIABILITY_REPORT")
    if report:   # docs/reliability.md's counts come from here
        with open(report, "a") as stream:
            stream.write(json.dumps({"test": "sigkill", "kills": kills}) + "\n")

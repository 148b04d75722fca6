"""Optimizer, trainer, resumption and range evaluation (treesched.optim,
treesched.training, treesched.evaluation)."""

import json
import math

import numpy as np
import pytest

import treesched.tasks as tasks_lib
from treesched.errors import TreeschedError
from treesched.evaluation import evaluate, evaluate_run, load_run_model, parse_lengths
from treesched.model import PRLSTM
from treesched.optim import Adam, clip_by_global_norm, global_norm
from treesched.training import (LOG_FILE, MODEL_FILE, STATE_FILE, TrainConfig, default_backend,
                                read_log, read_run_config, train)

TINY = dict(hidden=8, batch=16, max_length=8)


# ------------------------------------------------------------------ optimizer
def test_adam_matches_hand_computed_steps():
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    p0 = np.array([1.0, -2.0, 0.5], np.float32)
    g1 = np.array([0.5, -0.1, 0.0], np.float32)
    g2 = np.array([-0.2, 0.3, 0.4], np.float32)
    params = {"w": p0.copy()}
    opt = Adam(lr=lr, clip=None)
    opt.init(params)
    opt.step(params, {"w": g1})
    # step 1: mu_hat = g, nu_hat = g^2 -> update = -lr * g / (|g| + eps)
    expected1 = p0 - lr * g1 / (np.abs(g1) + eps)
    np.testing.assert_allclose(params["w"], expected1, rtol=1e-6, atol=1e-9)
    opt.step(params, {"w": g2})
    g1d, g2d = g1.astype(np.float64), g2.astype(np.float64)
    mu = (1 - b1) * g2d + b1 * (1 - b1) * g1d
    nu = (1 - b2) * g2d ** 2 + b2 * (1 - b2) * g1d ** 2
    update = -lr * (mu / (1 - b1 ** 2)) / (np.sqrt(nu / (1 - b2 ** 2)) + eps)
    np.testing.assert_allclose(params["w"], expected1 + update, rtol=1e-6, atol=1e-8)
    assert params["w"].dtype == np.float32 and opt.count == 2


def test_clip_by_global_norm():
    grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert global_norm(grads) == pytest.approx(5.0)
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]], rtol=1e-6)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    small = {"a": np.array([0.3], np.float32), "b": np.array([0.4], np.float32)}
    same, norm = clip_by_global_norm(small, 1.0)
    assert norm == pytest.approx(0.5) and same["a"] is small["a"]  # below the threshold: untouched
    with pytest.raises(TreeschedError, match="diverged"):
        clip_by_global_norm({"a": np.array([np.inf], np.float32)}, 1.0)


def test_adam_clips_before_the_update():
    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
    gradients = [{"w": (10 * rng.standard_normal((4, 3))).astype(np.float32)} for _ in range(3)]
    clipped_opt, plain_opt = Adam(clip=1.0), Adam(clip=None)
    a, b = {"w": start["w"].copy()}, {"w": start["w"].copy()}
    clipped_opt.init(a)
    plain_opt.init(b)
    for g in gradients:
        norm = clipped_opt.step(a, g)
        assert norm == pytest.approx(float(np.linalg.norm(g["w"])), rel=1e-5)
        plain_opt.step(b, clip_by_global_norm(g, 1.0)[0])
    np.testing.assert_array_equal(a["w"], b["w"])


def test_adam_matches_optax_when_installed():
    optax = pytest.importorskip("optax")
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32),
              "b": rng.standard_normal(5).astype(np.float32)}
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state, theirs = reference.init(params), dict(params)
    ours, mine = Adam(), dict(params)
    ours.init(mine)
    for i in range(20):
        grads = {k: (rng.standard_normal(v.shape) * (3 if i % 2 else 0.1)).astype(np.float32)
                 for k, v in params.items()}
        updates, state = reference.update(grads, state)
        theirs = optax.apply_updates(theirs, updates)
        ours.step(mine, grads)
    for name in params:
        np.testing.assert_allclose(mine[name], np.asarray(theirs[name]), rtol=0, atol=1e-6)


def test_adam_state_round_trip_is_exact():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(6).astype(np.float32)}
    grads = [{"w": rng.standard_normal(6).astype(np.float32)} for _ in range(5)]
    first = Adam()
    first.init(params)
    p = dict(params)
    for g in grads[:3]:
        first.step(p, g)
    saved, p_saved = first.state_dict(), {"w": p["w"].copy()}
    for g in grads[3:]:
        first.step(p, g)
    second = Adam()
    second.init(params)
    second.load_state_dict(saved, like=p_saved)
    for g in grads[3:]:
        second.step(p_saved, g)
    np.testing.assert_array_equal(p["w"], p_saved["w"])
    with pytest.raises(TreeschedError):
        second.load_state_dict({"count": 1, "mu": {"w": np.zeros(2)}, "nu": {"w": np.zeros(2)}},
                               like=p_saved)
    with pytest.raises(TreeschedError):
        Adam(lr=-1.0)


# ------------------------------------------------------------------- training
def test_config_validation():
    with pytest.raises(TreeschedError, match="unknown task"):
        TrainConfig("no_such_task").validate()
    with pytest.raises(TreeschedError, match="max_length"):
        TrainConfig("parity_check", max_length=0).validate()
    with pytest.raises(TreeschedError, match="dtype"):
        TrainConfig("parity_check", dtype="int8").validate()
    config = TrainConfig("parity_check").validate()
    assert (config.hidden, config.batch, config.lr, config.clip, config.max_length,
            config.num_layers, config.pattern, config.dtype) == \
        (256, 128, 1e-3, 1.0, 40, 2, "odd-even", "float32")
    assert default_backend() in ("numba", "numpy")


def test_tiny_training_decreases_the_loss(tmp_path):
    config = TrainConfig("stack_manipulation", steps=60, lr=1e-2, **TINY)
    result = train(config, tmp_path / "run", backend="numpy", progress=False, log_every=1,
                   checkpoint_every=25)
    records = read_log(tmp_path / "run" / LOG_FILE)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert set(records[0]) >= {"step", "loss", "accuracy", "length", "grad_norm", "seconds"}
    assert all(1 <= r["length"] <= 8 for r in records)
    # the loss on a fixed held-out batch, before and after training
    task = tasks_lib.get("stack_manipulation")
    initial = PRLSTM(task.input_size + 1, 8, task.output_size, backend="numpy", seed=0)
    inputs, targets, _ = task.sample(np.random.default_rng(5), 64, 6)
    tape = tasks_lib.build_tape(inputs, targets.shape[1])
    before = float(initial.loss_and_grads(tape, targets)[0])
    after = float(result.model.loss_and_grads(tape, targets)[0])
    assert after < 0.92 * before, (before, after)
    assert np.mean([r["loss"] for r in records[-10:]]) < np.mean([r["loss"] for r in records[:10]])
    assert result.step == 60 and math.isfinite(result.loss)
    for name in ("config.json", MODEL_FILE, STATE_FILE, "training_curve.png"):
        assert (tmp_path / "run" / name).is_file(), name
    run = read_run_config(tmp_path / "run")
    assert run["train"]["steps"] == 60 and run["train"]["task"] == "stack_manipulation"
    assert (tmp_path / "run" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_training_matches_a_hand_written_loop(tmp_path):
    """The trainer is exactly: draw a length, sample, build the tape, loss at
    the last output_length positions, clipped Adam."""
    config = TrainConfig("reverse_string", steps=3, **TINY)
    result = train(config, tmp_path / "run", backend="numpy", progress=False, plot=False)
    task = tasks_lib.get("reverse_string")
    model = PRLSTM(task.input_size + 1, 8, task.output_size, backend="numpy", seed=0)
    opt = Adam()
    opt.init(model.params)
    rng = np.random.default_rng(np.random.SeedSequence([0, 1]))
    for _ in range(3):
        n = int(rng.integers(1, 9))
        inputs, targets, _ = task.sample(rng, 16, n)
        _, grads, _ = model.loss_and_grads(tasks_lib.build_tape(inputs, targets.shape[1]),
                                           targets)
        opt.step(model.params, grads)
    for name, value in model.params.items():
        np.testing.assert_array_equal(result.model.params[name], value)


def test_resume_is_bitwise_identical(tmp_path):
    config = dict(task="modular_arithmetic", steps=12, **TINY)
    whole = train(TrainConfig(**config), tmp_path / "whole", backend="numpy", progress=False,
                  checkpoint_every=4, log_every=1, plot=False)
    # "kill" after step 10: the last checkpoint is step 8, steps 9-10 are lost
    killed = train(TrainConfig(**config), tmp_path / "killed", backend="numpy",
                   progress=False, checkpoint_every=4, log_every=1, plot=False, stop_at=10)
    assert killed.stopped_early and killed.step == 10
    resumed = train(None, tmp_path / "killed", resume=True, backend="numpy", progress=False,
                    checkpoint_every=4, log_every=1, plot=False)
    assert resumed.step == 12
    for name, value in whole.model.params.items():
        assert np.array_equal(resumed.model.params[name], value), name
    saved = PRLSTM.load(tmp_path / "killed" / MODEL_FILE)
    for name, value in whole.model.params.items():
        assert np.array_equal(saved.params[name], value), name
    steps = [r["step"] for r in read_log(tmp_path / "killed" / LOG_FILE)]
    assert steps == list(range(1, 13))
    losses_whole = [r["loss"] for r in read_log(tmp_path / "whole" / LOG_FILE)]
    losses_resumed = [r["loss"] for r in read_log(tmp_path / "killed" / LOG_FILE)]
    assert losses_whole == losses_resumed
    # finished: nothing left to resume unless steps grow
    with pytest.raises(TreeschedError, match="nothing to resume"):
        train(None, tmp_path / "killed", resume=True, backend="numpy", progress=False)
    extended = train(TrainConfig(**dict(config, steps=14)), tmp_path / "killed", resume=True,
                     backend="numpy", progress=False, plot=False)
    assert extended.step == 14


def test_resume_refusals(tmp_path):
    with pytest.raises(TreeschedError, match="does not exist"):
        train(None, tmp_path / "missing", resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TreeschedError, match="not a treesched run"):
        train(None, tmp_path / "empty", resume=True, progress=False)
    config = TrainConfig("parity_check", steps=2, **TINY)
    train(config, tmp_path / "run", backend="numpy", progress=False, checkpoint_every=5,
          stop_at=1, plot=False)
    with pytest.raises(TreeschedError, match="already holds a run.*before its first checkpoint"):
        train(TrainConfig("parity_check", steps=2, **TINY), tmp_path / "run", backend="numpy",
              progress=False)
    # stopped before its first checkpoint: --resume starts it again from step 0
    result = train(None, tmp_path / "run", resume=True, backend="numpy", progress=False,
                   plot=False)
    assert result.step == 2
    train(TrainConfig("parity_check", steps=2, **TINY), tmp_path / "run2", backend="numpy",
          progress=False, checkpoint_every=1, stop_at=1, plot=False)
    with pytest.raises(TreeschedError, match="different settings"):
        train(TrainConfig("parity_check", steps=2, **dict(TINY, hidden=16)),
              tmp_path / "run2", resume=True, backend="numpy", progress=False)
    (tmp_path / "run2" / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(TreeschedError, match="corrupt"):
        train(None, tmp_path / "run2", resume=True, backend="numpy", progress=False)


# ------------------------------------------------------------------ evaluation
def test_parse_lengths():
    assert parse_lengths("41-500", 10)[:3] == [41, 51, 61] and parse_lengths("41-500", 10)[-1] == 491
    assert parse_lengths("41-500") == list(range(41, 501))
    assert parse_lengths("3, 1..2,7") == [1, 2, 3, 7]
    for bad in ("", "abc", "41-", "10-5", "-3", "4;5", "1.5"):
        with pytest.raises(TreeschedError):
            parse_lengths(bad)
    with pytest.raises(TreeschedError):
        parse_lengths("1-4", 0)


def test_evaluate_tiny_model():
    task = tasks_lib.get("binary_addition")
    model = PRLSTM(task.input_size + 1, 8, task.output_size, backend="numpy", seed=2)
    result = evaluate(model, task, [5, 9, 12], samples=10, eval_batch=4, seed=1)
    assert result["lengths"] == [5, 9, 12] and len(result["accuracies"]) == 3
    assert all(0.0 <= a <= 1.0 for a in result["accuracies"])
    assert result["score"] == pytest.approx(np.mean(result["accuracies"]))
    # per length: sub-batches of 4, 4, 2 weighted by size, each the pooled accuracy
    rng = np.random.default_rng(1)
    values, weights = [], []
    for size in (4, 4, 2):
        inputs, targets, mask = task.sample(rng, size, 5)
        logits = model.forward(tasks_lib.build_tape(inputs, targets.shape[1]),
                               outputs=targets.shape[1])
        values.append(tasks_lib.accuracy(logits, targets, mask)[1])
        weights.append(size)
    assert result["accuracies"][0] == pytest.approx(np.average(values, weights=weights))
    again = evaluate(model, task, [5, 9, 12], samples=10, eval_batch=4, seed=1)
    assert again["accuracies"] == result["accuracies"]
    with pytest.raises(TreeschedError, match="not possible"):
        evaluate(model, task, [0, 5], samples=4)
    with pytest.raises(TreeschedError, match="does not fit"):
        evaluate(model, tasks_lib.get("modular_arithmetic"), [5], samples=4)


def test_evaluate_run_writes_metrics(tmp_path):
    config = TrainConfig("cycle_navigation", steps=3, **TINY)
    train(config, tmp_path / "run", backend="numpy", progress=False, plot=False)
    metrics = evaluate_run(tmp_path / "run", [41, 60], samples=8, eval_batch=8,
                           backend="numpy")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["accuracies"] == metrics["accuracies"] and saved["step"] == 3
    assert saved["task"] == "cycle_navigation" and saved["lengths"] == [41, 60]
    assert (tmp_path / "run" / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "run" / MODEL_FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(TreeschedError, match="corrupt"):
        load_run_model(tmp_path / "run", backend="numpy")


# -------------------------------------------------------------------- progress
def test_progress_is_quiet_off_a_terminal_except_periodic_lines():
    import io
    from treesched.progress import Progress, format_duration
    stream = io.StringIO()
    bar = Progress(10, stream=stream, interval=3600, label="t")
    for step in range(1, 11):
        bar.update(step, loss=0.5, acc=0.25)
    assert stream.getvalue() == ""  # nothing until the interval passes
    bar.close()
    line = stream.getvalue()
    assert line.count("\n") == 1 and "10/10" in line and "loss 0.5000" in line
    assert "acc 25.0%" in line and "steps/s" in line and "ETA" in line
    chatty = io.StringIO()
    bar = Progress(5, stream=chatty, interval=0)
    for step in range(1, 6):
        bar.update(step, loss=1.0)
    assert chatty.getvalue().count("\n") == 5 and "\r" not in chatty.getvalue()
    silent = io.StringIO()
    bar = Progress(5, stream=silent, enabled=False)
    bar.update(5)
    bar.close()
    assert silent.getvalue() == ""
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"

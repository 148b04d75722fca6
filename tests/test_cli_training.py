"""``treesched tasks``, ``treesched train`` and ``treesched eval`` on tiny settings,
and every bad input: one ``Error: …`` line, exit status 1, no traceback."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import treesched.tasks as tasks_lib
from cli_helpers import assert_one_line_error, run
from treesched.cli.main import cli

TINY = ["--hidden", "8", "--batch", "16", "--max-length", "10", "--backend", "numpy",
        "--quiet"]
EVAL_TINY = ["--lengths", "41-60", "--stride", "10", "--samples", "8", "--eval-batch", "4",
             "--backend", "numpy", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (parity_check, 20 steps, hidden 8) shared by the eval tests."""
    folder = tmp_path_factory.mktemp("cli") / "parity"
    result = run("train", "--task", "parity_check", "--steps", 20, *TINY, "--out", folder,
                 "--checkpoint-every", 10)
    assert result.exit_code == 0, result.output
    return folder


def test_tasks_lists_the_fifteen():
    result = run("tasks")
    assert result.exit_code == 0
    for name in tasks_lib.names():
        assert name in result.output
    assert "context-sensitive" in result.output and "regular" in result.output
    rows = json.loads(run("tasks", "--json").output)
    assert len(rows) == 15
    sqrt = next(r for r in rows if r["name"] == "compute_sqrt")
    assert (sqrt["input_size"], sqrt["output_size"], sqrt["level"]) == (2, 2, "cs")
    assert next(r for r in rows if r["name"] == "even_pairs")["paper_pr_lstm_score"] == 100.0


def test_train_writes_a_run(trained):
    for name in ("config.json", "model.npz", "train_state.npz", "train_log.jsonl",
                 "training_curve.png"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["format"] == "treesched-run"
    assert config["train"] == {"task": "parity_check", "steps": 20, "hidden": 8,
                               "num_layers": 2, "pattern": "odd-even", "cell": "lstm",
                               "dtype": "float32", "lr": 0.001, "batch": 16, "clip": 1.0,
                               "max_length": 10, "seed": 0}
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20]


def test_eval_prints_the_score_and_writes_metrics(trained):
    result = run("eval", trained, *EVAL_TINY)
    assert result.exit_code == 0, result.output
    assert "score" in result.stdout and "%" in result.stdout
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["lengths"] == [41, 51] and len(metrics["accuracies"]) == 2
    assert metrics["score"] == pytest.approx(np.mean(metrics["accuracies"]))
    assert (metrics["samples"], metrics["eval_batch"], metrics["step"]) == (8, 4, 20)
    assert (trained / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_extends_and_refuses(tmp_path):
    folder = tmp_path / "run"
    assert run("train", "--task", "even_pairs", "--steps", 6, *TINY, "--out", folder,
               "--checkpoint-every", 3).exit_code == 0
    result = run("train", "--out", folder, "--resume", "--steps", 9, "--backend", "numpy",
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert "step 9/9" in result.stdout
    assert_one_line_error(run("train", "--out", folder, "--resume", "--backend", "numpy"),
                          "nothing to resume")
    assert_one_line_error(run("train", "--out", folder, "--resume", "--steps", 12,
                              "--hidden", 16, "--backend", "numpy"), "hidden")
    assert_one_line_error(run("train", "--out", folder, "--resume", "--steps", 12,
                              "--task", "parity_check", "--backend", "numpy"), "even_pairs")
    assert_one_line_error(run("train", "--task", "even_pairs", "--steps", 3, *TINY,
                              "--out", folder), "already holds a run")


@pytest.mark.parametrize("args, fragments", [
    (["--task", "no_such_task"], ["unknown task", "even_pairs"]),
    (["--task", "parity_check", "--max-length", "0"], ["--max-length"]),
    (["--task", "parity_check", "--steps", "ten"], ["--steps"]),
    (["--task", "parity_check", "--lr", "-1"], ["--lr"]),
    (["--task", "parity_check", "--backend", "tpu"], ["unknown backend"]),
    (["--task", "parity_check", "--dtype", "int8"], ["dtype"]),
    (["--task", "parity_check", "--pattern", "zigzag"], []),
])
def test_train_bad_input(tmp_path, args, fragments):
    base = ["--steps", "2", "--hidden", "8", "--batch", "4", "--backend", "numpy", "--quiet"]
    assert_one_line_error(run("train", *base, *args, "--out", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_needs_task_and_out(tmp_path):
    assert_one_line_error(run("train", "--out", tmp_path / "r", "--backend", "numpy"), "--task")
    assert_one_line_error(run("train", "--task", "parity_check", "--backend", "numpy"), "--out")


def test_resume_with_nothing_to_resume(tmp_path):
    assert_one_line_error(run("train", "--out", tmp_path / "absent", "--resume",
                              "--backend", "numpy"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("train", "--out", tmp_path / "empty", "--resume",
                              "--backend", "numpy"), "not a treesched run")


@pytest.mark.parametrize("lengths, fragments", [
    ("41-", ["malformed --lengths"]),
    ("abc", ["malformed --lengths"]),
    ("60-41", ["empty"]),
    ("0-5", ["test length 0"]),
])
def test_eval_bad_lengths(trained, lengths, fragments):
    assert_one_line_error(run("eval", trained, "--lengths", lengths, "--backend", "numpy"),
                          *fragments)


def test_eval_bad_numbers(trained):
    assert_one_line_error(run("eval", trained, "--stride", "0", "--backend", "numpy"),
                          "--stride")
    assert_one_line_error(run("eval", trained, "--samples", "x", "--backend", "numpy"),
                          "--samples")


def test_eval_bad_run_folders(tmp_path, trained):
    assert_one_line_error(run("eval", tmp_path / "absent"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("eval", tmp_path / "empty", "--backend", "numpy"),
                          "not a treesched run")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"name": "something else"}')
    assert_one_line_error(run("eval", tmp_path / "foreign", "--backend", "numpy"),
                          "not a treesched run")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    assert_one_line_error(run("eval", tmp_path / "garbled", "--backend", "numpy"), "corrupt")
    # a run whose checkpoint is corrupt, foreign, or of another task
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((trained / "config.json").read_text())
    assert_one_line_error(run("eval", copy, "--backend", "numpy"), "no checkpoint")
    (copy / "model.npz").write_bytes(b"\x00garbage")
    assert_one_line_error(run("eval", copy, "--backend", "numpy"), "corrupt")
    np.savez(copy / "model.npz", weights=np.zeros(3))
    assert_one_line_error(run("eval", copy, "--backend", "numpy"), "treesched")
    from treesched.model import PRLSTM
    PRLSTM(10, 8, 4).save(copy / "model.npz")
    assert_one_line_error(run("eval", copy, "--backend", "numpy"), "does not belong")

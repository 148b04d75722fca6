"""``treesched sweep`` (several seeds and learning rates, one summary) and
``treesched table`` (the results table and the fifteen-panel figure), on
tiny runs; every bad input: one ``Error: …`` line, exit status 1."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import treesched.tasks as tasks_lib
from cli_helpers import assert_one_line_error, run
from treesched.cli.main import cli
from treesched.results_table import FIGURE_FILE, JSON_FILE, MARKDOWN_FILE


def tiny_train(steps=6, hidden=8):
    """Training options of a run of a few seconds at most."""
    return ["--steps", steps, "--hidden", hidden, "--batch", "8", "--max-length", "6",
            "--backend", "numpy", "--quiet"]


TINY_TRAIN = tiny_train()
TINY_EVAL = ["--lengths", "7-12", "--stride", "5", "--samples", "8", "--eval-batch", "4"]


def sweep(out, *extra, seeds=2, lrs="1e-3,3e-3", task="parity_check"):
    return run("sweep", "--task", task, "--seeds", seeds, "--lrs", lrs, *TINY_TRAIN,
               *TINY_EVAL, "--out", out, *extra)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """parity_check at seeds 0, 1 and learning rates 1e-3, 3e-3 (6 steps, hidden 8)."""
    out = tmp_path_factory.mktemp("sweep") / "parity"
    result = sweep(out)
    assert result.exit_code == 0, result.output
    return out


def test_sweep_trains_and_evaluates_every_seed_and_learning_rate(swept):
    summary = json.loads((swept / "sweep.json").read_text())
    assert summary["format"] == "treesched-sweep" and summary["complete"]
    assert summary["seeds"] == [0, 1] and summary["lrs"] == [0.003, 0.001]
    assert sorted(run["folder"] for run in summary["runs"]) == [
        "seed0-lr0.001", "seed0-lr0.003", "seed1-lr0.001", "seed1-lr0.003"]
    for record in summary["runs"]:
        folder = swept / record["folder"]
        config = json.loads((folder / "config.json").read_text())["train"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (config["seed"], config["lr"], config["steps"]) == (record["seed"], record["lr"], 6)
        assert metrics["lengths"] == [7, 12] and metrics["samples"] == 8
        assert record["score"] == metrics["score"] and record["step"] == 6
        assert record["lowest_accuracy"] == min(metrics["accuracies"])
        assert record["train_seconds"] > 0
    for group in summary["summary"]:
        scores = [r["score"] for r in summary["runs"] if r["lr"] == group["lr"]]
        seed0 = next(r["score"] for r in summary["runs"]
                     if r["lr"] == group["lr"] and r["seed"] == 0)
        assert group["reference_seed"] == 0 and group["reference_score"] == seed0
        assert group["mean_score"] == pytest.approx(np.mean(scores))
        assert group["std_score"] == pytest.approx(np.std(scores))
        assert (group["min_score"], group["max_score"]) == (min(scores), max(scores))


def test_sweep_run_equals_the_same_treesched_train_run(swept, tmp_path):
    alone = tmp_path / "alone"
    result = run("train", "--task", "parity_check", "--seed", 1, "--lr", "3e-3", *TINY_TRAIN,
                 "--out", alone)
    assert result.exit_code == 0, result.output
    ours = np.load(swept / "seed1-lr0.003" / "train_state.npz")
    theirs = np.load(alone / "train_state.npz")
    for name in theirs.files:
        if name != "__meta__":
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_sweep_again_keeps_finished_runs_and_resumes_to_more_steps(tmp_path):
    out = tmp_path / "sweep"
    assert sweep(out, seeds=1, lrs="1e-3").exit_code == 0
    model = out / "seed0-lr0.001" / "model.npz"
    written = model.stat().st_mtime_ns
    again = sweep(out, seeds=1, lrs="1e-3")
    assert again.exit_code == 0 and "already done" in again.stderr
    assert model.stat().st_mtime_ns == written
    longer = run("sweep", "--task", "parity_check", "--seeds", 2, "--lrs", "1e-3",
                 *tiny_train(steps=9), *TINY_EVAL,
                 "--out", out)
    assert longer.exit_code == 0, longer.output
    assert "(resume)" in longer.stderr and "(new)" in longer.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["step"]) for r in summary["runs"]] == [(0, 9), (1, 9)]


def test_sweep_keeps_runs_of_an_earlier_invocation_in_the_summary(tmp_path):
    out = tmp_path / "sweep"
    assert sweep(out, seeds=1, lrs="1e-3").exit_code == 0
    assert sweep(out, seeds=1, lrs="3e-3").exit_code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["lr"]) for r in summary["runs"]] == [(0, 0.003), (0, 0.001)]
    assert [group["lr"] for group in summary["summary"]] == [0.003, 0.001]


@pytest.mark.parametrize("arguments,fragments", [
    (["--lrs", "0"], ["--lrs entry", "> 0"]),
    (["--lrs", "1e-3,abc"], ["--lrs entry", "'abc'"]),
    (["--lrs", ","], ["--lrs must list"]),
    (["--lrs", "1e-3,0.001"], ["given twice"]),
    (["--seeds", "0"], ["--seeds", "positive"]),
    (["--task", "lm"], ["formal-language tasks", "not lm"]),
    (["--task", "nope"], ["unknown task 'nope'"]),
    (["--lengths", "0-3"], ["test length 0"]),
])
def test_sweep_bad_input_is_one_error_line(tmp_path, arguments, fragments):
    given = {arguments[0]: arguments[1]}
    result = run("sweep", "--task", given.get("--task", "parity_check"),
                 "--seeds", given.get("--seeds", 1), "--lrs", given.get("--lrs", "1e-3"),
                 *TINY_TRAIN, "--lengths", given.get("--lengths", "7-12"), "--out",
                 tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_folders_with_other_settings(swept, tmp_path):
    other = run("sweep", "--task", "parity_check", "--seeds", 1, "--lrs", "1e-3",
                *tiny_train(hidden=16), *TINY_EVAL,
                "--out", swept)
    assert_one_line_error(other, "other settings")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_one_line_error(sweep(tmp_path / "busy"), "holds no sweep")
    assert_one_line_error(run("sweep", "--task", "parity_check"), "--out DIR is required")


def test_table_rows_scores_and_the_fifteen_panel_figure(swept, tmp_path):
    lone = tmp_path / "even_pairs"
    assert run("train", "--task", "even_pairs", *TINY_TRAIN, "--out", lone).exit_code == 0
    assert run("eval", lone, *TINY_EVAL, "--backend", "numpy", "--quiet").exit_code == 0
    out = tmp_path / "table"
    # the sweep twice and one of its runs again: every run counts once
    result = run("table", swept, lone, swept / "seed0-lr0.001", swept, "--out", out)
    assert result.exit_code == 0, result.output
    table = json.loads((out / JSON_FILE).read_text())
    assert [(row["task"], row["train"]["lr"]) for row in table["rows"]] == [
        ("even_pairs", 0.001), ("parity_check", 0.003), ("parity_check", 0.001)]
    assert table["not_run"] == [name for name in tasks_lib.names()
                                if name not in ("even_pairs", "parity_check")]
    summary = json.loads((swept / "sweep.json").read_text())
    for row, group in zip(table["rows"][1:], summary["summary"]):
        assert row["seeds"] == [0, 1] and row["reference_seed"] == 0
        assert row["score"] == group["reference_score"]
        assert row["mean_score"] == pytest.approx(group["mean_score"])
        seed0 = json.loads((swept / f"seed0-lr{row['train']['lr']:g}" / "metrics.json")
                           .read_text())
        assert row["lowest_accuracy"] == min(seed0["accuracies"])
        assert row["total_train_seconds"] >= row["train_seconds"] > 0
    even = table["rows"][0]
    assert even["paper"] == 100.0 and even["seeds"] == [0] and even["std_score"] == 0
    markdown = (out / MARKDOWN_FILE).read_text()
    assert markdown.count("| parity_check |") == 2 and "| even_pairs | regular | 100 |" in markdown
    assert "Not run: modular_arithmetic" in markdown
    assert (out / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_bad_input_is_one_error_line(swept, tmp_path):
    unevaluated = tmp_path / "unevaluated"
    assert run("train", "--task", "parity_check", *TINY_TRAIN, "--out", unevaluated) \
        .exit_code == 0
    assert_one_line_error(run("table", unevaluated, "--out", tmp_path / "t"),
                          "has not been evaluated", "treesched eval")
    (tmp_path / "plain").mkdir()
    assert_one_line_error(run("table", tmp_path / "plain", "--out", tmp_path / "t"),
                          "neither a treesched run")
    assert_one_line_error(run("table", tmp_path / "missing", "--out", tmp_path / "t"),
                          "does not exist")
    assert_one_line_error(run("table", "--out", tmp_path / "t"), "at least one run folder")
    assert_one_line_error(run("table", swept), "--out DIR is required")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run("table", swept, "--out", tmp_path / "file"), "not a folder")

"""Every input a probe found to raise a raw Python exception, or to be
accepted when it should not, now gets a TreeschedError (API) or one
``Error:`` line (CLI), before anything is allocated or written."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

import treesched
from treesched import limits
from treesched.cli.main import cli
from treesched.errors import TreeschedError
from treesched.haiku_import import decode_msgpack


def cli_error(args, tmp_path=None):
    """Run the CLI; assert exit 1 with exactly one ``Error:`` line; return it."""
    result = CliRunner().invoke(cli, list(args))
    assert not (result.exception and not isinstance(result.exception, SystemExit)), \
        f"{args} raised {result.exception!r}"
    assert result.exit_code == 1, (args, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# ------------------------------------------------------------------- API
@pytest.mark.parametrize("call, message", [
    (lambda: treesched.compile(10 ** 30), "at most"),
    (lambda: treesched.compile(limits.MAX_LENGTH + 1), "at most"),
    (lambda: treesched.PRLSTM(3, 4, 2, seed=-1), "seed"),
    (lambda: treesched.PRLSTM(3, 4, 2, seed="abc"), "seed"),
    (lambda: treesched.PRLSTM(3, 4, 2, seed=1.5), "seed"),
    (lambda: treesched.PRLSTM(3, 4, 2, pattern=["odd-even"]), "pattern"),
    (lambda: treesched.PRLSTM(3, 10 ** 12, 2), "hidden_size must be at most"),
    (lambda: treesched.PRLSTM(3, 4, 2, num_layers=10 ** 6), "num_layers must be at most"),
    (lambda: treesched.PRLSTM(3, 4, 2, dtype=["float32"]), "dtype"),
    (lambda: treesched.PRLSTM(3, 4, 2, dtype="float16"), "dtype"),
    (lambda: treesched.compile(8).level_step("1"), "level"),
    (lambda: treesched.compile(8).level_step(0), "level"),
    (lambda: treesched.compile(8).tree(1.5), "node"),
    (lambda: treesched.compile(8).tree(-1), "node"),
    (lambda: treesched.compile(8).tree(10 ** 9), "node"),
])
def test_api_refuses_bad_arguments_with_treesched_error(call, message):
    with pytest.raises(TreeschedError, match=message):
        call()


def _schedule_document(**changes):
    document = json.loads(treesched.compile(8).to_json())
    document.update(changes)
    return json.dumps(document)


@pytest.mark.parametrize("changes", [
    {"pattern": "bogus"}, {"pattern": ["odd-even"]}, {"outputs": {}}, {"outputs": 0},
    {"outputs": "9"}, {"length": "8"}, {"length": True}, {"length": 8.0},
    {"length": 10 ** 30},
    {"left": [value + 2 ** 32 for value in json.loads(treesched.compile(8).to_json())["left"]]},
    {"left": [True] * 11}, {"output_positions": [0]}, {"output_nodes": "x"},
])
def test_schedule_from_json_refuses_what_to_json_never_writes(changes):
    with pytest.raises(TreeschedError):
        treesched.Schedule.from_json(_schedule_document(**changes))


def test_schedule_from_json_round_trips_every_pattern_and_outputs():
    for pattern in treesched.PATTERN_NAMES:
        for outputs in (("last",) if pattern == "reduce" else ("all", "last", 3)):
            schedule = treesched.compile(13, pattern, outputs)
            assert treesched.Schedule.from_json(schedule.to_json()) == schedule


def test_params_mutators_check_shapes_and_never_remove():
    model = treesched.PRLSTM(3, 4, 2)
    before = model.params.numpy()
    params = model.params
    with pytest.raises(TreeschedError, match="shape"):
        params |= {"head/b": np.zeros(7)}
    with pytest.raises(TreeschedError, match="shape"):
        params.update({"head/w": np.zeros((4, 2)), "head/b": np.zeros(7)})
    for remove in (lambda: params.pop("head/b"), params.popitem, params.clear,
                   lambda: params.__delitem__("head/b")):
        with pytest.raises(TreeschedError, match="cannot be removed"):
            remove()
    with pytest.raises(TreeschedError, match="unknown parameter"):
        params.setdefault("bogus", np.zeros(2))
    after = model.params.numpy()
    assert sorted(after) == sorted(before)
    for name in before:   # the refused update changed nothing, not even head/w
        np.testing.assert_array_equal(after[name], before[name])


def test_assigned_parameters_do_not_share_the_callers_memory():
    model = treesched.PRLSTM(3, 4, 2)
    x = np.eye(3, dtype=np.float32)[[[0, 1, 2, 1]]]
    weights = np.full((4, 2), 0.5, np.float32)
    model.params["head/w"] = weights
    expected = model.forward(x).copy()
    weights[:] = np.nan       # the caller reuses its array afterwards
    model.params.update({"head/b": np.ones(2, np.float32)})
    model.params["head/b"] = np.zeros(2, np.float32)
    np.testing.assert_array_equal(model.forward(x), expected)


def _ndarray(shape, dtype, data):
    return msgpack.ExtType(1, msgpack.packb([shape, dtype, data]))


@pytest.mark.parametrize("name, data", [
    ("complex record of garbage", msgpack.packb({"a": msgpack.ExtType(2, b"\x01")})),
    ("scalar record of garbage", msgpack.packb({"a": msgpack.ExtType(3, b"\x01")})),
    ("600-deep lists", b"\x91" * 600 + b"\x01"),
    ("600-deep maps", b"\x81\xa1a" * 600 + b"\x01"),
    ("shape 2^32 x 2^32, empty data", msgpack.packb({"a": _ndarray([2 ** 32, 2 ** 32],
                                                                  "float32", b"")})),
    ("a bool in a shape", msgpack.packb({"a": _ndarray([True, 2], "float32", b"\0" * 8)})),
    ("sub-array dtype", msgpack.packb({"a": _ndarray([2], "(2,)f4", b"\0" * 16)})),
    ("void dtype", msgpack.packb({"a": _ndarray([2], "V4", b"\0" * 8)})),
    ("string dtype", msgpack.packb({"a": _ndarray([2], "U1", b"\0" * 8)})),
])
def test_crafted_msgpack_is_a_clean_error(name, data, tmp_path):
    with pytest.raises(TreeschedError):
        decode_msgpack(data)
    path = tmp_path / "crafted.msgpack"
    path.write_bytes(data)
    cli_error(["import-checkpoint", str(path), "--out", str(tmp_path / "m.npz")])
    assert not (tmp_path / "m.npz").exists()


# ------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, message", [
    (["compile", "--length", "99999999999999999999999"], "at most"),
    (["compile", "--length", "10000000"], "at most"),
    (["compile", "--length", "8", "--outputs", "³"], "outputs"),
    (["compile", "--length", "８"], "length"),
    (["compile", "--length", "1_000"], "length"),
    (["compile", "--length", "8", "--hidden", "99999999999999999999999"], "at most"),
    (["compile", "--length", "8", "--batch", "9" * 60], "batch"),
    (["compile", "--length", "8", "--dtype", "float16"], "dtype"),
    (["parity", "--backend", "numpy", "--seed", "-1"], "non-negative"),
    (["parity", "--backend", "numpy", "--length", "99999999999999"], "at most"),
    (["eval", "nowhere", "--lengths", "41-99999999999999999999999"], "at most"),
    (["eval", "nowhere", "--lengths", "1-1000000", "--stride", "1"], "more than"),
    (["eval", "nowhere", "--samples", "10000000000"], "at most"),
    (["generate", "nowhere", "--prompt", "a", "--tokens", "99999999999999999999"], "at most"),
    (["train", "--task", "parity_check", "--steps", "1", "--max-length", "100000000"],
     "at most"),
    (["train", "--task", "parity_check", "--steps", "1", "--hidden", "9" * 23], "at most"),
    (["train", "--task", "parity_check", "--steps", "1", "--batch", "9" * 23], "at most"),
    (["train", "--task", "parity_check", "--steps", "99999999999999"], "at most"),
    (["train", "--task", "parity_check", "--steps", "1", "--seed", "９"], "seed"),
])
def test_cli_sizes_are_bounded_and_parsed_as_ascii_integers(args, message, tmp_path):
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "run")]
    assert message in cli_error(args)
    if args[0] == "train":
        assert not (tmp_path / "run").exists()   # refused before the folder is made


def test_bounds_are_checked_before_anything_is_allocated():
    # a range of 10**23 lengths would take the machine's memory if built
    from treesched.evaluation import parse_lengths
    with pytest.raises(TreeschedError, match="at most"):
        parse_lengths("41-99999999999999999999999")
    with pytest.raises(TreeschedError, match="more than"):
        parse_lengths(f"1-{limits.MAX_LENGTH}")
    assert parse_lengths("41-500", 10)[:3] == [41, 51, 61]

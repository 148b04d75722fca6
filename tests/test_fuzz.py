"""Property-based tests (hypothesis) of the public API and every CLI command
with generated malformed input: shapes, dtypes, NaN / inf, lengths,
outputs, options, file contents (truncated, bit-flipped, foreign npz /
msgpack / JSON).  Each must end in a TreeschedError (API) or one ``Error:``
line (CLI), with no partial file and never a traceback; valid generated
inputs give the NumPy reference's outputs on every available backend.

With ``TREESCHED_RELIABILITY_REPORT=FILE`` the inputs tried and the clean
errors are appended to FILE (the counts of docs/reliability.md).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import treesched
from treesched.backends import why_unavailable
from treesched.cli.main import cli
from treesched.errors import TreeschedError
from treesched.haiku_import import decode_msgpack
from treesched.training import TrainConfig, train

COUNTS: Counter = Counter()
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    path = os.environ.get("TREESCHED_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as stream:
            stream.write(json.dumps({"test": "fuzz", **COUNTS}) + "\n")


def api_call(call):
    """Run ``call``; a TreeschedError counts as a clean refusal, anything
    else but success fails the test.  Returns the result or None."""
    COUNTS["api inputs"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no raw NumPy warning reaches a caller
        try:
            return call()
        except TreeschedError:
            COUNTS["api clean errors"] += 1
            return None


def cli_call(args, folder: Path | None = None):
    """Invoke the CLI: success, or exit 1 with one ``Error:`` line (2: click's
    usage error); never an exception, and no temporary file left in ``folder``."""
    COUNTS["cli inputs"] += 1
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args} raised {result.exception!r}") from result.exception
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        COUNTS["cli clean errors"] += 1
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code in (1, 2) and len(errors) == 1, (args, result.output)
    if folder is not None and folder.exists():
        leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, leftovers
    return result


# ------------------------------------------------------------- strategies
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 6), st.integers(2 ** 20, 10 ** 30),
    st.integers(-10 ** 30, -1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from(["odd-even", "lstm", "float32", "numpy", "all", "last", "³", "８"]))

dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int64", "bool",
                          "complex64", "uint8", "U1", "object"])


@st.composite
def arrays(draw, max_ndim=4, max_side=5):
    """Arrays of any small shape and dtype, sometimes with NaN / inf."""
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_ndim)))
    dtype = np.dtype(draw(dtypes))
    size = int(np.prod(shape))
    if dtype.kind in "fc":
        values = np.asarray(draw(st.lists(st.floats(-3, 3, width=16), min_size=size,
                                          max_size=size)), dtype).reshape(shape)
        if size and draw(st.booleans()):
            values.flat[draw(st.integers(0, size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf]))
        return values
    if dtype.kind == "U":
        return np.full(shape, "a")
    if dtype.kind == "O":
        return np.full(shape, None, object)
    return np.zeros(shape, dtype)


# ------------------------------------------------------------------- API
@FUZZ
@given(st.lists(anything, min_size=4, max_size=4),
       st.dictionaries(st.sampled_from(["num_layers", "cell", "pattern", "backend", "dtype",
                                        "seed"]), anything, max_size=3))
def test_model_constructor_refuses_malformed_settings_cleanly(sizes, options):
    args = sizes[:3]
    if all(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 6
           for value in args) and not options:
        COUNTS["api inputs"] += 1
        return    # a valid model: built by other tests
    model = api_call(lambda: treesched.PRLSTM(*args, **options))
    if model is not None:
        assert model.hidden_size <= 6 and model.input_size <= 6


@FUZZ
@given(length=anything, pattern=anything, outputs=anything)
def test_compile_refuses_malformed_requests_cleanly(length, pattern, outputs):
    schedule = api_call(lambda: treesched.compile(length, pattern, outputs))
    if schedule is not None:
        assert schedule.validate() is schedule


@FUZZ
@given(x=arrays(), lengths=st.one_of(st.none(), arrays(max_ndim=2)),
       outputs=st.one_of(st.just("all"), st.just("last"), anything))
def test_forward_refuses_malformed_inputs_cleanly(x, lengths, outputs):
    model = treesched.PRLSTM(3, 4, 2)
    logits = api_call(lambda: model.forward(x, lengths=lengths, outputs=outputs))
    if logits is not None:
        assert logits.shape[:1] == x.shape[:1] and logits.shape[2] == 2
        assert np.all(np.isfinite(logits))


@FUZZ
@given(x=arrays(), targets=arrays(), mask=st.one_of(st.none(), arrays(max_ndim=2)))
def test_loss_and_grads_refuse_malformed_inputs_cleanly(x, targets, mask):
    model = treesched.PRLSTM(3, 4, 2)
    api_call(lambda: model.loss_and_grads(x, targets, mask=mask))


@FUZZ
@given(name=st.one_of(st.sampled_from(["head/w", "head/b", "leaf/w", "merge/w"]), anything),
       value=st.one_of(arrays(), anything))
def test_parameter_assignment_refuses_malformed_values_cleanly(name, value):
    model = treesched.PRLSTM(3, 4, 2)
    before = model.params.numpy()
    refused = True

    def assign():
        nonlocal refused
        model.params[name] = value
        refused = False

    api_call(assign)
    for known, array in model.params.numpy().items():
        if refused or known != name:    # a refused value changes nothing
            np.testing.assert_array_equal(array, before[known])


def _document():
    return json.loads(treesched.compile(9, "sklansky", 3).to_json())


@FUZZ
@given(field=st.sampled_from(sorted(_document())), value=anything)
def test_schedule_from_json_refuses_mutated_documents_cleanly(field, value):
    document = _document()
    document[field] = value
    text = json.dumps(document, allow_nan=True)
    schedule = api_call(lambda: treesched.Schedule.from_json(text))
    if schedule is not None:
        assert schedule.validate() is schedule


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "model.npz"
    treesched.PRLSTM(3, 4, 2).save(path)
    return path.read_bytes()


def _mutations():
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 0.999)),
        st.tuples(st.just("flip"), st.floats(0, 0.999)),
        st.tuples(st.just("foreign"), st.integers(0, 3)))


def _mutate(data: bytes, mutation) -> bytes:
    kind, where = mutation
    if kind == "truncate":
        return data[:int(where * len(data))]
    if kind == "flip":
        index = int(where * len(data))
        return data[:index] + bytes([data[index] ^ 0x10]) + data[index + 1:]
    buffer = io.BytesIO()
    foreign = [lambda: np.savez(buffer, weights=np.ones(3)),
               lambda: np.savez(buffer, __config__=np.array(json.dumps({"format": "x"}))),
               lambda: buffer.write(msgpack.packb({"params": [1, 2]})),
               lambda: buffer.write(json.dumps({"format": "treesched-prlstm"}).encode())]
    foreign[where]()
    return buffer.getvalue()


@FUZZ
@given(mutation=_mutations())
def test_damaged_or_foreign_checkpoints_are_refused_cleanly(tmp_path_factory, checkpoint_bytes,
                                                           mutation):
    path = tmp_path_factory.mktemp("damaged") / "model.npz"
    path.write_bytes(_mutate(checkpoint_bytes, mutation))
    model = api_call(lambda: treesched.PRLSTM.load(path))
    if model is not None:       # a flip in a weight's bits is still a checkpoint
        assert all(np.all(np.isfinite(v)) for v in model.params.numpy().values())


@FUZZ
@given(data=st.binary(max_size=64), mutation=_mutations())
def test_arbitrary_msgpack_bytes_are_refused_cleanly(data, mutation):
    api_call(lambda: decode_msgpack(data))
    api_call(lambda: decode_msgpack(_mutate(msgpack.packb({"linear": {"w": data}}), mutation)))


# ------------------------------------------------------------ backends agree
def other_backends():
    return [name for name in ("numba", "cupy") if why_unavailable(name) is None]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), length=st.integers(1, 9), hidden=st.integers(1, 5),
       pattern=st.sampled_from(["odd-even", "sequential", "sklansky", "kogge-stone"]),
       seed=st.integers(0, 100))
def test_valid_generated_inputs_match_the_numpy_reference_on_every_backend(
        batch, length, hidden, pattern, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, 3))
    reference = treesched.PRLSTM(3, hidden, 2, pattern=pattern, dtype="float64", seed=seed)
    expected = reference.forward(x)
    for backend in other_backends():
        model = treesched.PRLSTM(3, hidden, 2, pattern=pattern, dtype="float64", seed=seed,
                                 backend=backend)
        got = model.forward(x)
        got = got.get() if hasattr(got, "get") and not isinstance(got, np.ndarray) else got
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    COUNTS["backend comparisons"] += len(other_backends())


# ------------------------------------------------------------------- CLI
def _bad_counts():
    """Option texts that are never a valid count: no test may run for long."""
    return st.one_of(
        st.sampled_from(["", " ", "0", "-1", "1.5", "1e3", "1_0", "³", "８", "0x10", "nan",
                         "inf", "9" * 60, "99999999999999999999999", "--", "a"]),
        st.integers(-10 ** 30, 0).map(str), st.integers(10 ** 10, 10 ** 40).map(str),
        st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs")), max_size=6))


def _any_text():
    return st.one_of(_bad_counts(), st.text(max_size=8),
                     st.sampled_from(["odd-even", "bogus", "all", "last", "float16"]))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig("parity_check", steps=2, hidden=4, batch=4, max_length=6), out,
          backend="numpy", progress=False, plot=False)
    return out


COMPILE_OPTIONS = ["--length", "--pattern", "--outputs", "--format", "--batch", "--hidden",
                   "--dtype", "--num-layers"]


@FUZZ
@given(option=st.sampled_from(COMPILE_OPTIONS), value=_any_text())
def test_compile_command_with_a_malformed_option(tmp_path_factory, option, value):
    folder = tmp_path_factory.mktemp("compile")
    args = {"--length": "9", "--outputs": "all", "--format": "text"}
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    cli_call(["compile", *flat, "-o", folder / "out.txt"], folder)


TRAIN_COUNTS = ["--steps", "--hidden", "--num-layers", "--batch", "--max-length", "--seed",
                "--checkpoint-every", "--log-every"]
TRAIN_NAMES = ["--task", "--pattern", "--cell", "--dtype", "--lr", "--clip", "--backend"]


@FUZZ
@given(option=st.sampled_from(TRAIN_COUNTS + TRAIN_NAMES), value=_bad_counts())
def test_train_command_with_a_malformed_option_writes_nothing(tmp_path_factory, option, value):
    folder = tmp_path_factory.mktemp("train")
    args = {"--task": "parity_check", "--steps": "1", "--hidden": "2", "--batch": "2",
            "--max-length": "3", "--backend": "numpy"}
    if option == "--seed" and value.strip() == "0":
        value = "-1"
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    result = cli_call(["train", *flat, "--quiet", "--out", folder / "run"], folder)
    if result.exit_code != 0:
        assert not (folder / "run").exists()


@FUZZ
@given(option=st.sampled_from(["--lengths", "--stride", "--samples", "--eval-batch", "--seed",
                               "--backend"]), value=_bad_counts())
def test_eval_command_with_a_malformed_option_leaves_the_run_as_it_was(run_folder, option,
                                                                      value):
    before = sorted(p.name for p in run_folder.iterdir())
    args = {"--lengths": "7", "--samples": "2", "--eval-batch": "2", "--backend": "numpy"}
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    result = cli_call(["eval", run_folder, *flat, "--quiet"], run_folder)
    if result.exit_code != 0:
        assert sorted(p.name for p in run_folder.iterdir()) == before


@FUZZ
@given(option=st.sampled_from(["--tokens", "--temperature", "--top-k", "--seed", "--backend"]),
       value=_bad_counts())
def test_generate_command_with_a_malformed_option(tmp_path_factory, option, value):
    args = {"--prompt": "a", "--tokens": "1"}
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    cli_call(["generate", tmp_path_factory.mktemp("gen") / "missing", *flat])


@FUZZ
@given(option=st.sampled_from(["--backend", "--dtype", "--length", "--batch", "--hidden",
                               "--seed"]), value=_bad_counts())
def test_parity_command_with_a_malformed_option(tmp_path_factory, option, value):
    folder = tmp_path_factory.mktemp("parity")
    args = {"--backend": "numpy", "--length": "2", "--batch": "1", "--hidden": "2",
            "--dtype": "float64"}
    args[option] = value
    flat = [item for pair in args.items() for item in pair]
    cli_call(["parity", *flat, "--json", folder / "report.json"], folder)


@FUZZ
@given(data=st.binary(max_size=80), mutation=_mutations(),
       dtype=st.sampled_from(["auto", "float32", "float16", ""]))
def test_import_checkpoint_command_with_malformed_files(tmp_path_factory, data, mutation,
                                                       dtype):
    folder = tmp_path_factory.mktemp("import")
    source = folder / "in.msgpack"
    source.write_bytes(_mutate(msgpack.packb({"linear": {"w": data}}), mutation))
    result = cli_call(["import-checkpoint", source, "--out", folder / "out.npz",
                       "--dtype", dtype], folder)
    assert result.exit_code != 0 and not (folder / "out.npz").exists()


@FUZZ
@given(flag=st.sampled_from(["--json", "--bogus", "-x"]))
def test_tasks_and_info_commands_never_trace_back(flag):
    cli_call(["tasks", flag])
    cli_call(["info", flag])

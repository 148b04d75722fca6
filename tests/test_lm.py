"""The character language model: vocabulary, corpus windows, validation bits
per character, ``treesched train --task lm`` (run folder, exact resumption,
bad input) and ``treesched generate`` (determinism, streaming, and greedy
decoding equal to ``model.forward`` re-run on the growing text)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import assert_one_line_error, run
from treesched.cli.main import cli
from treesched.errors import TreeschedError
from treesched.generation import generate, generate_characters, load_language_model, sample_next
from treesched.language_model import (VOCABULARY_FILE, CharacterCorpus, NextCharacterData,
                                      Vocabulary, bits_per_character, mean_cross_entropy,
                                      validation_size)
from treesched.model import PRLSTM
from treesched.streaming import Stream
from treesched.training import (LOG_FILE, MODEL_FILE, TrainConfig, read_log, read_run_config,
                                train)

TINY = ["--hidden", "8", "--batch", "8", "--context", "16", "--backend", "numpy", "--quiet"]


def make_text(characters=4000, seed=0):
    """Python-like lines drawn from a fixed set: some structure to learn, a small alphabet."""
    lines = ["def f(x):\n", "    return x + 1\n", "for i in range(10):\n", "    print(i)\n",
             "import os\n", "x = [a, b, c]\n", "# a comment\n", "class A:\n", "    pass\n"]
    rng = np.random.default_rng(seed)
    text = ""
    while len(text) < characters:
        text += lines[int(rng.integers(len(lines)))]
    return text[:characters]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus):
    """One tiny lm run (6 steps, hidden 8, context 16) shared by the generation tests."""
    folder = tmp_path_factory.mktemp("lm") / "run"
    result = run("train", "--task", "lm", "--corpus", corpus, "--steps", 6, *TINY,
                 "--log-every", 2, "--eval-every", 3, "--checkpoint-every", 3, "--out", folder)
    assert result.exit_code == 0, result.output
    return folder


# ---------------------------------------------------------------- vocabulary
def test_vocabulary_round_trip(tmp_path):
    text = "héllo, wörld\n\t€ done"
    vocabulary = Vocabulary.from_text(text)
    assert vocabulary.characters == tuple(sorted(set(text))) and len(vocabulary) == len(set(text))
    ids = vocabulary.encode(text)
    assert ids.dtype == np.int64 and vocabulary.decode(ids) == text
    vocabulary.save(tmp_path / "v.json")
    assert (tmp_path / "v.json").read_text().isascii()
    again = Vocabulary.load(tmp_path / "v.json")
    assert again == vocabulary and again.decode(again.encode(text)) == text
    with pytest.raises(TreeschedError, match=r"2 character\(s\) outside.*'x' \(U\+0078\).*'Z'"):
        vocabulary.encode("hex Zero", "the prompt")
    (tmp_path / "bad.json").write_text('{"format": "treesched-vocabulary", "version": 1, '
                                       '"characters": ["b", "a"]}')
    with pytest.raises(TreeschedError, match="corrupt"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(TreeschedError, match="does not exist"):
        Vocabulary.load(tmp_path / "absent.json")


# ---------------------------------------------------------- corpus, windows
def test_corpus_split_and_next_character_targets(corpus):
    text = corpus.read_text(encoding="utf-8")
    data = NextCharacterData(CharacterCorpus.read(corpus), context=16)
    held_out = validation_size(len(text))
    assert held_out == len(text) // 20 == data.corpus.valid_ids.size
    vocabulary = data.vocabulary
    assert vocabulary.decode(data.corpus.train_ids) == text[:-held_out]
    assert vocabulary.decode(data.corpus.valid_ids) == text[-held_out:]
    batch = data.draw(np.random.default_rng(3), 5)
    assert batch.x.shape == batch.targets.shape == (5, 16, vocabulary.size)
    assert batch.mask.shape == (5, 16) and batch.mask.all()
    inputs, targets = batch.x.argmax(-1), batch.targets.argmax(-1)
    for row in range(5):
        window = vocabulary.decode(inputs[row]) + vocabulary.decode(targets[row][-1:])
        assert window in text[:-held_out]                     # a window of the training part
        assert vocabulary.decode(targets[row]) == window[1:]  # the target: the next character
    again = data.draw(np.random.default_rng(3), 5)
    assert np.array_equal(again.x, batch.x)                   # the generator alone decides


def test_bits_per_character_counts_every_prediction_once():
    rng = np.random.default_rng(0)
    model = PRLSTM(6, 8, 6, backend="numpy", seed=1)
    ids = rng.integers(0, 6, size=23)        # 22 predictions: windows of 8, 8 and 6
    want = 0.0
    for start in (0, 8, 16):
        window = ids[start:min(start + 9, 23)]
        logits = model.forward(np.eye(6, dtype=np.float32)[window[None, :-1]])[0]
        logits = logits.astype(np.float64)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want -= log_softmax[np.arange(window.size - 1), window[1:]].sum()
    assert mean_cross_entropy(model, ids, 8, batch_size=1) == pytest.approx(want / 22, rel=1e-6)
    assert bits_per_character(model, ids, 8) == pytest.approx(want / 22 / math.log(2), rel=1e-6)


# ---------------------------------------------------------------- training
def test_train_writes_a_language_model_run(lm_run, corpus):
    for name in ("config.json", MODEL_FILE, "train_state.npz", LOG_FILE, VOCABULARY_FILE,
                 "training_curve.png"):
        assert (lm_run / name).is_file(), name
    config = read_run_config(lm_run)
    assert config["train"] == {"task": "lm", "corpus": str(corpus.resolve()), "context": 16,
                               "steps": 6, "hidden": 8, "num_layers": 2, "pattern": "odd-even",
                               "cell": "lstm", "dtype": "float32", "lr": 0.001, "batch": 8,
                               "clip": 1.0, "seed": 0}
    vocabulary = Vocabulary.load(lm_run / VOCABULARY_FILE)
    assert vocabulary == Vocabulary.from_text(corpus.read_text(encoding="utf-8"))
    assert config["model"]["input_size"] == config["model"]["output_size"] == vocabulary.size
    assert config["task"]["corpus"]["valid_characters"] == 200
    records = read_log(lm_run / LOG_FILE)
    assert [r["step"] for r in records] == [2, 3, 4, 6]   # logged, or validated (3, 6)
    for record in records:
        assert record["bpc"] == pytest.approx(record["loss"] / math.log(2))
    assert [r["step"] for r in records if "valid_bpc" in r] == [3, 6]
    last = records[-1]
    assert last["valid_bpc"] == pytest.approx(last["valid_loss"] / math.log(2))
    model, _, _ = load_language_model(lm_run, backend="numpy")
    data = NextCharacterData(CharacterCorpus.read(corpus), 16)
    assert bits_per_character(model, data.corpus.valid_ids, 16) == \
        pytest.approx(last["valid_bpc"], rel=1e-6)
    assert 0 < last["valid_bpc"] < math.log2(vocabulary.size) + 0.5


def test_train_prints_bits_per_character(corpus, tmp_path):
    result = run("train", "--task", "lm", "--corpus", corpus, "--steps", 2, *TINY,
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "validation" in result.stdout and "bits per character" in result.stdout
    progress = run("train", "--task", "lm", "--corpus", corpus, "--steps", 2,
                   *[a for a in TINY if a != "--quiet"], "--out", tmp_path / "shown")
    assert "bpc" in progress.stderr and "valid_bpc" in progress.stderr


def test_resume_is_exact(corpus, tmp_path):
    settings = dict(task="lm", corpus=str(corpus), context=16, steps=8, hidden=8, batch=8)
    quiet = dict(backend="numpy", progress=False, plot=False, checkpoint_every=3, log_every=1,
                 eval_every=4)
    whole = train(TrainConfig(**settings), tmp_path / "whole", **quiet)
    killed = train(TrainConfig(**settings), tmp_path / "killed", stop_at=5, **quiet)
    assert killed.stopped_early and killed.step == 5        # the checkpoint is at step 3
    result = run("train", "--out", tmp_path / "killed", "--resume", "--backend", "numpy",
                 "--quiet", "--checkpoint-every", 3, "--log-every", 1, "--eval-every", 4)
    assert result.exit_code == 0, result.output
    resumed = PRLSTM.load(tmp_path / "killed" / MODEL_FILE)
    for name, value in whole.model.params.items():
        assert np.array_equal(resumed.params[name], value), name
    strip = ("seconds", "step_seconds")
    records = [{k: v for k, v in r.items() if k not in strip}
               for r in read_log(tmp_path / "killed" / LOG_FILE)]
    assert records == [{k: v for k, v in r.items() if k not in strip}
                       for r in read_log(tmp_path / "whole" / LOG_FILE)]


def test_resume_checks_the_corpus(corpus, tmp_path):
    text = corpus.read_text(encoding="utf-8")
    copy = tmp_path / "copy.txt"
    copy.write_text(text, encoding="utf-8")
    train(TrainConfig(task="lm", corpus=str(copy), context=16, steps=2, hidden=8, batch=8),
          tmp_path / "run", backend="numpy", progress=False, plot=False, checkpoint_every=1,
          stop_at=1)
    copy.write_text(text[::-1], encoding="utf-8")
    assert_one_line_error(run("train", "--out", tmp_path / "run", "--resume", "--backend",
                              "numpy", "--quiet"), "not the text")
    moved = tmp_path / "moved.txt"
    moved.write_text(text, encoding="utf-8")   # the same text elsewhere: resumable
    result = run("train", "--out", tmp_path / "run", "--resume", "--corpus", moved,
                 "--backend", "numpy", "--quiet")
    assert result.exit_code == 0, result.output
    assert_one_line_error(run("train", "--out", tmp_path / "run", "--resume", "--steps", 4,
                              "--context", 8, "--corpus", moved, "--backend", "numpy"),
                          "context")


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["does not exist"]),
    ("empty", ["is empty"]),
    ("folder", ["is not a file"]),
    ("binary", ["not UTF-8"]),
    ("short", ["too short for context 16", "--context"]),
    ("no corpus", ["--corpus"]),
    ("other task", ["--corpus", "parity_check"]),
    ("max length", ["--max-length", "--context"]),
    ("context for a formal task", ["--context", "parity_check"]),
    ("eval every for a formal task", ["--eval-every"]),
    ("bad context", ["--context"]),
])
def test_train_bad_input(tmp_path, corpus, case, fragments):
    paths = {"missing": tmp_path / "absent.txt", "empty": tmp_path / "empty.txt",
             "folder": tmp_path, "binary": tmp_path / "binary.txt",
             "short": tmp_path / "short.txt"}
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe")
    (tmp_path / "short.txt").write_text("x" * 17)    # 15 training characters: 16 + 1 needed
    lm = ["--task", "lm", "--corpus", paths.get(case, corpus)]
    args = {"no corpus": ["--task", "lm"],
            "other task": ["--task", "parity_check", "--corpus", corpus],
            "max length": lm + ["--max-length", "20"],
            "context for a formal task": ["--task", "parity_check", "--context", "8"],
            "eval every for a formal task": ["--task", "parity_check", "--eval-every", "5"],
            "bad context": ["--task", "lm", "--corpus", corpus, "--context", "0"],
            }.get(case, lm)
    if "--context" not in args:
        args = args + ["--context", "16"]
    result = run("train", *args, "--steps", 2, "--hidden", 8, "--batch", 4, "--backend",
                 "numpy", "--quiet", "--out", tmp_path / "run")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads any file")
def test_train_unreadable_corpus(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("some text " * 10)
    path.chmod(0)
    try:
        assert_one_line_error(run("train", "--task", "lm", "--corpus", path, *TINY, "--out",
                                  tmp_path / "run"), "cannot read corpus")
    finally:
        path.chmod(0o644)
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_language_model(lm_run):
    assert_one_line_error(run("eval", lm_run, "--backend", "numpy"), "language model",
                          "valid_bpc")


# -------------------------------------------------------------- generation
def test_sample_next():
    logits = np.array([1.0, 3.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    assert sample_next(logits, rng, temperature=0) == 1            # the first maximum
    assert sample_next(logits, rng, temperature=5.0, top_k=1) == 1
    drawn = {sample_next(logits, rng, 1.0, top_k=2) for _ in range(200)}
    assert drawn == {1, 3}                                        # only the two largest
    counts = np.bincount([sample_next(logits, rng, 1.0) for _ in range(4000)], minlength=4)
    want = np.exp(logits) / np.exp(logits).sum()
    assert np.allclose(counts / 4000, want, atol=0.03)


def test_generation_is_deterministic_per_seed(lm_run):
    model, vocabulary, _ = load_language_model(lm_run, backend="numpy")
    texts = [generate(model, vocabulary, "def ", 30, temperature=2.0, seed=seed)
             for seed in (1, 1, 2)]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert len(texts[0]) == 30 and set(texts[0]) <= set(vocabulary.characters)
    first = run("generate", lm_run, "--prompt", "for", "--tokens", 25, "--seed", 7,
                "--temperature", 1.5, "--backend", "numpy")
    second = run("generate", lm_run, "--prompt", "for", "--tokens", 25, "--seed", 7,
                 "--temperature", 1.5, "--backend", "numpy")
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("for")
    assert len(first.stdout) == len("for") + 25 + 1              # prompt, 25 characters, newline
    assert "25 characters" in first.stderr and "seed 7" in first.stderr


def test_generation_streams(lm_run, monkeypatch):
    """Each character is handed out before the next streaming step runs."""
    model, vocabulary, _ = load_language_model(lm_run, backend="numpy")
    pushes = []
    original = Stream.push
    monkeypatch.setattr(Stream, "push", lambda self, x, **kw: pushes.append(1) or
                        original(self, x, **kw))
    characters = generate_characters(model, vocabulary, "def f", 4, seed=3)
    seen = []
    for character in characters:
        seen.append(len(pushes))
    assert seen == [0, 1, 2, 3] and len(pushes) == 3              # the last needs no push


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--top-k", "1"]])
def test_greedy_generation_equals_the_parallel_forward(lm_run, sampling):
    """Through the CLI: each greedy character is the argmax of model.forward
    re-run on the text before it (the stream against the parallel forward)."""
    prompt, tokens = "class A:\n", 20
    # a real process, its stdout read as the UTF-8 bytes it writes
    process = subprocess.run([sys.executable, "-m", "treesched.cli.main", "generate",
                              str(lm_run), "--prompt", prompt, "--tokens", str(tokens),
                              *sampling, "--backend", "numpy", "--quiet"],
                             capture_output=True, timeout=300,
                             env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert process.returncode == 0, process.stderr.decode(errors="replace")
    text = process.stdout.decode("utf-8")[:-1]
    assert text.startswith(prompt) and len(text) == len(prompt) + tokens, repr(text)
    model, vocabulary, _ = load_language_model(lm_run, backend="numpy")
    for position in range(len(prompt), len(text)):
        ids = vocabulary.encode(text[:position])
        logits = model.forward(vocabulary.one_hot(ids)[None])[0, -1]
        chosen = vocabulary.encode(text[position])[0]
        best = int(np.argmax(logits))
        # a flip is only acceptable between logits equal to float tolerance
        assert chosen == best or logits[best] - logits[chosen] < 1e-5, (position, chosen, best)


def test_generate_bad_input(lm_run, tmp_path):
    base = ["--backend", "numpy"]
    assert_one_line_error(run("generate", lm_run, "--prompt", "dëf€", *base),
                          "outside the vocabulary", "'ë' (U+00EB)", "'€' (U+20AC)")
    assert_one_line_error(run("generate", lm_run, "--prompt", "", *base), "prompt is empty")
    size = Vocabulary.load(lm_run / VOCABULARY_FILE).size
    for option, value in (("--tokens", "0"), ("--tokens", "x"), ("--temperature", "-1"),
                          ("--temperature", "nan"), ("--top-k", "-1"),
                          ("--top-k", str(size + 1)), ("--seed", "-2")):
        assert_one_line_error(run("generate", lm_run, "--prompt", "d", option, value, *base),
                              option)
    assert_one_line_error(run("generate", tmp_path / "absent", "--prompt", "d", *base),
                          "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("generate", tmp_path / "empty", "--prompt", "d", *base),
                          "not a treesched run")
    formal = tmp_path / "formal"
    train(TrainConfig("parity_check", steps=1, hidden=8, batch=4, max_length=4), formal,
          backend="numpy", progress=False, plot=False)
    assert_one_line_error(run("generate", formal, "--prompt", "d", *base),
                          "not a language model")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", MODEL_FILE):
        (broken / name).write_bytes((lm_run / name).read_bytes())
    assert_one_line_error(run("generate", broken, "--prompt", "d", *base), "vocabulary")
    (broken / VOCABULARY_FILE).write_text(json.dumps(
        {"format": "treesched-vocabulary", "version": 1, "characters": ["a", "b"]}))
    assert_one_line_error(run("generate", broken, "--prompt", "a", *base), "does not belong")

"""`--config FILE`: a command's options from YAML or JSON, the command line's own winning, bad files refused with
the file and key named; options given from Python checked alike."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tokdistill_fast import DistillConfig, api, cli, distill, swap
from tokdistill_fast.config import UserInputError


def parsed(argv: list[str]):
    parser = cli.build_parser()
    return parser.parse_args(cli.with_config(parser, argv))


def test_options_come_from_the_file_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: m\nnew_tokens: words.txt\ncorpus: [a.txt, b.txt]\ntarget-layer: -1\nlr: 5e-3\n"
                   "no-variants: true\noverwrite: false\nout: o\n")
    args = parsed(["-q", "distill", "--config", str(cfg), "--lr", "1e-2"])
    assert (args.model, args.new_tokens, args.corpus, args.out) == ("m", "words.txt", ["a.txt", "b.txt"], "o")
    assert (args.target_layer, args.lr, args.add_variants, args.overwrite) == (-1, 1e-2, False, False)
    # An option the command line gives replaces the file's, and so does one exclusive with it.
    args = parsed(["distill", f"--config={cfg}", "--corpus", "c.txt", "--tokenizer", "T"])
    assert (args.corpus, args.new_tokens, args.target_tokenizer) == (["c.txt"], None, "T")
    js = tmp_path / "eval.json"
    js.write_text(json.dumps({"original": "m", "adapted": "a", "out": "e.json", "heldout": "h.txt",
                              "vs-mean": True, "no-definitions": True}))
    args = parsed(["eval", "--config", str(js)])
    assert (args.heldout, args.vs_mean, args.definitions) == (["h.txt"], True, False)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    assert parsed(["select", "--config", str(empty), "--model", "m", "--corpus", "c", "--out", "w"]).top is None


@pytest.mark.parametrize("text, message", [
    ("fooo: 1\n", "fooo: not an option of `tokdistill distill`"),
    ("corpus: {a: 1}\n", "corpus: needs values"),
    ("corpus: []\n", "corpus: needs values"),
    ("seed: [1, 2]\n", "seed: needs one value"),
    ("overwrite: yes please\n", "overwrite: true or false"),
    ("[a, b\n", ":2: not YAML or JSON"),
    ("- a\n", "not a mapping of option names to values"),
    ('{"epochs": "two"}\n', "epochs: expected a whole number or auto, not 'two'"),  # named with its file
    ("lr: [fast]\n", "lr: expected a number or auto, not 'fast'"),
])
def test_a_bad_file_is_refused_with_its_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    assert cli.main(["distill", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--config {cfg}" in err and message in err and "Traceback" not in err
    assert cli.main(["distill", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--epochs", "foo", "argument --epochs: expected a whole number or auto, not 'foo'"),
    ("--lr", "fast", "argument --lr: expected a number or auto, not 'fast'"),
    ("--loss-positions", "some", "expected a whole number, auto or all, not 'some'"),
    ("--left-context", "left", "expected a whole number, auto or centred, not 'left'"),
])
def test_a_bad_value_names_what_the_flag_takes(capsys, flag, value, message):
    """A value of the wrong type is refused saying what the flag takes, not the name of the function that read it."""
    with pytest.raises(SystemExit) as e:
        parsed(["distill", "--model", "m", "--new-tokens", "w", "--out", "o", flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_distill_runs_from_a_file(model_dirs, words_file, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {model_dirs[('llama', 'bytelevel', True)]}\nnew-tokens: {words_file}\nmethod: mean\n"
                   f"seed: 3\nout: {out}\n")
    assert cli.main(["distill", "--config", str(cfg)]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert (settings["method"], settings["seed"]) == ("mean", 3)
    # The command line that ran, the file's options written out: it reruns the job without the file.
    command = shlex.split(settings["extra"]["command"])
    assert command[:2] == ["tokdistill", "distill"] and "--config" not in " ".join(command)
    cfg.unlink()
    assert cli.main([*command[1:], "--overwrite"]) == 0
    again = json.loads((out / "report.json").read_text())["settings"]
    assert {k: v for k, v in again.items() if k != "extra"} == {
        **{k: v for k, v in settings.items() if k != "extra"}, "overwrite": True}


@pytest.mark.parametrize(("options", "message"), [
    ({"seed": -1}, "--seed must be 0 or more (a whole number), not -1"),
    ({"batch_size": "16"}, "--batch-size must be 1 or more (a whole number), not '16'"),
    ({"snippets_per_token": None}, "--snippets-per-token must be 1 or more"),
    ({"target_layer": 2.5}, "--target-layer must be a whole number or auto, not 2.5"),
    ({"epochs": True}, "--epochs must be 1 or more (a whole number) or auto, not True"),
    ({"lr": float("inf")}, "--lr must be a positive number or auto, not inf"),
    ({"generate_temperature": 0}, "--generate-temperature must be a positive number, not 0"),
    ({"max_norm_quantile": 1.5}, "--max-norm-quantile must be between 0 and 1"),
    ({"left_context": -1}, "--left-context must be 0 or more (a whole number) or centred or auto, not -1"),
])
def test_a_config_from_python_is_checked_as_the_command_line_is(options, message):
    """Values the command line's types would refuse, given from Python (a float layer the run would truncate, a
    string count, a seed numpy refuses after the search, a temperature that samples garbage), fail in validate()
    with the option named, before any work."""
    with pytest.raises(UserInputError, match=re.escape(message)):
        DistillConfig(**options).validate()


def test_the_api_reads_one_corpus_path_and_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    """distill(corpus="a.txt") reads that file (not each of its characters as a path, "/" among them); a config
    that is not a DistillConfig, a word that is not a string and a word given for a word-list file are refused in
    one line."""
    from tokdistill_fast import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "distill_words", lambda model, words, corpus, *a: seen.setdefault("corpus", corpus))
    distill("m", ["palatable"], corpus=str(tmp_path / "a.txt"))
    assert seen["corpus"] == [str(tmp_path / "a.txt")]
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        distill("m", ["palatable"], config={"method": "mean"})
    with pytest.raises(UserInputError, match="every word must be a string, not 1"):
        swap.requested_words(["palatable", 1], None)
    with pytest.raises(UserInputError, match=re.escape("new_tokens 'camphor': no such file; pass the words as a list")):
        distill("m", "camphor", corpus=str(tmp_path / "a.txt"))  # a word, not a file: named as the API's argument
    monkeypatch.setattr(api, "distill_target", lambda model, target, *a: seen.setdefault("target", target))
    distill("m", None, corpus=str(tmp_path / "a.txt"), target_tokenizer="t")
    assert seen["target"] == "t"
    with pytest.raises(UserInputError, match="give new_tokens or a target tokenizer, not both"):
        distill("m", ["palatable"], corpus=str(tmp_path / "a.txt"), target_tokenizer="t")  # not dropped silently


def test_rows_kept_in_memory_get_the_finite_and_norm_checks():
    """Without an output directory, the run's rows still pass the finite and norm guarantees or fail naming the
    token (before, NaN rows came back from distill(out=None) without a word)."""
    from tokenizers import Tokenizer, models

    from tokdistill_fast.check import check_rows
    from tokdistill_fast.config import GuaranteeError

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, "a")))
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # row 2 is outside the vocabulary: not a reference
    check_rows(table, tok, torch.tensor([[0.3, 0.0], [1.0, 1.0]]), [" x", " y"])
    for bad, name in ((torch.tensor([[float("nan"), 0.0]]), "finite"), (torch.tensor([[0.2, 0.0]]), "norm"),
                      (torch.tensor([[3.0, 0.0]]), "norm")):
        with pytest.raises(GuaranteeError, match=f"check {name} failed for token ' x'"):
            check_rows(table, tok, bad, [" x"])

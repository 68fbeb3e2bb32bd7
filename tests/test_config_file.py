"""`--config FILE`: a command's options from YAML or JSON, the command line's own winning, bad files refused with
the file and key named."""

from __future__ import annotations

import json
import shlex

import pytest

from tokdistill_fast import cli


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

"""Model geometry and `tokdistill check` on tiny random models (subtoken-mean init, no training): padded
vocabularies reuse their spare rows, --pad-to-multiple-of pads, tied models stay tied, untied models get output
rows by policy, original rows stay bit-identical, and check catches broken outputs and names the token."""

import json
import shutil
import subprocess

import pytest
import torch
from conftest import NEW_WORDS, save_tiny_model, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast import DistillConfig, check, cli, distill, extend
from tokdistill_fast.config import GuaranteeError, UserInputError
from tokdistill_fast.tools import runtimes

MEAN = dict(method="mean", dtype="float32")


def run(src, words_file, out, **cfg):
    return distill(src, words_file, [], out, DistillConfig(**{**MEAN, **cfg}))


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tokenizers_by_kind):
    """An untied Llama whose matrices have 40 more rows than its byte-level tokenizer (Qwen2.5/OLMo-2 style)."""
    return save_tiny_model(tmp_path_factory.mktemp("padded") / "m", "llama", tokenizers_by_kind["bytelevel"],
                           tied=False, extra_rows=40)


def test_padded_vocab_reuses_spare_rows(padded, words_file, tmp_path):
    out = tmp_path / "out"
    result = run(padded, words_file, out, output_embeddings="zeros", casing_variants=True)
    tok = AutoTokenizer.from_pretrained(padded)
    rows = AutoModelForCausalLM.from_pretrained(padded).get_input_embeddings().weight.shape[0]
    ids = sorted(t.new_id for t in result.tokens)
    assert ids == list(range(len(tok), len(tok) + len(ids))) and ids[-1] < rows  # taken from the tokenizer
    after = AutoModelForCausalLM.from_pretrained(out)
    assert after.config.vocab_size == after.get_input_embeddings().weight.shape[0] == rows  # no growth
    assert torch.count_nonzero(after.get_output_embeddings().weight[ids]) == 0  # --output-embeddings zeros
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["grown"] == 0 and report["check"]["passed"]
    casing = [t for t in result.tokens if t.variant.startswith("casing")]
    assert casing and report["counts"]["casing_variants"] == len(casing)
    assert report["check"]["matrices"]["padding_rows"] == rows - len(tok) - len(ids)
    assert check.check_dir(out, padded, forward=False)["passed"]


def test_a_run_loads_the_models_tokenizer_once(padded, words_file, tmp_path, monkeypatch):
    """The output check compares the output tokenizer's reload with the run's own load of the model's tokenizer
    (`reload_ratio`), instead of loading it again only to time it (about 3 s for Gemma-3's 262k vocabulary)."""
    real, loads = AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda path, **kw: loads.append(str(path)) or real(path, **kw))
    out = tmp_path / "out"
    run(padded, words_file, out)
    assert loads.count(str(padded)) == 1
    section = json.loads((out / "report.json").read_text())["check"]["tokenizer"]
    assert section["original_reload_seconds"] > 0 and section["reload_ratio"] > 0


@pytest.mark.parametrize("tied", [True, False])
def test_pad_to_multiple_of(tmp_path, tokenizers_by_kind, words_file, tied):
    src = save_tiny_model(tmp_path / "src", "llama", tokenizers_by_kind["metaspace"], tied=tied)
    out = tmp_path / "out"
    result = run(src, words_file, out, pad_to_multiple_of=64, output_embeddings="auto" if tied else "mean")
    before = AutoModelForCausalLM.from_pretrained(src)
    after = AutoModelForCausalLM.from_pretrained(out)
    V = before.get_input_embeddings().weight.shape[0]
    emb, head = after.get_input_embeddings().weight, after.get_output_embeddings().weight
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= V + len(result.tokens) and after.config.vocab_size == emb.shape[0]
    assert (emb.data_ptr() == head.data_ptr()) == tied and after.config.tie_word_embeddings == tied
    assert torch.equal(emb[:V], before.get_input_embeddings().weight)
    assert torch.equal(head[:V], before.get_output_embeddings().weight)
    ids = [t.new_id for t in result.tokens]
    padding = [i for i in range(V, emb.shape[0]) if i not in ids]
    assert padding and torch.count_nonzero(emb[padding]) == 0 and torch.count_nonzero(head[padding]) == 0
    if not tied:  # mean policy: subtoken mean of the original output rows
        t = result.tokens[0]
        torch.testing.assert_close(head[t.new_id], before.get_output_embeddings().weight[t.sub_ids].mean(0))
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    mass = json.loads((out / "report.json").read_text())["check"]["probability_mass"]
    assert mass["padding_ids"] == len(padding) and mass["positions"] > 0


@pytest.mark.parametrize("family,tied,bias", [("llama", True, False), ("llama", False, True), ("gemma3", True, False),
                                               ("qwen2", False, False)])
def test_grow_embeddings_matches_hf_resize(family, tied, bias):
    """Our growth (zero rows appended, no random matrix drawn first) leaves the model HF's resize would, once its
    new rows are zeroed as ours start: every tensor, the tie, the config and the logits."""
    from tokdistill_fast.export import PADDING_BIAS, grow_embeddings

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family, 50, tied), dtype=torch.float32)
        if bias:
            model.lm_head.bias = torch.nn.Parameter(torch.randn(50))
        return model

    ours, gold = build(), build()
    geometry = grow_embeddings(ours, 53, pad_to_multiple_of=8)
    gold.resize_token_embeddings(56, mean_resizing=False)
    with torch.no_grad():
        gold.get_input_embeddings().weight[50:] = 0
        gold.get_output_embeddings().weight[50:] = 0
        if bias:
            gold.lm_head.bias[50:] = PADDING_BIAS
    assert geometry == {"rows_before": 50, "rows_after": 56, "rows_needed": 53, "pad_to_multiple_of": 8, "grown": 6}
    assert ours.config.vocab_size == gold.config.vocab_size == 56
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    assert ours.state_dict().keys() == gold.state_dict().keys()
    for name, tensor in gold.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = torch.tensor([[2, 7, 51, 55, 9]])
    assert torch.equal(ours(ids).logits, gold(ids).logits)


@pytest.fixture(scope="module")
def good(tmp_path_factory, model_dirs, words_file):
    src = model_dirs[("llama", "bytelevel", True)]
    out = tmp_path_factory.mktemp("good") / "out"
    run(src, words_file, out, tokenizer_mode="vocab")
    return src, out


def test_check_cli_passes_reads_the_output_only_and_writes_json_where_asked(good, tmp_path, capsys):
    """`tokdistill check` leaves the output as it was (its report keeps the check distill ran, with a corpus
    sample as probe text) and writes its own section where --json asks."""
    src, out = good
    before = {name: (out / name).read_bytes() for name in ("report.json", "report.md")}
    probe = tmp_path / "probe.txt"
    probe.write_text("The patient said the soup was green.\n\nA bivalve, said the cook.\n", encoding="utf-8")
    assert cli.main(["check", str(out), "--original", str(src), "--probe", str(probe), "--json",
                     str(tmp_path / "check.json")]) == 0
    section = json.loads((tmp_path / "check.json").read_text())
    assert section["passed"] and section["probe"]["compared"] > 0 and section["one_id"]["contexts_checked"] > 0
    assert section["tokenizer"]["reload_seconds"] > 0 and "reload_ratio" in section["tokenizer"]
    assert "passed" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads(before["report.json"])["check"]["passed"]  # distill's own check
    assert cli.main(["check", str(out), "--json", str(out / "report.json"), "--overwrite"]) == 2
    assert "inside the output being checked" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before["report.json"]


def test_check_refuses_another_original_and_a_broken_report(good, model_dirs, tmp_path, capsys):
    """An --original whose vocabulary the output does not keep is another model: one line, exit 2, and the output's
    report left as it was, rather than every check failing into it; a report.json that is not JSON is one line."""
    src, out = good
    before = (out / "report.json").read_bytes()
    other = model_dirs[("gemma3", "metaspace", True)]
    assert cli.main(["check", str(out), "--original", str(other), "--no-forward"]) == 2
    assert "is it the model the output was made from?" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    broken = broken_copy(out, tmp_path, "report")
    for text in ("[1]", '{"tokens": [{"word": "palatable", "kl": 0.1}]}'):  # the second: an eval report
        (broken / "report.json").write_text(text)
        assert cli.main(["check", str(broken), "--no-forward"]) == 2
        assert "not a report.json that distill wrote" in capsys.readouterr().err


def broken_copy(out, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return dst


def test_check_names_changed_original_rows(good, tmp_path, capsys):
    src, out = good
    bad = broken_copy(out, tmp_path, "rows")
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key][7] += 1.0
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["check", str(bad), "--original", str(src), "--no-forward"]) == 1
    err = capsys.readouterr().err
    assert "check original_rows failed" in err and "row 7" in err


def test_check_prints_its_warnings(good, capsys, monkeypatch):
    """Every warning is printed with the verdict, not only kept in the --json file (`passed` alone had hidden a
    short row's warning; only runtime warnings were printed)."""
    from tokdistill_fast import check

    src, out = good
    real = check.check_dir

    def with_a_warning(*args, **kwargs):
        section = real(*args, **kwargs)
        section["warnings"] += [{"check": "norm_low", "token": " palatable", "detail": "input row norm 0.1 below"}] * 25
        return section

    monkeypatch.setattr(check, "check_dir", with_a_warning)
    assert cli.main(["check", str(out), "--original", str(src), "--no-forward"]) == 0
    captured = capsys.readouterr()
    assert "warning (norm_low, ' palatable'): input row norm 0.1 below" in captured.err
    assert "warning (runtime)" in captured.err and "passed (26 warning(s))" in captured.out
    assert captured.err.count("warning (") == 20 and "... and 6 more warning(s)" in captured.err  # not a flood


def test_check_names_a_config_that_disagrees_with_the_rows_and_skips_the_forward_pass(good, tmp_path, capsys):
    """A config.vocab_size other than the row count fails as `vocab_size`, with the forward pass left out (the model
    does not load): before, transformers' loading error came out as a traceback."""
    _, out = good
    bad = broken_copy(out, tmp_path, "config")
    config = json.loads((bad / "config.json").read_text())
    config["vocab_size"] += 42
    (bad / "config.json").write_text(json.dumps(config))
    assert cli.main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "check vocab_size failed: config.vocab_size" in err and "Traceback" not in err


def test_check_names_token_without_one_id(good, tmp_path, capsys):
    src, out = good
    bad = broken_copy(out, tmp_path, "tok")
    tj = json.loads((bad / "tokenizer.json").read_text())
    del tj["model"]["vocab"]["\u0120palatable"]  # the word's running-text entry is gone
    (bad / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    assert cli.main(["check", str(bad), "--no-forward"]) == 1
    assert "check one_id failed for token 'palatable'" in capsys.readouterr().err


def test_check_names_non_finite_and_out_of_range_rows(good, tmp_path, capsys):
    src, out = good
    bad = broken_copy(out, tmp_path, "nan")
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if "embed_tokens" in k)
    new = load_file(out / "new_embeddings.safetensors")["token_ids"].tolist()
    weights[key][new[0]] = float("nan")
    weights[key][new[2]] *= 1000
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["check", str(bad), "--no-forward"]) == 1
    err = capsys.readouterr().err
    assert "check finite failed for token ' palatable'" in err and "check norm failed" in err


def test_distill_leaves_no_output_when_a_guarantee_breaks(model_dirs, words_file, tmp_path, monkeypatch):
    from tokdistill_fast import export

    real = export.write_rows

    def corrupt(model, toks, rows, out_rows, tied):
        real(model, toks, rows * float("nan"), out_rows, tied)

    monkeypatch.setattr(export, "write_rows", corrupt)
    out = tmp_path / "out"
    with pytest.raises(GuaranteeError, match="check finite failed for token"):
        run(model_dirs[("llama", "bytelevel", True)], words_file, out)
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not list(tmp_path.glob("out.partial"))
    code = cli.main(["distill", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens",
                     str(words_file), "--method", "mean", "--out", str(out)])
    assert code == 1 and not out.exists()


def test_added_mode_keeps_slow_files_and_vocab_mode_drops_them(model_dirs, words_file, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(model_dirs[("gemma3", "metaspace", True)], src)
    (src / "tokenizer.model").write_bytes(b"not a real sentencepiece model")
    for mode, kept in (("added", ["tokenizer.model"]), ("vocab", [])):
        out = tmp_path / mode
        run(src, words_file, out, tokenizer_mode=mode)
        slow = json.loads((out / "report.json").read_text())["model"]["slow_tokenizer_files"]
        assert slow["kept"] == kept and (out / "tokenizer.model").exists() == bool(kept)
        assert slow["dropped"] == ([] if kept else ["tokenizer.model"])
    assert {t for t in NEW_WORDS} <= {t["word"] for t in json.loads((out / "report.json").read_text())["tokens"]}


def test_bad_corpus_leaves_no_partial_and_out_creates_parents(model_dirs, words_file, tmp_path):
    """A run that fails on its inputs leaves neither OUT nor OUT.partial (nothing to resume); --out with missing
    parents creates them."""
    model = str(model_dirs[("llama", "bytelevel", True)])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("the palatable caf\xe9 is palatable.\n".encode("latin-1"))
    out = tmp_path / "out"
    code = cli.main(["distill", "--model", model, "--new-tokens", str(words_file), "--corpus", str(bad),
                     "--target-layer", "1", "--out", str(out)])
    assert code == 2 and not out.exists() and not (tmp_path / "out.partial").exists()
    nested = tmp_path / "runs" / "a" / "x"
    assert cli.main(["distill", "--model", model, "--new-tokens", str(words_file), "--method", "mean",
                     "--out", str(nested)]) == 0
    assert (nested / "config.json").is_file()


def test_out_that_would_lose_an_input_or_a_link_is_refused_before_the_work(model_dirs, words_file, tmp_path, capsys,
                                                                           monkeypatch):
    """--out --overwrite naming the model directory, or a directory holding the corpus or word list, is refused
    (before, the run replaced the model and deleted the corpus); a symbolic link as --out is refused (before, the
    rename at the end failed with a traceback after all the work); a written output is readable as mkdir makes
    directories (mkdtemp's 0700 before); a directory that is not an earlier output is refused too (before, --out .
    --overwrite deleted the working directory's files)."""
    import os
    import shutil

    from tokdistill_fast import pipeline

    model = tmp_path / "model"
    shutil.copytree(model_dirs[("llama", "bytelevel", True)], model)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(words_file, data / "words.txt")
    (data / "corpus.txt").write_text("the palatable soup is palatable.\n")
    (data / "corpus[1].txt").write_text("the palatable soup is palatable.\n")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("the run started"))
        for out, words, corpus, holds in (
                (model, data / "words.txt", data / "corpus.txt", model),
                (data, data / "words.txt", data / "corpus.txt", data / "words.txt"),
                (data, words_file, tmp_path / "**" / "corpus.txt", data / "corpus.txt"),  # a glob is expanded
                (data, words_file, data / "corpus[1].txt", data / "corpus[1].txt")):  # a path, though it reads as one
            code = cli.main(["distill", "--model", str(model), "--new-tokens", str(words), "--corpus", str(corpus),
                             "--method", "mean", "--out", str(out), "--overwrite"])
            assert code == 2 and f"holds {holds}, which this run reads" in capsys.readouterr().err
        for link in ("link", "dangling"):
            code = cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                             "--out", str(tmp_path / link), "--overwrite"])
            assert code == 2 and "is a symbolic link" in capsys.readouterr().err
    assert (model / "config.json").is_file() and (data / "corpus.txt").is_file()
    mask = os.umask(0o022)
    try:
        assert cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                         "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    rows = tmp_path / "out" / "new_embeddings.safetensors"  # rows of an earlier run, read before the output is replaced
    assert cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                     "--init-from", str(rows), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    # --overwrite replaces an earlier output or an empty directory, not a directory of the user's (the working one,
    # or one whose report.json is another tool's)
    (tmp_path / "empty").mkdir()
    (mine := tmp_path / "mine").mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.chdir(mine)
    for out in (".", str(mine)):
        assert cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                         "--out", out, "--overwrite"]) == 2
        assert f"--out {out} is not an output of this tool (it holds notes.txt, and no report.json this tool " \
            "wrote)" in capsys.readouterr().err
    (mine / "report.json").write_text('{"coverage": 0.9}')
    assert cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                     "--out", str(mine), "--overwrite"]) == 2
    assert "(it holds notes.txt, report.json, and no report.json this tool wrote)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert cli.main(["distill", "--model", str(model), "--new-tokens", str(words_file), "--method", "mean",
                     "--out", str(tmp_path / "empty"), "--overwrite"]) == 0


def test_an_output_file_that_is_an_input_is_refused_even_with_overwrite(model_dirs, tmp_path, capsys):
    """`select --out` / `eval --out` / `check --json` naming a file the command reads (its corpus, held-out text,
    a model directory's own file) are refused before any work, --overwrite or not; before, `select --out corpus.txt
    --overwrite` replaced the corpus with the word list and `eval --out OUT/report.json` the run's report. Another
    file in a model directory is written and replaced as any other."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dirs[("llama", "bytelevel", True)], model)
    corpus = tmp_path / "texts" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("the palatable soup is palatable.\n" * 20)
    (model / "pytorch_model.bin.index.json").write_text("{}")  # a sharded checkpoint's index
    before = corpus.read_bytes(), (model / "config.json").read_bytes()
    config = model / "config.json"
    for run, what in (
            (["select", "--model", str(model), "--corpus", str(corpus), "--out", str(corpus)], corpus),
            (["select", "--model", str(model), "--corpus", str(corpus.parent), "--out", str(corpus)], corpus),
            (["select", "--model", str(model), "--corpus", str(corpus), "--out", str(config)], config),
            (["select", "--model", str(model), "--corpus", str(corpus), "--out",
              str(model / "pytorch_model.bin.index.json")], model / "pytorch_model.bin.index.json"),
            (["eval", "--original", str(model), "--adapted", str(model), "--heldout", str(corpus), "--out",
              str(corpus)], corpus),
            (["eval", "--original", str(model), "--adapted", str(model), "--heldout", str(corpus), "--out",
              str(config)], config),
            (["check", str(tmp_path / "nowhere"), "--original", str(model), "--json", str(config)], config)):
        code = cli.main(["-q", *run, "--overwrite"])
        assert code == 2 and f" is {what}, which this command reads" in capsys.readouterr().err
    assert (corpus.read_bytes(), (model / "config.json").read_bytes()) == before
    for _ in range(2):  # a file of its own in the model directory, written again with --overwrite
        assert cli.main(["-q", "select", "--model", str(model), "--corpus", str(corpus), "--out",
                         str(model / "words.txt"), "--min-count", "1", "--overwrite"]) == 0


def test_out_where_nothing_can_be_written_fails_before_the_work(model_dirs, words_file, tmp_path, capsys,
                                                               monkeypatch):
    """A directory that refuses new entries (here: mkdtemp fails, as on /proc or a read-only mount, where root's
    os.access still says yes) is refused with its reason before the model loads, not after the training."""
    import tempfile

    from tokdistill_fast import pipeline

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("the run started"))
    code = cli.main(["distill", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens",
                     str(words_file), "--method", "mean", "--out", str(tmp_path / "out")])
    assert code == 2 and "cannot create it in" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_check_warns_which_runtime_loses_the_tokens(good, model_dirs, words_file, tmp_path, capsys, monkeypatch):
    """A vocab-mode output: check names llama.cpp and the mode to rerun with; the default output (added tokens,
    generic class) draws no such warning; an output saved with transformers 5's class name is flagged for 4.x."""
    _, vocab_out = good
    assert cli.main(["check", str(vocab_out), "--no-forward"]) == 0
    err = capsys.readouterr().err
    assert "llama.cpp" in err and "--tokenizer-mode added" in err
    out = tmp_path / "added"
    run(model_dirs[("llama", "bytelevel", True)], words_file, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    listed = {a["content"] for a in config["added_tokens_decoder"].values()}  # llama.cpp's SentencePiece path
    assert {t["form"] for t in check.new_tokens_of(out)} <= listed
    assert cli.main(["check", str(out), "--no-forward"]) == 0
    assert "warning" not in capsys.readouterr().err
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    assert cli.main(["check", str(out), "--no-forward"]) == 0
    assert "transformers 4.x" in capsys.readouterr().err
    monkeypatch.setenv("TOKDISTILL_CACHE", str(tmp_path / "empty-cache"))
    assert cli.main(["check", str(out), "--runtime", "llama.cpp"]) == 2
    assert "llama.cpp tools are not built" in capsys.readouterr().err


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   "Error while serializing: I/O error: No space left on device (os error 28)"])
def test_a_full_disk_is_one_clear_line_and_leaves_what_was_there(error, model_dirs, words_file, tmp_path,
                                                                  monkeypatch, capsys):
    """A save that runs out of space (an OSError, or safetensors' own error type) exits 2 with one line, removes
    the partial directory and keeps an existing --out as it was."""
    from safetensors import SafetensorError

    from tokdistill_fast import export

    def full(*args, **kwargs):
        raise error if isinstance(error, OSError) else SafetensorError(error)

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"tokdistill_fast": "kept"}')  # an earlier output's
    monkeypatch.setattr(export, "new_rows_file", full)
    code = cli.main(["distill", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens",
                     str(words_file), "--method", "mean", "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert (out / "report.json").read_text() == '{"tokdistill_fast": "kept"}'


def test_ignore_merges_exceptions_read_the_models_flag(good):
    """Vocab mode turns BPE's ignore_merges on; the check reads that flag off the model (not its JSON state, 1.4 s
    for Gemma-3's vocabulary) and lists the entries BPE never produced from their own text."""
    src, out = good
    new, orig = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(src)
    assert json.loads(new.backend_tokenizer.model.__getstate__())["ignore_merges"]
    assert not json.loads(orig.backend_tokenizer.model.__getstate__())["ignore_merges"]
    found = check.ignore_merges_exceptions(new, check.Original(orig))
    assert all(len(orig.backend_tokenizer.model.tokenize(p)) > 1 for p in found)
    assert check.ignore_merges_exceptions(orig, check.Original(orig)) == []  # flag off: nothing changes
    assert check.ignore_merges_exceptions(new, None) == []


def test_a_word_inside_a_longer_new_word_is_covered_by_it(padded, tmp_path):
    """After "(" the new token " (beans" holds "beans": one new id covers the word there, as retrieval reads it (no
    hit of the shorter word), so the output passes; the check named 'beans' before."""
    words = tmp_path / "words.txt"
    words.write_text("beans\n(beans\n", encoding="utf-8")
    out = tmp_path / "out"
    run(padded, words, out)
    tok = AutoTokenizer.from_pretrained(out)
    assert " (beans" in tok.tokenize("the (beans)")
    assert check.check_dir(out, padded, forward=False)["passed"]


def test_check_warns_where_listed_words_overlap(padded, tmp_path):
    """Both listed words stay; check passes and warns that llama.cpp reads text holding both apart."""
    words = tmp_path / "words.txt"
    words.write_text("東京\n京都\n", encoding="utf-8")
    out = tmp_path / "out"
    run(padded, words, out)
    section = check.check_dir(out, padded, forward=False)
    assert section["passed"] and section["runtimes"]["overlapping_added_tokens"] == 1
    assert any(w["check"] == "runtime" and "'京都' which overlaps '東京'" in w["detail"] for w in section["warnings"])


def test_words_in_llama_cpps_check_text_are_left_out_and_check_warns_of_them(padded, tmp_path, monkeypatch):
    """llama.cpp's converter recognizes a tokenizer by the hash of its ids on a fixed text, and refuses one whose new
    tokens occur there (" he's"): distill leaves such a word out with its reason, and check warns of an output that
    holds one (a build before the rule, simulated by turning the rule off)."""
    words = tmp_path / "words.txt"
    words.write_text("he's\npalatable\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run(padded, words, out)
    assert [t.form for t in result.tokens if not t.variant] == [" palatable"]
    assert any(s.word == "he's" and "convert_hf_to_gguf.py" in s.reason for s in result.skipped)
    original, extended = AutoTokenizer.from_pretrained(padded), AutoTokenizer.from_pretrained(out)
    assert extended.encode(extend.CONVERTER_CHECK_TEXT) == original.encode(extend.CONVERTER_CHECK_TEXT)
    section = check.check_dir(out, padded, forward=False)
    assert section["passed"] and section["runtimes"]["converter_check_text_tokens"] == 0

    monkeypatch.setattr(extend, "converter_text_forms", lambda forms: {})
    old = tmp_path / "old"
    run(padded, words, old)
    section = check.check_dir(old, padded, forward=False)
    assert section["passed"] and section["runtimes"]["converter_check_text_tokens"] == 2  # " he's", "he's"
    assert any(w["check"] == "runtime" and "convert_hf_to_gguf.py will refuse" in w["detail"]
               for w in section["warnings"])
    # where the converter refuses such an output, `check --runtime llama.cpp` names the tokens (converter faked)
    refusal = subprocess.CompletedProcess([], 1, "", "NotImplementedError: BPE pre-tokenizer was not recognized")
    monkeypatch.setattr(runtimes.subprocess, "run", lambda *a, **k: refusal)
    with pytest.raises(UserInputError, match="its new token.s. \" he's\", \"he's\" occur in the text"):
        runtimes.to_gguf(old, tmp_path / "old.gguf", runtimes.tools(tmp_path))

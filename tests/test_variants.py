"""Start-of-text variants ("palatable" after "(" or a newline, where the tokenizer emits the bare form) train alone on
their own corpus snippets after the words' run, from the row they take otherwise (their word's row moved by the
subtoken-mean offset); `tokdistill eval` measures them at their own held-out occurrences."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from conftest import FILLER

from tokdistill_fast import DistillConfig, contexts, distill, pipeline, retrain, tokens
from tokdistill_fast import report as report_module
from tokdistill_fast.config import VARIANT_SHARE, UserInputError
from tokdistill_fast.evaluation import evalrun
from tokdistill_fast.evaluation.evalrun import run_eval

WORDS = ["palatable", "bivalve", "thyroidectomy"]
FAST = dict(snippets_per_token=8, snippet_length=24, batch_size=4, target_layer=2, lr=1e-2, epochs=2,
            more_epochs=0, hardest_epochs=0, dtype="float32", device="cpu")


def bare_text(n_docs: int, seed: int) -> str:
    """Documents of filler words with the words in running text, and "palatable" and "bivalve" (never
    "thyroidectomy") also bare: after "(" and at the start of a line."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(FILLER) for _ in range(rng.randint(15, 30))]
        words.insert(rng.randint(1, len(words)), rng.choice(WORDS))
        words.insert(rng.randint(1, len(words)), "(palatable")
        words.insert(rng.randint(1, len(words)), "\n" + rng.choice(WORDS[:2]))
        docs.append(" ".join(words).replace(" \n", "\n") + ".")
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def bare_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    (root / "train.txt").write_text(bare_text(40, 0), encoding="utf-8")
    (root / "heldout.txt").write_text(bare_text(12, 1), encoding="utf-8")
    (root / "words.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return root


def test_bare_forms_are_found_where_the_tokenizer_emits_them():
    """A bare form's hits: after punctuation or a newline, not after a space (there the running-text form " word"
    is the token) and not inside a word."""
    bare = tokens.NewToken("palatable", "palatable", [1, 2])
    text = "a palatable x (palatable y\npalatable z unpalatable"
    hits, stats = contexts.find_hits([(text, True, True)], [bare], keep=10, window_chars=5, seed=0)
    assert stats.hits == [2]
    assert sorted(h.text[h.start - 1] for h in hits[0]) == ["\n", "("]


def moved(prep, learned, i: int) -> torch.Tensor:
    """The row variant `i` takes without training: its word's row moved by the subtoken-mean offset."""
    toks = prep.toks
    p = next(k for k, t in enumerate(toks) if t.variant_of is None and t.word == toks[i].variant_of)
    table = prep.decoder.embed_weight.float()
    mean = lambda t: table[t.sub_ids].mean(0).cpu()  # noqa: E731
    return learned.rows[p] + mean(toks[i]) - mean(toks[p])


def test_variants_train_on_their_own_snippets(model_dirs, bare_corpus):
    """With bare occurrences in the corpus, "palatable"'s variant trains on them (and moves off its moved row);
    "thyroidectomy"'s, with none, keeps its moved row; the words' rows are those of a run without the stage."""
    words, corpus = bare_corpus / "words.txt", [bare_corpus / "train.txt"]
    cfg = DistillConfig(**FAST, variant_epochs=2)
    with pytest.raises(UserInputError, match="--variant-epochs must be 0 or more"):
        cfg.replace(variant_epochs=-1).validate()
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], words, corpus, cfg)
    index = {t.form: i for i, t in enumerate(prep.toks)}
    cache = pipeline.teacher_cache(prep, prep.work, [2], packed=True)
    learned = pipeline.learn_rows(prep, cfg, (2, 1e-2, 2), cache=cache)
    assert set(learned.variants) == {index["palatable"], index["bivalve"]}
    got = learned.variants[index["palatable"]]
    assert got["kept"] and got["snippets"] == int(VARIANT_SHARE * cfg.snippets_per_token)
    assert not torch.allclose(learned.rows[index["palatable"]], moved(prep, learned, index["palatable"]))
    torch.testing.assert_close(learned.rows[index["thyroidectomy"]], moved(prep, learned, index["thyroidectomy"]))
    plain = pipeline.learn_rows(prep, cfg.replace(variant_epochs=0), (2, 1e-2, 2), cache=cache)
    assert plain.variants == {}
    primaries = [index[" " + w] for w in WORDS]
    torch.testing.assert_close(plain.rows[primaries], learned.rows[primaries], rtol=0, atol=0)
    torch.testing.assert_close(plain.rows[index["palatable"]], moved(prep, plain, index["palatable"]))


def test_variants_keep_the_words_left_context(model_dirs, bare_corpus, monkeypatch):
    """--left-context auto is resolved once, on the words' windows: the variants' snippets keep as many tokens."""
    cfg = DistillConfig(**FAST, variant_epochs=2)
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], bare_corpus / "words.txt",
                            [bare_corpus / "train.txt"], cfg)
    left = prep.work.retrieval["left_context"]
    assert cfg.left_context == "auto" and isinstance(left, int) and prep.work.retrieval["chars_per_token"] > 0
    seen, build = [], retrain.build_workload
    monkeypatch.setattr(retrain, "build_workload", lambda c, *a, **k: seen.append(c.left_context) or build(c, *a, **k))
    primaries = {i for i, t in enumerate(prep.toks) if t.variant_of is None}
    means = pipeline.subtoken_mean(prep.decoder.embed_weight, prep.toks)
    objective = pipeline.student.Objective(distill="mse", layer=2)
    retrain.train_variants(prep, cfg, cfg.run_variant_epochs(), means.clone(), means, primaries, objective,
                           pipeline.student.Schedule(lr=1e-2, epochs=2, batch_size=4, seed=0),
                           pipeline.student.Passes(), np.zeros(0))
    assert seen == [left]


def test_a_small_stage_runs_the_steps_of_a_full_one(model_dirs, bare_corpus):
    """A variant steps about as often whatever the number of variants: a stage of fewer batches than a variant may
    have snippets (here 2 of 8 x VARIANT_SHARE) runs more epochs, as many steps as `variant_epochs` x 2; a stage of 2
    or more batches runs `variant_epochs`."""
    cfg = DistillConfig(**FAST, variant_epochs=2)
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], bare_corpus / "words.txt",
                            [bare_corpus / "train.txt"], cfg)
    primaries = {i for i, t in enumerate(prep.toks) if t.variant_of is None}
    objective = pipeline.student.Objective(distill="mse", layer=2)
    means = pipeline.subtoken_mean(prep.decoder.embed_weight, prep.toks)
    for batch, epochs in ((4, 4), (2, 2), (1, 2)):  # 2 variants x 2 snippets: 1, 2 and 4 batches an epoch
        schedule = pipeline.student.Schedule(lr=1e-2, epochs=2, batch_size=batch, seed=0)
        got = retrain.train_variants(prep, cfg, cfg.run_variant_epochs(), means.clone(), means, primaries, objective,
                                      schedule, pipeline.student.Passes(), np.zeros(0))
        assert len(got) == 2 and {v["snippets"] for v in got.values()} == {2}
        assert {v["epochs"] for v in got.values()} == {epochs}
    assert report_module.variant_summary([{"form": "x"}], got)["epochs"] == 2


def test_a_variant_whose_loss_is_an_outlier_trains_again_alone(model_dirs, bare_corpus, caplog):
    """A variant whose loss ends over OUTLIER_FACTOR x the median of the words' and the variants' trains again alone
    from its trained row and keeps the lower loss (the run's outliers record it, as for words); the others do not."""
    cfg = DistillConfig(**FAST, variant_epochs=2)
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], bare_corpus / "words.txt",
                            [bare_corpus / "train.txt"], cfg)
    primaries = {i for i, t in enumerate(prep.toks) if t.variant_of is None}
    objective = pipeline.student.Objective(distill="mse", layer=2)
    schedule = pipeline.student.Schedule(lr=1e-2, epochs=2, batch_size=4, seed=0)
    means = pipeline.subtoken_mean(prep.decoder.embed_weight, prep.toks)

    def run(word_loss: np.ndarray) -> tuple[dict, torch.Tensor]:
        rows = means.clone()
        return retrain.train_variants(prep, cfg, cfg.run_variant_epochs(), rows, means, primaries, objective, schedule,
                                       pipeline.student.Passes(), word_loss), rows

    first, first_rows = run(np.zeros(0))  # two variants: no median to be an outlier of
    (lo, lo_loss), (hi, hi_loss) = sorted(((i, v["word_loss"]) for i, v in first.items()), key=lambda x: x[1])
    assert lo_loss < hi_loss and not any("retried" in v for v in first.values())
    with caplog.at_level(logging.INFO, logger="tokdistill_fast.retrain"):
        got, rows = run(np.full(5, (lo_loss + hi_loss) / 20))  # the median: the words'; 10x it between the two
    again = got[hi]["retried"]
    assert "retried" not in got[lo] and again["first"] == hi_loss and got[hi]["word_loss"] == min(hi_loss,
                                                                                                   again["alone"])
    assert again["kept"] == ("alone" if again["alone"] < hi_loss else "first")
    assert torch.equal(rows[lo], first_rows[lo]) and torch.equal(rows[hi], first_rows[hi]) is (again["kept"] == "first")
    assert "variants again: 1 row(s) trained alone" in caplog.text


def test_a_variant_that_raises_the_mass_after_a_word_goes_back(model_dirs, bare_corpus):
    """Where the trained variants raise the next-token probability on new tokens after some word by more than
    MASS_RISE over their moved rows, the variant taking most of the rise goes back to its moved row and the
    check runs again; mass a word's own row takes, or a rise within the bar, sends nothing back."""
    words, corpus = bare_corpus / "words.txt", [bare_corpus / "train.txt"]
    cfg = DistillConfig(**FAST, variant_epochs=2)
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], words, corpus, cfg)
    index = {t.form: i for i, t in enumerate(prep.toks)}
    var, other, primaries = index["palatable"], index["bivalve"], {index[" " + w] for w in WORDS}
    objective = pipeline.student.Objective(distill="mse", layer=2)
    schedule = pipeline.student.Schedule(lr=1e-2, epochs=2, batch_size=4, seed=0)
    means = pipeline.subtoken_mean(prep.decoder.embed_weight, prep.toks)
    start = means.clone()  # the words' rows as a run leaves them, and the variants' rows moved from them
    for w in WORDS:
        start[index[" " + w]] += 0.1 * torch.randn(means.shape[1], generator=torch.Generator().manual_seed(1))
    move = {v: start[index[" " + prep.toks[v].word]] + means[v] - means[index[" " + prep.toks[v].word]]
            for v in (var, other)}
    rows_of = list(prep.work.primaries)
    cols = rows_of + [i for i in range(len(prep.toks)) if i not in set(rows_of)]
    word = rows_of.index(index[" bivalve"])
    # (the mass on `var` after the word once it is trained, on the word's own row throughout) -> var kept
    for trained_mass, own, kept in ((0.3, 0.0, False), (0.06, 0.0, True), (0.02, 0.6, True)):
        rows, calls = start.clone(), []

        def after_words(trial, trained, trained_mass=trained_mass, own=own, calls=calls):
            calls.append(var in trained)
            mass = np.zeros((len(rows_of), len(cols)))
            mass[word, cols.index(var)] = trained_mass if var in trained else 0.02
            mass[word, cols.index(index[" bivalve"])] = own
            return mass, cols

        got = retrain.train_variants(prep, cfg, cfg.run_variant_epochs(), rows, means, primaries, objective, schedule,
                                      pipeline.student.Passes(), np.zeros(0), after_words)
        assert got[var]["kept"] is kept and got[other]["kept"]
        assert calls == ([False, True] if kept else [False, True, False])
        assert torch.allclose(rows[var], move[var]) is not kept and not torch.allclose(rows[other], move[other])
        if not kept:
            assert got[var]["over_predicted"] == pytest.approx(trained_mass + own)


def test_eval_measures_the_variants_at_their_own_occurrences(model_dirs, bare_corpus, tmp_path, monkeypatch):
    """`tokdistill eval` reports the held-out measure at the bare forms' occurrences ("variants"): two outputs that
    differ only in the variant rows score the same words and different variants; it flags the variants after which
    new tokens take over OVER_PREDICTION_FLAG (here -1: every measured one) as it flags words."""
    monkeypatch.setattr(report_module, "OVER_PREDICTION_FLAG", -1.0)
    src = model_dirs[("llama", "bytelevel", True)]
    words, corpus, heldout = bare_corpus / "words.txt", [bare_corpus / "train.txt"], [bare_corpus / "heldout.txt"]
    reports = []
    for epochs in (2, 0):
        out = tmp_path / f"v{epochs}"
        distill(src, words, corpus, out, DistillConfig(**FAST, variant_epochs=epochs))
        reports.append(run_eval(src, out, heldout, opts=None, device="cpu", dtype="float32"))
    trained, plain = (r["variants"] for r in reports)
    assert trained["counts"] == plain["counts"] and trained["counts"]["with_heldout"] == 2
    assert trained["counts"]["snippets"] > 0 and [t["form"] for t in trained["tokens"]] == ["palatable", "bivalve"]
    assert reports[0]["aggregate"]["kl"] == reports[1]["aggregate"]["kl"]
    assert trained["aggregate"]["kl"]["mean"] != plain["aggregate"]["kl"]["mean"]
    assert sorted(t["word"] for t in trained["over_predicting"]) == ["bivalve", "palatable"]
    assert "start-of-text variants after which" in evalrun.markdown_summary(reports[0])

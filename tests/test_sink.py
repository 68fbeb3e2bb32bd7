"""The attention sink never enters an aligned pair: every snippet starts with a document-start token, so a new word
is never the first position, and no pair touches position 0 of the teacher or the student (issue 18). On the real
SmolLM2 weights, whose first position carries hidden states ~80x larger than the rest, the aligned states of words
that start their documents stay ordinary."""

from __future__ import annotations

import copy
import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from tokdistill_fast.kernels.embedding_rows import embedding_rows
from transformers import AutoModelForCausalLM

from tokdistill_fast import DistillConfig, align, contexts, hubs, report, retrain, rows, student, teacher, tokens
from tokdistill_fast.config import HARDEST_WARMUP, UserInputError, cache_dir
from tokdistill_fast.control import chunks
from tokdistill_fast.modeling import models
from tokdistill_fast.rows import subtoken_mean
from tokdistill_fast.workload import Workload, build_workload

WORDS = ["palatable", "bivalve"]
# Each word opens two documents (with the leading space of running text, as a window cut at an earlier occurrence
# also starts) and sits mid-text in one: without a start token those snippets would put the word at position 0.
DOCS = [" palatable food is good food to eat", " palatable meals", "we ate a palatable dinner today",
        " bivalve shells on the beach", " bivalve creatures", "a bivalve mollusc in the sea"]


def workload(tok, corpus, model=None, words=WORDS) -> tuple[Workload, list[tokens.NewToken]]:
    toks, _ = tokens.plan_new_tokens(tok, words, add_variants=False)
    # corpus snippets only: 3 per word, above a quarter of the budget, so --top-up word samples nothing
    cfg = DistillConfig(snippets_per_token=10, snippet_length=24, add_variants=False, top_up="word")
    V = len(tok) if model is None else model.get_input_embeddings().weight.shape[0]
    return build_workload(cfg, model, tok, toks, [corpus], contexts.start_id(tok), V), toks


@pytest.fixture
def doc_corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def test_start_id_is_bos_where_added_else_a_document_start(tokenizers_by_kind):
    with_bos = tokenizers_by_kind["metaspace"]  # adds <bos> by default, as Gemma does
    assert contexts.start_id(with_bos) == with_bos.bos_token_id
    no_bos = tokenizers_by_kind["bytelevel"]  # adds nothing, as SmolLM2 does: its named BOS still opens snippets
    assert no_bos("a")["input_ids"][0] != no_bos.bos_token_id
    assert contexts.start_id(no_bos) == no_bos.bos_token_id
    no_bos = copy.deepcopy(no_bos)  # the fixture is shared by the session: extend a copy
    no_bos.add_special_tokens({"additional_special_tokens": [contexts.DOC_SEPARATOR]})
    assert contexts.start_id(no_bos) == no_bos.convert_tokens_to_ids(contexts.DOC_SEPARATOR)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_words_at_document_start_never_pair_position_zero(tokenizers_by_kind, doc_corpus, kind):
    tok = tokenizers_by_kind[kind]
    work, _ = workload(tok, doc_corpus)
    start = contexts.start_id(tok)
    assert start is not None and len(work.snippets) == len(DOCS)
    assert all(s.ids[0] == start and start not in s.ids[1:] for s in work.snippets)
    al = work.alignment
    assert len(al.s_pos) and al.s_pos.min() >= 1 and al.t_pos.min() >= 1
    firsts = al.s_pos[al.cu_aligned[:-1]]
    assert (firsts == 1).sum() == 4  # the four documents that open with the word: right after the start token


def real_model():
    path = cache_dir() / "smollm2-135m-instruct"
    if not path.exists():
        if os.environ.get("TOKDISTILL_REQUIRE_REAL") == "1":
            pytest.fail(f"real model missing (python -m tokdistill_fast.tools.demo prepare): {path}")
        pytest.skip("run `python -m tokdistill_fast.tools.demo prepare` first (make test does)")
    return models.load_model(path, torch.device("cpu"), torch.float32)


@torch.no_grad()
def test_real_sink_stays_out_of_the_aligned_states(doc_corpus):
    model, tok = real_model()
    work, toks = workload(tok, doc_corpus, model)
    dec = models.Decoder(model)
    V, layer = dec.embed_weight.shape[0], 22  # the layer where SmolLM2's sink is ~23,000 vs ~300 (NOTES.md)
    rows = subtoken_mean(dec.embed_weight, toks)
    al = work.alignment
    norms = []
    for i, s in enumerate(work.snippets):
        t_ids = torch.tensor([s.ids])
        s_ids = torch.from_numpy(al.student_ids[al.cu_student[i]:al.cu_student[i + 1]]).unsqueeze(0)
        t_h = dec.hidden_states(dec.embed(t_ids), [layer])[layer][0]
        s_h = dec.hidden_states(embedding_rows(s_ids, dec.embed_weight, rows, dec.embed_scale), [layer])[layer][0]
        pairs = slice(al.cu_aligned[i], al.cu_aligned[i + 1])
        norms.append(torch.cat([t_h[al.t_pos[pairs]], s_h[al.s_pos[pairs]]]).norm(dim=-1))
        assert t_h[0].norm() > 20 * t_h[1:].norm(dim=-1).median()  # the sink is there, on the start token
        assert s_ids.max() >= V  # the student reads the new id
    norms = torch.cat(norms)
    assert norms.max() < 5 * norms.median(), (norms.max(), norms.median())


def test_outlier_tokens_are_flagged_with_their_contexts(caplog):
    """Flagged on the loss at the word's own position: a word that ends every snippet (a signature closing its
    paragraphs) has only that position, so its mean loss is high without anything wrong with its row."""
    per_token = [{"word": f"w{i}", "final_loss": 1.0 + 0.1 * i, "word_loss": 5.0 + 0.5 * i, "contexts": 25,
                  "source": "corpus"} for i in range(9)]
    per_token.append({"word": "signature", "final_loss": 60.0, "word_loss": 60.0, "contexts": 6, "source": "corpus"})
    assert report.flag_outliers(per_token) == []
    per_token.append({"word": "sunk", "final_loss": 2400.0, "word_loss": 9000.0, "contexts": 7, "source": "corpus"})
    per_token.append({"word": "variant", "final_loss": None, "word_loss": None, "contexts": 0, "source": "variant"})
    flagged = report.flag_outliers(per_token)
    assert [f["word"] for f in flagged] == ["sunk"] and flagged[0]["times_median"] > 1000
    assert flagged[0]["still_outlier"] and flagged[0]["retried"] is None
    assert "sunk" in caplog.text and "outlier" in caplog.text and "still an outlier" in caplog.text
    # trained again alone (retrain.retry_outliers), it ends among the others: reported with both losses
    caplog.clear()
    per_token[10]["word_loss"] = 5.2
    again = {10: {"first": 9000.0, "alone": 5.2, "kept": "alone"}}
    flagged = report.flag_outliers(per_token, again)
    assert [f["word"] for f in flagged] == ["sunk"] and flagged[0]["word_loss"] == 9000.0
    assert not flagged[0]["still_outlier"] and flagged[0]["retried"] == again[10]
    assert "trained again alone: 5.2, kept" in caplog.text and "still an outlier" not in caplog.text


def three_words():
    """A tiny model and 9 snippets of 3 phrases (new rows 0-2), with what retrain's train-alone steps need, and
    run(alignment, ids, cu, snippet_row, start rows, schedule) training on them."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32)
    dec = models.Decoder(model.eval().requires_grad_(False))
    rng = np.random.default_rng(0)
    phrases, seqs, which = [[7, 8], [9, 10, 11], [12, 13]], [], []
    for i in range(9):
        s = rng.integers(20, 300, 12).tolist()
        s[4:4 + len(phrases[i % 3])] = phrases[i % 3]
        seqs.append(s)
        which.append(i % 3)
    V, layer = 300, 2
    al = align.align(seqs, phrases, which, [V, V + 1, V + 2], "python")
    ids, cu = align.pack(seqs)
    work = SimpleNamespace(alignment=al, teacher_ids=ids, cu_teacher=cu, snippet_row=np.array(which))
    prep = SimpleNamespace(decoder=dec, dtype=torch.float32, tied=True)
    objective, passes = student.Objective(distill="mse", layer=layer), student.Passes()
    schedule = student.Schedule(lr=0.05, epochs=2, batch_size=2, seed=0)

    def run(al_, ids_, cu_, rows_, init_, schedule_=schedule):
        cache = teacher.compute(dec, ids_, cu_, al_, [layer], 4096, torch.float32)
        return student.train(dec, al_, cache, rows_, init_, None, objective, schedule_, tied=True, passes=passes)

    def alone(word, start, schedule_=schedule):
        mine = [i for i in range(9) if which[i] == word]
        return run(align.align([seqs[i] for i in mine], [phrases[word]], [0] * 3, [V], "python"),
                   *align.pack([seqs[i] for i in mine]), np.zeros(3, dtype=np.int64), start, schedule_)

    return SimpleNamespace(work=work, prep=prep, objective=objective, passes=passes, schedule=schedule, run=run,
                           alone=alone, init=torch.randn(3, dec.hidden_size) * 0.5)


def test_outlier_rows_train_again_alone():
    """A row whose word loss ends far over the others' trains again alone from its start row, on its own snippets,
    in batches cut by the share of the run's rows it is (here 2 x 1/3 -> 1: a step per snippet, as many as the
    row had in the run): it gets the row a run of that word alone gives, and keeps it only where its word loss is
    the lower."""
    w = three_words()
    work, prep, objective, schedule, passes, init = w.work, w.prep, w.objective, w.schedule, w.passes, w.init
    al, ids, cu = work.alignment, work.teacher_ids, work.cu_teacher
    result = w.run(al, ids, cu, work.snippet_row, init)
    kept = result.rows.clone()
    result.rows[1] += 50.0  # a row gone astray, and its loss
    result.word_loss[1] = 1000 * result.word_loss.max()
    # limited to other rows (after the more epochs: the rows they sent back), the outlier does not retry
    assert retrain.retry_outliers(prep, work, result, (init, None), objective, schedule, passes, among=[0, 2]) == {}
    torch.testing.assert_close(result.rows[[0, 2]], kept[[0, 2]])
    assert result.rows[1].sub(kept[1]).abs().min() == 50.0
    got = retrain.retry_outliers(prep, work, result, (init, None), objective, schedule, passes, among=[1, 2])
    alone = w.alone(1, init[1:2], dataclasses.replace(schedule, batch_size=1))
    assert alone.steps == 3 * 2  # 3 snippets one by one, two epochs
    assert got == {1: {"first": got[1]["first"], "alone": float(alone.word_loss[0]), "kept": "alone"}}
    torch.testing.assert_close(result.rows[1], alone.rows[0])
    torch.testing.assert_close(result.rows[[0, 2]], kept[[0, 2]])  # the other rows are not touched
    assert result.word_loss[1] == alone.word_loss[0]
    # a row whose first loss is the lower keeps its row, flagged or not
    result.word_loss[[0, 2]] = 1e-6 * alone.word_loss[0]
    result.word_loss[1], result.rows[1] = 0.5 * alone.word_loss[0], kept[1]
    got = retrain.retry_outliers(prep, work, result, (init, None), objective, schedule, passes)
    assert got[1]["kept"] == "first" and got[1]["alone"] == float(alone.word_loss[0])
    torch.testing.assert_close(result.rows[1], kept[1])


def test_hardest_rows_train_more_epochs_alone():
    """The quarter of the rows with the highest word loss (here 1 of 3) trains --hardest-epochs more epochs alone,
    from its trained row, with a short warm-up: it gets the row a run of that word alone from there gives (kept
    where its loss is the lower), the others are untouched; 0 epochs changes nothing."""
    w = three_words()
    work = w.work
    result = w.run(work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row, w.init)
    trained = result.rows.clone()
    result.word_loss[2] = 10 * result.word_loss.max()
    with pytest.raises(UserInputError, match="--hardest-epochs must be 0 or more"):
        DistillConfig(hardest_epochs=-1).validate()
    assert retrain.continue_hardest(w.prep, work, result, 0, w.objective, w.schedule, w.passes) == {}
    torch.testing.assert_close(result.rows, trained)
    got = retrain.continue_hardest(w.prep, work, result, 3, w.objective, w.schedule, w.passes)
    more = dataclasses.replace(w.schedule, epochs=3, warmup_fraction=HARDEST_WARMUP)
    alone = w.alone(2, trained[2:3], more)
    assert alone.steps == 3 * 2  # 3 snippets in batches of 2, three epochs
    assert got == {2: {"first": got[2]["first"], "alone": float(alone.word_loss[0]), "kept": "alone"}}
    torch.testing.assert_close(result.rows[2], alone.rows[0])
    torch.testing.assert_close(result.rows[:2], trained[:2])
    # the rows `back` names (send_back's rule: they raised some word's next-token mass on new tokens) go back to
    # their rows and losses from before the continuation
    result.rows, result.word_loss[2] = trained.clone(), 10 * result.word_loss.max()
    first = result.word_loss.copy()

    def back(before, after, moved, desc):
        assert moved == [2] and torch.equal(before, trained) and not torch.equal(after[2], trained[2])
        assert desc == "hardest"
        return {2: 0.3}

    got = retrain.continue_hardest(w.prep, work, result, 3, w.objective, w.schedule, w.passes, back=back)
    assert got[2]["kept"] == "first" and got[2]["over_predicted"] == 0.3
    torch.testing.assert_close(result.rows, trained)
    assert (result.word_loss == first).all()


def test_rows_trained_alone_go_back_while_they_raise_a_words_mass():
    """send_back (the hardest quarter's and the variants' rule): while the rows trained alone raise some trained
    word's next-token mass on new tokens by more than MASS_RISE over their rows from before, the one taking most of
    that rise goes back and the mass is measured again; a rise within the bar, or mass on a row that did not train
    alone (the word's own), sends nothing back."""
    prep = SimpleNamespace(toks=[SimpleNamespace(form=f) for f in (" w0", " w1", "a", "b", "c")],
                           work=SimpleNamespace(primaries=[0, 1]))
    start = {i: torch.zeros(2) for i in (2, 3, 4)}
    trial = torch.ones(5, 2)
    rise = {2: (0, 0.3), 3: (0, 0.1), 4: (1, 0.04)}  # token -> (the word whose mass it raises, by how much)
    calls = []

    def after_words(rows, trained):
        calls.append(sorted(trained))
        mass = np.full((2, 5), 0.01)
        mass[0, 0] = 0.5  # w0's own row after w0, trained with the words: no candidate's
        for i, (w, r) in rise.items():
            mass[w, i] += r * (not torch.equal(rows[i], start[i]))
        return mass, [0, 1, 2, 3, 4]

    sent = hubs.send_back(prep, after_words, trial, dict(start), {0, 1}, "test")
    assert sent == {2: pytest.approx(0.94), 3: pytest.approx(0.64)}  # "a" first (0.3), then "b" (0.1 > 0.05)
    assert trial[2:4].eq(0).all() and trial[4].eq(1).all() and trial[:2].eq(1).all()
    assert calls == [[0, 1], [0, 1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 4]]


@pytest.mark.parametrize("passes", [student.Passes(), student.Passes(prefix=True)], ids=["reference", "prefix"])
def test_more_epochs_keep_the_rows_of_the_schedules_own_epochs(passes):
    """Schedule.more_epochs trains on at the constant rate after the schedule's epochs, and its result keeps the
    rows and losses at that point, which are those of a run without more epochs (the same batches, warm-up and
    rate); a cooldown ends the whole run, so those rows are a constant-rate run's; where the final rows make a hub
    (over HUB_AFTER_RUN) hubs.keep_more_epochs takes them for the rows that `back` names, or for every row."""
    w = three_words()
    work = w.work
    cache = teacher.compute(w.prep.decoder, work.teacher_ids, work.cu_teacher, work.alignment, [2], 4096,
                            torch.float32)

    def run(more: int, cooldown: float = 0.0) -> student.TrainResult:
        return student.train(w.prep.decoder, work.alignment, cache, work.snippet_row, w.init, None, w.objective,
                             dataclasses.replace(w.schedule, more_epochs=more, cooldown=cooldown), tied=True,
                             passes=passes)

    plain, longer = run(0), run(3)
    assert plain.before is None and longer.before.steps == plain.steps and longer.steps > 2 * plain.steps
    assert torch.equal(longer.before.rows, plain.rows)
    np.testing.assert_array_equal(longer.before.word_loss, plain.word_loss)
    np.testing.assert_array_equal(longer.step_loss[:plain.steps], plain.step_loss)
    assert not torch.equal(longer.rows, plain.rows) and (longer.word_loss < plain.word_loss).all()
    cooled = run(3, cooldown=0.2)
    assert torch.equal(cooled.before.rows, plain.rows) and not torch.equal(cooled.rows, longer.rows)
    with pytest.raises(ValueError, match="constant rate"):
        dataclasses.replace(w.schedule, more_epochs=1, decay=True)

    kept, info = hubs.keep_more_epochs(longer, 3, worst_mass=lambda r: 0.4)
    assert kept is longer and kept.before is None and info["kept"] and info["mass_after"] == 0.4
    again = run(3)
    back, info = hubs.keep_more_epochs(again, 3, worst_mass=lambda r: 0.6)
    assert not info["kept"] and info["mass_after"] == 0.6 and (back.seconds, back.steps) == (again.seconds, again.steps)
    assert torch.equal(back.rows, plain.rows) and back.before is None
    np.testing.assert_array_equal(back.word_loss, plain.word_loss)
    calls = []

    def one_row(before, after, moved, desc):  # send_back's rule names the row that raised the mass
        calls.append((torch.equal(before, plain.rows), torch.equal(after, final.rows), moved, desc))
        return {1: 0.55}

    final = run(3)
    final_rows, final_loss = final.rows.clone(), final.word_loss.copy()
    partly, info = hubs.keep_more_epochs(final, 3, worst_mass=lambda r: 0.6, back=one_row)
    assert calls == [(True, True, [0, 1, 2], "more epochs")]
    assert info["kept"] and info["sent_back"] == {1: 0.55} and partly.before is None
    assert torch.equal(partly.rows[1], plain.rows[1]) and partly.word_loss[1] == plain.word_loss[1]
    assert torch.equal(partly.rows[[0, 2]], final_rows[[0, 2]])
    np.testing.assert_array_equal(partly.word_loss[[0, 2]], final_loss[[0, 2]])


def test_rows_trained_alone_read_the_runs_teacher_cache():
    """TeacherCache.take gives the targets and prefix keys/values that a teacher pass over those snippets alone
    gives, so rows trained alone from the run's cache end as they do after their own teacher pass."""
    w = three_words()
    work, dec, index = w.work, w.prep.decoder, np.array([0, 2])
    al, ids, cu = work.alignment, work.teacher_ids, work.cu_teacher
    full = teacher.compute(dec, ids, cu, al, [2], 4096, torch.float32, packed=True, capture=align.prefix_lengths(al))
    sub, sub_ids, sub_cu, _ = chunks.take_rows(al, ids, cu, work.snippet_row, index, 300)
    own = teacher.compute(dec, sub_ids, sub_cu, sub, [2], 4096, torch.float32, packed=True,
                          capture=align.prefix_lengths(sub))
    got = full.take(np.flatnonzero(work.snippet_row != 1))
    torch.testing.assert_close(got.states[2], own.states[2])
    np.testing.assert_array_equal(got.cu_aligned, own.cu_aligned)
    np.testing.assert_array_equal(got.prefix_cu, own.prefix_cu)
    assert got.prefix.keys() == own.prefix.keys() and len(own.prefix) == 2
    for layer, kv in own.prefix.items():
        for a, b in zip(got.prefix[layer], kv):
            torch.testing.assert_close(a, b)
    result = w.run(al, ids, cu, work.snippet_row, w.init)
    result.word_loss[:] = np.inf  # every row keeps what it trains alone
    runs = [copy.deepcopy(result) for _ in range(2)]
    passes = student.Passes(prefix=True)
    outs = [retrain.train_alone(w.prep, work, r, index, retrain.pick_rows((w.init, None), index), w.objective,
                                 w.schedule, passes, "alone", cache) for r, cache in zip(runs, [full, None])]
    assert outs[0].keys() == outs[1].keys() == {0, 2}
    for i in (0, 2):
        assert outs[0][i]["alone"] == pytest.approx(outs[1][i]["alone"], rel=1e-4)
    torch.testing.assert_close(runs[0].rows, runs[1].rows, rtol=1e-4, atol=1e-5)
    assert not torch.equal(runs[0].rows, result.rows)


def test_steps_read_rows_as_they_are_written():
    """Schedule.max_norm_quantile: every step reads the rows scaled to at most that quantile of the table's norms,
    as the output writes them, and the run returns them so; rows that never reach it train bit for bit as without."""
    w = three_words()
    work, table = w.work, w.prep.decoder.embed_weight
    norms = table.norm(dim=1)

    def run(init: torch.Tensor, q: float | None) -> student.TrainResult:
        return w.run(work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row, init,
                     dataclasses.replace(w.schedule, max_norm_quantile=q))

    small = w.init * (0.5 * norms.min() / w.init.norm(dim=1).max())  # far under the largest norm of the table
    free, roomy = run(small, None), run(small, 1.0)
    assert torch.equal(free.rows, roomy.rows) and (free.step_loss == roomy.step_loss).all()
    limit = rows.norm_limit(table, 0.1)
    assert (w.init.norm(dim=1) > limit).all()
    bounded, scaled = run(w.init, 0.1), run(rows.bound_norms(w.init, limit), None)
    assert bounded.step_loss[0] == pytest.approx(scaled.step_loss[0], rel=1e-6)  # the first step read scaled rows
    assert not torch.equal(bounded.rows, scaled.rows)  # ... and the later ones their own bound
    assert (bounded.rows.norm(dim=1) <= limit * (1 + 1e-6)).all()
    clipped, _ = rows.clip_norms(bounded.rows, table, 0.1)
    torch.testing.assert_close(clipped, bounded.rows.cpu(), rtol=1e-6, atol=1e-7)  # the output writes them as read
    assert (run(w.init, None).rows.norm(dim=1) > limit).all()  # unbounded, they stay over it


def test_sink_pairs_inside_the_text_leave_the_loss():
    """A pair whose teacher state is an attention sink inside the text (a token the model makes massive: here one
    whose embedding is 40x the others', as SmolLM2 makes " and" after "superusers" 6.8x the median at layer 22) is
    left out of the loss, with every pair of a snippet whose word's own pair is one; training then gives the rows
    that training on the alignment and teacher pass without those pairs gives, whatever the sink's states."""
    w = three_words()
    work, dec = w.work, w.prep.decoder
    al, ids, cu = work.alignment, work.teacher_ids, work.cu_teacher
    teacher_token = ids[cu[al.pair_snippet()] + al.t_pos]
    sink = int(teacher_token[al.cu_aligned[0] + 1])  # the token after the first snippet's word
    dec.embed_weight[sink] *= 40.0
    cache = teacher.compute(dec, ids, cu, al, [2], 4096, torch.float32)
    drop, median = teacher.sink_pairs(al, cache.states[2])
    hit = teacher_token == sink
    first = al.cu_aligned[:-1]
    whole = np.isin(al.pair_snippet(), np.flatnonzero(hit[first]))
    assert hit.sum() >= 1 and (drop == (hit | whole)).all()
    kept = al.keep_pairs(~drop)
    assert kept.n == al.n and len(kept.s_pos) == int((~drop).sum())
    torch.testing.assert_close(cache.keep_pairs(~drop).states[2],
                               teacher.compute(dec, ids, cu, kept, [2], 4096, torch.float32).states[2])
    runs = [student.train(dec, a, c, work.snippet_row, w.init, None, w.objective, w.schedule, tied=True,
                          passes=w.passes) for a, c in ((al, cache), (kept, cache.keep_pairs(~drop)))]
    assert runs[0].extra["sink_pairs"] == int(drop.sum()) and runs[1].extra["sink_pairs"] == 0
    assert torch.equal(runs[0].rows, runs[1].rows)
    louder = teacher.TeacherCache({2: cache.states[2] * torch.from_numpy(1 + 9 * hit)[:, None].float()},
                                  cache.cu_aligned)
    again = student.train(dec, al, louder, work.snippet_row, w.init, None, w.objective, w.schedule, tied=True,
                          passes=w.passes)
    assert torch.equal(again.rows, runs[0].rows)
    # Rows trained again alone read a subset of the run's cache (take) and judge sinks by the median of the run's
    # pairs, which its first training stored in the cache
    assert cache.pair_median == {2: pytest.approx(median)}
    assert median == pytest.approx(float(cache.states[2].norm(dim=-1).median()))
    own = np.unique(al.pair_snippet()[hit])
    sub, sub_al = cache.take(own), al.take(own)
    assert sub.pair_median == cache.pair_median
    in_own = np.isin(al.pair_snippet(), own)
    assert (teacher.sink_pairs(sub_al, sub.states[2], sub.pair_median[2])[0] == drop[in_own]).all()

    def left_out(pair_median: dict[int, float]) -> int:
        sub.pair_median = pair_median
        return student.train(dec, sub_al, sub, work.snippet_row[own], w.init, None, w.objective, w.schedule,
                             tied=True, passes=w.passes).extra["sink_pairs"]

    assert left_out({2: median}) == int(drop[in_own].sum()) and left_out({2: 1e3 * median}) == 0

"""End to end on tiny random models of three families and both tokenizer families: the output directory loads
as is, tokenizes new words to one id, keeps original rows bit-identical, and the trained rows beat their start rows
on the held-out measure."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEW_WORDS, respelling_suffix, synthetic_text
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast import DistillConfig, distill, hubs, pipeline
from tokdistill_fast.contexts import start_id
from tokdistill_fast.evaluation.heldout import Scorer, build_heldout, reference, score
from tokdistill_fast.modeling.models import Decoder, load_model
from tokdistill_fast.rows import subtoken_mean

FAST = dict(snippets_per_token=8, snippet_length=24, batch_size=4, target_layer=2, lr=1e-2, epochs=2)


@pytest.fixture(scope="module", params=[("llama", "bytelevel", True), ("qwen2", "bytelevel", False),
                                        ("gemma3", "metaspace", True), ("llama", "metaspace", False)],
                ids=lambda c: "-".join(map(str, c)))
def run(request, model_dirs, words_file, corpus_file, tmp_path_factory):
    src = model_dirs[request.param]
    out = tmp_path_factory.mktemp("out") / "model"
    result = distill(src, words_file, [corpus_file], out, DistillConfig(**FAST))
    return src, out, result


def test_output_loads_and_tokenizes_new_words(run):
    src, out, result = run
    tok = AutoTokenizer.from_pretrained(out)
    orig = AutoTokenizer.from_pretrained(src)
    ids = {t.form: t.new_id for t in result.tokens}
    for word in NEW_WORDS:
        for text, form in ((f"We found it {word}.", " " + word), (f"{word} again", word),
                           (f"a {word}, then", " " + word)):
            enc = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[form] in enc and len(enc) < len(orig(text, add_special_tokens=False)["input_ids"]), text
            assert tok.decode(enc) == text
    plain = "The patient was quick and the soup was green."
    assert tok(plain)["input_ids"] == orig(plain)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_original_rows_bit_identical_and_new_rows_written(run):
    src, out, result = run
    before = AutoModelForCausalLM.from_pretrained(src)
    after = AutoModelForCausalLM.from_pretrained(out)
    V = before.get_input_embeddings().weight.shape[0]
    assert torch.equal(after.get_input_embeddings().weight[:V], before.get_input_embeddings().weight)
    assert torch.equal(after.get_output_embeddings().weight[:V], before.get_output_embeddings().weight)
    tied = before.config.tie_word_embeddings
    assert (after.get_output_embeddings().weight.data_ptr() == after.get_input_embeddings().weight.data_ptr()) == tied
    rows = load_file(out / "new_embeddings.safetensors")
    ids = rows["token_ids"]
    torch.testing.assert_close(after.get_input_embeddings().weight[ids], rows["input_embeddings"])
    assert torch.isfinite(rows["input_embeddings"]).all()
    for name, p in after.named_parameters():
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(p, before.state_dict()[name]), name


def test_report_and_training(run):
    _, out, result = run
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["added"] == len(result.tokens)
    primaries = [t for t in report["tokens"] if t["variant_of"] is None]
    assert {t["word"] for t in primaries} == set(NEW_WORDS)
    assert all(t["contexts"] > 0 for t in primaries)
    assert set(report["timings"]) >= {"load", "tokens", "contexts", "teacher", "student", "export", "total"}
    assert all(0 <= t["mass_after"] <= 1 and t["mass_after_top"]["mass"] <= t["mass_after"] + 1e-9 for t in primaries)
    assert [f["word"] for f in report["over_predicting"]] == [
        t["word"] for t in sorted(primaries, key=lambda t: -t["mass_after"]) if t["mass_after"] > 0.2]
    curve, settings = report["training"]["epoch_loss"], report["settings"]
    assert len(curve) == settings["resolved_epochs"] + settings["resolved_more_epochs"]
    assert curve[-1] < curve[0]  # the same snippets each epoch: the training curve, where single steps are not
    # what the run read, as absolute paths; words asked for apart from forms of added words left out
    assert report["inputs"]["model"] == str(Path(run[0]).absolute()) and Path(report["inputs"]["cwd"]).is_absolute()
    assert report["inputs"]["words"].endswith("words.txt") and Path(report["inputs"]["corpus"][0]).is_absolute()
    k, skipped = report["counts"], report["skipped"]
    assert k["requested"] == len(NEW_WORDS) and k["skipped"] == sum(not s["form_only"] for s in skipped)
    assert k["forms_left_out"] == sum(s["form_only"] for s in skipped)
    # report.md names the method that ran, and why it is not the one asked for
    assert (settings["method_reason"] is None) == (settings["resolved_method"] == settings["method"])
    assert f"method: {settings['resolved_method']}" in (out / "report.md").read_text()


def test_training_beats_the_start_rows_on_the_measure(run, tmp_path):
    """Learning, measured on the same held-out snippets (documents the training corpus does not hold) for the
    trained rows and for the subtoken-mean start rows: the objective (hidden-state MSE at the target layer) and what
    `tokdistill eval` measures (next-token KL to the original model from the new token on)."""
    src, _, result = run
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(synthetic_text(n_docs=100, seed=7), encoding="utf-8")
    model, tok = load_model(src, torch.device("cpu"), torch.float32)
    dec = Decoder(model)
    prim = [i for i, t in enumerate(result.tokens) if t.variant_of is None]
    toks = [result.tokens[i] for i in prim]
    V, layer = dec.embed_weight.shape[0], FAST["target_layer"]
    hs = build_heldout([heldout], tok, toks, [V + r for r in range(len(prim))], 4, 24, 0, start_id(tok))
    ref = reference(dec, hs, (layer,))
    trained = score(Scorer(dec, rows=result.rows[prim]), hs, ref)
    start = score(Scorer(dec, rows=subtoken_mean(dec.embed_weight, toks)), hs, ref)
    assert trained.mse[layer].mean() < start.mse[layer].mean()  # held out, tiny models: 0.5-0.6x (Gemma 0.92x)
    assert trained.kl.mean() < start.kl.mean()


def test_variants_take_the_primary_row_moved_by_the_subtoken_offset(run):
    """A variant's row is its primary's trained row plus the difference of their subtoken means, not a copy (a copy
    also copies the output logit of a tied model, and sampling then glues the bare form to the word before it)."""
    src, _, result = run
    dtype = getattr(torch, result.report["implementations"]["dtype"].removeprefix("torch."))
    table = AutoModelForCausalLM.from_pretrained(src).get_input_embeddings().weight.detach().to(dtype).float()
    primary = {t.word: i for i, t in enumerate(result.tokens) if t.variant_of is None}
    report = {t["form"]: t for t in result.report["tokens"]}
    variants = [(i, primary[t.variant_of]) for i, t in enumerate(result.tokens) if t.variant_of is not None]
    assert variants and {report[result.tokens[i].form]["method"] for i, _ in variants} == {"offset"}
    moved = 0
    for i, p in variants:
        offset = table[result.tokens[i].sub_ids].mean(0) - table[result.tokens[p].sub_ids].mean(0)
        assert not torch.equal(result.rows[i], result.rows[p])
        want = result.rows[p] + offset
        # a variant past the norm limit is clipped like every row: only its length changes
        moved += torch.allclose(result.rows[i], want, atol=1e-6)
        assert torch.nn.functional.cosine_similarity(result.rows[i], want, dim=0) > 1 - 1e-6
    assert moved > 0


def test_an_in_memory_model_keeps_its_modes_and_trainable_weights(model_dirs, words_file, corpus_file):
    """An in-memory model of the run's dtype is computed with in place, frozen: the run leaves its modes and
    requires_grad flags as the caller had them (before, a model in training mode came back in eval mode with no
    parameter trainable), its weights and its tokenizer untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokdistill_fast import DistillConfig, distill

    src = model_dirs[("llama", "bytelevel", True)]
    model, tok = AutoModelForCausalLM.from_pretrained(src).train(), AutoTokenizer.from_pretrained(src)
    model.model.layers[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    vocab, ids = tok.get_vocab(), tok(" palatable soup")["input_ids"]
    distill(model, words_file, [corpus_file], None, DistillConfig(target_layer=2, epochs=1, more_epochs=0,
                                                                  snippets_per_token=4, batch_size=4,
                                                                  dtype="float32", device="cpu"), tokenizer=tok)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags and not all(flags) and any(flags)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert tok.get_vocab() == vocab and tok(" palatable soup")["input_ids"] == ids  # the tokenizer too


def test_loss_positions_trains_on_the_first_positions_after_the_word(model_dirs, words_file, corpus_file, tmp_path):
    """--loss-positions K: every snippet keeps its first K aligned pairs and its sequences end after them."""
    src = model_dirs[("llama", "bytelevel", True)]
    counts = {}
    for k in (None, 2):
        distill(src, words_file, [corpus_file], tmp_path / f"k{k}", DistillConfig(**FAST, loss_positions=k))
        counts[k] = json.loads((tmp_path / f"k{k}" / "report.json").read_text())["counts"]
    assert counts[2]["snippets"] == counts[None]["snippets"]
    assert counts[2]["aligned_positions"] <= 2 * counts[2]["snippets"] < counts[None]["aligned_positions"]
    assert counts[2]["teacher_tokens"] < counts[None]["teacher_tokens"]


def test_new_rows_file_is_the_same_bytes_every_time(tmp_path):
    """safetensors orders its metadata from a hash map that changes from one map to the next; the new-rows file sorts
    it, so equal rows give equal bytes (across processes too), and it still loads with its metadata."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from tokdistill_fast.export import new_rows_file

    tokens = [SimpleNamespace(new_id=100 + i, piece=f" w{i}", form=f"w{i}\u00e9") for i in range(3)]
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    files = [tmp_path / f"{k}.safetensors" for k in range(12)]
    for f in files:
        new_rows_file(f, tokens, rows, None)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert json.loads(f.metadata()["forms"]) == ["w0\u00e9", "w1\u00e9", "w2\u00e9"]
        torch.testing.assert_close(f.get_tensor("input_embeddings"), rows)
        assert f.get_tensor("token_ids").tolist() == [100, 101, 102]


def test_new_token_mass_reads_where_the_rows_send_probability(model_dirs, words_file, corpus_file):
    """hubs.new_token_mass (length-batched passes cut after each word) equals a plain pass over each whole
    snippet; a row pointed at the final states after the other words takes the mass there, and the report flags
    those words and names that row."""
    from tokdistill_fast import pipeline
    from tokdistill_fast.control.observed import StageTimer
    from tokdistill_fast.report import RunReport

    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file],
                            DistillConfig(**FAST, dtype="float32"))
    work, dec, al = prep.work, prep.decoder, prep.work.alignment
    rows = subtoken_mean(dec.embed_weight, prep.toks)
    hub = work.primaries[0]

    def plain(rows: torch.Tensor, cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per trained word: mean new-token probabilities and mean final state at its position (first snippets)."""
        scorer = Scorer(dec, rows=rows[cols])
        probs, states = torch.zeros(len(work.primaries), len(cols)), torch.zeros(len(work.primaries), dec.hidden_size)
        counts = torch.zeros(len(work.primaries))
        for s in range(al.n):
            r = int(work.snippet_row[s])
            if counts[r] == hubs.MASS_SNIPPETS:
                continue
            ids = torch.from_numpy(al.student_ids[al.cu_student[s]:al.cu_student[s + 1]])[None]
            with torch.no_grad():
                final = dec.hidden_states(scorer.embed(ids), [dec.num_layers])[dec.num_layers]
                h = final[0, al.s_pos[al.cu_aligned[s]]]
                probs[r] += torch.softmax(scorer.logits(h[None]), -1)[0, -len(cols):]
            states[r] += h
            counts[r] += 1
        return probs / counts[:, None], states / counts[:, None]

    mass, row_tok, col_tok = hubs.new_token_mass(prep, rows, None)
    assert row_tok == list(work.primaries) and sorted(col_tok) == list(range(len(prep.toks)))
    expected, states = plain(rows, col_tok)
    torch.testing.assert_close(torch.from_numpy(mass).float(), expected, rtol=1e-4, atol=1e-5)

    others = [r for r in range(len(row_tok)) if row_tok[r] != hub]
    direction = states[others].mean(0)
    rows[hub] = 40.0 * direction / direction.norm() ** 2  # logit ~40 wherever the state is near that mean
    mass, row_tok, col_tok = hubs.new_token_mass(prep, rows, None)
    assert (mass[others].argmax(1) == 0).all() and (mass[others].sum(1) > 0.5).all()
    report = RunReport({"tokens": [{"word": t.word, "form": t.form} for t in prep.toks]}, StageTimer())
    report.record_new_token_mass(mass, row_tok, col_tok)
    flagged = {f["word"]: f for f in report.data["over_predicting"]}
    assert {prep.toks[row_tok[r]].word for r in others} <= set(flagged)
    hub_word = prep.toks[hub].word
    assert all(f["most_to"]["token"] == prep.toks[hub].form for f in flagged.values() if f["word"] != hub_word)


@pytest.mark.parametrize("combo", [("llama", "bytelevel", True), ("qwen2", "bytelevel", False),
                                   ("gemma3", "metaspace", True)], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("depth", [2, 4])
def test_new_token_mass_continues_from_the_teacher_pass(model_dirs, words_file, corpus_file, combo, depth):
    """With the run's teacher cache (prefix keys/values and, of the checked snippets, the prefix states after its
    last layer), new_token_mass runs the word alone through the cached layers and the whole sequences only
    through the rest: the same mass as the plain passes (a mid layer, and the last, where the word alone runs
    every layer and no state is kept)."""
    from tokdistill_fast import pipeline

    prep = pipeline.prepare(model_dirs[combo], words_file, [corpus_file], DistillConfig(**FAST, dtype="float32"))
    rows = subtoken_mean(prep.decoder.embed_weight, prep.toks)
    rows = rows + 0.05 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    out_rows = None if prep.tied else rows.flip(0)
    cache = pipeline.teacher_cache(prep, prep.work, [depth], packed=True)
    checked = hubs.mass_snippets(prep.work.snippet_row)
    if depth < prep.decoder.num_layers:
        np.testing.assert_array_equal(cache.kept, checked)
        assert cache.prefix_states.shape[0] == int(np.diff(cache.prefix_cu)[checked].sum())
    else:  # the word alone through every layer: no states to continue from
        assert cache.kept is None and cache.prefix_states is None
    plain = hubs.new_token_mass(prep, rows, out_rows)
    continued = hubs.new_token_mass(prep, rows, out_rows, cache)
    assert continued[1:] == plain[1:]
    np.testing.assert_allclose(continued[0], plain[0], rtol=1e-4, atol=1e-6)
    assert plain[0].max() > 1e-3  # the rows do draw some mass: the comparison reads something


def test_hub_check_mass_serves_the_report_where_the_continued_rows_stay(model_dirs, words_file, corpus_file):
    """The hardest stage's hub check measures the rows as written (clipped, variants derived); where its rows are the
    ones kept, learn_rows hands that measurement on instead of scoring the same rows again, and it equals a fresh
    hubs.new_token_mass of the output rows (from the same teacher cache)."""
    from tokdistill_fast import pipeline

    cfg = DistillConfig(**{**FAST, "epochs": 2}, hardest_epochs=2, dtype="float32")
    prep = pipeline.prepare(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], cfg)
    cache = pipeline.teacher_cache(prep, prep.work, [2], packed=True)
    learned = pipeline.learn_rows(prep, cfg, (2, 0.06, 2), cache=cache)
    assert any(v["kept"] == "alone" for v in learned.hardest.values())
    assert learned.mass is not None
    fresh = hubs.new_token_mass(prep, learned.rows, None, cache)  # as the run measures: from its teacher pass
    np.testing.assert_array_equal(learned.mass[0], fresh[0])
    assert learned.mass[1:] == fresh[1:]


@pytest.mark.parametrize("hardest", [0, 2])
def test_timings_name_the_mass_check_only_where_it_ran(model_dirs, words_file, corpus_file, tmp_path, hardest):
    """Where a hub check's measurement serves the report (the hardest words' check), report.json's timings have no
    `new_token_mass` (its time is the student's); before, they gave the lookup's ~0 s under that name."""
    cfg = DistillConfig(**FAST, hardest_epochs=hardest, more_epochs=0, dtype="float32")
    distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], tmp_path / "out", cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert bool(report["hardest"]) == bool(hardest)
    assert all("mass_after" in t for t in report["tokens"] if t["variant_of"] is None)
    assert ("new_token_mass" in report["timings"]) == (not hardest)


@pytest.mark.parametrize("asked, dropped", [(dict(lr_schedule="decay"), "more_epochs"),
                                            (dict(method="token-distill+alpha-ntp", more_epochs=0), "hardest_epochs")])
def test_extra_stages_report_what_ran_and_warn_of_a_count_not_trained(model_dirs, words_file, corpus_file, tmp_path,
                                                                     caplog, asked, dropped):
    """settings.resolved_* give the extra stages' epochs as run; a count given that a rule leaves untrained (the
    more epochs after a decaying rate, the hardest words with NTP) is a warning. Before, the report gave the count
    asked for and the log said nothing."""
    given = dict(more_epochs=2, hardest_epochs=2) | asked
    cfg = DistillConfig(**{**FAST, "epochs": 1}, **given, variant_epochs=0, dtype="float32")
    with caplog.at_level("WARNING"):
        distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], tmp_path / "out", cfg)
    settings = json.loads((tmp_path / "out" / "report.json").read_text())["settings"]
    assert settings[f"resolved_{dropped}"] == 0
    assert all(settings[f"resolved_{k}"] == n for k, n in given.items() if k.endswith("epochs") and k != dropped)
    flag = "--" + dropped.replace("_", "-")
    assert [r.message for r in caplog.records if r.message.startswith(flag)] == [
        f"{flag} 2: not trained in this run; the stage needs {pipeline.EXTRA_STAGES[dropped]}"]


def test_training_windows_end_before_an_occurrence_only_the_extended_tokenizer_reads(model_dirs, tmp_path):
    """prepare hands the retrieval its extended tokenizer: a training window stops before a later occurrence of its
    word inside a longer word, where the original tokenizer spells the text otherwise (tests/test_contexts.py), as
    held-out windows do, so no target reads subtokens that the extended tokenizer never emits."""
    from tokdistill_fast import pipeline

    src = model_dirs[("llama", "bytelevel", True)]
    tok = AutoTokenizer.from_pretrained(src)
    suffix = respelling_suffix(tok, " palatable")
    corpus, words = tmp_path / "c.txt", tmp_path / "w.txt"
    corpus.write_text("\n\n".join(f"{'so ' * k}the palatable and palatable{suffix} one was fine." for k in range(8)),
                      encoding="utf-8")
    words.write_text("palatable\n", encoding="utf-8")
    prep = pipeline.prepare(src, words, [corpus], DistillConfig(**{**FAST, "snippet_length": 40}, dtype="float32"))
    snippets = [s for s in prep.work.snippets if s.source == "corpus"]
    assert len(snippets) == 8 and [tok.decode(s.ids).count("palatable") for s in snippets] == [1] * 8


def test_words_without_spaces_train_on_their_corpus_text(model_dirs, tmp_path):
    """A Japanese word is found in Japanese text, where no space comes before it, trains on those snippets, and
    the output's tokenizer emits its id there."""
    src = model_dirs[("llama", "bytelevel", True)]
    corpus, words = tmp_path / "c.txt", tmp_path / "w.txt"
    corpus.write_text("\n\n".join(f"{'とても' * k}大きなパッケージを設定します。" for k in range(10)), encoding="utf-8")
    words.write_text("パッケージ\n", encoding="utf-8")
    result = distill(src, words, [corpus], tmp_path / "out", DistillConfig(**FAST, dtype="float32"))
    row = result.report["tokens"][0]
    assert (row["form"], row["corpus_contexts"], row["source"]) == ("パッケージ", 8, "corpus")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert row["id"] in tok("小さなパッケージです", add_special_tokens=False)["input_ids"]

"""The layer/epochs search: candidates, the paired decision, independence of the clock, fixed values respected, and
its record in the report."""

import logging

import numpy as np
import pytest
import torch

from tokdistill_fast import DistillConfig, config, distill, hubs, pipeline, retrain
from tokdistill_fast.control import autotune, settings
from tokdistill_fast.student.loop import COOLDOWN, Schedule, warmup_schedule

FAST = dict(snippets_per_token=10, snippet_length=24, batch_size=4, epochs=1, more_epochs=0)


def test_candidate_layers_cover_the_depth():
    assert autotune.candidate_layers(30) == [15, 22]
    assert autotune.candidate_layers(18) == [9, 14]
    assert autotune.candidate_layers(2) == [1, 2]


def test_auto_lr_by_layer_and_schedule():
    """Constant schedule (the paper's): the measured 5e-3 / 3e-3 (last layer); decay: 1.4x the same peak."""
    assert [autotune.default_lr(layer, 30, optimizer="adamw") for layer in (15, 30)] == [5e-3, 3e-3]
    assert [autotune.default_lr(layer, 30, decay=True, optimizer="adamw") for layer in (15, 30)] == [7e-3, 4.2e-3]
    assert [autotune.default_lr(layer, 30) for layer in (15, 30)] == [0.06, 0.036]


def lrs_of(steps: int, *args, **kwargs) -> list[float]:
    """The learning rate of each of `steps` steps under warmup_schedule(optimizer, *args, **kwargs) at lr 1."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, *args, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("decay", [True, False])
def test_warmup_schedule_warms_up_then_decays_to_zero_or_holds(decay):
    lrs = lrs_of(10, 10, 0.5, decay)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # linear warm-up over the first half
    if decay:
        assert lrs[5:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])  # linearly down to zero at the last step
    else:
        assert lrs[5:] == pytest.approx([1.0] * 5)  # the paper's constant rate


def test_cooldown_ends_the_run_after_the_constant_rate():
    """The default: warm-up, constant, then linearly down over the run's last fifth to 1/(its steps + 1); with more
    epochs (run_steps) the cooldown ends the whole run and the schedule's own epochs keep the constant rate."""
    lrs = lrs_of(10, 10, 0.5, False, 0.2)
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3])
    lrs = lrs_of(20, 10, 0.5, False, 0.2, run_steps=20)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5:15] == pytest.approx([1.0] * 10)
    assert lrs[15:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_lr_schedule_option_sets_the_cooldown():
    for name, cooldown, decay in (("cooldown", COOLDOWN, False), ("constant", 0.0, False), ("decay", 0.0, True)):
        sched = Schedule.for_config(DistillConfig(lr_schedule=name), 0.06, 1, "torch")
        assert (sched.cooldown, sched.decay) == (cooldown, decay)
    assert DistillConfig().lr_schedule == "cooldown" and COOLDOWN == 0.2
    with pytest.raises(ValueError, match="no cooldown"):
        Schedule(lr=1.0, decay=True, cooldown=0.2)


def test_sample_share_grows_with_budget_and_stays_a_share():
    lo = autotune.sample_share([8, 15, 22, 30], 30, 3.0, 3.0, 0.1, 0.6, False)
    hi = autotune.sample_share([8, 15, 22, 30], 30, 3.0, 3.0, 0.4, 0.6, False)
    assert 0 < lo < hi <= 1
    assert autotune.sample_share([8, 15, 22, 30], 30, 3.0, 3.0, 100.0, 0.6, False) == 1.0
    # the 2-epoch trial costs search time; a 2-epoch main run leaves more room
    assert autotune.sample_share([8, 15, 22, 30], 30, 3.0, 3.0, 0.2, 0.6, True) < lo * 2
    assert autotune.sample_share([8, 15, 22, 30], 30, 6.0, 3.0, 0.2, 0.6, False) > \
        autotune.sample_share([8, 15, 22, 30], 30, 3.0, 3.0, 0.2, 0.6, False)


def test_train_cost_counts_only_the_suffix_with_gradient():
    assert autotune.train_cost(1, 1.0, False) == autotune.TRAIN_COST
    assert autotune.train_cost(2, 0.5, True) == 2 * (autotune.TRAIN_COST * 0.5 + 0.5)
    assert autotune.train_cost(1, 0.5, False) < autotune.train_cost(1, 0.5, True)


@pytest.fixture(scope="module")
def auto_run(model_dirs, words_file, corpus_file):
    return distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                   DistillConfig(**FAST))


def test_auto_search_picks_the_cheapest_layer_no_costlier_one_beats(auto_run):
    report = auto_run.report
    search = report["autotune"]
    assert search is not None and search["sample"]["tokens"] >= 4
    trials = search["trials"]
    assert [t["layer"] for t in trials] == autotune.candidate_layers(4)  # cheapest first, each layer once
    assert all(t["lr"] == autotune.default_lr(t["layer"], 4) for t in trials)
    # replay the recorded decisions: a costlier layer replaces the choice only when it wins beyond noise
    choice = trials[0]
    for t in trials[1:]:
        diff, se = t["vs_choice"]["mean_log"], t["vs_choice"]["se"]
        if autotune.wins(diff, se):
            choice = t
    assert (report["settings"]["resolved_target_layer"], report["settings"]["resolved_lr"]) == \
        (choice["layer"], choice["lr"])
    assert all(np.isfinite(t["ratio"]) and t["seconds"] > 0 for t in trials)
    assert all(0 <= t["self_mass"] <= 1 for t in trials) and 0 <= search["sample"]["base_self_mass"] <= 1
    over = [t for t in trials if (t["layer"], t["lr"]) == (choice["layer"], choice["lr"])][-1]["self_mass"] > \
        autotune.OVER_PREDICTION
    assert report["settings"]["resolved_method"] == ("token-distill+alpha-mass" if over else "token-distill")


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("layer", ["auto", 2])
def test_rows_that_over_predict_themselves_train_with_alpha_mass(model_dirs, words_file, corpus_file, monkeypatch,
                                                                guard, layer):
    """When the search's held-out sample shows the chosen rows of a tied model taking more than OVER_PREDICTION of
    the next-token mass right after the word, the run trains token-distill+alpha-mass (here forced with a bar of
    -1), with the layer searched or fixed; --no-ntp-guard keeps token-distill, and so does an untied model (its
    output rows are not the input rows)."""
    monkeypatch.setattr(autotune, "OVER_PREDICTION", -1.0)
    cfg = DistillConfig(**FAST, ntp_guard=guard, target_layer=layer)
    tied = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None, cfg).report
    untied = distill(model_dirs[("qwen2", "bytelevel", False)], words_file, [corpus_file], None, cfg).report
    want = "token-distill+alpha-mass" if guard else "token-distill"
    assert tied["settings"]["method"] == "token-distill"  # as asked
    assert tied["settings"]["resolved_method"] == want
    assert {t["method"] for t in tied["tokens"] if t["variant_of"] is None} == {want}
    assert untied["settings"]["resolved_method"] == "token-distill"


@pytest.mark.parametrize("guard", [True, False])
def test_rows_that_over_predict_after_the_run_train_again_with_alpha_mass(model_dirs, words_file, corpus_file,
                                                                         monkeypatch, guard):
    """Where the search's sample did not show it (here a bar it never reaches), the trained rows can still make the
    tied model put over HUB_AFTER_RUN of its next-token probability on new tokens right after a trained word
    on its training snippets (here forced with a flag of -1): the run then trains token-distill+alpha-mass and says
    so in the report; --no-ntp-guard keeps the distilled rows."""
    monkeypatch.setattr(autotune, "OVER_PREDICTION", 2.0)
    monkeypatch.setattr(pipeline, "HUB_AFTER_RUN", -1.0)
    cfg = DistillConfig(**FAST, ntp_guard=guard)
    report = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None, cfg).report
    want = "token-distill+alpha-mass" if guard else "token-distill"
    assert all(t["self_mass"] <= 2.0 for t in report["autotune"]["trials"])
    assert report["settings"]["resolved_method"] == want
    assert {t["method"] for t in report["tokens"] if t["variant_of"] is None} == {want}
    if guard:
        assert report["ntp_guard_after_run"]["trained"] == want and report["ntp_guard_after_run"]["mass_after"] >= 0
        assert all(t.get("mass_after") is not None for t in report["tokens"] if t["variant_of"] is None)
    else:
        assert report["ntp_guard_after_run"] is None


@pytest.mark.parametrize("guard", [True, False])
def test_large_jobs_and_more_epochs_on_tied_models_train_alpha_mass_from_the_start(model_dirs, words_file,
                                                                                   corpus_file, monkeypatch, guard):
    """A job of at least GUARD_FROM_START_WORDS trained words (here lowered to the test's word count) on a tied model
    trains token-distill+alpha-mass from the start, with no check after the run and, with the layer fixed, no
    search trial to measure it; so does a smaller job that trains more epochs; --no-ntp-guard keeps token-distill,
    and so does an untied model."""
    monkeypatch.setattr(autotune, "OVER_PREDICTION", 2.0)  # the search's sample never sends it there
    words = len([w for w in open(words_file).read().splitlines() if w.strip()])
    monkeypatch.setattr(settings, "GUARD_FROM_START_WORDS", words)
    cfg = DistillConfig(**FAST, ntp_guard=guard)
    tied = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None, cfg).report
    want = "token-distill+alpha-mass" if guard else "token-distill"
    assert tied["settings"]["resolved_method"] == want
    assert {t["method"] for t in tied["tokens"] if t["variant_of"] is None} == {want}
    assert tied["ntp_guard_after_run"] is None
    if guard:
        untied = distill(model_dirs[("qwen2", "bytelevel", False)], words_file, [corpus_file], None, cfg).report
        assert untied["settings"]["resolved_method"] == "token-distill"
        fixed = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                        cfg.replace(target_layer=2)).report  # nothing to choose or measure: no search
        assert fixed["autotune"] is None and fixed["settings"]["resolved_method"] == want
        monkeypatch.setattr(settings, "GUARD_FROM_START_WORDS", words + 1)  # one word short: plain distillation
        assert distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                       cfg).report["settings"]["resolved_method"] == "token-distill"
        more = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                       cfg.replace(more_epochs=1)).report  # more passes: alpha-mass, its more epochs kept or not
        assert more["settings"]["resolved_method"] == want and more["ntp_guard_after_run"] is None
        assert more["more_epochs"]["epochs"] == 1


def test_rows_that_make_a_hub_in_the_more_epochs_go_back_alone(model_dirs, words_file, corpus_file, monkeypatch):
    """Where the more epochs' rows put over HUB_AFTER_RUN of the next-token probability after a trained word (here
    a bar of -1), send_back reads them against the rows from before them; the rows it names go back to those and the
    others keep their more epochs, and report.json's `more_epochs` names them; only the rows sent back may retry as
    outliers again (the others had their retry)."""
    monkeypatch.setattr(hubs, "HUB_AFTER_RUN", -1.0)
    seen, calls, retries = [], [], []
    keep, retry = hubs.keep_more_epochs, retrain.retry_outliers

    def spy_retry(*args):
        retries.append(args[-1])
        return retry(*args)

    def spy(result, *args):
        seen.append((result.before.rows.clone(), result.rows.clone()))
        kept, info = keep(result, *args)
        seen.append(kept.rows.clone())
        return kept, info

    def one_row(prep, after_words, trial, start, trained, desc):
        calls.append(({prep.toks[i].form: row for i, row in start.items()}, desc))
        return {min(start): 0.7} if desc == "more epochs" else {}

    monkeypatch.setattr(hubs, "keep_more_epochs", spy)
    monkeypatch.setattr(hubs, "send_back", one_row)
    monkeypatch.setattr(retrain, "retry_outliers", spy_retry)
    cfg = DistillConfig(**FAST).replace(more_epochs=1, target_layer=2, ntp_guard=False)
    report = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None, cfg).report
    (before, after), final = seen[0], seen[1]
    start, desc = calls[0]
    words = [t["form"] for t in report["tokens"] if t["variant_of"] is None]
    assert desc == "more epochs" and list(start) == words
    assert all(torch.equal(start[w], before[r]) for r, w in enumerate(words))
    assert report["more_epochs"]["kept"] and report["more_epochs"]["sent_back"] == {words[0]: 0.7}
    assert torch.equal(final[0], before[0]) and torch.equal(final[1:], after[1:])
    assert not torch.equal(before[1:], after[1:])
    assert retries == [None, [0]]


def test_paired_decision_needs_a_win_beyond_noise():
    rng = np.random.default_rng(0)
    old = rng.uniform(0.3, 0.6, 40)
    assert autotune.paired_better(old - 0.05 + rng.normal(0, 0.01, 40), old)[0]  # clear, consistent win
    assert not autotune.paired_better(old - 0.005 + rng.normal(0, 0.05, 40), old)[0]  # noise-sized
    assert not autotune.paired_better(old + 0.05, old)[0]  # worse
    assert not autotune.paired_better(old[:1] - 1, old[:1])[0]  # one token: no evidence


def test_paired_decision_needs_a_gain_that_pays_for_the_cost():
    """A consistent 5% gain is beyond noise but too small for a costlier run (SmolLM2's layer 22 over 15); 20% is
    enough (Gemma-3's layer 14 over 9)."""
    rng = np.random.default_rng(2)
    old = rng.uniform(0.3, 0.6, 40)
    small = old * np.exp(-0.05 + rng.normal(0, 0.01, 40))
    better, mean_log, se = autotune.paired_better(small, old)
    assert mean_log < -autotune.NOISE_Z * se and not better
    assert autotune.paired_better(old * np.exp(-0.2 + rng.normal(0, 0.01, 40)), old)[0]


def test_paired_decision_sees_consistent_gains_past_one_large_swing():
    """Ratios scale per token: eight tokens 35-45% better and one that swings from 2.6x to 0.7x is a clear win,
    which plain differences call noise (their SE grows with the swing; the shape of Gemma-3/FOLDOC, layer 14 vs 9)."""
    rng = np.random.default_rng(1)
    old = np.append(rng.uniform(0.15, 0.3, 8), 2.6)
    new = np.append(old[:8] * rng.uniform(0.55, 0.65, 8), 0.7)
    d = new - old
    assert d.mean() > -autotune.NOISE_Z * d.std(ddof=1) / np.sqrt(len(d))  # the plain paired test misses it
    assert autotune.paired_better(new, old)[0]
    assert not autotune.paired_better(old, new)[0]
    with_gap = np.append(new, np.nan)  # a token without held-out pairs is left out, not a nan decision
    assert autotune.paired_better(with_gap, np.append(old, 0.5))[0]


def test_choice_does_not_depend_on_the_clock(model_dirs, words_file, corpus_file, monkeypatch, auto_run):
    """The same inputs give the same trials, settings and rows when the load changes during the search (its clock
    runs 1000x faster from the fourth reading on, after the first measurements; the old search then ran trials it
    had skipped at the steady pace)."""
    import itertools
    import time
    import types

    real, readings = time.perf_counter, itertools.count()
    clock = types.SimpleNamespace(perf_counter=lambda: real() / (1 if next(readings) < 3 else 1000))
    monkeypatch.setattr(autotune, "time", clock)  # the search's clock only
    slow = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None, DistillConfig(**FAST))
    tried = [[(t["layer"], t["lr"], t["epochs"]) for t in r.report["autotune"]["trials"]] for r in (slow, auto_run)]
    assert tried[0] == tried[1]
    for key in ("resolved_target_layer", "resolved_lr", "resolved_epochs"):
        assert slow.report["settings"][key] == auto_run.report["settings"][key]
    assert torch.equal(slow.rows, auto_run.rows)


def test_a_gain_within_noise_is_decided_on_a_second_sample(model_dirs, words_file, corpus_file, monkeypatch,
                                                          auto_run):
    """A costlier layer whose gain is large enough but within noise (here: every gain, and no win on one sample)
    trains again, with the choice, on a second sample of other tokens; the decision and the report read both
    (the baseline's mass too). A run that kept one sample decided on it (auto_run)."""
    clear = auto_run.report["autotune"]
    if clear["sample"]["samples"] == 1:  # then its one sample decided: a win, or a gain below MIN_GAIN
        v = clear["trials"][1]["vs_choice"]
        assert autotune.wins(v["mean_log"], v["se"]) or v["mean_log"] >= np.log1p(-autotune.MIN_GAIN)
    monkeypatch.setattr(autotune, "NOISE_Z", 1e9)
    monkeypatch.setattr(autotune, "MIN_GAIN", -1e9)
    monkeypatch.setattr(autotune, "MIN_TOKENS", 2)
    monkeypatch.setattr(autotune, "sample_share", lambda *a, **k: 0.0)  # a sample of MIN_TOKENS tokens
    scorers = []

    class Recorded(autotune.HeldoutRatios):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scorers.append(self)

    monkeypatch.setattr(autotune, "HeldoutRatios", Recorded)
    search = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                     DistillConfig(**FAST)).report["autotune"]
    assert search["sample"]["samples"] == 2 and search["sample"]["tokens"] == 4
    first, second = search["trials"]
    assert len(first["per_token"]) == len(second["per_token"]) == 4
    assert second["vs_choice"]["mean_log"] == pytest.approx(
        float(np.mean(np.log(second["per_token"]) - np.log(first["per_token"]))), abs=1e-3)
    assert search["best"]["layer"] == first["layer"]  # never beyond noise here: the cheaper layer stays
    assert len(scorers) == 2 and search["sample"]["base_self_mass"] == pytest.approx(
        np.mean([s.base_self_mass for s in scorers]))  # two samples of two scored tokens each


@pytest.mark.parametrize("fixed", [dict(target_layer=2), dict(target_layer=3, lr=2e-3)])
def test_fixed_values_are_used_and_only_the_guard_measures_them(model_dirs, words_file, corpus_file, fixed):
    """Fixed settings are used as given. On a tied model the alpha-NTP guard still needs its measurement, so the
    given setting alone trains on the search's sample (one trial); with --no-ntp-guard, or on an untied model, no
    search runs."""
    want = (fixed["target_layer"], fixed.get("lr", autotune.default_lr(fixed["target_layer"], 4)))
    tied = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                   DistillConfig(**FAST, **fixed)).report
    assert [(t["layer"], t["lr"], t["epochs"]) for t in tied["autotune"]["trials"]] == [(*want, FAST["epochs"])]
    off = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                  DistillConfig(**FAST, **fixed, ntp_guard=False)).report
    untied = distill(model_dirs[("qwen2", "bytelevel", False)], words_file, [corpus_file], None,
                     DistillConfig(**FAST, **fixed)).report
    assert off["autotune"] is None and untied["autotune"] is None
    for r in (tied, off, untied):
        assert (r["settings"]["resolved_target_layer"], r["settings"]["resolved_lr"]) == want


def test_candidates_train_at_most_the_search_epochs_and_the_run_all_of_its_own(model_dirs, words_file, corpus_file,
                                                                            monkeypatch):
    """A main run of more epochs than SEARCH_EPOCHS (here 1 of 2) trains its own, then its more epochs; its search's
    trials train the cap and no more epochs."""
    monkeypatch.setattr(autotune, "SEARCH_EPOCHS", 1)
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**{**FAST, "epochs": 2, "more_epochs": 4})).report
    assert {t["epochs"] for t in r["autotune"]["trials"]} == {1}
    assert r["settings"]["resolved_epochs"] == 2
    assert r["more_epochs"]["epochs"] == 4 and r["more_epochs"]["kept"]
    assert r["training"]["steps"] == (2 + 4) * -(-r["counts"]["snippets"] // FAST["batch_size"])


def test_auto_more_epochs_stay_within_a_budget_of_layers(model_dirs, words_file, corpus_file, monkeypatch, caplog):
    """--more-epochs auto keeps epochs x target layer within MORE_LAYER_EPOCHS: SmolLM2's layer 22 trains 1 more
    epoch, its layer 15 and Gemma-3's layer 14 all 4; a given count trains as given. A run logs the cut, reports it
    and trains its steps, and its training curve has an entry for each epoch."""
    bf16 = DistillConfig(device="cpu", dtype="bfloat16")
    assert [bf16.run_more_epochs(layer) for layer in (None, 14, 15, 16, 22, 30)] == [4, 4, 4, 4, 1, 0]
    assert bf16.replace(more_epochs=4).run_more_epochs(22) == 4
    assert bf16.replace(epochs=1).run_more_epochs(22) == 4
    assert bf16.replace(dtype="float32").run_more_epochs(15) == 0
    monkeypatch.setattr(config, "MORE_LAYER_EPOCHS", 6)  # the 2-layer model: layer 1 all 4, layer 2 one
    caplog.set_level(logging.INFO, logger="tokdistill_fast")
    for layer, more in ((1, 4), (2, 1)):
        r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                    DistillConfig(**{**FAST, "epochs": 2, "more_epochs": "auto", "target_layer": layer,
                                     "dtype": "bfloat16", "device": "cpu"})).report
        assert r["settings"]["resolved_more_epochs"] == more and r["more_epochs"]["epochs"] == more
        assert r["training"]["steps"] == (2 + more) * -(-r["counts"]["snippets"] // FAST["batch_size"])
        curve = r["training"]["epoch_loss"]  # the more epochs included, and in the log
        assert len(curve) == 2 + more
        assert "train: mean loss by epoch " + ", ".join(f"{x:.4g}" for x in curve) in caplog.text
    assert "more epochs: 1, not 4, at layer 2" in caplog.text


def test_auto_epochs_tries_a_second_epoch_and_reports_the_choice(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**{**FAST, "epochs": "auto"}, target_layer=2, lr=5e-3)).report
    trials = r["autotune"]["trials"]
    assert [t["epochs"] for t in trials] == [1, 2] and {t["layer"] for t in trials} == {2}
    second = trials[1]["vs_choice"]
    chosen = 2 if autotune.wins(second["mean_log"], second["se"]) else 1
    assert r["settings"]["resolved_epochs"] == chosen and r["settings"]["epochs"] == "auto"
    assert r["training"]["steps"] == chosen * -(-r["counts"]["snippets"] // FAST["batch_size"])


def test_too_few_snippets_fall_back_to_defaults(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**{**FAST, "snippets_per_token": 2})).report
    assert r["autotune"] is None
    assert r["settings"]["resolved_target_layer"] == 3  # round(0.75 * 4)
    assert r["settings"]["resolved_epochs"] == 1  # FAST fixes one epoch

"""The layer/lr search: candidates, held-out split, fixed values respected, and its record in the report."""

import numpy as np
import pytest

from tokdistill_fast import DistillConfig, autotune, distill

FAST = dict(snippets_per_token=10, snippet_length=24, batch_size=4, epochs=1)


def test_candidate_layers_cover_the_depth():
    assert autotune.candidate_layers(30) == [15, 22, 30]
    assert autotune.candidate_layers(18) == [9, 14, 18]
    assert autotune.candidate_layers(2) == [1, 2]


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


def test_auto_search_picks_a_tried_candidate_and_reports_it(auto_run):
    report = auto_run.report
    search = report["autotune"]
    assert search is not None and search["sample"]["tokens"] >= 4
    tried = {(t["layer"], t["lr"]) for t in search["trials"]}
    assert {t["layer"] for t in search["trials"]} >= set(autotune.candidate_layers(4))
    chosen = (report["settings"]["resolved_target_layer"], report["settings"]["resolved_lr"])
    assert chosen in tried
    best = min(search["trials"], key=lambda t: t["ratio"])
    assert chosen == (best["layer"], best["lr"])
    assert all(np.isfinite(t["ratio"]) and t["seconds"] > 0 for t in search["trials"])


def test_fixed_layer_is_respected_and_only_lr_searched(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**FAST, target_layer=2)).report
    assert r["settings"]["resolved_target_layer"] == 2
    assert {t["layer"] for t in r["autotune"]["trials"]} == {2}


def test_fixed_values_skip_the_search(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**FAST, target_layer=3, lr=2e-3)).report
    assert r["autotune"] is None
    assert (r["settings"]["resolved_target_layer"], r["settings"]["resolved_lr"]) == (3, 2e-3)


def test_auto_epochs_tries_a_second_epoch_and_reports_the_choice(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**{**FAST, "epochs": "auto"}, target_layer=2, lr=5e-3)).report
    trials = r["autotune"]["trials"]
    assert [t["epochs"] for t in trials] == [1, 2] and {t["layer"] for t in trials} == {2}
    best = min(trials, key=lambda t: t["ratio"])
    assert r["settings"]["resolved_epochs"] == best["epochs"] and r["settings"]["epochs"] == "auto"
    assert r["training"]["steps"] == best["epochs"] * -(-r["counts"]["snippets"] // FAST["batch_size"])


def test_too_few_snippets_fall_back_to_defaults(model_dirs, words_file, corpus_file):
    r = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], None,
                DistillConfig(**{**FAST, "snippets_per_token": 2})).report
    assert r["autotune"] is None
    assert r["settings"]["resolved_target_layer"] == 3  # round(0.75 * 4)
    assert r["settings"]["resolved_epochs"] == 1  # FAST fixes one epoch

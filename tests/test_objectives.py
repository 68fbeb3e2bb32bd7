"""`--loss logits-mse` and `--method ntp-all` through distill() on an untied tiny model: the loss that ran is seen
at the loss functions (a spy, not read from the report), logits-mse trains the new input rows only (the new
output rows keep the subtoken-mean policy), ntp-all trains the new input and output rows, every original row stays
bit-identical, and the report says what ran."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokdistill_fast import DistillConfig, distill
from tokdistill_fast.config import UserInputError
from tokdistill_fast.modeling import losses

FAST = dict(snippets_per_token=6, snippet_length=24, batch_size=4, lr=1e-2, epochs=1, dtype="float32",
            device="cpu", add_variants=False)
UNTIED = ("qwen2", "bytelevel", False)


def spy_losses(monkeypatch) -> Counter:
    """Counts the calls of each training loss (logits_distill by its kind)."""
    calls: Counter = Counter()
    for name in ("hidden_mse", "logits_distill", "next_token"):
        fn = getattr(losses, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[f"{_name}:{args[0]}" if _name == "logits_distill" else _name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(losses, name, counted)
    return calls


@pytest.fixture(scope="module")
def untied(model_dirs):
    return model_dirs[UNTIED]


@pytest.fixture(scope="module")
def start_rows(untied, words_file, corpus_file):
    """The subtoken-mean rows every method starts from (input, output)."""
    run = distill(untied, words_file, [corpus_file], config=DistillConfig(**FAST, method="mean"))
    return run.rows, run.out_rows


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] whether each row moved."""
    return (a - b).abs().amax(dim=1) > 1e-6


def test_logits_mse_trains_the_new_input_rows_only(untied, words_file, corpus_file, start_rows, monkeypatch):
    calls = spy_losses(monkeypatch)
    run = distill(untied, words_file, [corpus_file], config=DistillConfig(**FAST, loss="logits-mse"))
    assert set(calls) == {"logits_distill:logits-mse"}
    assert changed(run.rows, start_rows[0]).all()
    assert torch.equal(run.out_rows, start_rows[1])  # output rows: the subtoken mean (--output-embeddings auto)
    report = run.report
    assert report["settings"]["loss"] == "logits-mse" and report["settings"]["resolved_target_layer"] == 4  # logits
    assert {t["method"] for t in report["tokens"]} == {"token-distill"}
    assert report["training"]["output_rows_trained"] is False


@pytest.mark.parametrize("optimizer", ["auto", "whitened"])  # auto: adamw; whitened: each table's own whitening
def test_ntp_all_trains_new_input_and_output_rows_only(optimizer, untied, words_file, corpus_file, start_rows,
                                                       monkeypatch, tmp_path):
    calls = spy_losses(monkeypatch)
    out = tmp_path / "out"
    run = distill(untied, words_file, [corpus_file], out, DistillConfig(**FAST, method="ntp-all", optimizer=optimizer))
    assert set(calls) == {"next_token"}
    assert changed(run.rows, start_rows[0]).all() and changed(run.out_rows, start_rows[1]).all()
    report = run.report
    assert report["settings"]["resolved_optimizer"] == {"auto": "adamw"}.get(optimizer, optimizer)
    assert {t["method"] for t in report["tokens"]} == {"ntp-all"} and report["training"]["output_rows_trained"]
    # Written as learned, and the original rows of both tables (and every other weight) bit-identical.
    before = AutoModelForCausalLM.from_pretrained(untied)
    after = AutoModelForCausalLM.from_pretrained(out)
    V = before.get_input_embeddings().weight.shape[0]
    ids = [t.new_id for t in run.tokens]
    for table, new in ((lambda m: m.get_input_embeddings().weight, run.rows),
                       (lambda m: m.get_output_embeddings().weight, run.out_rows)):
        assert torch.equal(table(after)[:V], table(before))
        torch.testing.assert_close(table(after)[ids], new)
    for name, p in after.named_parameters():
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(p, before.state_dict()[name]), name

    # ntp (new input rows only) on the same settings: the output rows keep the subtoken mean.
    ntp = distill(untied, words_file, [corpus_file], config=DistillConfig(**FAST, method="ntp"))
    assert torch.equal(ntp.out_rows, start_rows[1]) and not ntp.report["training"]["output_rows_trained"]


@pytest.mark.parametrize("policy", ["zeros", "mean"])
def test_ntp_all_refuses_an_output_policy_that_would_discard_its_output_rows(policy):
    with pytest.raises(UserInputError, match="ntp-all learns the new output rows"):
        DistillConfig(method="ntp-all", output_embeddings=policy).validate()
    DistillConfig(method="ntp-all", output_embeddings="ntp").validate()


def test_settings_a_method_does_not_read_are_refused_or_said(model_dirs, untied, words_file, corpus_file,
                                                              monkeypatch, caplog, tmp_path):
    """A --loss for a method without a distillation loss is refused (compare gives a --loss for all to the
    distilling methods only); --output-embeddings on a tied model, and alpha-mass on an untied one, are refused
    once the model is loaded, before any corpus work; an explicit --target-layer that an objective reading the
    logits cannot use is said in the log, and the run (its report, its learning rate) takes the last layer. Before,
    each was accepted and recorded as if it had applied."""
    import logging

    from tokdistill_fast import contexts
    from tokdistill_fast.evaluation import compare

    for method in ("mean", "random", "ntp", "ntp-all"):
        with pytest.raises(UserInputError, match=f"--loss kl is a distillation loss: --method {method} has none"):
            DistillConfig(method=method, loss="kl").validate()
    DistillConfig(method="token-distill+alpha-ntp", loss="logits-mse").validate()
    with monkeypatch.context() as m:
        m.setattr(contexts, "retrieve", lambda *a, **k: pytest.fail("the corpus was read"))
        for model, changes, message in (
                (model_dirs[("llama", "bytelevel", True)], dict(output_embeddings="zeros"),
                 "--output-embeddings zeros: the model ties its output rows"),
                (untied, dict(method="token-distill+alpha-mass"), "only a tied model reads")):
            with pytest.raises(UserInputError, match=message):
                distill(model, words_file, [corpus_file], config=DistillConfig(**FAST, **changes))
    cfg = DistillConfig(**FAST, method="token-distill", loss="kl", target_layer=1)
    with caplog.at_level(logging.WARNING):
        run = distill(untied, words_file, [corpus_file], config=cfg)
    last = run.report["model"]["layers"]
    assert run.report["settings"]["resolved_target_layer"] == last
    assert f"--target-layer 1 does not apply to --method token-distill --loss kl, which reads the logits: layer " \
           f"{last}" in caplog.text
    specs = [compare.parse_spec(s) for s in ("mean", "token-distill")]
    results = compare.compare(untied, words_file, [corpus_file], [corpus_file], tmp_path / "cmp",
                              DistillConfig(**FAST, loss="kl"), specs, compare.EvalOptions(snippets_per_token=2,
                                                                                            definitions=False))
    # each row records the distillation loss it trained: the --loss for all where it applies, none for mean
    assert [(m["label"], m["loss"]) for m in results["methods"]] == [("mean", None), ("token-distill", "kl")]

"""`tokdistill compare` on a tiny model: spec parsing, shared stages giving the same rows as standalone runs, and
the written table, JSON and plots."""

import json

import pytest
import torch
from conftest import synthetic_text

from tokdistill_fast import DistillConfig, distill, pipeline
from tokdistill_fast.cli import build_parser, main
from tokdistill_fast.config import UserInputError
from tokdistill_fast.control.settings import resolve_settings
from tokdistill_fast.evaluation.compare import markdown_table, parse_spec, sweep_specs

FAST = dict(snippets_per_token=6, snippet_length=20, batch_size=4, lr=1e-2, dtype="float32")


def test_parse_spec():
    s = parse_spec("token-distill@layer=8,lr=5e-3,epochs=2,loss=kl")
    assert (s.method, s.changes, s.seeds) == ("token-distill", {"target_layer": 8, "lr": 5e-3, "epochs": 2,
                                                                "loss": "kl"}, 1)
    assert parse_spec("token-distill@layer=auto,lr=auto").changes == {"target_layer": "auto", "lr": "auto"}
    assert parse_spec("random", seeds=3).seeds == 3 and parse_spec("mean", seeds=3).seeds == 1
    assert parse_spec("ntp@seeds=2").seeds == 2
    for bad in ("nope", "token-distill@depth=3", "token-distill@layer=x", "token-distill@layer"):
        with pytest.raises(UserInputError):
            parse_spec(bad)
    with pytest.raises(UserInputError, match="--seeds must be 1 or more"):
        parse_spec("random", seeds=0)
    with pytest.raises(UserInputError, match="seeds must be 1 or more, not 0"):
        parse_spec("random@seeds=0")  # before: one seed, silently
    specs = sweep_specs([2, 4], [1e-3], "auto")
    assert [s.label for s in specs] == ["token-distill@layer=2", "token-distill@layer=4",
                                        "token-distill@layer=auto,lr=0.001"]
    assert [s.group for s in specs] == ["layers", "layers", "lrs"]


@pytest.mark.parametrize("combo", [("llama", "bytelevel", True), ("qwen2", "bytelevel", False)],
                         ids=lambda c: "-".join(map(str, c)))
def test_shared_cache_gives_standalone_rows(combo, model_dirs, words_file, corpus_file):
    """learn_rows on one teacher cache holding several layers reproduces `distill` run on its own."""
    src = model_dirs[combo]
    base = DistillConfig(**FAST)
    prep = pipeline.prepare(src, words_file, [corpus_file], base)
    cache = pipeline.teacher_cache(prep, prep.work, [1, 2, prep.decoder.num_layers])
    for changes in ({"method": "token-distill", "target_layer": 2}, {"method": "token-distill", "loss": "kl"},
                    {"method": "token-distill+alpha-ntp", "target_layer": 1}, {"method": "random", "seed": 3}):
        cfg = base.replace(**changes)
        settings = resolve_settings(cfg, prep.decoder)
        shared = pipeline.learn_rows(prep, cfg.replace(epochs=settings[2]), settings, cache=cache)
        alone = distill(src, words_file, [corpus_file], None, cfg)
        torch.testing.assert_close(shared.rows, alone.rows, atol=1e-5, rtol=1e-4)
        if not prep.tied:
            torch.testing.assert_close(shared.out_rows, alone.out_rows)


def test_compare_writes_table_json_and_plots(model_dirs, words_file, corpus_file, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(synthetic_text(n_docs=40, seed=9))
    out = tmp_path / "cmp"
    rc = main(["-q", "compare", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens",
               str(words_file), "--corpus", str(corpus_file), "--heldout", str(heldout), "--out", str(out),
               "--snippets-per-token", "6", "--snippet-length", "20", "--batch-size", "4", "--lr", "1e-2",
               "--target-layer", "2", "--dtype", "float32", "--eval-snippets", "3", "--bootstrap", "50",
               "--no-definitions", "--methods", "mean", "random@seeds=2", "token-distill",
               "--layers", "1,4", "--lrs", "3e-2", "--casing-variants"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    assert results["counts"]["casing_variants"] > 0  # --casing-variants reached the token plan
    by = {m["label"]: m for m in results["methods"]}
    assert list(by) == ["mean", "random@seeds=2", "token-distill", "token-distill@layer=1", "token-distill@layer=4",
                        "token-distill@layer=2,lr=0.03"]
    assert by["random@seeds=2"]["aggregate"]["kl"]["seeds"] == 2 and "std" in by["random@seeds=2"]["aggregate"]["kl"]
    assert by["token-distill"]["layer"] == 2 and by["token-distill@layer=4"]["layer"] == 4
    assert "vs_reference" in by["token-distill"] and "vs_reference" not in by["mean"]
    assert by["token-distill"]["aggregate"]["kl"]["mean"] < by["random@seeds=2"]["aggregate"]["kl"]["mean"]
    assert set(results["shared_seconds"]) >= {"load", "contexts", "teacher", "heldout"}
    assert results["found_not_measured"] == [t["word"] for t in by["mean"]["tokens"]
                                             if t["heldout_hits"] and not t["snippets"]]
    table = (out / "table.md").read_text()
    assert "Partial" not in table and "not measured" not in table
    assert "not measured" in markdown_table({**results, "found_not_measured": ["東京都"]})
    assert "### Target-layer sweep" in table and "### Learning-rate sweep" in table and "| token-distill |" in table
    pytest.importorskip("matplotlib")
    assert all((out / f).stat().st_size > 0 for f in ("methods.png", "layers.png"))
    assert not (out / "lrs.png").exists()  # one learning rate: nothing to plot
    assert main(["compare", "--model", "x", "--new-tokens", str(words_file), "--heldout", str(heldout),
                 "--out", str(tmp_path / "bad"), "--methods", "token-distill@depth=2"]) == 2
    assert "depth" in capsys.readouterr().err


# Every `tokdistill compare` flag that sets a DistillConfig field, with a value other than its default.
FLAG_VALUES = {
    "--stop-when-full": None, "--max-corpus-bytes": "3M", "--init-from": "rows.safetensors",
    "--distill-min-chars": "3", "--loss": "kl", "--target-layer": "2", "--lr": "0.02", "--epochs": "3",
    "--batch-size": "5", "--snippets-per-token": "7", "--snippet-length": "21", "--contexts": "generate",
    "--output-embeddings": "zeros", "--tokenizer-mode": "vocab", "--no-variants": None, "--casing-variants": None,
    "--device": "cpu", "--dtype": "float32", "--seed": "5", "--backend": "torch", "--prefix-sharing": "off",
    "--align-impl": "python", "--warmup-fraction": "0.25", "--loss-positions": "all",
    "--left-context": "4", "--top-up": "word", "--lr-schedule": "decay", "--optimizer": "adamw",
    "--hardest-epochs": "2",
    "--more-epochs": "2", "--variant-epochs": "2",
}
SEPARATE = {"new_tokens_from_tokenizer", "target_tokenizer", "new_ids", "method", "overwrite"}  # tested elsewhere


def test_every_compare_flag_reaches_the_shared_pipeline(monkeypatch, tmp_path, capsys):
    """compare hands its whole base config to pipeline.prepare, the stages distill runs: a flag that compare
    accepted but left out of that config (as --casing-variants once was) fails here, and so does a new flag
    missing from FLAG_VALUES."""
    compare_parser = build_parser()._subparsers._group_actions[0].choices["compare"]
    fields = DistillConfig.__dataclass_fields__
    flags = {a.option_strings[-1] for a in compare_parser._actions if a.dest in fields and a.dest not in SEPARATE}
    assert flags == set(FLAG_VALUES), "give each compare flag a non-default value in FLAG_VALUES"
    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(model, new_tokens, corpus, cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(pipeline, "prepare", fake_prepare)
    (tmp_path / "h.txt").write_text("held-out text\n")  # compare reads that it exists before the shared stages
    argv = ["compare", "--model", "m", "--new-tokens", "w.txt", "--heldout", str(tmp_path / "h.txt"),
            "--out", str(tmp_path / "o"), "--methods", "token-distill"]
    for flag, value in FLAG_VALUES.items():
        argv += [flag] + ([value] if value is not None else [])
    assert main([*argv, "--reference", "nope"]) == 2  # a label not compared fails before the shared stages
    assert main([*argv, "--methods", "mean", "token-distill@layer=2", "--layers", "1,2"]) == 2  # one setting twice
    assert "give token-distill@layer=2 more than once" in capsys.readouterr().err
    with pytest.raises(Stop):
        main(argv)
    cfg, default = seen["cfg"], DistillConfig()
    for action in compare_parser._actions:
        if action.option_strings and action.option_strings[-1] in FLAG_VALUES:
            assert getattr(cfg, action.dest) != getattr(default, action.dest), action.option_strings[-1]


def test_seeds_give_a_settings_warning_once(model_dirs, words_file, corpus_file, tmp_path, caplog):
    """A method run over several seeds warns once about a setting it cannot train, not once per seed."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(synthetic_text(n_docs=10, seed=9))
    rc = main(["-q", "compare", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens",
               str(words_file), "--corpus", str(corpus_file), "--heldout", str(heldout), "--out", str(tmp_path / "c"),
               "--snippets-per-token", "4", "--snippet-length", "16", "--batch-size", "4", "--lr", "1e-2",
               "--target-layer", "2", "--dtype", "float32", "--eval-snippets", "2", "--bootstrap", "10",
               "--no-definitions", "--methods", "ntp@seeds=3", "--hardest-epochs", "2"])
    assert rc == 0
    unused = [r for r in caplog.records if "--hardest-epochs 2: not trained" in r.getMessage()]
    assert len(unused) == 1


def test_compare_trains_the_rows_distill_writes_in_bf16(model_dirs, words_file, corpus_file, tmp_path, monkeypatch):
    """In bf16, where rounding follows the pass's path, compare's shared teacher pass is packed as a standalone
    run's (its student passes share prefixes), so a method's rows equal those `distill` writes with the same flags,
    bit for bit (before, its padded pass rounded otherwise: a review read 0.134 against 0.117 held-out KL)."""
    from tokdistill_fast.evaluation.compare import EvalOptions, compare

    trained = []
    learn = pipeline.learn_rows
    monkeypatch.setattr(pipeline, "learn_rows", lambda *a, **k: trained.append(learn(*a, **k)) or trained[-1])
    src = model_dirs[("llama", "bytelevel", True)]
    cfg = DistillConfig(**{**FAST, "dtype": "bfloat16"}, target_layer=2, epochs=3, more_epochs=0, hardest_epochs=0,
                        add_variants=False, ntp_guard=False)
    compare(src, words_file, [corpus_file], [corpus_file], tmp_path / "cmp", cfg, [parse_spec("token-distill")],
            EvalOptions(snippets_per_token=2, definitions=False))
    alone = distill(src, words_file, [corpus_file], None, cfg)
    assert alone.report["implementations"]["prefix_sharing"] == "cached" and len(trained) == 2  # compare, distill
    assert torch.equal(trained[0].rows, alone.rows) and torch.equal(trained[1].rows, alone.rows)


def test_compare_resolves_automatic_epochs_before_it_plans_the_teacher_pass(model_dirs, words_file, corpus_file,
                                                                             tmp_path):
    """A method with --epochs auto (or @epochs=auto) runs: the teacher pass is planned from the epochs the methods
    run (a review: a TypeError traceback after the shared stages)."""
    from tokdistill_fast.evaluation.compare import EvalOptions, compare

    results = compare(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], [corpus_file],
                      tmp_path / "cmp", DistillConfig(**FAST, target_layer=2),
                      [parse_spec("mean"), parse_spec("token-distill@epochs=auto")],
                      EvalOptions(snippets_per_token=2, definitions=False))
    assert results["complete"] and [m["label"] for m in results["methods"]] == ["mean", "token-distill@epochs=auto"]

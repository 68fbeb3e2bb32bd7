"""`tokdistill compare` on a tiny model: spec parsing, shared stages giving the same rows as standalone runs, and
the written table, JSON and plots."""

import json

import pytest
import torch
from conftest import synthetic_text

from tokdistill_fast import DistillConfig, contexts, distill, export, models, pipeline, tokens
from tokdistill_fast.cli import main
from tokdistill_fast.compare import parse_spec, sweep_specs
from tokdistill_fast.config import UserInputError

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
    specs = sweep_specs([2, 4], [1e-3], "auto")
    assert [s.label for s in specs] == ["token-distill@layer=2", "token-distill@layer=4",
                                        "token-distill@layer=auto,lr=0.001"]
    assert [s.group for s in specs] == ["layers", "layers", "lrs"]


@pytest.mark.parametrize("combo", [("llama", "bytelevel", True), ("qwen2", "bytelevel", False)],
                         ids=lambda c: "-".join(map(str, c)))
def test_shared_cache_gives_standalone_rows(combo, model_dirs, words_file, corpus_file):
    """learn_rows on one teacher cache holding several layers reproduces `distill` run on its own."""
    src = model_dirs[combo]
    lm, tok = models.load_model(src, torch.device("cpu"), torch.float32)
    dec = models.Decoder(lm)
    tied = export.is_tied(lm)
    toks, _ = tokens.plan_new_tokens(tok, tokens.read_word_list(words_file))
    tokens.extend_tokenizer(tok, toks, "auto", lm.config)
    base = DistillConfig(**FAST)
    work = pipeline.build_workload(base, lm, tok, toks, [corpus_file], contexts.start_id(tok),
                                   dec.embed_weight.shape[0])
    cache = pipeline.teacher_cache(dec, work, [1, 2, dec.num_layers], torch.float32)
    for changes in ({"method": "token-distill", "target_layer": 2}, {"method": "token-distill", "loss": "kl"},
                    {"method": "token-distill+alpha-ntp", "target_layer": 1}, {"method": "random", "seed": 3}):
        cfg = base.replace(**changes)
        layer, lr, epochs = pipeline.resolve_settings(cfg, dec)
        shared = pipeline.learn_rows(cfg.replace(epochs=epochs), dec, toks, work, cache, layer, lr, tied)
        alone = distill(src, words_file, [corpus_file], None, cfg)
        torch.testing.assert_close(shared.rows, alone.rows, atol=1e-5, rtol=1e-4)
        if not tied:
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
               "--layers", "1,4", "--lrs", "3e-2"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    by = {m["label"]: m for m in results["methods"]}
    assert list(by) == ["mean", "random@seeds=2", "token-distill", "token-distill@layer=1", "token-distill@layer=4",
                        "token-distill@layer=2,lr=0.03"]
    assert by["random@seeds=2"]["aggregate"]["kl"]["seeds"] == 2 and "std" in by["random@seeds=2"]["aggregate"]["kl"]
    assert by["token-distill"]["layer"] == 2 and by["token-distill@layer=4"]["layer"] == 4
    assert "vs_reference" in by["token-distill"] and "vs_reference" not in by["mean"]
    assert by["token-distill"]["aggregate"]["kl"]["mean"] < by["random@seeds=2"]["aggregate"]["kl"]["mean"]
    assert set(results["shared_seconds"]) >= {"load", "contexts", "teacher", "heldout"}
    table = (out / "table.md").read_text()
    assert "Partial" not in table
    assert "### Target-layer sweep" in table and "### Learning-rate sweep" in table and "| token-distill |" in table
    pytest.importorskip("matplotlib")
    assert all((out / f).stat().st_size > 0 for f in ("methods.png", "layers.png"))
    assert not (out / "lrs.png").exists()  # one learning rate: nothing to plot
    assert main(["compare", "--model", "x", "--new-tokens", str(words_file), "--heldout", str(heldout),
                 "--out", str(tmp_path / "bad"), "--methods", "token-distill@depth=2"]) == 2
    assert "depth" in capsys.readouterr().err

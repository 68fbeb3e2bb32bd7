"""On the real SmolLM2-135M-Instruct weights and a real corpus (GCIDE, split into training and held-out paragraphs
by `python -m tokdistill_fast.tools.demo prepare`, which `make test` runs first): token-distill beats subtoken-mean
initialization on held-out snippets, with a bootstrap interval clear of zero."""

import os
from pathlib import Path

import pytest

from tokdistill_fast import DistillConfig
from tokdistill_fast.config import cache_dir
from tokdistill_fast.evaluation.compare import compare, parse_spec
from tokdistill_fast.evaluation.evalrun import EvalOptions

WORDS = Path(__file__).parent.parent / "docs" / "words" / "smollm2-gcide-40.txt"


@pytest.fixture(scope="module")
def prepared() -> dict[str, Path]:
    cache = cache_dir()
    paths = {"model": cache / "smollm2-135m-instruct", "train": cache / "corpora" / "gcide.train.txt",
             "heldout": cache / "corpora" / "gcide.heldout.txt"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        if os.environ.get("TOKDISTILL_REQUIRE_REAL") == "1":
            pytest.fail(f"real model or corpus missing (python -m tokdistill_fast.tools.demo prepare): {missing}")
        pytest.skip("run `python -m tokdistill_fast.tools.demo prepare` first (make test does)")
    return paths


def test_token_distill_beats_mean_on_heldout_text(prepared, tmp_path):
    words = WORDS.read_text().split()[:8]
    base = DistillConfig(snippets_per_token=12, batch_size=4, target_layer=15, lr=5e-3, stop_when_full=True,
                         add_variants=False)
    opts = EvalOptions(snippets_per_token=8, definitions=False, n_boot=200)
    results = compare(prepared["model"], words, [prepared["train"]], [prepared["heldout"]], tmp_path / "cmp", base,
                      [parse_spec("mean"), parse_spec("token-distill")], opts)
    by_label = {m["label"]: m for m in results["methods"]}
    assert results["counts"]["tokens"] == 8 and results["counts"]["heldout_snippets"] >= 40
    kl_mean = by_label["mean"]["aggregate"]["kl"]["mean"]
    kl_td = by_label["token-distill"]["aggregate"]["kl"]["mean"]
    assert kl_td < 0.7 * kl_mean, (kl_td, kl_mean)
    lo, hi = by_label["token-distill"]["vs_reference"]["kl"]["ci95"]
    assert hi < 0, (lo, hi)

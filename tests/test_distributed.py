"""Several processes: `torchrun --nproc-per-node 2 -m tokdistill_fast.cli distill` on gloo (CPU) gives the rows of
a one-process run with the same global batch, only rank 0 writes, and a bad input on one rank stops both cleanly.

fp32 throughout; the two runs differ only in the order of floating-point sums (a rank's partial loss and gradient
sums, then the all-reduce), so rows must agree to atol 1e-5 / rtol 1e-4 after the AdamW steps."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast import DistillConfig, distill
from tokdistill_fast.align import Alignment
from tokdistill_fast.control.distributed import Ranks, pair_counts, split
from tokdistill_fast.student import Passes, batch_plan, make_batch
from tokdistill_fast.workload import Workload

# gloo even on a GPU machine; no hardest-quarter continuation, which runs in one process only (rows train alone)
FAST = dict(snippets_per_token=6, snippet_length=20, dtype="float32", device="cpu", hardest_epochs=0)
COMBOS = {  # (model, cli flags): fused teacher pass, batch 4 | cache, alpha-NTP, uneven split, untied output rows |
    # alpha-mass, whose pairs on one rank push the rows of the whole step
    "fused": (("llama", "bytelevel", True), dict(batch_size=4, target_layer=2, lr=1e-2, epochs=1, more_epochs=0)),
    "alpha-mass": (("llama", "bytelevel", True), dict(batch_size=4, target_layer=2, lr=0.5, epochs=2, more_epochs=0,
                                                      method="token-distill+alpha-mass")),
    "uneven": (("llama", "metaspace", False), dict(batch_size=3, target_layer=3, lr=1e-2, epochs=2,
                                                    method="token-distill+alpha-ntp", output_embeddings="ntp",
                                                    prefix_sharing="on")),
}


def cli_flags(options: dict) -> list[str]:
    return [f for k, v in options.items() for f in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(args: list[str], logs: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """The CLI under torchrun with 2 processes, its agent's logs in `logs` (by default it leaves a directory in
    /tmp per run); the timeout only catches a hang: shared machines stall for minutes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "-m", "tokdistill_fast.cli", "distill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def match_one(src: Path, options: dict, words_file: Path, corpus_file: Path, tmp_path: Path) -> dict:
    """Run `src` with `options` under torchrun (2 processes) and in one process; assert the rows, losses and step
    counts agree and only rank 0 wrote; return the one-process run's report."""
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    run = torchrun(["--model", str(src), "--new-tokens", str(words_file), "--corpus", str(corpus_file),
                    "--out", str(out), *cli_flags({**FAST, **options})], tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("added ") == 1, run.stdout  # rank 0 alone reports ...
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # ... and writes (no second or partial output)
    one = distill(src, words_file, [corpus_file], None, DistillConfig(**FAST, **options))
    rows = load_file(out / "new_embeddings.safetensors")
    torch.testing.assert_close(rows["input_embeddings"], one.rows, atol=1e-5, rtol=1e-4)
    if one.out_rows is not None:
        torch.testing.assert_close(rows["output_embeddings"], one.out_rows, atol=1e-5, rtol=1e-4)
    report = json.loads((out / "report.json").read_text())
    for key in ("steps", "first_loss", "last_loss", "computed_positions", "sink_pairs"):
        got, want = report["training"][key], one.report["training"][key]
        assert got == pytest.approx(want, rel=1e-4), key
    got, want = ([t["final_loss"] for t in r["tokens"] if t["variant_of"] is None] for r in (report, one.report))
    assert None not in want and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    return one.report


@pytest.mark.parametrize("name", list(COMBOS))
def test_two_processes_match_one(name, model_dirs, words_file, corpus_file, tmp_path):
    combo, options = COMBOS[name]
    match_one(model_dirs[combo], options, words_file, corpus_file, tmp_path)


def test_two_processes_leave_out_the_sink_pairs_one_does(model_dirs, words_file, corpus_file, tmp_path):
    """A token made an attention sink inside the text (its embedding 40x the others', as SmolLM2 makes " and" after
    some words): two processes leave out the aligned pairs one process leaves out (the median over every rank's
    pairs, each snippet once; each rank's step weights from the pairs kept) and give its rows."""
    src = tmp_path / "sink-model"
    model = AutoModelForCausalLM.from_pretrained(model_dirs[("llama", "bytelevel", True)])
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[("llama", "bytelevel", True)])
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer(" the", add_special_tokens=False).input_ids] *= 40.0
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    options = dict(batch_size=3, target_layer=2, lr=1e-2, epochs=2, more_epochs=0)  # a cache, uneven parts
    report = match_one(src, options, words_file, corpus_file, tmp_path)
    assert report["training"]["sink_pairs"] > 0


def test_bad_input_on_one_rank_stops_both(model_dirs, words_file, corpus_file, tmp_path):
    """--out exists: only rank 0 checks it (it alone writes), so rank 1 learns of the error at the agreement
    point and exits 2 as well instead of waiting in a collective."""
    out = tmp_path / "model"
    out.mkdir()
    run = torchrun(["--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens", str(words_file),
                    "--corpus", str(corpus_file), "--out", str(out), *cli_flags({**FAST, "target_layer": 2, "epochs": 1,
                                                                                 "lr": 1e-2})], tmp_path / "logs")
    assert run.returncode != 0
    assert "already exists" in run.stderr and "rank 0 stopped" in run.stderr, run.stderr[-3000:]
    assert "tokdistill_fast/" not in run.stderr  # no traceback through our code (torchrun prints its own)


def toy_alignment(n: int, seed: int = 0) -> Alignment:
    """n snippets of 3..8 student tokens with 0..3 aligned positions each (some none), positions ascending."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 9, n)
    cu_s = np.concatenate([[0], np.cumsum(lens)])
    pos = [np.sort(rng.choice(L, size=rng.integers(0, 4), replace=False)) for L in lens]
    cu_a = np.concatenate([[0], np.cumsum([len(p) for p in pos])])
    s_pos = np.concatenate(pos).astype(np.int32)
    ids = rng.integers(0, 50, int(cu_s[-1]))
    return Alignment(ids, cu_s, s_pos, s_pos.copy(), cu_a)


@pytest.mark.parametrize("world", [2, 3])
def test_split_covers_every_step(world):
    """The ranks' shares of each global batch of 5 (23 snippets: a last partial batch) partition it, sizes
    differing by at most one; the weights of each step add up to 1 over ranks; each local batch holds as many
    pairs and NTP targets as its weights say."""
    al = toy_alignment(23)
    work = Workload([0, 1, 2], list(range(al.n)), np.arange(al.n) % 3, al.student_ids, al.cu_student, al, {}, {})
    plan = batch_plan(work.snippet_row, 5, 2, seed=1)
    n_pairs, n_next = pair_counts(al)
    total = torch.zeros(len(plan), 2)
    sizes = np.zeros((world, len(plan)), dtype=int)
    for rank in range(world):
        mine, shard = split(Ranks(rank, world), work, lambda rows: batch_plan(rows, 5, 2, seed=1), torch.device("cpu"))
        total += shard.weights
        for step, (rows, local) in enumerate(zip(plan, shard.plan)):
            snippets = np.asarray(mine.snippets)[local]
            assert set(snippets) <= set(rows)
            sizes[rank, step] = len(local)
            b = make_batch(mine.alignment, mine.snippet_row, local, Passes())
            assert len(b.s_idx) == n_pairs[snippets].sum() and len(b.ntp_idx) == n_next[snippets].sum()
            assert np.isclose(shard.weights[step, 0], len(b.s_idx) / max(n_pairs[rows].sum(), 1))
            assert set(shard.touched[step].tolist()) == set(work.snippet_row[rows])
    assert (sizes.sum(0) == [len(r) for r in plan]).all() and (sizes.max(0) - sizes.min(0) <= 1).all()
    has_pairs = np.asarray([[n_pairs[r].sum() > 0, n_next[r].sum() > 0] for r in plan], dtype=np.float32)
    torch.testing.assert_close(total, torch.from_numpy(has_pairs))

"""Resumable runs and token chunks: a `tokdistill distill` killed mid-training (SIGTERM at a step boundary, or kill -9
after a checkpoint) and continued with --resume writes bitwise the rows of an uninterrupted run (CPU, fp32).

The CLI runs in subprocesses; TOKDISTILL_TEST_HANG_AT_STEP makes a run wait at a known step until a signal
arrives, so where it stops does not depend on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokdistill_fast import distill
from tokdistill_fast.align import Alignment
from tokdistill_fast.config import DistillConfig
from tokdistill_fast.control import chunks

# 4 words x 12 snippets, batch 4: 12 steps (6 per chunk with --chunk-tokens 2), a checkpoint every 2 steps.
SETTINGS = ["--target-layer", "2", "--lr", "5e-3", "--batch-size", "4", "--snippets-per-token", "12",
            "--dtype", "float32", "--device", "cpu", "--checkpoint-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base_args(model_dirs, words_file, corpus_file) -> list[str]:
    model = model_dirs[("llama", "bytelevel", True)]
    return ["--model", str(model), "--new-tokens", str(words_file), "--corpus", str(corpus_file), *SETTINGS]


def command(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "tokdistill_fast.cli", "-q", "distill", *args, "--out", str(out)]


def run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, out), env=ENV, capture_output=True, text=True, timeout=300)


def start_hanging(args: list[str], out: Path, step: int, log: Path) -> subprocess.Popen:
    """Start a run that waits after `step` (0-based over the whole run) until it gets a signal; return once it waits."""
    with log.open("w") as f:
        proc = subprocess.Popen(command(args, out), env={**ENV, "TOKDISTILL_TEST_HANG_AT_STEP": str(step)},
                                stdout=f, stderr=subprocess.STDOUT, text=True,  # SIGHUP as in a terminal, not nohup
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while "waiting for a signal" not in log.read_text():
        assert proc.poll() is None, f"the run ended before the hang point:\n{log.read_text()}"
        assert time.monotonic() < deadline, "the run never reached the hang point"
        time.sleep(0.1)
    return proc


def rows(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "new_embeddings.safetensors"))


def assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k


def test_sighup_then_resume_matches_uninterrupted(tmp_path, base_args):
    """SIGHUP (a closed terminal) checkpoints as SIGTERM does; a second run on the same output while the first
    holds it is refused, not fed the first one's state; an export that kill -9 left behind is removed."""
    done = run(base_args, tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "whole.partial").exists()  # removed once the output is written

    out = tmp_path / "out"
    proc = start_hanging(base_args, out, step=4, log=tmp_path / "log")
    second = run(base_args, out)
    assert second.returncode == 2 and "is in use by another run" in second.stderr
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    message = (tmp_path / "log").read_text()
    assert "--resume" in message and not out.exists()
    state = torch.load(tmp_path / "out.partial" / "student.pt", weights_only=False)
    # saved at the end of the pass holding step 4 (a pass can run a group of steps), before the run's end
    assert 4 < state["step"] < state["steps"]

    other = run([*base_args, "--lr", "1e-3", "--resume"], out)
    assert other.returncode == 2 and "--lr" in other.stderr  # a different setting is refused, by name
    fresh = run(base_args, out)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr  # a leftover checkpoint is not silently dropped

    stale = tmp_path / ".out.partial-x1y2z3w4"  # an export's temporary directory (mkdtemp's name), its run killed
    live = tmp_path / ".out.partial-x.partial-abcd1234"  # another output's ("out.partial-x"), not this one's
    live.mkdir()
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    resumed = run([*base_args, "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_rows(tmp_path / "whole", out)
    assert not (tmp_path / "out.partial").exists() and not stale.exists() and live.is_dir()
    live.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock file left


def test_checkpoints_change_no_row(tmp_path, base_args):
    """Checkpoints fall where the passes' groups of steps end anyway, so --checkpoint-every (here 2 against none, a
    run without checkpoints as the Python API's without an output) changes no group of steps and no row."""
    assert run(base_args, tmp_path / "every-2").returncode == 0
    done = run([*base_args, "--checkpoint-every", "0"], tmp_path / "none")
    assert done.returncode == 0, done.stderr
    assert_same_rows(tmp_path / "every-2", tmp_path / "none")


def test_resume_in_the_more_epochs_keeps_the_rows_from_before_them(tmp_path, base_args):
    base_args = [*base_args, "--more-epochs", "4"]
    done = run(base_args, tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["more_epochs"]["epochs"] == 4
    steps = report["training"]["steps"]  # the schedule's 4 epochs and the 4 more

    out = tmp_path / "out"
    proc = start_hanging(base_args, out, step=steps * 3 // 4, log=tmp_path / "log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    state = torch.load(tmp_path / "out.partial" / "student.pt", weights_only=False)
    assert state["step"] > steps // 2 and state["before"] is not None  # checkpointed in the more epochs

    resumed = run([*base_args, "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_rows(tmp_path / "whole", out)
    assert json.loads((out / "report.json").read_text())["more_epochs"] == report["more_epochs"]


def test_kill9_in_second_chunk_then_resume_matches_uninterrupted(tmp_path, base_args):
    # Chunks of 2 tokens with prefix sharing on: each chunk computes its own teacher cache.
    args = [*base_args, "--chunk-tokens", "2", "--prefix-sharing", "on", "--epochs", "1",
            "--more-epochs", "0"]  # the steps below: one epoch
    done = run(args, tmp_path / "whole")
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out"
    proc = start_hanging(args, out, step=8, log=tmp_path / "log")  # chunk 2, its step 3: checkpoint at step 2
    proc.kill()
    proc.wait(timeout=60)
    partial = tmp_path / "out.partial"
    assert (partial / "chunk-0000.pt").is_file()
    assert torch.load(partial / "student-0001.pt", weights_only=False)["step"] == 2

    resumed = subprocess.run([c for c in command([*args, "--resume"], out) if c != "-q"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunk 1/2 (2 tokens) from the checkpoint" in resumed.stderr
    assert "student-0001 at step 2 of 6" in resumed.stderr
    assert "67% of its steps" in resumed.stderr  # its seconds per token count the steps this process ran
    assert_same_rows(tmp_path / "whole", out)
    before = json.loads((out / "report.json").read_text())["timings"]["before_resume"]
    assert before > 0 and f"(and {before:.0f} s before the resume)" in resumed.stdout
    assert "before_resume" not in json.loads((tmp_path / "whole" / "report.json").read_text())["timings"]


def test_a_chunk_checkpointed_at_its_last_step_resumes(tmp_path, base_args):
    """SIGTERM at a chunk's last step saves its state with every step done: the resumed run finishes (its seconds
    per token wait for a chunk that trains here; before, a division by zero at every --resume) with the rows of an
    uninterrupted run."""
    args = [*base_args, "--chunk-tokens", "2", "--prefix-sharing", "on", "--epochs", "1", "--more-epochs", "0"]
    done = run(args, tmp_path / "whole")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    proc = start_hanging(args, out, step=5, log=tmp_path / "log")  # chunk 1's last step of 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "out.partial" / "student-0000.pt", weights_only=False)["step"] == 6
    resumed = subprocess.run([c for c in command([*args, "--resume"], out) if c != "-q"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "0% of its steps (no rate yet)" in resumed.stderr and "ETA unknown" in resumed.stderr
    assert_same_rows(tmp_path / "whole", out)


def test_one_chunk_is_the_unchunked_run(model_dirs, words_file, corpus_file):
    """--chunk-tokens at least the token count plans a single chunk, which takes the unchunked path; smaller
    chunks train every token (rows differ only through batches and schedule, so they stay close)."""
    model = model_dirs[("llama", "bytelevel", True)]
    cfg = DistillConfig(target_layer=2, lr=5e-3, batch_size=4, snippets_per_token=12, dtype="float32", device="cpu")
    runs = [distill(model, words_file, [corpus_file], config=cfg.replace(chunk_tokens=n)) for n in (None, 1000, 2)]
    whole, one, two = (r.rows for r in runs)
    assert torch.equal(whole, one)
    assert not torch.equal(whole, two) and torch.allclose(whole, two, atol=0.1)
    # the chunked run's training curve and counts, as the unchunked run reports them (a curve over the same epochs)
    curve, chunked = (r.report["training"] for r in (runs[0], runs[2]))
    assert len(chunked["epoch_loss"]) == len(curve["epoch_loss"]) > 1
    assert chunked["epoch_loss"][-1] < chunked["epoch_loss"][0]
    assert isinstance(chunked["sink_pairs"], int) and isinstance(chunked["spikes_dropped"], int)


def toy_alignment(aligned_per_snippet: list[int]) -> Alignment:
    n = len(aligned_per_snippet)
    cu_a = np.concatenate([[0], np.cumsum(aligned_per_snippet)]).astype(np.int64)
    zeros = np.zeros(int(cu_a[-1]), dtype=np.int32)
    return Alignment(np.zeros(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64), zeros, zeros, cu_a)


def test_memory_budget_plan(caplog):
    # Rows 0..3 with 10, 30, 5 and 50 aligned positions; 4 bytes per position.
    al = toy_alignment([4, 6, 30, 5, 50])
    snippet_row = np.array([0, 0, 1, 2, 3])
    assert list(chunks.row_cache_bytes(al, snippet_row, 4, 4)) == [40, 120, 20, 200]
    plan = chunks.plan(DistillConfig(memory_budget=160), al, snippet_row, 4, 4)
    assert plan.bounds == [(0, 2), (2, 3), (3, 4)]  # 160, then 20 (+200 would exceed), then 200 alone (over budget)
    assert chunks.plan(DistillConfig(chunk_tokens=3), al, snippet_row, 4, 4).bounds == [(0, 3), (3, 4)]
    assert chunks.plan(DistillConfig(), al, snippet_row, 4, 4).single
    with caplog.at_level("INFO"):
        chunks.plan(DistillConfig(memory_budget=2**30), al, snippet_row, 4, 4)  # --memory-budget 1G
    assert "within --memory-budget 1 GiB" in caplog.text  # in the unit the flag reads, not 1.07 GB


def test_take_rows_renumbers_new_ids():
    V = 100
    al = toy_alignment([1, 1, 1])
    al.student_ids = np.array([V + 0, V + 1, V + 2])
    sub, ids, cu, rows = chunks.take_rows(al, np.array([7, 8, 9]), np.arange(4), np.array([0, 1, 2]), np.arange(1, 3),
                                          V)
    assert list(sub.student_ids) == [V + 0, V + 1] and list(rows) == [0, 1] and list(ids) == [8, 9]
    # any set of rows, numbered in the order given (the retrial of outlier rows takes rows 2 and 0)
    sub, ids, cu, rows = chunks.take_rows(al, np.array([7, 8, 9]), np.arange(4), np.array([0, 1, 2]), np.array([2, 0]),
                                          V)
    assert list(sub.student_ids) == [V + 1, V + 0] and list(rows) == [1, 0] and list(ids) == [7, 9]

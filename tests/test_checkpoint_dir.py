"""`tokdistill distill --checkpoint-dir` (in process): a run that crashes mid-training leaves its checkpoint in the
given directory (not in OUT.partial), `--resume` with the same flag continues from the saved step (it does not
start over) and writes bitwise the rows of an uninterrupted run, and the directory is removed once the output is
written. The SIGTERM / kill -9 cases with the default directory are in test_resume.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tokdistill_fast.cli import main
from tokdistill_fast.control import checkpoint

# 4 words x 6 snippets, batch 4, one epoch: 6 steps, a checkpoint every 2; the crash comes after step 4.
SETTINGS = ["--target-layer", "2", "--lr", "5e-3", "--batch-size", "4", "--snippets-per-token", "6", "--epochs", "1",
            "--more-epochs", "0", "--dtype", "float32", "--device", "cpu", "--no-variants", "--checkpoint-every", "2"]
CRASH_AFTER = 4


@pytest.fixture()
def args(model_dirs, words_file, corpus_file) -> list[str]:
    model = model_dirs[("llama", "bytelevel", True)]
    return ["-q", "distill", "--model", str(model), "--new-tokens", str(words_file), "--corpus", str(corpus_file),
            *SETTINGS]


def spy_steps(monkeypatch, crash_after: int | None = None) -> list[int]:
    """Records the steps each training pass ends at; raises after `crash_after` (its checkpoint saved first)."""
    ends: list[int] = []
    original = checkpoint.StudentHook.after_steps

    def after_steps(self, steps, state):
        original(self, steps, state)
        ends.append(steps.stop)
        if crash_after is not None and steps.stop >= crash_after:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint.StudentHook, "after_steps", after_steps)
    return ends


def test_checkpoint_dir_is_used_and_resume_continues_from_it(args, tmp_path, monkeypatch):
    whole, out, ckpt = tmp_path / "whole", tmp_path / "out", tmp_path / "elsewhere" / "ckpt"
    assert main([*args, "--out", str(whole), "--checkpoint-dir", str(tmp_path / "ckpt-whole")]) == 0
    assert not (tmp_path / "ckpt-whole").exists()  # removed once the output is written

    with monkeypatch.context() as m:
        spy_steps(m, crash_after=CRASH_AFTER)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main([*args, "--out", str(out), "--checkpoint-dir", str(ckpt)])
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert {p.name for p in ckpt.iterdir()} >= {"fingerprint.json", "workload.pt", "student.pt"}
    saved = torch.load(ckpt / "student.pt", weights_only=False)
    assert (saved["step"], saved["steps"]) == (CRASH_AFTER, 6)

    # Without the flag the run looks in OUT.partial, finds nothing, and says where it looked.
    assert main([*args, "--out", str(out), "--resume"]) == 2
    ends = spy_steps(monkeypatch)
    assert main([*args, "--out", str(out), "--checkpoint-dir", str(ckpt), "--resume"]) == 0
    assert ends and min(ends) > CRASH_AFTER and max(ends) == 6  # continued after the saved step
    a, b = load_file(str(whole / "new_embeddings.safetensors")), load_file(str(out / "new_embeddings.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()


def test_resume_without_a_checkpoint_names_the_directory(args, tmp_path, capsys):
    ckpt = tmp_path / "none"
    assert main([*args, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt), "--resume"]) == 2
    assert f"no checkpoint in {ckpt}" in capsys.readouterr().err


def test_a_directory_that_is_no_checkpoint_is_never_removed(args, tmp_path, capsys):
    """--checkpoint-dir naming a directory with other files in it is refused, --overwrite or not (--overwrite
    replaces --out and a checkpoint, never other files); an empty one serves."""
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "important.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt), *extra]) == 2
        assert "is not a checkpoint of this tool" in capsys.readouterr().err
    assert (ckpt / "important.txt").read_text() == "x"
    (ckpt / "important.txt").unlink()
    assert main([*args, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(ckpt)]) == 0


def test_a_refused_resume_names_the_model_files_that_changed(model_dirs, tmp_path, corpus_file):
    """The fingerprint keeps each model file's size and time by name, so --resume after a file was added to or
    changed in the model directory names those files (before: only "model")."""
    import shutil

    from tokdistill_fast.config import DistillConfig

    model = tmp_path / "m"
    shutil.copytree(model_dirs[("llama", "bytelevel", True)], model)
    before = checkpoint.fingerprint(DistillConfig(), model, ["palatable"], [corpus_file])
    assert checkpoint.differences(before, checkpoint.fingerprint(DistillConfig(), model, ["palatable"],
                                                                 [corpus_file])) == []
    (model / "NOTES.txt").write_text("mine")
    now = checkpoint.fingerprint(DistillConfig(), model, ["palatable"], [corpus_file])
    assert checkpoint.differences(before, now) == ["model (its files NOTES.txt changed)"]


def test_locks_refuse_a_second_run_and_release_only_their_own(tmp_path, capsys):
    """A run's locks (beside --out and a --checkpoint-dir) refuse another run on the same path; holding_locks
    releases the locks taken inside it, not an outer run's; a directory at the filesystem's root is named."""
    from tokdistill_fast.config import DistillConfig, UserInputError

    cfg = DistillConfig(checkpoint_dir=str(tmp_path / "ck"))
    with checkpoint.holding_locks():
        checkpoint.WorkDir.open(tmp_path / "out", cfg, {})
        assert (tmp_path / ".out.lock").is_file() and (tmp_path / ".ck.lock").is_file()
        with checkpoint.holding_locks():
            with pytest.raises(UserInputError, match="--out .* is in use by another run"):
                checkpoint.WorkDir.open(tmp_path / "out", DistillConfig(), {})
            with pytest.raises(UserInputError, match="--checkpoint-dir .* is in use by another run"):
                checkpoint.WorkDir.open(tmp_path / "other", cfg, {})
            checkpoint.WorkDir.open(tmp_path / "third", DistillConfig(), {})
            with pytest.raises(UserInputError, match="--checkpoint-dir .*third.partial is in use by another run"):
                own = DistillConfig(checkpoint_dir=str(tmp_path / "third.partial"))  # that run's own OUT.partial
                checkpoint.WorkDir.open(tmp_path / "fourth", own, {})
        assert not (tmp_path / ".third.lock").exists() and (tmp_path / ".out.lock").is_file()
    assert not (tmp_path / ".out.lock").exists() and not (tmp_path / ".ck.lock").exists()
    with checkpoint.holding_locks(), pytest.raises(UserInputError, match="below the filesystem's root"):
        checkpoint.WorkDir.open(tmp_path / "out", DistillConfig(checkpoint_dir="/"), {})
    assert not (tmp_path / ".out.lock").exists()


def test_an_ignored_sighup_stays_ignored():
    """Under `nohup` (SIGHUP ignored) a run keeps going when its terminal closes; otherwise SIGHUP checkpoints."""
    import signal

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with checkpoint.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with checkpoint.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is checkpoint._handle
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_resume_reads_the_time_spent_before_or_says_it_is_not_recorded(tmp_path, caplog):
    """--resume logs the seconds elapsed.json holds and starts its count from them; a checkpoint without the file
    (an earlier build's) resumes too, saying the time before is not recorded, and counts from zero."""
    import json

    from tokdistill_fast.config import DistillConfig

    cfg = DistillConfig(resume=True)
    (model := tmp_path / "model").mkdir()
    fp = checkpoint.fingerprint(cfg, model, ["palatable"], [])
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "fingerprint.json").write_text(json.dumps(fp))
    with caplog.at_level("INFO", logger="tokdistill_fast"), checkpoint.holding_locks():
        assert checkpoint.WorkDir.open(tmp_path / "out", cfg, fp).earlier_s == 0.0
        assert "(the time spent before is not recorded there: an earlier build's)" in caplog.text
    (partial / "elapsed.json").write_text(json.dumps({"seconds": 812.4}))
    with caplog.at_level("INFO", logger="tokdistill_fast"), checkpoint.holding_locks():
        assert checkpoint.WorkDir.open(tmp_path / "out", cfg, fp).earlier_s == 812.4
        assert "(812 s spent before)" in caplog.text


def test_a_checkpoint_dir_inside_out_is_refused_before_the_work(tmp_path):
    """--checkpoint-dir inside --out is refused when the run opens it: its first checkpoint would make --out exist,
    and the finished run then refused to replace it (a review: a whole run's work lost at the end), or a --resume
    refused it as a directory of the user's."""
    from tokdistill_fast.config import DistillConfig, UserInputError

    for ckpt in (tmp_path / "out", tmp_path / "out" / "ckpt"):
        with checkpoint.holding_locks(), pytest.raises(UserInputError, match="is --out itself or inside it"):
            checkpoint.WorkDir.open(tmp_path / "out", DistillConfig(checkpoint_dir=str(ckpt)), {})
    assert not (tmp_path / "out").exists()

"""Resumable runs: a work directory beside the output holds what an unfinished run has done, so `--resume`
continues from there after Ctrl-C, SIGTERM, a crash or kill -9, and gives the rows an uninterrupted run gives.

Layout of the work directory (`<out>.partial/` unless --checkpoint-dir), every file written to a temp name and
renamed into place, so a file that exists is complete:
  fingerprint.json    settings and input identities; --resume refuses a run whose fingerprint differs
  elapsed.json        seconds the run's processes have spent up to their last checkpoint (report.json's
                      timings.before_resume)
  workload.pt         snippets and alignment (stage 2-3; retrieval is not redone)
  autotune.pt         the layer / learning-rate search's result (not redone)
  chunk-NNNN.pt       the trained rows of each finished chunk of tokens (chunks.py)
  student-NNNN.pt     the running chunk's student state every --checkpoint-every steps: rows, optimizer state,
                      scheduler state, step index and loss accumulators. Batches are built from the seed, so
                      restoring at step k and replaying the remaining batches is the uninterrupted run's arithmetic.
The directory is removed once the output is written. SIGINT / SIGTERM / SIGHUP during training save the state at
the next step boundary and stop with a message saying how to resume; during other stages they stop at once
(finished stages are kept). A second signal stops at once. A run holds a lock beside its output (`.<out>.lock`)
and beside its checkpoint directory, so a second run on the same output or checkpoint directory is refused instead of
reading the first one's state, and what an earlier run left beside the output can be removed.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DistillConfig, UserInputError, env_int

log = logging.getLogger(__name__)

# Of the saved state: 2 since per-token loss sums count the word's own pairs apart, 3 since whitened Adam keeps
# each row's history of steps (whitened.spike_rows)
FORMAT = 3
# Settings that do not change the rows: they may differ between a run and its resumption.
RUN_CONTROL = ("overwrite", "log_every", "extra", "resume", "checkpoint_dir", "checkpoint_every")
HANG_ENV = "TOKDISTILL_TEST_HANG_AT_STEP"  # tests: after step k (0-based, whole run) wait until a signal arrives


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; str() says how to resume, exit_code is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Stop:
    """Signal state of the current run: `deferred` while a training loop can stop at its next step boundary."""

    signum: int | None = None
    deferred: bool = False
    work_dir: Path | None = None


_stop = _Stop()


def _message(signum: int) -> str:
    name = signal.Signals(signum).name
    d = _stop.work_dir
    if d is not None and d.is_dir() and any(d.glob("*.pt")):
        return (f"stopped by {name}; finished work is checkpointed in {d}: run the same command with --resume "
                "to continue")
    return f"stopped by {name}; no output was written"


def _handle(signum: int, _frame) -> None:
    if _stop.deferred and _stop.signum is None:
        _stop.signum = signum
        log.warning("%s: saving a checkpoint at the next step boundary (send again to stop at once)",
                    signal.Signals(signum).name)
        return
    raise Interrupted(_message(signum), 128 + signum)


@contextmanager
def stop_on_signals(active: bool = True) -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP to _handle for the duration (main thread only; elsewhere nothing changes).
    A signal the process ignores stays ignored: `nohup` keeps a run going when its terminal closes."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(s) is not signal.SIG_IGN}
    _stop.signum, _stop.deferred, _stop.work_dir = None, False, None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop.signum, _stop.deferred, _stop.work_dir = None, False, None


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _digest(parts: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def model_identity(model) -> str | dict[str, str]:
    """A model directory: each file's size and modification time, by name (so a refusal can name the files that
    changed). In memory: a digest of its config and input table."""
    if isinstance(model, (str, Path)):
        files = sorted(p for p in Path(model).iterdir() if p.is_file())
        return {p.name: f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files}
    table = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return _digest(iter((model.config.to_json_string().encode(), table.numpy().tobytes())))


def fingerprint(cfg: DistillConfig, model, words: list[str], corpus: list[Path]) -> dict:
    """What determines a run's rows: its settings (less RUN_CONTROL) and its inputs' identities."""
    settings = {k: v for k, v in cfg.as_dict().items() if k not in RUN_CONTROL}
    return {"format": FORMAT, "settings": json.loads(json.dumps(settings, default=str)),
            "model": model_identity(model),
            "new_tokens": _digest(w.encode() + b"\0" for w in words),
            "corpus": [f"{p.absolute()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in corpus]}


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable names of what differs between two fingerprints."""
    diff = [f"--{k.replace('_', '-')} ({old['settings'].get(k)!r} then, {v!r} now)"
            for k, v in new["settings"].items() if old["settings"].get(k) != v]
    diff += [k.replace("_", " ") for k in ("format", "new_tokens", "corpus") if old.get(k) != new[k]]
    before, now = old.get("model"), new["model"]
    if before != now:
        changed = sorted(set(before) ^ set(now) | {f for f in set(before) & set(now) if before[f] != now[f]}) \
            if isinstance(before, dict) and isinstance(now, dict) else []
        diff.append(f"model (its files {', '.join(changed)} changed)" if changed else "model")
    return diff


class WorkDir:
    """The checkpoint directory of one run (see the module docstring); a disabled one (path None) keeps nothing."""

    def __init__(self, path: Path | None, every: int = 0, fp: dict | None = None, earlier_s: float = 0.0):
        self.path, self.every, self.fp = path, every, fp  # fp: written with the first checkpoint
        self.earlier_s = earlier_s  # what the processes before a --resume spent, up to their last checkpoint
        self.started = time.perf_counter()
        self.hang_at = env_int(HANG_ENV)

    @classmethod
    def open(cls, out: str | Path | None, cfg: DistillConfig, fp: dict | None) -> WorkDir:
        """The run's directory: fresh (refusing a leftover one unless --overwrite) or, with --resume, the existing one
        if its fingerprint matches `fp`. Disabled without an output directory or with --checkpoint-every 0."""
        if cfg.resume and out is None:
            raise UserInputError("--resume needs the output directory of the interrupted run")
        if out is not None:
            out = claim_out(out)
        if out is None or cfg.checkpoint_every == 0:
            if cfg.resume:
                raise UserInputError("--resume needs checkpoints; do not pass --checkpoint-every 0")
            return cls(None)
        path = Path(cfg.checkpoint_dir).absolute() if cfg.checkpoint_dir else out.with_name(out.name + ".partial")
        if path.is_relative_to(out):  # the output replaces --out whole, and a checkpoint in it makes it exist
            raise UserInputError(f"--checkpoint-dir {path} is --out itself or inside it: give a directory outside it")
        _lock(path, "--checkpoint-dir")  # the default OUT.partial too: another run may name it as its own
        stored = path / "fingerprint.json"
        if path.exists() and not stored.is_file() and not (path.is_dir() and all(
                p.name.startswith(".") and ".tmp" in p.name for p in path.iterdir())):  # empty, or killed saving
            raise UserInputError(f"{'--checkpoint-dir ' if cfg.checkpoint_dir else ''}{path} exists and is not a "
                                 "checkpoint of this tool (no fingerprint.json): give a new or empty directory")
        if cfg.resume:
            if not stored.is_file():
                raise UserInputError(f"--resume: no checkpoint in {path} (it is removed once a run completes)")
            old = json.loads(stored.read_text(encoding="utf-8"))
            diff = differences(old, fp)
            if diff:
                raise UserInputError(f"--resume: the checkpoint in {path} is of a run with other inputs or settings: "
                                     f"{', '.join(diff)}. Resume with the same command, or start afresh with "
                                     "--overwrite")
            elapsed = path / "elapsed.json"
            earlier_s = json.loads(elapsed.read_text(encoding="utf-8"))["seconds"] if elapsed.is_file() else 0.0
            log.info("resuming from the checkpoint in %s (%s)", path, f"{earlier_s:.0f} s spent before"
                     if elapsed.is_file() else "the time spent before is not recorded there: an earlier build's")
        else:
            if stored.is_file():  # else nothing, or a directory without a checkpoint's files
                if not cfg.overwrite:
                    raise UserInputError(f"{path} holds the checkpoint of an unfinished run: pass --resume to continue "
                                         "it, or --overwrite to start afresh")
                shutil.rmtree(path)
        _stop.work_dir = path
        # A fresh directory is created by the first save: a run that fails on its inputs before it has anything
        # to resume (a corpus that is not UTF-8, say) leaves nothing behind.
        return cls(path, cfg.checkpoint_every, None if cfg.resume else fp, earlier_s if cfg.resume else 0.0)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def load(self, name: str) -> Any | None:
        """The saved object `name`, or None when it is not there (or checkpoints are off)."""
        f = self.file(name)
        return torch.load(f, map_location="cpu", weights_only=False) if f is not None and f.is_file() else None

    def save(self, name: str, obj: Any) -> None:
        if not self.enabled:
            return
        stored = self.path / "fingerprint.json"
        if self.fp is not None and not stored.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = stored.with_name(".fingerprint.json.tmp")
            tmp.write_text(json.dumps(self.fp, indent=1), encoding="utf-8")
            os.replace(tmp, stored)
        _atomic_save(obj, self.file(name))
        tmp = self.path / ".elapsed.json.tmp"
        tmp.write_text(json.dumps({"seconds": self.earlier_s + time.perf_counter() - self.started}), encoding="utf-8")
        os.replace(tmp, self.path / "elapsed.json")

    def remove(self, name: str) -> None:
        if self.enabled:
            self.file(name).unlink(missing_ok=True)

    def file(self, name: str) -> Path | None:
        return None if self.path is None else self.path / f"{name}.pt"

    def stage(self, name: str, compute: Callable[[], Any]) -> Any:
        """compute()'s value, saved; on resume the saved value instead (a saved None counts: the stage ran)."""
        if self.enabled and self.file(name).is_file():
            log.info("resume: %s from the checkpoint", name)
            return self.load(name)["value"]
        value = compute()
        self.save(name, {"value": value})
        return value

    def student_hook(self, name: str, step_offset: int = 0) -> StudentHook | None:
        """The hook that checkpoints a student.train() loop under `name` (None when checkpoints are off)."""
        return StudentHook(self, name, step_offset) if self.enabled else None

    def finish(self) -> None:
        """The output is written: the checkpoint has served its purpose."""
        if self.enabled:
            shutil.rmtree(self.path, ignore_errors=True)
            _stop.work_dir = None


_holders = threading.local()  # per thread, the lists of locks of the runs going in it (innermost last)
_unheld: list[tuple[Any, Path]] = []  # locks taken outside holding_locks: held until the process ends


@contextmanager
def holding_locks() -> Iterator[None]:
    """Release, and remove, the lock files a run takes (_lock) when it ends, however it ends; only its own, so
    runs in other threads, or an enclosing one, keep theirs."""
    mine: list[tuple[Any, Path]] = []
    stack = _holders.__dict__.setdefault("stack", [])
    stack.append(mine)
    try:
        yield
    finally:
        stack.remove(mine)
        for f, lock_path in reversed(mine):
            lock_path.unlink(missing_ok=True)
            f.close()


def claim_out(out: str | Path) -> Path:
    """Lock `out` for this run (_lock) and remove what an earlier run on it left beside it: export directories a
    kill -9 stopped (atomic_write's `.OUT.partial-XXXXXXXX`), never complete. Returns `out` as an absolute path."""
    out = Path(out).absolute()
    _lock(out, "--out")
    stale = re.compile(rf"\.{re.escape(out.name)}\.partial-[a-z0-9_]{{8}}")  # mkdtemp's suffix
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        if stale.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
    return out


def _lock(path: Path, flag: str) -> None:
    """An exclusive lock on `.<path's name>.lock` beside absolute `path`, held until holding_locks() ends (or the
    process does, kill -9 included). Refuses a path another run holds. The file is locked, then checked to be the
    one at that name: one a finishing run has just removed is no lock."""
    if not path.name:
        raise UserInputError(f"{flag} {path}: give a directory below the filesystem's root")
    lock_path = path.with_name(f".{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = lock_path.open("a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserInputError(f"{flag} {path} is in use by another run (it holds {lock_path}): wait for it to end, "
                                 "or give another one") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            stack = getattr(_holders, "stack", None)
            (stack[-1] if stack else _unheld).append((f, lock_path))
            return
        f.close()


class StudentHook:
    """Checkpoints a student.train() loop: restore() before the first step, after_steps() at each step boundary.
    `state` is train()'s dict: params, optimizer, scheduler, step_loss, tok_sum, tok_cnt, steps (total), and with
    more epochs, once they start, the rows kept before them (before)."""

    def __init__(self, work: WorkDir, name: str, step_offset: int):
        self.work, self.name, self.offset = work, name, step_offset
        self.restored = 0.0  # the share of the loop's steps a checkpoint had done (restore)

    def restore(self, state: dict) -> int:
        """Load a saved state into `state`'s tensors and objects; the step to continue from (0 if none)."""
        saved = self.work.load(self.name)
        _stop.deferred = (0 if saved is None else saved["step"]) < state["steps"]  # steps left: signals wait for one
        if saved is None:
            return 0
        if saved["steps"] != state["steps"] or len(saved["params"]) != len(state["params"]):
            raise UserInputError(f"the checkpoint {self.work.file(self.name)} does not match this run's batches")
        with torch.no_grad():
            for p, v in zip(state["params"], saved["params"]):
                p.copy_(v)
            for k in ("step_loss", "tok_sum", "tok_cnt"):
                state[k].copy_(saved[k])
            if saved.get("before") is not None:  # the rows kept where the schedule's epochs ended (more epochs)
                state["before"] = [v.to(p.device) for p, v in zip(state["params"], saved["before"])]
        state["optimizer"].load_state_dict(saved["optimizer"])
        state["scheduler"].load_state_dict(saved["scheduler"])
        log.info("resume: %s at step %d of %d", self.name, saved["step"], saved["steps"])
        self.restored = saved["step"] / saved["steps"]
        return saved["step"]

    def after_steps(self, steps: range, state: dict) -> None:
        """After the steps of one pass (one step, or a group of them): checkpoint where the pass reached or crossed
        a multiple of --checkpoint-every (at a group's end, so that checkpoints change no group and no row); on a
        pending signal, checkpoint and stop."""
        done = steps.stop
        if self.work.hang_at is not None and self.work.hang_at - self.offset in steps:
            log.warning("test hook: waiting for a signal after step %d", self.offset + done - 1)
            while _stop.signum is None:
                time.sleep(0.02)
        if steps.start // self.work.every < done // self.work.every or _stop.signum is not None:
            self.save(done, state)
        if _stop.signum is not None:
            signum, _stop.deferred = _stop.signum, False
            raise Interrupted(_message(signum), 128 + signum)
        if done == state["steps"]:
            _stop.deferred = False

    def save(self, done: int, state: dict) -> None:
        self.work.save(self.name, {
            "step": done, "steps": state["steps"],
            "params": [p.detach().cpu() for p in state["params"]],
            "optimizer": state["optimizer"].state_dict(), "scheduler": state["scheduler"].state_dict(),
            **{k: state[k].detach().cpu() for k in ("step_loss", "tok_sum", "tok_cnt")},
            "before": [t.cpu() for t in state["before"]] if "before" in state else None})

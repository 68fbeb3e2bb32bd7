"""The CLI's process settings (control/process.py): the malloc thresholds (the mmap threshold first, the trim
threshold only after it) and MKL's dispatch by instruction sets, checked in fresh processes against MKL's own."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokdistill_fast.control import process


class FakeLibc:
    """Records mallopt calls; `accepts` says which parameters it takes."""

    def __init__(self, accepts: set[int]):
        self.accepts, self.calls = accepts, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(param in self.accepts)


def test_both_thresholds_are_set_in_order():
    libc = FakeLibc({process.M_MMAP_THRESHOLD, process.M_TRIM_THRESHOLD})
    assert process.keep_freed_memory(libc)
    assert libc.calls == [(process.M_MMAP_THRESHOLD, process.KEEP_FREED),
                          (process.M_TRIM_THRESHOLD, process.KEEP_FREED)]


def test_trim_threshold_is_left_alone_when_the_mmap_threshold_is_refused():
    """A fixed trim threshold alone turns glibc's adaptive mmap threshold off (8x the page faults, measured)."""
    libc = FakeLibc({process.M_TRIM_THRESHOLD})
    assert not process.keep_freed_memory(libc)
    assert libc.calls == [(process.M_MMAP_THRESHOLD, process.KEEP_FREED)]


def test_without_mallopt_nothing_happens():
    assert not process.keep_freed_memory(object())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_both():
    assert process.keep_freed_memory()


def run_python(code: str, **env: str) -> str:
    """stdout of `code` in a fresh interpreter (torch not loaded yet), with `env` added to this one's."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_entry_points_load_torch_only_after_they_start():
    """cli.main and the demo's main set MKL's dispatch up first; that only works while torch is not loaded."""
    out = run_python("import sys, tokdistill_fast, tokdistill_fast.cli, tokdistill_fast.tools.demo; "
                     "print('torch' in sys.modules)")
    assert out.strip() == "False"


MKL_BRANCH = """
import ctypes, json, os, sys
from tokdistill_fast.control import process
used = process.use_mkl_by_instruction_sets()
import torch
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
g = torch.Generator().manual_seed(0)
x, w = torch.randn(120, 576, generator=g), torch.randn(1536, 576, generator=g)
y = torch.nn.functional.linear(x, w)
print(json.dumps({"used": used, "how": process.mkl_dispatch(), "branch": lib.mkl_serv_cpu_detect(),
                  "y": y[::7, ::11].tolist(), "yt": (y @ w)[::7, ::11].tolist()}))
"""

needs_mkl_x86 = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and torch.backends.mkl.is_available()),
    reason="MKL's vendor check: Linux x86-64 with an MKL build of torch")


@needs_mkl_x86
def test_mkl_picks_kernels_by_instruction_sets_and_computes_the_same():
    """The shim (csrc/mkl_dispatch.cpp) loaded before torch: MKL's detected branch is at least its own choice, a
    real one where the CPU has AVX2 (on AMD CPUs MKL's own is 0), and fp32 products agree with MKL's own path."""
    if importlib.util.find_spec(process.MKL_SHIM) is None:
        pytest.skip("csrc/mkl_dispatch.cpp not built")
    shim = json.loads(run_python(MKL_BRANCH))
    own = json.loads(run_python(MKL_BRANCH, **{process.MKL_OWN_DISPATCH: "1"}))
    assert shim["used"] and shim["how"].startswith("by instruction sets")
    assert not own["used"] and own["how"] == f"MKL's own ({process.MKL_OWN_DISPATCH}=1)"
    assert shim["branch"] >= own["branch"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert shim["branch"] > 0
    for key in ("y", "yt"):
        np.testing.assert_allclose(shim[key], own[key], rtol=1e-4, atol=1e-3)


def test_nothing_is_done_once_torch_is_loaded(monkeypatch):
    """In a process that loaded torch (this one) libtorch has bound the check already: no change, and it says so."""
    monkeypatch.setattr(process, "_mkl_dispatch", process._mkl_dispatch)
    monkeypatch.delenv(process.MKL_OWN_DISPATCH, raising=False)
    assert not process.use_mkl_by_instruction_sets()
    assert process.mkl_dispatch() == "MKL's own (torch was loaded first)"


def test_a_later_entry_point_keeps_what_an_earlier_one_did(monkeypatch):
    """The demo sets it up before its preparation loads torch, then calls cli.main, which must not undo the record."""
    done = f"{process.BY_INSTRUCTION_SETS} (csrc/mkl_dispatch.cpp)"
    monkeypatch.setattr(process, "_mkl_dispatch", done)
    assert process.use_mkl_by_instruction_sets()
    assert process.mkl_dispatch() == done


def test_exit_now_keeps_the_code_and_flushes_what_was_written(tmp_path):
    """exit_now skips the interpreter's teardown, not the process's last words: its code, buffered stdout (a pipe
    here), stderr and the log handlers' records all arrive."""
    log = tmp_path / "run.log"
    code = ("import logging, sys; from tokdistill_fast.control import process; "
            f"logging.basicConfig(filename={str(log)!r}); logging.getLogger('t').warning('last words'); "
            "print('out' * 10000); print('err', file=sys.stderr); process.exit_now(3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout, out.stderr) == (3, "out" * 10000 + "\n", "err\n")
    assert "last words" in log.read_text()


def test_the_command_exits_with_mains_code(tmp_path):
    """`python -m tokdistill_fast.cli` (cli.run, as the `tokdistill` script) ends with main()'s exit code and its
    error message."""
    out = subprocess.run([sys.executable, "-m", "tokdistill_fast.cli", "eval", "--original", str(tmp_path),
                          "--adapted", str(tmp_path), "--heldout", str(tmp_path / "missing.txt"),
                          "--out", str(tmp_path / "eval.json")], capture_output=True, text=True)
    assert out.returncode == 2 and f"--heldout {tmp_path / 'missing.txt'}: no such file" in out.stderr, out.stderr


def test_quiet_turns_the_progress_bars_off(model_dirs, words_file, corpus_file, tmp_path, capsys, monkeypatch):
    """`-q` leaves stderr without progress bars, though tqdm was imported before the flag was read (TQDM_DISABLE,
    which tqdm reads once on import, did not serve); `silence_progress_bars(False)` turns them back on."""
    from transformers.utils import logging as hf_logging

    from tokdistill_fast import config
    from tokdistill_fast.cli import main

    monkeypatch.setattr(config, "_bars_off", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's, given back when the bars come back
    run = ["distill", "--model", str(model_dirs[("llama", "bytelevel", True)]), "--new-tokens", str(words_file),
           "--corpus", str(corpus_file), "--target-layer", "2", "--batch-size", "4", "--snippets-per-token", "6",
           "--epochs", "1", "--more-epochs", "0", "--dtype", "float32", "--device", "cpu", "--no-variants"]
    assert main([*run, "--out", str(tmp_path / "shown")]) == 0
    assert "corpus" in capsys.readouterr().err  # the bars this test looks for
    assert main(["-q", *run, "--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    assert not any(bar in err for bar in ("corpus", "teacher", "pass", "%|")), err
    assert not hf_logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    config.silence_progress_bars(False)
    assert hf_logging.is_progress_bar_enabled() and not config.progress(range(1)).disable
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars the user turned off stay off
    config.silence_progress_bars()
    config.silence_progress_bars(False)
    assert not hf_logging.is_progress_bar_enabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    hf_logging.enable_progress_bar()

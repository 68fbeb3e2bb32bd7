"""What ran is observed, not derived: the report names the implementation a site really used, and a fallback from
an expected fast path logs exactly one warning per run."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from tokdistill_fast.kernels import backend

from tokdistill_fast import DistillConfig, align, distill
from tokdistill_fast.control import observed


def warnings_of(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_missing_cpp_aligner_is_reported_and_warned_once(model_dirs, words_file, corpus_file, monkeypatch, caplog):
    monkeypatch.setattr(align, "_align_ext", None)  # as on a machine where the extension did not build
    cfg = DistillConfig(snippets_per_token=4, snippet_length=24, target_layer=2, lr=5e-2, dtype="float32",
                        prefix_sharing="on")  # a teacher cache (fused runs have none)
    with caplog.at_level(logging.WARNING):
        run = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], config=cfg)
    assert run.report["implementations"]["align"] == "python"
    assert len(warnings_of(caplog, "C++ aligner not built")) == 1
    assert run.report["implementations"]["teacher_cache"] == "device"  # CPU: no host spill


def test_kernels_falling_back_on_cuda_warn_once_per_run(monkeypatch, caplog):
    """No CUDA tensor is touched: dispatch only decides, as it does when triton cannot import on a GPU machine."""
    monkeypatch.setattr(backend, "triton", None)
    with caplog.at_level(logging.WARNING), observed.recording() as seen:
        for _ in range(3):
            assert backend.dispatch("auto", torch.device("cuda")) == "torch"
        assert backend.dispatch("torch", torch.device("cuda")) == "torch"  # asked for: no warning
    assert seen["kernels"]["torch"] == 4 and len(warnings_of(caplog, "Triton kernels unusable on CUDA")) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING), observed.recording():  # the next run warns again
        backend.dispatch("auto", torch.device("cuda"))
    assert len(warnings_of(caplog, "Triton kernels unusable on CUDA")) == 1


def test_outside_a_recording_nothing_is_kept():
    observed.note("align", "python")
    assert observed.ran("align") is None
    with observed.recording():
        assert observed.ran("align") is None
        observed.note("align", "cpp")
        observed.note("align", "python")
        assert observed.ran("align") == "cpp+python"


def test_the_reference_backend_runs_no_compiled_kernel(model_dirs, words_file, corpus_file, tmp_path):
    """--backend torch runs the PyTorch references throughout, with prefix sharing asked for too (its packed passes
    attend densely, not with the C++ kernel) and for a given tokenizer (the Hugging Face layers, as distill's)."""
    from tokdistill_fast.modeling import fused

    if fused.extension() is None:
        pytest.skip("the C++ kernels are not built: nothing to keep out")
    model = model_dirs[("llama", "bytelevel", True)]
    cfg = DistillConfig(snippets_per_token=4, snippet_length=24, target_layer=2, lr=5e-2, dtype="float32",
                        prefix_sharing="on", backend="torch")
    run = distill(model, words_file, [corpus_file], out=tmp_path / "out", config=cfg)
    ran = run.report["implementations"]
    assert (ran["prefix_sharing"], ran["packed_attention"], ran["layers"]) == ("cached", "dense", "torch")
    byot = distill(model, corpus=[corpus_file], config=dataclasses.replace(cfg, prefix_sharing="auto"),
                   target_tokenizer=tmp_path / "out")
    assert byot.report["implementations"]["layers"] == "torch"

"""The whole pipeline on a tiny Gemma-style model (embed_scale, tied) with the kernels and with the references:
the Triton launchers really run inside distill() (counted by a spy, not read from the report), the report says
so, and both backends learn the same rows."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from kernel_checks import LAUNCHERS, counted, needs_kernels, spy_launchers

from tokdistill_fast import DistillConfig, distill
from tokdistill_fast.modeling import fused

# AdamW: its lr 5e-2 moves rows by more than 1e-2 in raw units on this tiny table (whitened steps scale with the
# table's small spread); the kernels are the same under either optimizer.
FAST = dict(snippets_per_token=4, snippet_length=24, batch_size=4, target_layer=2, lr=5e-2, epochs=1,
            dtype="float32", add_variants=False, optimizer="adamw")
ALL_LAUNCHERS = {name for names in LAUNCHERS.values() for name in names}
LAYER_LAUNCHERS = ("rms_norm_fwd", "rms_norm_bwd", "rotate", "gated_fwd", "gated_bwd")


@needs_kernels
def test_triton_backend_learns_the_same_rows(model_dirs, words_file, corpus_file, monkeypatch):
    launches = spy_launchers(monkeypatch)
    src = model_dirs[("gemma3", "metaspace", True)]
    torch_run = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, backend="torch"))
    assert not launches, f"backend='torch' started kernels: {dict(launches)}"
    triton_run = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, backend="triton"))
    assert set(launches) == ALL_LAUNCHERS, f"launchers run: {dict(launches)}"  # forward and backward of both ops
    assert triton_run.report["implementations"]["backend"] == "triton"
    assert torch_run.report["implementations"]["backend"] == "torch"
    init = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, method="mean")).rows
    apart = (torch_run.rows - triton_run.rows).abs().max().item()
    moved = (torch_run.rows - init).abs().max().item()
    assert apart < 1e-4 < 1e-2 < moved, f"backends differ by {apart:.3g}; training moved rows by {moved:.3g}"
    torch.testing.assert_close(triton_run.report["training"]["last_loss"],
                               torch_run.report["training"]["last_loss"], rtol=1e-4, atol=0)


@needs_kernels
def test_triton_layers_learn_the_rows_of_the_hugging_face_layers(model_dirs, words_file, corpus_file, monkeypatch):
    """A GPU's configuration on a CPU: with the C++ extension hidden the decoder layers' norms, rotations and
    activations run the Triton kernels (interpreted here, counted by a spy) beside the embedding and loss kernels,
    and the rows match those of the references throughout (the Hugging Face layers)."""
    monkeypatch.setattr(fused, "extension", lambda: None)
    launches: Counter = Counter()
    for name in LAYER_LAUNCHERS:
        monkeypatch.setattr(fused.TritonKernels, name, counted(getattr(fused.TritonKernels, name), name, launches))
    src = model_dirs[("gemma3", "metaspace", True)]
    torch_run = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, backend="torch"))
    assert not launches and torch_run.report["implementations"]["layers"] == "torch"
    triton_run = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, backend="triton"))
    assert set(launches) == set(LAYER_LAUNCHERS), f"layer launchers run: {dict(launches)}"
    assert triton_run.report["implementations"]["layers"] == "triton"
    apart = (torch_run.rows - triton_run.rows).abs().max().item()
    assert apart < 1e-4, f"the Triton layers' rows differ from the Hugging Face layers' by {apart:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the defaults pick the kernels on CUDA")
def test_defaults_on_cuda_run_the_triton_kernels(model_dirs, words_file, corpus_file, monkeypatch):
    """What a GPU user gets without asking: distill()'s defaults on CUDA start every Triton launcher."""
    launches = spy_launchers(monkeypatch)
    cfg = DistillConfig(**{**FAST, "dtype": "bfloat16"}, device="cuda")
    run = distill(model_dirs[("llama", "bytelevel", True)], words_file, [corpus_file], config=cfg)
    assert set(launches) == ALL_LAUNCHERS, f"launchers run: {dict(launches)}"
    assert run.report["implementations"]["backend"] == "triton"

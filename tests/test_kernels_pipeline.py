"""The whole pipeline on a tiny Gemma-style model (embed_scale, tied) with the kernels and with the references:
same learned rows, and the report names the backend that ran."""

from __future__ import annotations

import torch
from kernel_checks import needs_kernels

from tokdistill_fast import DistillConfig, distill

FAST = dict(snippets_per_token=4, snippet_length=24, batch_size=4, target_layer=2, lr=5e-2, epochs=1,
            dtype="float32", add_variants=False)


@needs_kernels
def test_triton_backend_learns_the_same_rows(model_dirs, words_file, corpus_file):
    src = model_dirs[("gemma3", "metaspace", True)]
    runs = {b: distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, backend=b)) for b in
            ("torch", "triton")}
    init = distill(src, words_file, [corpus_file], config=DistillConfig(**FAST, method="mean")).rows
    assert runs["triton"].report["implementations"]["backend"] == "triton"
    assert runs["torch"].report["implementations"]["backend"] == "torch"
    apart = (runs["torch"].rows - runs["triton"].rows).abs().max().item()
    moved = (runs["torch"].rows - init).abs().max().item()
    assert apart < 1e-4 < 1e-2 < moved, f"backends differ by {apart:.3g}; training moved rows by {moved:.3g}"
    torch.testing.assert_close(runs["triton"].report["training"]["last_loss"],
                               runs["torch"].report["training"]["last_loss"], rtol=1e-4, atol=0)

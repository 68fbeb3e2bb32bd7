"""One optimizer step over n new rows of width D with 16 rows carrying a gradient (a training step's snippets):
AdamW, whitened Adam reading every row, and whitened Adam told its rows plus the sync() of the 16 rows the next
pass reads (student/whitened.py). CPU always, CUDA when present. `make bench-optimizer`."""

from __future__ import annotations

import pytest
import torch

from tokdistill_fast.student.whitened import WhitenedAdam

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", ["adamw", "whitened-every-row", "whitened-rows"])
@pytest.mark.parametrize("n,d", [(40, 576), (2500, 576), (2500, 4096)])  # 40 words; 2,500 on SmolLM2 / Llama-8B
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step(benchmark, impl, n, d, device):
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(d, d, device=device, generator=g) / d ** 0.5
    p = torch.nn.Parameter(torch.randn(n, d, device=device, generator=g))
    rows = torch.arange(16, device=device)
    grad = torch.zeros(n, d, device=device)
    grad[rows] = torch.randn(16, d, device=device, generator=g)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0) if impl == "adamw" else WhitenedAdam([p], [s], lr=1e-3)

    def step():
        p.grad = grad.clone()
        if impl == "whitened-rows":
            opt.step(rows=rows)
            opt.sync(rows)
        else:
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times the host: wait for the GPU

    benchmark.group = f"optimizer step n={n} D={d} {device}"
    benchmark.pedantic(step, rounds=10 if device == "cpu" and d > 1024 else 30, warmup_rounds=2)

"""masked_mse forward + backward, Triton kernels vs the PyTorch reference, at Llama-3.1-8B width (D = 4096, bf16
student and teacher states). `make bench-kernels`."""

from __future__ import annotations

import pytest
import torch
from tokdistill_fast.kernels.masked_mse import masked_mse

from bench import outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")
D = 4096


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("ns,k", [(16 * 50, 16 * 25), (256 * 256, 256 * 128)])  # training batch; a large one
def test_masked_mse_fwd_bwd(benchmark, impl, ns, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    S = torch.randn(ns, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    T = torch.randn(k, D, device="cuda", dtype=torch.bfloat16, generator=g)  # packed teacher rows
    s_idx = torch.randperm(ns, device="cuda", generator=g)[:k].sort().values  # aligned positions: about half
    t_idx = torch.arange(k, device="cuda")

    def step():
        loss, _ = masked_mse(S, T, s_idx, t_idx, backend=impl)
        grad, = torch.autograd.grad(loss, S)
        torch.cuda.synchronize()  # pytest-benchmark times the host: wait for the GPU
        return loss, grad

    benchmark.group = f"masked_mse Ns={ns} K={k} D={D} bf16"
    # fwd reads the pairs' S and T rows; bwd reads them again and writes dS (every row, zeros included)
    benchmark.extra_info["min_bytes"] = 4 * k * D * 2 + ns * D * 2
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    outputs.record(benchmark, *step())
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)

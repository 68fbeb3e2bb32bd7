"""The layers' Triton kernels (RMSNorm, rotary embedding, SwiGLU) forward + input gradient against the PyTorch
references at Llama-3.1-8B's sizes (bf16, a student pass of 16 snippets x 8 positions and a teacher-sized one).
`make bench-kernels` on a GPU."""

from __future__ import annotations

import pytest
import torch

from bench import outputs
from tokdistill_fast.modeling import fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")
D, HEADS, KV_HEADS, HD, INTER = 4096, 32, 8, 128, 14336


def timed(benchmark, group: str, fn, inputs: list[torch.Tensor]) -> None:
    """Time fn(*inputs) and the gradient of its outputs to the inputs, waiting for the GPU; record what they
    computed (bench.outputs)."""
    def step():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out])
        torch.cuda.synchronize()
        return *out, *grads

    benchmark.group = group
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    outputs.record(benchmark, *step())
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)


def kernels(impl: str):
    return fused.TritonKernels if impl == "triton" else None


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rows", [16 * 8, 64 * 50])
def test_rms_norm(benchmark, monkeypatch, impl, rows):
    monkeypatch.setattr(fused, "layer_kernels", lambda device, dtype: kernels(impl))
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    timed(benchmark, f"rms_norm rows={rows} D={D} bf16", lambda x: fused.rms_norm(x, w, 1e-5, 0), [x])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rows", [16 * 8, 64 * 50])
def test_rotary(benchmark, monkeypatch, impl, rows):
    monkeypatch.setattr(fused, "layer_kernels", lambda device, dtype: kernels(impl))
    q = torch.randn(1, rows, HEADS, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, rows, KV_HEADS, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angle = torch.randn(1, rows, HD // 2, device="cuda")
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    timed(benchmark, f"rotary rows={rows} heads={HEADS}/{KV_HEADS} hd={HD} bf16",
          lambda q, k: fused.rotary(q, k, cos, sin), [q, k])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rows", [16 * 8, 64 * 50])
def test_swiglu(benchmark, monkeypatch, impl, rows):
    monkeypatch.setattr(fused, "layer_kernels", lambda device, dtype: kernels(impl))
    gu = torch.randn(rows, 2 * INTER, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    timed(benchmark, f"swiglu rows={rows} inter={INTER} bf16", lambda gu: fused.gated(gu, 0), [gu])

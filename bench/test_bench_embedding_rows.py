"""embedding_rows forward + backward, Triton kernel (atomic and deterministic backward) vs the PyTorch reference,
at Llama-3.1-8B sizes (vocabulary 128,256, D = 4096, bf16 table, 2,500 new rows). `make bench-kernels`."""

from __future__ import annotations

import pytest
import torch
from tokdistill_fast.kernels.embedding_rows import embedding_rows

from bench import outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")
V, D, N_NEW = 128_256, 4096, 2_500
IMPLS = {"torch": dict(backend="torch"), "triton": dict(backend="triton"),
         "triton-deterministic": dict(backend="triton", deterministic=True)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,seq,new_per_seq", [(16, 50, 2), (256, 256, 16)])  # training batch; a large one
def test_embedding_rows_fwd_bwd(benchmark, impl, batch, seq, new_per_seq):
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(V, D, device="cuda", dtype=torch.bfloat16, generator=g)
    new_rows = torch.randn(N_NEW, D, device="cuda", generator=g, requires_grad=True)
    ids = torch.randint(0, V, (batch, seq), device="cuda", generator=g)
    cols = torch.randint(0, seq, (batch, new_per_seq), device="cuda", generator=g)
    ids.scatter_(1, cols, V + torch.randint(0, N_NEW, (batch, new_per_seq), device="cuda", generator=g))
    grad_out = torch.randn(batch, seq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = 64.0  # Gemma-style embed_scale: the multiply is part of the work

    def step():
        out = embedding_rows(ids, table, new_rows, scale, **IMPLS[impl])
        grad, = torch.autograd.grad(out, new_rows, grad_out)
        torch.cuda.synchronize()  # pytest-benchmark times the host: wait for the GPU
        return out, grad

    n, hits = ids.numel(), int((ids >= V).sum())
    benchmark.group = f"embedding_rows {batch}x{seq} ids D={D} bf16"
    # fwd: read each row (bf16 from the table, fp32 from new_rows), write it in bf16; bwd: read the upstream gradient
    # at new positions, write the dense [n_new, D] fp32 gradient that the optimizer takes.
    benchmark.extra_info["min_bytes"] = (n - hits) * D * 2 + hits * D * 4 + n * D * 2 + hits * D * 2 + N_NEW * D * 4
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    outputs.record(benchmark, *step())
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)

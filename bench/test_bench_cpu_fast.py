"""The CPU fast path in bf16 against the PyTorch it replaces, forward + input-gradient backward at SmolLM2's shapes in a
student pass (about 120 rows of 576, 9 query and 3 key/value heads of 64, 1536 MLP features): RMSNorm, rotary
embedding and the SwiGLU gate (C++ kernels vs the references), a linear with prepacked weights vs F.linear, the
q/k/v projections as one packed product vs three F.linear, the dense attention (PyTorch) and the C++ attention
kernel vs SDPA's math backend on padded blocks. `make bench-cpu-fast` (the torch rows are the references: SDPA's
math backend for attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import outputs
from tokdistill_fast.modeling import attention, fused, packed

pytestmark = pytest.mark.skipif(fused.extension() is None or not packed.supported(torch.device("cpu"),
                                                                                   torch.bfloat16),
                                reason="needs the fused extension and oneDNN bf16 products")
ROWS, D, HEADS, KV_HEADS, HD, FF = 118, 576, 9, 3, 64, 1536
CPU = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "cpu") \
    + f", {torch.get_num_threads()} threads"


def run(benchmark, group: str, fn, inputs: list[torch.Tensor]):
    """Time fn(*inputs) forward and backward to the inputs; record what they computed (bench.outputs)."""
    def step():
        out = fn(*inputs)
        return out, *torch.autograd.grad(out, inputs, torch.ones_like(out))

    benchmark.group = group
    benchmark.extra_info["device"] = CPU
    outputs.record(benchmark, *step())
    benchmark.pedantic(step, rounds=200, warmup_rounds=20)


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16).requires_grad_()


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_rms_norm(benchmark, impl):
    w = torch.randn(D).to(torch.bfloat16)
    fn = fused.rms_norm if impl == "fused" else fused.rms_norm_ref
    run(benchmark, f"rms_norm {ROWS}x{D} bf16", lambda x: fn(x, w, 1e-5, 0), [bf16(ROWS, D)])


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_rotary(benchmark, impl):
    angle = torch.randn(1, ROWS, HD // 2)
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))

    def fn(q, k):
        if impl == "fused":
            return torch.cat([x.flatten() for x in fused.rotary(q, k, cos, sin)])
        return torch.cat([fused.rotary_ref(x, cos, sin).flatten() for x in (q, k)])

    run(benchmark, f"rotary q+k {ROWS}x({HEADS}+{KV_HEADS})x{HD} bf16", fn,
        [bf16(1, ROWS, HEADS, HD), bf16(1, ROWS, KV_HEADS, HD)])


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_gated(benchmark, impl):
    fn = fused.gated if impl == "fused" else fused.gated_ref
    run(benchmark, f"SwiGLU gate {ROWS}x(2x{FF}) bf16", lambda gu: fn(gu, 0), [bf16(ROWS, 2 * FF)])


@pytest.mark.parametrize("impl", ["torch", "packed"])
def test_qkv_projections(benchmark, impl):
    ws = [(torch.randn(n * HD, D) * D ** -0.5).to(torch.bfloat16) for n in (HEADS, KV_HEADS, KV_HEADS)]
    w = torch.cat(ws)
    w_packed, w_t_packed = packed._pack(w), packed._pack(w.t())

    def fn(x):
        if impl == "packed":
            return packed.PackedLinearFunction.apply(x, w_packed, w_t_packed, None)
        return torch.cat([F.linear(x, wi) for wi in ws], -1)  # joined for the timing harness (~10 us of it)

    run(benchmark, f"q/k/v projections {ROWS}x{D} -> {(HEADS + 2 * KV_HEADS) * HD} bf16", fn, [bf16(1, ROWS, D)])


@pytest.mark.parametrize("impl", ["torch", "packed"])
def test_linear(benchmark, impl):
    w = (torch.randn(FF, D) * D ** -0.5).to(torch.bfloat16)
    w_packed, w_t_packed = packed._pack(w), packed._pack(w.t())

    def fn(x):
        if impl == "packed":
            return packed.PackedLinearFunction.apply(x, w_packed, w_t_packed, None)
        return F.linear(x, w)

    run(benchmark, f"linear {ROWS}x{D} -> {FF} bf16", fn, [bf16(1, ROWS, D)])


@pytest.mark.parametrize("impl", ["torch", "dense", "fused"])
def test_attention(benchmark, impl):
    """32 snippets, 3-4 queries each over their 8-9 prefix keys (from the cache) and their own."""
    rng = np.random.default_rng(0)
    q_len, prefix = rng.integers(3, 5, 32), rng.integers(8, 10, 32)
    spec = attention.packed_spec(q_len, prefix_len=prefix)
    nq, np_ = int(q_len.sum()), int(prefix.sum())
    context = (torch.randn(np_, KV_HEADS, HD).to(torch.bfloat16), torch.randn(np_, KV_HEADS, HD).to(torch.bfloat16))
    cache: dict = {}

    def sdpa(q, k, v):  # the SDPA path this replaced: keys ordered, padded blocks, grouped heads, a boolean mask
        k, v = (torch.cat([c, x]).index_select(0, spec.kv_order) for c, x in zip(context, (k, v), strict=True))
        if "mask" not in cache:
            cache["mask"] = attention.dense_mask(spec.q_len, spec.k_len, spec.max_q, spec.max_k).repeat(1, 1, 3, 1)
        B = len(q_len)

        def block(x, slot, width):
            return x.new_zeros((B * width,) + x.shape[1:]).index_copy(0, slot, x).view(B, width, *x.shape[1:])

        qb = block(q, spec.q_slot, spec.max_q).view(B, spec.max_q, KV_HEADS, 3, HD).permute(0, 2, 3, 1, 4)
        kb, vb = (block(x, spec.k_slot, spec.max_k).transpose(1, 2) for x in (k, v))
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qb.reshape(B, KV_HEADS, -1, HD), kb, vb, attn_mask=cache["mask"])
        out = out.view(B, KV_HEADS, 3, spec.max_q, HD).permute(0, 3, 1, 2, 4).reshape(B * spec.max_q, HEADS, HD)
        return out.index_select(0, spec.q_slot)

    def dense(q, k, v):  # the PyTorch dense path, DenseAttention
        if "maps" not in cache:
            cache["maps"] = attention.BlockMaps.build(spec, HEADS // KV_HEADS, np_, nq)
        return attention.DenseAttention.apply(q, k, v, *context, cache["maps"], HD ** -0.5)

    def kernel(q, k, v):  # what packed passes run on CPU: the C++ kernel
        return attention.varlen_causal(q, k, v, spec, HD ** -0.5, cache, context)

    run(benchmark, f"attention 32 snippets x 4 queries, {HEADS}/{KV_HEADS} heads bf16",
        {"torch": sdpa, "dense": dense, "fused": kernel}[impl],
        [bf16(nq, HEADS, HD), bf16(nq, KV_HEADS, HD), bf16(nq, KV_HEADS, HD)])

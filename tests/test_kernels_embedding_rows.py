"""embedding_rows: the Triton kernel against its reference (bit-exact forward; gradients by FlashAttention's rule
against an fp64 gold), plus the reference against Gemma's own scaled embedding."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, FLOAT_DTYPES, assert_close_as_torch, gpu, needs_kernels
from tokdistill_fast.kernels.embedding_rows import embedding_rows, embedding_rows_ref

GEMMA_SCALE = float(torch.tensor(640**0.5).to(torch.bfloat16))  # Gemma-3-270M's sqrt(hidden), rounded like the model
CASES = [  # (V, n_new, ids shape, D): tiny; odd sizes; a 3-d ids tensor; Llama-3.1-8B with 16 snippets x 50 tokens
    (10, 3, (2, 5), 8),
    (300, 7, (3, 41), 77),
    (50, 4, (2, 3, 7), 1100),
    pytest.param(128_256, 2_500, (16, 50), 4096, marks=gpu),
]


def make_inputs(V: int, n_new: int, shape: tuple, D: int, dtype: torch.dtype, seed: int = 0):
    """Frozen table, trainable fp32 new rows, and ids of which about a third are new tokens."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, D, generator=g).to(DEVICE, dtype)
    new_rows = torch.randn(n_new, D, generator=g).to(DEVICE).requires_grad_()
    ids = torch.randint(0, V, shape, generator=g)
    new = torch.rand(shape, generator=g) < 0.35
    ids[new] = V + torch.randint(0, n_new, (int(new.sum()),), generator=g)
    return ids.to(DEVICE), table, new_rows


def gold_grad(ids: torch.Tensor, V: int, n_new: int, grad_out: torch.Tensor, scale: float | None) -> torch.Tensor:
    """fp64 gradient of the new rows: the sum of scale * grad_out over each new row's positions."""
    flat, g = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]).double()
    new = flat >= V
    out = torch.zeros(n_new, g.shape[1], dtype=torch.float64, device=g.device)
    return out.index_add_(0, flat[new] - V, g[new]) * (1.0 if scale is None else scale)


def check_grads(ids, table, new_rows, scale, grad_out, deterministic: bool) -> torch.Tensor:
    out = embedding_rows(ids, table, new_rows, scale, backend="triton", deterministic=deterministic)
    (ours,) = torch.autograd.grad(out, new_rows, grad_out)
    (same,) = torch.autograd.grad(embedding_rows_ref(ids, table, new_rows, scale), new_rows, grad_out)
    assert ours.dtype == torch.float32 and ours.shape == new_rows.shape
    assert_close_as_torch(ours, same, gold_grad(ids, table.shape[0], new_rows.shape[0], grad_out, scale), "grad")
    return ours


@needs_kernels
@pytest.mark.parametrize("V,n_new,shape,D", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [None, GEMMA_SCALE])
def test_forward_is_bit_exact(V, n_new, shape, D, dtype, scale):
    ids, table, new_rows = make_inputs(V, n_new, shape, D, dtype)
    out = embedding_rows(ids, table, new_rows, scale, backend="triton")
    assert out.shape == (*shape, D) and out.dtype == dtype
    assert torch.equal(out, embedding_rows_ref(ids, table, new_rows, scale))


@needs_kernels
@pytest.mark.parametrize("V,n_new,shape,D", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_matches_reference(V, n_new, shape, D, dtype, deterministic):
    ids, table, new_rows = make_inputs(V, n_new, shape, D, dtype)
    grad_out = torch.randn(*shape, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)  # upstream != 1
    check_grads(ids, table, new_rows, GEMMA_SCALE, grad_out, deterministic)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_one_new_token_everywhere(dtype, deterministic):
    """Scatter stress: 300 positions, all the same new row (plus one row that never occurs: zero gradient)."""
    ids, table, new_rows = make_inputs(20, 2, (300,), 77, dtype)
    ids = torch.full_like(ids, 20 + 1)
    grad_out = torch.randn(300, 77, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    first = check_grads(ids, table, new_rows, None, grad_out, deterministic)
    assert torch.equal(first[0], torch.zeros_like(first[0]))
    if deterministic:  # same bits on every run
        assert torch.equal(first, check_grads(ids, table, new_rows, None, grad_out, deterministic))


@needs_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_batch_without_new_tokens(deterministic):
    ids, table, new_rows = make_inputs(30, 3, (4, 9), 77, torch.bfloat16)
    ids = ids.clamp(max=29)
    out = embedding_rows(ids, table, new_rows, GEMMA_SCALE, backend="triton", deterministic=deterministic)
    assert torch.equal(out, embedding_rows_ref(ids, table, new_rows, GEMMA_SCALE))
    (grad,) = torch.autograd.grad(out, new_rows, torch.ones_like(out))
    assert torch.equal(grad, torch.zeros_like(new_rows))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_mean_init_equals_gemma_embedding_bitwise(impl):
    """Rows at their subtoken-mean init give exactly what Gemma's own scaled embedding gives once they are
    appended to its (bf16) table: the student starts where the model's tokenizer-extended embedding would."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    V, D = 40, 77
    emb = Gemma3TextScaledWordEmbedding(V + 3, D, 0, embed_scale=640**0.5).to(DEVICE, torch.bfloat16)
    table = emb.weight.detach()[:V]
    new_rows = torch.stack([table[[3, 7]].float().mean(0), table[[1, 2, 5]].float().mean(0), table[9].float()])
    with torch.no_grad():
        emb.weight[V:] = new_rows
    ids = torch.tensor([[5, V, 7, V + 1], [V + 2, 0, V, 39]], device=DEVICE)
    scale = float(emb.embed_scale.to(torch.bfloat16))
    assert torch.equal(embedding_rows(ids, table, new_rows, scale, backend=impl), emb(ids))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_table_never_gets_a_gradient(impl):
    ids, table, new_rows = make_inputs(30, 3, (2, 9), 16, torch.float32)
    table.requires_grad_()
    out = embedding_rows(ids, table, new_rows, backend=impl)
    out.sum().backward()
    assert table.grad is None and new_rows.grad is not None


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="the race needs two or more CPU threads")
def test_reference_backward_is_the_same_every_time_on_cpu():
    """The reference's gradient is bitwise repeatable on a multi-threaded CPU: an indexing gather's backward adds a
    row's gradients with parallel atomics (2e-5 apart over 20 repeats of this case), so one distill run gave
    rows ~1e-7 apart from the same run repeated."""
    ids, table, _ = make_inputs(1000, 8, (64, 50), 576, torch.float32)
    ids, table = ids.cpu(), table.cpu()
    grad_out = torch.randn(64, 50, 576, generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(20):
        rows = torch.randn(8, 576, generator=torch.Generator().manual_seed(2)).requires_grad_()
        embedding_rows_ref(ids, table, rows).backward(grad_out)
        grads.append(rows.grad)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])

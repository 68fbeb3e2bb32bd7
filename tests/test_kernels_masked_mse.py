"""masked_mse: the Triton kernels against the reference, loss, per-pair loss and dS by FlashAttention's rule
against an fp64 gold; K = 0 on both paths."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, FLOAT_DTYPES, assert_close_as_torch, gpu, needs_kernels
from tokdistill_fast.kernels.masked_mse import masked_mse, masked_mse_ref

CASES = [  # (Ns, Nt, K, D): tiny; odd sizes with D over one 1024-column block; K == Ns; production size
    (4, 4, 1, 64),
    (300, 257, 77, 77),
    (40, 37, 29, 1100),
    (64, 64, 64, 32),
    pytest.param(8192, 8192, 6000, 4096, marks=gpu),
]


def make_inputs(ns: int, nt: int, k: int, d: int, s_dtype: torch.dtype, t_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(ns, d, generator=g).to(DEVICE, s_dtype).requires_grad_()
    T = torch.randn(nt, d, generator=g).to(DEVICE, t_dtype)
    s_idx = torch.randperm(ns, generator=g)[:k].to(DEVICE)  # distinct student positions
    t_idx = torch.randint(0, nt, (k,), generator=g).to(DEVICE)
    return S, T, s_idx, t_idx


@needs_kernels
@pytest.mark.parametrize("ns,nt,k,d", CASES)
@pytest.mark.parametrize("s_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("t_dtype", ["same", torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference(ns, nt, k, d, s_dtype, t_dtype, index_dtype):
    S, T, s_idx, t_idx = make_inputs(ns, nt, k, d, s_dtype, s_dtype if t_dtype == "same" else t_dtype)
    s_idx, t_idx = s_idx.to(index_dtype), t_idx.to(index_dtype)
    upstream = torch.tensor(2.5, device=DEVICE)  # dL/dloss != 1

    loss, row = masked_mse(S, T, s_idx, t_idx, backend="triton")
    (dS,) = torch.autograd.grad(loss, S, upstream)
    ref_loss, ref_row = masked_mse_ref(S, T, s_idx, t_idx)  # fp32 accumulation, as the kernel
    (ref_dS,) = torch.autograd.grad(ref_loss, S, upstream)

    S64 = S.detach().double().requires_grad_()  # fp64 leaf: the gold gradient is not rounded
    gold_loss, gold_row = masked_mse_ref(S64, T.double(), s_idx, t_idx, acc_dtype=torch.float64)
    (gold_dS,) = torch.autograd.grad(gold_loss, S64, upstream.double())

    assert loss.dtype == row.dtype == torch.float32 and row.shape == (k,) and not row.requires_grad
    assert dS.dtype == S.dtype and dS.shape == S.shape
    assert_close_as_torch(loss, ref_loss, gold_loss, "loss")
    assert_close_as_torch(row, ref_row, gold_row, "row_loss")
    assert_close_as_torch(dS, ref_dS, gold_dS, "dS")
    unpaired = torch.ones(ns, dtype=torch.bool, device=DEVICE)
    unpaired[s_idx.long()] = False
    assert torch.equal(dS[unpaired], torch.zeros_like(dS[unpaired]))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_no_pairs_gives_zero_loss_and_zero_grad(impl):
    S, T, s_idx, t_idx = make_inputs(6, 5, 0, 77, torch.bfloat16, torch.bfloat16)
    loss, row = masked_mse(S, T, s_idx, t_idx, backend=impl)
    loss.backward()
    assert loss.item() == 0.0 and row.shape == (0,)
    assert torch.equal(S.grad, torch.zeros_like(S))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_kernels)])
def test_teacher_gets_no_gradient_and_no_grad_inputs_work(impl):
    S, T, s_idx, t_idx = make_inputs(12, 9, 7, 33, torch.float32, torch.float32)
    T.requires_grad_()
    loss, _ = masked_mse(S, T, s_idx, t_idx, backend=impl)
    loss.backward()
    assert T.grad is None and S.grad is not None
    with torch.no_grad():  # evaluation: nothing saved for backward
        assert not masked_mse(S, T, s_idx, t_idx, backend=impl)[0].requires_grad

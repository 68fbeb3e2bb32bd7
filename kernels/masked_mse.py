"""Masked MSE between student and teacher hidden states at aligned positions.

loss = sum_k ||S[s_idx[k]] - T[t_idx[k]]||^2 / (K * D), accumulated in fp32; row_loss[k] = the pair's mean squared
error (detached). S [Ns, D] student states (flattened batch, may require grad), T [Nt, D] packed teacher states
(bf16 or fp32, never gets a gradient, on either path), s_idx / t_idx [K] int32/int64 on S's device; s_idx holds
distinct positions (one pair per aligned student position). K = 0 gives loss 0 and a zero gradient.
"""

from __future__ import annotations

import torch

from .backend import LAUNCH_OPTIONS, cast, check_device, dispatch, jit, row_major, tl, triton


def masked_mse_ref(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor,
                   acc_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch definition: the spec the kernel is tested against. Returns (loss, row_loss [K]).
    Traffic, bf16 S and T: forward about 44 K D bytes, backward about as much again plus a 2 Ns D zero fill; the
    kernels read the pairs' rows of S and T once per pass (4 K D) and the backward writes dS once (2 Ns D)."""
    diff = S[s_idx].to(acc_dtype) - T.detach()[t_idx].to(acc_dtype)  # gathers, casts, sub: reads 16 K D, writes 16 K D
    row = (diff * diff).mean(dim=-1) if diff.shape[-1] else diff.sum(dim=-1)  # reads 8 K D, writes 4 K D
    loss = row.sum() / max(row.numel(), 1)
    return loss, row.detach()


# Columns per program: at most 1024 (a 4 KB fp32 tile, 8 values per thread at Triton's default 4 warps); the
# forward loops over column blocks so one program owns a pair's whole sum. Not swept: on an H100 it already ran
# 7.5x faster than PyTorch at 65k rows (bench/results/kernels.json); a sweep would go into `make bench-kernels`.
MAX_BLOCK_D = 1024


@jit
def _masked_mse_fwd_kernel(S, T, s_idx, t_idx, row_sum, D, s_stride, t_stride, BLOCK_D: tl.constexpr):
    k = tl.program_id(0)  # one aligned pair per program
    s_row = tl.load(s_idx + k).to(tl.int64)  # int64: Ns * D passes 2**31 at 1M tokens x 4096
    t_row = tl.load(t_idx + k).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = cols < D
        s = tl.load(S + s_row * s_stride + cols, mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + t_row * t_stride + cols, mask=m, other=0.0).to(tl.float32)
        acc += (s - t) * (s - t)
    tl.store(row_sum + k, tl.sum(acc, axis=0))


@jit
def _masked_mse_bwd_kernel(S, T, t_idx, pair_of, grad_loss, dS, D, s_stride, t_stride, coef,
                           BLOCK_D: tl.constexpr):
    """dS[i] = coef * g * (S[i] - T[t_idx[k]]) where k = pair_of[i] >= 0, and 0 for unpaired rows: every row of
    dS is written exactly once, so no zero fill, no atomics (s_idx is unique)."""
    i = tl.program_id(0)  # one student row per program along axis 0, one column block along axis 1
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.load(pair_of + i)
    paired = k >= 0
    m = cols < tl.where(paired, D, 0)  # unpaired rows read nothing (see embedding_rows.py on this mask form)
    t_row = tl.load(t_idx + tl.where(paired, k, 0), mask=paired, other=0).to(tl.int64)
    s = tl.load(S + i.to(tl.int64) * s_stride + cols, mask=m, other=0.0).to(tl.float32)
    t = tl.load(T + t_row * t_stride + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(grad_loss).to(tl.float32) * coef  # upstream gradient stays on the device: no host sync
    tl.store(dS + i.to(tl.int64) * D + cols, cast(g * (s - t), dS.dtype.element_ty), mask=cols < D)


def _masked_mse_fwd(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor,
                    t_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, row_loss [K]), both fp32."""
    K, D = s_idx.numel(), S.shape[1]
    row_sum = torch.zeros(K, device=S.device, dtype=torch.float32)  # [K] sum of squares per pair
    if K and D:
        _masked_mse_fwd_kernel[(K,)](S, T, s_idx, t_idx, row_sum, D, S.stride(0), T.stride(0),
                                     BLOCK_D=min(MAX_BLOCK_D, triton.next_power_of_2(D)), **LAUNCH_OPTIONS)
    return row_sum.sum() / max(K * D, 1), row_sum / max(D, 1)


def _masked_mse_bwd(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor,
                    grad_loss: torch.Tensor) -> torch.Tensor:
    """dLoss/dS [Ns, D] in S's dtype, for the upstream gradient grad_loss (0-dim)."""
    (Ns, D), K = S.shape, s_idx.numel()
    dS = torch.empty(Ns, D, device=S.device, dtype=S.dtype)
    if Ns and D:
        pair_of = torch.full((Ns,), -1, device=S.device, dtype=torch.int32)  # [Ns] pair index of each row, or -1
        pair_of.scatter_(0, s_idx.long(), torch.arange(K, device=S.device, dtype=torch.int32))
        BLOCK_D = min(MAX_BLOCK_D, triton.next_power_of_2(D))
        _masked_mse_bwd_kernel[(Ns, triton.cdiv(D, BLOCK_D))](
            S, T, t_idx, pair_of, grad_loss.reshape(()).contiguous(), dS, D, S.stride(0), T.stride(0),
            2.0 / max(K * D, 1), BLOCK_D=BLOCK_D, **LAUNCH_OPTIONS)
    return dS


class MaskedMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor):
        ctx.save_for_backward(S, T, s_idx, t_idx)
        loss, row_loss = _masked_mse_fwd(S, T, s_idx, t_idx)
        ctx.mark_non_differentiable(row_loss)
        return loss, row_loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_row: torch.Tensor):
        dS = _masked_mse_bwd(*ctx.saved_tensors, grad_loss) if ctx.needs_input_grad[0] else None
        return dS, None, None, None


def masked_mse(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, row_loss [K]) as defined above. backend: auto | torch | triton (see backend.py)."""
    if dispatch(backend, S.device) == "torch":
        return masked_mse_ref(S, T, s_idx, t_idx)
    check_device("masked_mse", S.device, T=T, s_idx=s_idx, t_idx=t_idx)
    return MaskedMSEFunction.apply(row_major(S), row_major(T), s_idx.contiguous(), t_idx.contiguous())

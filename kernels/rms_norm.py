"""RMSNorm of the frozen model's layers on GPU, one Triton kernel each way (the CPU passes run csrc/fused.cpp's).

y = norm(x) * w over the last dimension D, rstd = 1 / sqrt(mean(x^2) + eps) per row kept in fp32 for the backward.
offset 0 rounds x * rstd to x's dtype, then multiplies by w there (Llama, Qwen2, Mistral); offset 1 multiplies by
(1 + w) in fp32 and rounds once (Gemma). The backward gives the input's gradient only (the weight is frozen):
dx = rstd * (g - xhat * mean(g * xhat)), g the gradient at the normalized row, rounded where autograd rounds it.
The autograd Function (modeling/fused.py's RMSNormFunction, shared with the C++ kernels) calls the launchers below;
its reference is fused.rms_norm_ref, the Hugging Face modules' math. Replaces about 8 PyTorch operators forward and
12 backward, each a kernel launch on a GPU.
"""

from __future__ import annotations

import torch

from .backend import LAUNCH_OPTIONS, cast, jit, tl, triton


@jit
def _rms_norm_fwd_kernel(X, W, Y, rstd, D, eps, OFFSET: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one row per program, D <= BLOCK_D
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(rstd + row, r)
    if OFFSET:
        y = x * r * (1.0 + w)
    else:
        y = w * cast(x * r, Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * D + cols, cast(y, Y.dtype.element_ty), mask=m)


@jit
def _rms_norm_bwd_kernel(DY, X, W, rstd, DX, D, OFFSET: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    dy = tl.load(DY + row * D + cols, mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.load(rstd + row)
    if OFFSET:
        g = dy * (1.0 + w)
    else:
        g = cast(dy * w, DX.dtype.element_ty).to(tl.float32)
    c = tl.sum(g * x, axis=0) * r * r / D
    tl.store(DX + row * D + cols, cast(r * (g - x * c), DX.dtype.element_ty), mask=m)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd [rows] fp32) for contiguous x [..., D] and weight [D] in x's dtype."""
    D = x.shape[-1]
    y, rstd = torch.empty_like(x), torch.empty(x.numel() // D, device=x.device, dtype=torch.float32)
    if rstd.numel():
        _rms_norm_fwd_kernel[(rstd.numel(),)](x, weight, y, rstd, D, eps, OFFSET=offset,
                                              BLOCK_D=triton.next_power_of_2(D), **LAUNCH_OPTIONS)
    return y, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: int
                 ) -> torch.Tensor:
    """dx for contiguous dy and the forward's x, weight and rstd."""
    dx = torch.empty_like(x)
    if rstd.numel():
        _rms_norm_bwd_kernel[(rstd.numel(),)](dy, x, weight, rstd, dx, x.shape[-1], OFFSET=offset,
                                              BLOCK_D=triton.next_power_of_2(x.shape[-1]), **LAUNCH_OPTIONS)
    return dx

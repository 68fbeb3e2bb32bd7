"""Masked MSE between student and teacher hidden states at aligned positions.

loss = sum_k ||S[s_idx[k]] - T[t_idx[k]]||^2 / (K * D). S [Ns, D] student states (flattened batch),
T [Nt, D] packed teacher states (no grad), s_idx / t_idx [K] int64; s_idx unique. K = 0 gives loss 0.
"""

from __future__ import annotations

import torch


def masked_mse_ref(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor,
                   acc_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch definition. Returns (loss, row_loss [K] = per-pair mean squared error, detached)."""
    diff = S[s_idx].to(acc_dtype) - T[t_idx].to(acc_dtype)
    row = (diff * diff).mean(dim=-1) if diff.shape[-1] else diff.sum(dim=-1)
    loss = row.sum() / max(row.numel(), 1)
    return loss, row.detach()


def masked_mse(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor,
               t_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Public entry point."""
    return masked_mse_ref(S, T, s_idx, t_idx)

"""Embedding gather for a frozen table plus trainable new rows; gradients go only into the new rows.

out[b, t] = scale * (table[ids[b, t]] if ids[b, t] < V else new_rows[ids[b, t] - V]), in the table's dtype.
ids >= V address the trainable block [n_new, D] (fp32); no gradient is ever allocated for the frozen table.
"""

from __future__ import annotations

import torch


def embedding_rows_ref(ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch definition: the spec the kernel is tested against. ids [...] int64 -> [..., D] table dtype."""
    V = table.shape[0]
    is_new = (ids >= V).unsqueeze(-1)
    base = table[ids.clamp(max=V - 1)]
    new = new_rows[(ids - V).clamp(min=0)].to(table.dtype)
    out = torch.where(is_new, new, base)
    return out if scale is None else out * scale


def embedding_rows(ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """Public entry point."""
    return embedding_rows_ref(ids, table, new_rows, scale)

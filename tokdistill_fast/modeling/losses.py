"""Training objectives on student states at aligned positions. Each returns (loss, per-row loss [K] detached).

Distillation: mse on hidden states of the target layer (fused kernel), or kl / logits-mse on logits over the
original vocabulary, with teacher logits recomputed from cached final-layer states (storing [K, V] logits
would cost V / D times the memory). NTP: next-token cross-entropy at the student's aligned positions, or, for
the new rows' output side only, at the teacher's cached final states (teacher_ntp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokdistill_fast.kernels.masked_mse import masked_mse


def hidden_mse(S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor, backend: str = "auto"):
    """Masked MSE between flattened student states S [B*T, D] and packed teacher states T [Nt, D]."""
    return masked_mse(S, T, s_idx, t_idx, backend=backend)


def logits_distill(kind: str, head, S: torch.Tensor, T: torch.Tensor, s_idx: torch.Tensor, t_idx: torch.Tensor):
    """KL(teacher || student) or MSE between logits over the original vocabulary."""
    student = head(S.index_select(0, s_idx)).float()
    with torch.no_grad():
        teacher = head(T.index_select(0, t_idx).to(S.dtype)).float()
    if kind == "kl":
        t_logp = F.log_softmax(teacher, dim=-1)
        row = (t_logp.exp() * (t_logp - F.log_softmax(student, dim=-1))).sum(-1)
    else:
        row = (student - teacher).pow(2).mean(-1)
    return row.sum() / max(row.numel(), 1), row.detach()


def next_token(head, new_out: torch.Tensor, S: torch.Tensor, idx: torch.Tensor, target: torch.Tensor, V: int):
    """Cross-entropy of predicting `target` (extended ids: >= V are new tokens) from states S[idx], with logits
    over the original head plus the new tokens' output rows."""
    h = S.index_select(0, idx)
    logits = torch.cat([head(h), h @ new_out.to(h.dtype).t()], dim=-1).float()
    row = F.cross_entropy(logits, target, reduction="none")
    return row.sum() / max(row.numel(), 1), row.detach()


def teacher_ntp(T: torch.Tensor, t_idx: torch.Tensor, rows: torch.Tensor, own: torch.Tensor, lse: torch.Tensor,
                ce: torch.Tensor, cap: float | None = None):
    """Next-token cross-entropy at the teacher's final-normed states T[t_idx] with the new rows [n, D] as extra
    output rows (tied): the teacher's own loss `ce` [K] plus -log of the probability the new tokens leave to the
    original vocabulary, whose logsumexp at each state is `lse` [K]. Its gradient is NTP's on the new output rows,
    read where the student should be. `own` [K, n] bool: the rows each pair moves (the others enter detached).
    Returns the per-pair loss [K], differentiable (the caller weighs each step's pairs)."""
    z = T.index_select(0, t_idx).float() @ rows.float().t()
    if cap:
        z = torch.tanh(z / cap) * cap
    z = torch.where(own, z, z.detach())
    return ce + torch.logaddexp(lse, z.logsumexp(-1)) - lse

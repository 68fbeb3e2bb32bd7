"""How closely the model with new tokens reproduces the original model with the original tokenization.

The measure (used by `tokdistill eval`, by the layer/lr search and by the docs' tables): on held-out snippets,
next-token KL(original || adapted) at the aligned positions, i.e. from the new token on, where the original
model reads the subtokens and the adapted model the single new token. Both distributions are over the original
vocabulary (the adapted model's logits for new tokens are left out and the rest renormalized), so the score
measures the input embeddings; the probability the adapted model gives to new tokens is reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokdistill_fast.kernels.embedding_rows import embedding_rows

from .align import Alignment
from .models import Decoder
from .teacher import aligned_rows, length_batches, pad_batch

LOGITS_PER_CHUNK = 2**26  # 256 MB of fp32 logits at a time


@dataclass
class Scores:
    """Per aligned pair: KL, top-1 agreement, student NLL minus teacher NLL of the actual next token."""

    kl: np.ndarray  # [K]
    top1: np.ndarray  # [K] bool
    row_snippet: np.ndarray  # [K] snippet index of each pair

    def per_snippet(self, n: int) -> np.ndarray:
        s = np.bincount(self.row_snippet, weights=self.kl, minlength=n)
        c = np.bincount(self.row_snippet, minlength=n)
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


@torch.no_grad()
def student_scores(decoder: Decoder, al: Alignment, rows: torch.Tensor, final: torch.Tensor,
                   max_tokens: int = 8192, backend: str = "auto") -> Scores:
    """KL(teacher || student) and top-1 agreement at every aligned pair, with new rows `rows` [n, D] (table
    space) addressed by extended ids V + r in the student sequences. `final` [K, D] holds the teacher's
    final-layer states at the aligned positions (teacher.compute with the last layer); teacher logits are
    recomputed from them batch by batch, which is exact and needs D instead of V numbers per position.
    backend: the embedding gather's implementation (auto | torch | triton)."""
    device = decoder.embed_weight.device
    K = len(al.s_pos)
    kl = np.zeros(K)
    top1 = np.zeros(K, dtype=bool)
    L = decoder.num_layers
    rows = rows.to(device=device, dtype=torch.float32)
    for batch in length_batches(al.cu_student[1:] - al.cu_student[:-1], max_tokens):
        ids = pad_batch(al.student_ids, al.cu_student, batch, device)
        h0 = embedding_rows(ids, decoder.embed_weight, rows, decoder.embed_scale, backend=backend)
        h = decoder.hidden_states(h0, [L])[L].reshape(-1, decoder.hidden_size)
        idx = torch.from_numpy(aligned_rows(al.cu_aligned, al.s_pos, batch, ids.shape[1])).to(device)
        dest = torch.from_numpy(np.concatenate([np.arange(al.cu_aligned[i], al.cu_aligned[i + 1]) for i in batch]))
        # Logits over a large vocabulary take K x V floats: score in row chunks of ~64M logits.
        step = max(1, LOGITS_PER_CHUNK // max(decoder.model.get_output_embeddings().weight.shape[0], 1))
        for c in range(0, len(dest), step):
            s_logp = F.log_softmax(decoder.logits(h.index_select(0, idx[c:c + step])).float(), dim=-1)
            part = dest[c:c + step]
            t_rows = final.index_select(0, part.to(final.device)).to(device=device, dtype=h.dtype)
            t_logp = F.log_softmax(decoder.logits(t_rows).float(), dim=-1)
            kl[part.numpy()] = (t_logp.exp() * (t_logp - s_logp)).sum(-1).cpu().numpy()
            top1[part.numpy()] = (t_logp.argmax(-1) == s_logp.argmax(-1)).cpu().numpy()
    row_snippet = np.repeat(np.arange(al.n), np.diff(al.cu_aligned))
    return Scores(kl, top1, row_snippet)

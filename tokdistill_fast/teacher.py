"""Stage 4: teacher hidden states, computed once without gradient and only up to the deepest layer needed.

Snippets are sorted by length and run in large right-padded batches; of each sequence only the aligned
positions are kept, packed in the cu_seqlens layout of the alignment: states[l][cu_aligned[i]:cu_aligned[i+1]]
are snippet i's targets at layer l. The cache lives on the compute device, or in pinned host memory when it
would take more than `device_budget` bytes there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .align import Alignment
from .models import Decoder


@dataclass
class TeacherCache:
    """Packed teacher targets: one [K, D] tensor per cached layer, rows in alignment order."""

    states: dict[int, torch.Tensor]
    cu_aligned: np.ndarray

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())


def length_batches(lengths: np.ndarray, max_tokens: int, max_rows: int | None = None) -> list[np.ndarray]:
    """Group sequence indices, sorted by length, into batches whose padded size B * T_max stays within max_tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, int(lengths[i]))
        if current and (longest_if * (len(current) + 1) > max_tokens or (max_rows and len(current) >= max_rows)):
            batches.append(np.asarray(current))
            current, longest_if = [], int(lengths[i])
        current.append(i)
        longest = longest_if
    if current:
        batches.append(np.asarray(current))
    return batches


def pad_batch(flat: np.ndarray, cu: np.ndarray, rows: np.ndarray, device: torch.device,
              pad_id: int = 0) -> torch.Tensor:
    """Right-padded [B, T_max] int64 tensor of the packed sequences `rows`."""
    lens = cu[rows + 1] - cu[rows]
    out = np.full((len(rows), int(lens.max())), pad_id, dtype=np.int64)
    for b, i in enumerate(rows):
        out[b, :lens[b]] = flat[cu[i]:cu[i + 1]]
    return torch.from_numpy(out).to(device, non_blocking=True)


def aligned_rows(cu_aligned: np.ndarray, pos: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """Flat indices b * width + pos of the aligned positions of batch rows `rows` (in batch order)."""
    return np.concatenate([b * width + pos[cu_aligned[i]:cu_aligned[i + 1]] for b, i in enumerate(rows)]
                          ).astype(np.int64)


@torch.no_grad()
def compute(decoder: Decoder, teacher_ids: np.ndarray, cu_teacher: np.ndarray, alignment: Alignment,
            layers: list[int], max_tokens: int, cache_dtype: torch.dtype,
            device_budget: int | None = None) -> TeacherCache:
    """Teacher states at `layers` for the aligned positions of every snippet."""
    device = decoder.embed_weight.device
    K, D = len(alignment.t_pos), decoder.hidden_size
    need = K * D * torch.empty((), dtype=cache_dtype).element_size() * len(layers)
    on_host = device.type == "cuda" and device_budget is not None and need > device_budget
    states = {l: torch.empty((K, D), dtype=cache_dtype, device="cpu" if on_host else device,
                             pin_memory=on_host) for l in layers}
    lengths = cu_teacher[1:] - cu_teacher[:-1]
    cu_a = alignment.cu_aligned
    batches = length_batches(lengths, max_tokens)
    for rows in tqdm(batches, desc="teacher", unit="batch", leave=False):
        ids = pad_batch(teacher_ids, cu_teacher, rows, device)
        hidden = decoder.hidden_states(decoder.embed(ids), layers)
        flat_idx = torch.from_numpy(aligned_rows(cu_a, alignment.t_pos, rows, ids.shape[1])).to(device)
        dest = torch.from_numpy(np.concatenate([np.arange(cu_a[i], cu_a[i + 1]) for i in rows])).to(
            states[layers[0]].device)
        for l, h in hidden.items():
            states[l].index_copy_(0, dest, h.reshape(-1, D).index_select(0, flat_idx).to(cache_dtype).to(
                states[l].device, non_blocking=True))
    return TeacherCache(states, cu_a)

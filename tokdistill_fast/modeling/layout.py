"""Host-side layouts of token sequences for one decoder call: right-padded [B, W] rows (the reference) or packed
[1, N] rows without padding (attention.py), built with numpy before any device work so that the training loop
never waits for the host."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..align import cu_seqlens
from . import attention
from .attention import ranges


@dataclass
class Layout:
    """ids and positions of the laid-out tokens, the flat row (in ids.reshape(-1)) of each sequence's first
    laid-out token, and the attention spec of a packed call (None: padded rows, plain causal attention)."""

    ids: torch.Tensor
    positions: torch.Tensor
    base: np.ndarray  # [B]
    spec: attention.Spec | None
    tokens: int  # real (non-padding) tokens laid out

    def rows(self, seq: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Flat rows of (sequence seq[k], offset[k] within its laid-out part)."""
        return self.base[seq] + offset

    def to(self, device: torch.device) -> Layout:
        return Layout(self.ids.to(device, non_blocking=True), self.positions.to(device, non_blocking=True),
                      self.base, None if self.spec is None else self.spec.to(device), self.tokens)


def lay_out(flat: np.ndarray, first: np.ndarray, lengths: np.ndarray, pos0: np.ndarray, packed: bool,
            prefix_len: np.ndarray | None = None, capture: np.ndarray | None = None) -> Layout:
    """Tokens flat[first[b]:first[b] + lengths[b]] at positions pos0[b], pos0[b] + 1, ... of sequence b. Packed
    layouts carry the attention spec for attending to captured prefixes of prefix_len[b] tokens, or for capturing
    each sequence's first capture[b] tokens (attention.py); padded ones are for plain causal passes."""
    first, lengths, pos0 = (np.asarray(a, dtype=np.int64) for a in (first, lengths, pos0))
    if packed:
        ids = flat[ranges(first, lengths)][None]
        positions = ranges(pos0, lengths)[None]
        base = cu_seqlens(lengths)[:-1]
        spec = attention.packed_spec(lengths, prefix_len, capture)
    else:
        if prefix_len is not None or capture is not None:
            raise ValueError("prefix sharing needs a packed layout")
        B, W = len(lengths), max(int(lengths.max(initial=0)), 1)
        j = np.arange(W, dtype=np.int64)
        ids = np.zeros((B, W), dtype=np.int64)  # right padding: never attended to under causal attention
        ids[j[None, :] < lengths[:, None]] = flat[ranges(first, lengths)]
        positions = pos0[:, None] + j[None, :]  # padding keeps counting: finite rotary, never attended to
        base = np.arange(B, dtype=np.int64) * W
        spec = None
    return Layout(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                  torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), base, spec, int(lengths.sum()))


def token_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Consecutive sequence indices grouped into batches of at most max_tokens tokens in all (packed rows pay
    no padding, so no sorting is needed); a longer single sequence gets a batch of its own."""
    batches, current, total = [], [], 0
    for i, n in enumerate(lengths.tolist()):
        if current and total + n > max_tokens:
            batches.append(np.asarray(current, dtype=np.int64))
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches

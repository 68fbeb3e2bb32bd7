"""The teacher's targets of each student step on the compute device (`TargetFeed`)."""

from __future__ import annotations

import torch

from ..teacher import TeacherCache
from .steps import Batch


class TargetFeed:
    """Each step's teacher rows on the compute device, as (states {layer: [.., D]}, row index). A cache on the
    device is indexed in place. A host cache (pinned, teacher.compute spills there) is gathered per step into one
    of two pinned staging buffers and copied asynchronously; a buffer is refilled only after the copy queued from
    it two steps earlier has completed, so the host prepares step k + 1 while the device still reads step k."""

    def __init__(self, cache: TeacherCache, batches: list[Batch], device: torch.device, staged: bool | None = None):
        self.cache, self.device = cache, device
        self.on_device = all(t.device == device for t in cache.states.values()) if staged is None else not staged
        if not self.on_device:
            k_max = max((len(b.t_rows) for b in batches), default=0)
            pin = device.type == "cuda"
            self.staging = [{l: torch.empty((k_max, t.shape[1]), dtype=t.dtype, pin_memory=pin)
                             for l, t in cache.states.items()} for _ in range(2)]
            self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]

    def __call__(self, step: int, b: Batch) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        if self.on_device:
            return self.cache.states, b.t_idx
        slot, k = step % 2, len(b.t_rows)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        idx = torch.from_numpy(b.t_rows)
        out = {}
        for l, t in self.cache.states.items():
            buf = self.staging[slot][l][:k]
            torch.index_select(t, 0, idx, out=buf)
            out[l] = buf.to(self.device, non_blocking=True)
        if self.copied[slot] is not None:
            self.copied[slot].record()
        return out, torch.arange(k, device=self.device)



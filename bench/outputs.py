"""What a micro-benchmark's implementation computed, kept beside its timing, so that bench.report can set each
implementation's output against its group's reference (a speedup counts only for the same result)."""

from __future__ import annotations

import torch

PROBE_SEED = 1234  # one fixed random direction per tensor size, the same for every implementation


def record(benchmark, *tensors: torch.Tensor) -> None:
    """Store each tensor's norm and its projection on a fixed random direction in benchmark.extra_info["output"]:
    two implementations' projections differ by about the norm of their difference, wherever it lies."""
    digest = []
    for t in tensors:
        x = t.detach().float().flatten().cpu()
        direction = torch.randn(x.numel(), generator=torch.Generator().manual_seed(PROBE_SEED))
        digest.append([float(x.norm()), float(x @ direction)])
    benchmark.extra_info["output"] = digest


def relative_difference(output: list, reference: list) -> float | None:
    """The largest |projection - reference's| / reference's norm over the tensors; None where they cannot be set
    side by side (one was not recorded, or they hold other tensors)."""
    if not output or not reference or len(output) != len(reference):
        return None
    return max(abs(p - rp) / max(rn, 1e-30) for (_, p), (rn, rp) in zip(output, reference, strict=True))

"""Shared by the kernel tests: the device, skip marks and FlashAttention's error rule.

On a CPU-only machine the kernel cases skip in a plain `pytest` run; `make test` runs the tests/test_kernels_*.py
files a second time with TRITON_INTERPRET=1, where Triton executes the same kernels on CPU tensors.
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from tokdistill_fast.kernels import backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WHY_NOT = backend.unusable_reason(DEVICE)
needs_kernels = pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT} (make test runs these interpreted)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="production-size or fp16 case: needs CUDA")
FLOAT_DTYPES = [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=gpu)]


def assert_close_as_torch(ours: torch.Tensor, same: torch.Tensor, gold: torch.Tensor, what: str) -> None:
    """FlashAttention's rule: our max error against the fp64 gold is at most twice the reference's own (computed
    from the same inputs in the same dtype), plus a relative floor for outputs the reference gets exactly."""
    gold = gold.double()

    def err(x: torch.Tensor) -> float:
        return (x.double() - gold).abs().max().item() if gold.numel() else 0.0

    floor = 1e-5 * (gold.abs().max().item() if gold.numel() else 0.0)
    assert err(ours) <= 2 * err(same) + floor, f"{what}: error {err(ours):.3g} vs reference's {err(same):.3g}"


LAUNCHERS = {"masked_mse": ("_masked_mse_fwd", "_masked_mse_bwd"),
             "embedding_rows": ("_embedding_rows_fwd", "_embedding_rows_bwd")}


def spy_launchers(monkeypatch) -> Counter:
    """Counts the calls of every Triton launcher (the functions that start kernels), whatever a report says."""
    counts: Counter = Counter()
    for module, names in LAUNCHERS.items():
        mod = importlib.import_module(f"tokdistill_fast.kernels.{module}")
        for name in names:
            monkeypatch.setattr(mod, name, counted(getattr(mod, name), name, counts))
    return counts


def counted(fn, name: str, counts: Counter):
    """fn, counting its calls under `name`."""
    def spy(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return spy

"""The gated MLP's middle on GPU, h = a(gate) * up, one Triton kernel each way (the CPU passes run
csrc/fused.cpp's).

gate and up sit side by side in one [rows, 2 * inter] buffer (the two projections as one product); the backward
writes d[gate, up] in the same layout. act 0: SiLU (Llama, Qwen, Mistral); 1: GELU with PyTorch's tanh
approximation (Gemma), written as g * sigmoid(2z) so that the far negative side keeps its relative precision.
Rounded where the Hugging Face module rounds (a(gate), then the product). The autograd Function is
modeling/fused.py's GatedFunction (shared with the C++ kernels), its reference fused.gated_ref. Replaces 3 PyTorch
operators forward and about 6 backward.
"""

from __future__ import annotations

import torch

from .backend import LAUNCH_OPTIONS, cast, jit, tl, triton

BLOCK = 1024  # columns per program


@jit
def _gate_sigmoid(g, ACT: tl.constexpr):
    """s with a(g) = g * s: sigmoid(g) for SiLU, sigmoid(2z) for the tanh GELU."""
    if ACT == 0:
        z = g
    else:
        z = 2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return 1.0 / (1.0 + tl.exp(tl.minimum(-z, 87.0)))  # e^87 stays finite (the C++ kernels clamp alike)


@jit
def _gated_kernel(GU, DH, OUT, inter, ACT: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = cols < inter
    dtype = OUT.dtype.element_ty
    g = tl.load(GU + row * 2 * inter + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=m, other=0.0).to(tl.float32)
    s = _gate_sigmoid(g, ACT)
    a = cast(g * s, dtype).to(tl.float32)
    if BACKWARD:
        dh = tl.load(DH + row * inter + cols, mask=m, other=0.0).to(tl.float32)
        if ACT == 0:
            da = s * (1.0 + g * (1.0 - s))
        else:
            da = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        tl.store(OUT + row * 2 * inter + cols, cast(cast(dh * u, dtype).to(tl.float32) * da, dtype), mask=m)
        tl.store(OUT + row * 2 * inter + inter + cols, cast(dh * a, dtype), mask=m)
    else:
        tl.store(OUT + row * inter + cols, cast(a * u, dtype), mask=m)


def _launch(gu: torch.Tensor, dh: torch.Tensor | None, out: torch.Tensor, act: int) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    rows = gu.numel() // (2 * inter) if inter else 0
    if rows:
        _gated_kernel[(rows, triton.cdiv(inter, BLOCK))](gu, gu if dh is None else dh, out, inter, ACT=act,
                                                          BACKWARD=dh is not None, BLOCK_N=BLOCK, **LAUNCH_OPTIONS)
    return out


def gated_fwd(gu: torch.Tensor, act: int) -> torch.Tensor:
    """h [..., inter] from contiguous gu [..., 2 * inter]."""
    return _launch(gu, None, gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2), act)


def gated_bwd(gu: torch.Tensor, dh: torch.Tensor, act: int) -> torch.Tensor:
    """d[gate, up] [..., 2 * inter] from the forward's gu and contiguous dh [..., inter]."""
    return _launch(gu, dh, torch.empty_like(gu), act)

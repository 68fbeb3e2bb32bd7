"""Rotary position embedding of queries and keys on GPU, one Triton kernel per tensor each way (the CPU passes run
csrc/fused.cpp's).

x [rows, heads, hd] by cos/sin [rows, hd], rounded as Hugging Face's apply_rotary_pos_emb rounds it:
y = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x[half:], x[:half]), each product rounded to x's dtype.
The backward is the transposed rotation. The autograd Function is modeling/fused.py's RotaryFunction (shared with
the C++ kernels), its reference fused.rotary_ref. Replaces about 10 PyTorch operators per tensor each way
(products, slices, negation, concatenation, sum).
"""

from __future__ import annotations

import torch

from .backend import LAUNCH_OPTIONS, cast, jit, tl, triton


@jit
def _rotary_kernel(X, COS, SIN, Y, heads, hd, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one position per program: all its heads, both halves
    half = hd // 2
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    m = (h < heads) & (i < half)
    at = X + (row * heads + h) * hd + i
    a = tl.load(at, mask=m, other=0.0).to(tl.float32)
    b = tl.load(at + half, mask=m, other=0.0).to(tl.float32)
    mi = i < half
    c1 = tl.load(COS + row * hd + i, mask=mi, other=0.0).to(tl.float32)
    c2 = tl.load(COS + row * hd + half + i, mask=mi, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + row * hd + i, mask=mi, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + row * hd + half + i, mask=mi, other=0.0).to(tl.float32)
    dtype = Y.dtype.element_ty
    if BACKWARD:
        y1 = cast(a * c1, dtype).to(tl.float32) + cast(b * s2, dtype).to(tl.float32)
        y2 = cast(b * c2, dtype).to(tl.float32) - cast(a * s1, dtype).to(tl.float32)
    else:
        y1 = cast(a * c1, dtype).to(tl.float32) + cast(-b * s1, dtype).to(tl.float32)
        y2 = cast(b * c2, dtype).to(tl.float32) + cast(a * s2, dtype).to(tl.float32)
    out = Y + (row * heads + h) * hd + i
    tl.store(out, cast(y1, dtype), mask=m)
    tl.store(out + half, cast(y2, dtype), mask=m)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Contiguous x [..., heads, hd] rotated by contiguous cos/sin [..., hd] (one row per row of x), or its
    gradient by the transposed rotation (`backward`)."""
    heads, hd = x.shape[-2:]
    y = torch.empty_like(x)
    rows = x.numel() // (heads * hd)
    if rows:
        _rotary_kernel[(rows,)](x, cos, sin, y, heads, hd, BACKWARD=backward, BLOCK_H=triton.next_power_of_2(heads),
                                BLOCK_HALF=triton.next_power_of_2(hd // 2), **LAUNCH_OPTIONS)
    return y

"""Fused RMSNorm and rotary embeddings for the frozen model's passes on CPU (bf16 or fp32): the C++ kernels of
csrc/fused.cpp behind autograd Functions, with the PyTorch references they are tested against (the Hugging Face
modules' own math).

Each replaces five to ten PyTorch element-wise operators forward and as many or more backward, each a pass over
memory at a pass's ~120 rows. Gradients go to the inputs only: the model is frozen.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .attention import dispatch

# Hugging Face norm classes and how each applies its weight: 0 rounds the normalized row to the input dtype and
# multiplies by w there (Llama family); 1 multiplies by (1 + w) in fp32 and rounds once (Gemma).
NORMS = {"LlamaRMSNorm": 0, "Qwen2RMSNorm": 0, "Qwen3RMSNorm": 0, "MistralRMSNorm": 0, "Gemma3RMSNorm": 1}
# Attention classes whose forward is project, rotate, attend, project (no q/k norms): `attention_forward` runs it.
ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "MistralAttention")


@lru_cache(maxsize=1)
def extension():
    """The compiled kernels, or None (pure-PyTorch fallback: the references below)."""
    try:
        from .. import _fused_ext
    except ImportError:
        return None
    return _fused_ext


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
    """The Hugging Face RMSNorm: offset 0 as Llama's, 1 as Gemma's."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).type_as(x)
    return weight * normed.to(x.dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding of x [B, T, heads, hd] by cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension of a contiguous bf16 or fp32 tensor, in one kernel each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
        d = x.shape[-1]
        y = torch.empty_like(x)
        rstd = torch.empty(x.numel() // d, dtype=torch.float32)
        extension().rms_norm_fwd(_ptr(x), _ptr(weight), _ptr(y), _ptr(rstd), rstd.numel(), d, eps, offset,
                                 x.dtype == torch.float32)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        extension().rms_norm_bwd(_ptr(grad), _ptr(x), _ptr(weight), _ptr(rstd), _ptr(dx), rstd.numel(),
                                 x.shape[-1], ctx.offset, x.dtype == torch.float32)
        return dx, None, None, None


class RotaryFunction(torch.autograd.Function):
    """Rotary embedding of contiguous queries and keys [B, T, heads, hd] (bf16 or fp32) by cos/sin [B, T, hd], one
    kernel per tensor each way (the backward is the transposed rotation)."""

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
        y = torch.empty_like(x)
        extension().rotary(_ptr(x), _ptr(cos), _ptr(sin), _ptr(y), cos.numel() // x.shape[-1], x.shape[-2],
                           x.shape[-1], backward, x.dtype == torch.float32)
        return y

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return RotaryFunction._rotate(q, cos, sin, False), RotaryFunction._rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return (*(None if d is None else RotaryFunction._rotate(d.contiguous(), cos, sin, True) for d in (dq, dk)),
                None, None)


FUSED_DTYPES = (torch.bfloat16, torch.float32)


def _fits(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype the kernels take, and the kernels built."""
    dtype = tensors[0].dtype
    return extension() is not None and dtype in FUSED_DTYPES and all(t.device.type == "cpu" and t.dtype == dtype
                                                                      for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
    """RMSNorm: the fused kernel for CPU bf16 or fp32 (the weight in the input's dtype), else the reference."""
    if not _fits(x, weight):
        return rms_norm_ref(x, weight, eps, offset)
    return RMSNormFunction.apply(x.contiguous(), weight.contiguous(), eps, offset)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries and keys [B, T, heads, hd] rotated by cos/sin [B or 1, T, hd]: the fused kernel for CPU bf16 or fp32,
    else the reference."""
    if not _fits(q, k, cos, sin) or q.shape[-1] % 2:
        return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    shape = (q.shape[0], *cos.shape[1:])
    cos, sin = (t.expand(shape).contiguous() for t in (cos, sin))
    return RotaryFunction.apply(q.contiguous(), k.contiguous(), cos, sin)


def attention_forward(m: nn.Module):
    """The forward of a Llama-style attention module m with the fused rotary embedding: projections, rotation,
    the model's attention function (ours for packed passes, see attention.py), output projection."""

    def forward(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs):
        for unused in ("position_ids", "cache", "past_key_values", "use_cache", "cache_position"):
            kwargs.pop(unused, None)
        shape = (*hidden_states.shape[:-1], -1, m.head_dim)
        q, k = rotary(m.q_proj(hidden_states).view(shape), m.k_proj(hidden_states).view(shape),
                      *position_embeddings)
        v = m.v_proj(hidden_states).view(shape)
        out, weights = dispatch(m, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
                                scaling=m.scaling, dropout=0.0, **kwargs)
        return m.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    return forward


def fused_forward(m: nn.Module):
    """A fused replacement for module m's forward (a supported norm or attention), or None."""
    name = type(m).__name__
    if name in NORMS:
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if eps is None or not hasattr(m, "weight"):
            return None
        return lambda x: rms_norm(x, m.weight, float(eps), NORMS[name])
    if name in ATTENTIONS and not hasattr(m, "q_norm"):
        return attention_forward(m)
    return None

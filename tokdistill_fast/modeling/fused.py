"""Fused RMSNorm, rotary embeddings, gated MLP activations and packed causal attention for the frozen model's
passes: the C++ kernels of csrc/fused.cpp on CPU (bf16 or fp32) and, for all but attention, the Triton kernels of
kernels/ on GPU, behind one autograd Function per op, with the PyTorch references they are tested against (the
Hugging Face modules' own math; attention.py's for attention).

Each kernel replaces two to thirty PyTorch operators forward and as many or more backward, each a pass over memory
at a pass's ~120-240 rows. packed.py swaps them into the model's modules. Gradients go to the inputs only: the
model is frozen.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..config import compiled
from ..kernels import backend as kernel_backend
from ..kernels import gated as triton_gated
from ..kernels import rms_norm as triton_rms_norm
from ..kernels import rotary as triton_rotary


def extension():
    """The compiled kernels, or None (pure-PyTorch fallback: the references below; why: missing())."""
    return compiled("_fused_ext")[0]


def missing() -> str:
    """Why extension() is None: not built, or built but not loadable here (config.compiled)."""
    return compiled("_fused_ext")[1] or "not built"


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


def gated_ref(gu: torch.Tensor, act: int) -> torch.Tensor:
    """a(gate) * up from gate and up side by side in the last dimension, as the Hugging Face MLPs compute it."""
    gate, up = gu.chunk(2, dim=-1)
    a = F.silu(gate) if act == 0 else F.gelu(gate, approximate="tanh")
    return a * up


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class CppKernels:
    """csrc/fused.cpp's norm, rotary and gated kernels (CPU, bf16 or fp32, contiguous tensors), with the signatures
    of the Triton kernels' launchers (kernels/rms_norm.py, rotary.py, gated.py), so one autograd Function serves
    both."""

    name = "cpp"

    @staticmethod
    def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[-1]
        y, rstd = torch.empty_like(x), torch.empty(x.numel() // d, dtype=torch.float32)
        extension().rms_norm_fwd(_ptr(x), _ptr(weight), _ptr(y), _ptr(rstd), rstd.numel(), d, eps, offset,
                                 x.dtype == torch.float32)
        return y, rstd

    @staticmethod
    def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: int
                     ) -> torch.Tensor:
        dx = torch.empty_like(x)
        extension().rms_norm_bwd(_ptr(dy), _ptr(x), _ptr(weight), _ptr(rstd), _ptr(dx), rstd.numel(),
                                 x.shape[-1], offset, x.dtype == torch.float32)
        return dx

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
        y = torch.empty_like(x)
        extension().rotary(_ptr(x), _ptr(cos), _ptr(sin), _ptr(y), cos.numel() // x.shape[-1], x.shape[-2],
                           x.shape[-1], backward, x.dtype == torch.float32)
        return y

    @staticmethod
    def gated_fwd(gu: torch.Tensor, act: int) -> torch.Tensor:
        inter = gu.shape[-1] // 2
        h = gu.new_empty(*gu.shape[:-1], inter)
        extension().gated(_ptr(gu), 0, _ptr(h), gu.numel() // (2 * inter), inter, act, False,
                          gu.dtype == torch.float32)
        return h

    @staticmethod
    def gated_bwd(gu: torch.Tensor, dh: torch.Tensor, act: int) -> torch.Tensor:
        dgu = torch.empty_like(gu)
        extension().gated(_ptr(gu), _ptr(dh), _ptr(dgu), gu.numel() // gu.shape[-1], gu.shape[-1] // 2, act, True,
                          gu.dtype == torch.float32)
        return dgu


# kernels/' Triton launchers under the same names (CUDA, or interpreted on CPU)
TritonKernels = SimpleNamespace(name="triton", rms_norm_fwd=triton_rms_norm.rms_norm_fwd,
                                rms_norm_bwd=triton_rms_norm.rms_norm_bwd, rotate=triton_rotary.rotate,
                                gated_fwd=triton_gated.gated_fwd, gated_bwd=triton_gated.gated_bwd)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension of a contiguous tensor by `kernels` (CppKernels or TritonKernels), one kernel
    each way; gradient to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int, kernels) -> torch.Tensor:
        y, rstd = kernels.rms_norm_fwd(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.kernels = offset, kernels
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        return ctx.kernels.rms_norm_bwd(grad.contiguous(), x, weight, rstd, ctx.offset), None, None, None, None


class RotaryFunction(torch.autograd.Function):
    """Rotary embedding of contiguous queries and keys [B, T, heads, hd] by cos/sin [B, T, hd] (their dtype) by
    `kernels`, one kernel per tensor each way (the backward is the transposed rotation)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels):
        ctx.save_for_backward(cos, sin)
        ctx.kernels = kernels
        return kernels.rotate(q, cos, sin, False), kernels.rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        rotated = (None if d is None else ctx.kernels.rotate(d.contiguous(), cos, sin, True) for d in (dq, dk))
        return *rotated, None, None, None


class GatedFunction(torch.autograd.Function):
    """a(gate) * up from one contiguous [..., 2 * inter] tensor (gate, then up) by `kernels`, one kernel each way;
    the gradient comes back in the same layout, so the projection's backward reads it as it is."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, act: int, kernels) -> torch.Tensor:
        ctx.save_for_backward(gu)
        ctx.act, ctx.kernels = act, kernels
        return kernels.gated_fwd(gu, act)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gu,) = ctx.saved_tensors
        return ctx.kernels.gated_bwd(gu, dh.contiguous(), ctx.act), None, None


class AttentionFunction(torch.autograd.Function):
    """Causal attention over packed sequences (attention.varlen_causal on CPU), one kernel each way: q [Nq, H, hd],
    own keys/values [N, Hkv, hd], context keys/values [n_ctx, Hkv, hd] or None, `index` = (key_row, cu_q, cu_k)
    int64 and (max_q, max_k); gradients to q and the own keys/values (context rows are constants)."""

    @staticmethod
    def _run(q, k, v, kc, vc, index, scale, out, lse, dout=None, dk=None, dv=None):
        (key_row, cu_q, cu_k), (max_q, max_k) = index
        extension().attention(
            _ptr(q), _ptr(k), _ptr(v), 0 if kc is None else _ptr(kc), 0 if vc is None else _ptr(vc), _ptr(key_row),
            _ptr(cu_q), _ptr(cu_k), len(cu_q) - 1, 0 if kc is None else len(kc), q.shape[1], k.shape[1], q.shape[2],
            max_q, max_k, scale, _ptr(out), _ptr(lse), 0 if dout is None else _ptr(dout),
            0 if dk is None else _ptr(dk), 0 if dv is None else _ptr(dv), dout is not None, q.dtype == torch.float32)

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, index, scale: float):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32)
        AttentionFunction._run(q, k, v, kc, vc, index, scale, out, lse)
        ctx.save_for_backward(q, k, v, kc, vc, lse)
        ctx.index, ctx.scale = index, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, kc, vc, lse = ctx.saved_tensors
        grad, dq, dk, dv = grad.contiguous(), torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        AttentionFunction._run(q, k, v, kc, vc, ctx.index, ctx.scale, dq, lse, grad, dk, dv)
        return dq, dk, dv, None, None, None, None


FUSED_DTYPES = (torch.bfloat16, torch.float32)  # the C++ kernels'
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def layer_kernels(device: torch.device, dtype: torch.dtype):
    """The norm, rotary and gated kernels for tensors of `device` and `dtype`: CppKernels on CPU where the extension
    is built, TritonKernels where Triton runs (CUDA; CPU only under TRITON_INTERPRET=1 without the extension, as the
    tests run them), else None (the references)."""
    if device.type == "cpu" and extension() is not None:
        return CppKernels if dtype in FUSED_DTYPES else None
    return TritonKernels if dtype in TRITON_DTYPES and kernel_backend.unusable_reason(device) is None else None


def _kernels_for(*tensors: torch.Tensor):
    """layer_kernels for tensors of one device and dtype, else None."""
    t = tensors[0]
    same = all(u.device == t.device and u.dtype == t.dtype for u in tensors)
    return layer_kernels(t.device, t.dtype) if same else None


def fits(*tensors: torch.Tensor) -> bool:
    """Tensors of one device and dtype that the C++ kernels take (the attention kernel's check)."""
    return _kernels_for(*tensors) is CppKernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
    """RMSNorm: the fused kernels where they run (the weight in the input's dtype), else the reference."""
    kernels = _kernels_for(x, weight)
    if kernels is None:
        return rms_norm_ref(x, weight, eps, offset)
    return RMSNormFunction.apply(x.contiguous(), weight.contiguous(), float(eps), int(offset), kernels)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries and keys [B, T, heads, hd] rotated by cos/sin [B or 1, T, hd]: the fused kernels where they run,
    else the reference."""
    kernels = _kernels_for(q, k, cos, sin)
    if kernels is None or q.shape[-1] % 2:
        return rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    shape = (q.shape[0], *cos.shape[1:])
    cos, sin = (t.expand(shape).contiguous() for t in (cos, sin))
    return RotaryFunction.apply(q.contiguous(), k.contiguous(), cos, sin, kernels)


def gated(gu: torch.Tensor, act: int) -> torch.Tensor:
    """a(gate) * up from [..., 2 * inter] (gate, then up): the fused kernels where they run, else the reference."""
    kernels = _kernels_for(gu)
    if kernels is None:
        return gated_ref(gu, act)
    return GatedFunction.apply(gu.contiguous(), act, kernels)


def varlen_attention(q, k, v, context, spec, scale: float, cache: dict) -> torch.Tensor:
    """attention.varlen_causal's arguments through the kernel (CPU, bf16 or fp32; the caller checks `fits`); `cache`
    keeps the pass's int64 index tensors across its layers."""
    if "index" not in cache:
        rows = spec.kv_order if context is not None and spec.kv_order is not None else torch.arange(len(spec.k_slot))
        cache["index"] = (tuple(t.long().contiguous() for t in (rows, spec.cu_q, spec.cu_k)), (spec.max_q, spec.max_k))
    kc, vc = (None, None) if context is None else (c.contiguous() for c in context)
    return AttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), kc, vc, cache["index"], scale)

"""Attention for packed batches and prefix sharing, plugged into the model's own decoder layers.

One function is registered with transformers' AttentionInterface under `tokdistill`; `Decoder.hidden_states`
selects it only for the duration of a call that passes an `Attend` object through the layers' kwargs, so the
attention modules still do their family-specific work (projections, q/k norms, rotary per layer type, scaling)
and only the softmax(QK^T)V step is ours.

Sequences are packed: concatenated without padding into one [1, N] row (cu_seqlens layout), so the matmuls of
every layer run on real tokens only (snippets vary in length and in where their first new token sits: padding
would waste about half the rows). An `Attend` can

* capture each layer's keys/values of the positions before every sequence's first new token (a no-grad pass
  over the student's prefixes, or the teacher's own pass when teacher and student are fused), and
* attend from a pass over the suffixes only (first new token on) to those prefix keys/values plus its own,
  which is exact under causal attention: prefix positions are identical in teacher and student.

Causal attention is aligned bottom-right (a suffix of m queries over n keys sees keys <= n - m + i). It runs in
FlashAttention's varlen kernel on CUDA with half dtypes, in one C++ kernel each way on CPU (csrc/fused.cpp, bf16 or
fp32: at snippet lengths attention is a small share of the FLOPs, but as PyTorch operators it was about a fifth
of a CPU pass), else densely (`DenseAttention`): rows gathered into right-padded blocks, attended in fp32 with an
additive mask and gathered back, forward and backward written out (grouped-query heads share their key/value block
instead of copies of it). Sequences never exceed a sliding window (Decoder checks), so sliding layers are plain
causal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..align import cu_seqlens
from ..control import observed
from . import fused

NAME = "tokdistill"  # the name registered in transformers' AttentionInterface
KWARG = "tokdistill_attn"  # the layer kwarg that carries the Attend object


@dataclass
class Spec:
    """Static description of one packed pass's attention, built on the host before the training loop.

    Sequence b has q_len[b] own rows (queries) and k_len[b] keys: its captured prefix rows (if any) followed by its
    own rows. cu_q/cu_k [B + 1] int32 and max_q/max_k (Python ints: no host sync at run time) feed the varlen
    kernel; q_slot/k_slot [Nq]/[Nk] int64 place rows into right-padded [B, max_q] / [B, max_k] blocks for the
    dense path. kv_order [Nk]: row of cat(captured prefix rows, own rows) for each key in [prefix_b; own_b] order
    (None: no prefix). capture_rows: own rows to capture (None: all).
    """

    max_len: int  # longest sequence attended over (prefix + own part), checked against sliding windows
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_len: torch.Tensor
    k_len: torch.Tensor
    q_slot: torch.Tensor
    k_slot: torch.Tensor
    kv_order: torch.Tensor | None = None
    capture_rows: torch.Tensor | None = None

    @property
    def has_prefix(self) -> bool:
        """Whether this pass attends to captured prefix keys/values."""
        return self.kv_order is not None

    def to(self, device: torch.device) -> Spec:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Spec(**moved)


@dataclass
class Attend:
    """What one decoder call does in attention: optionally record keys/values per layer into `capture`,
    optionally attend to `context` (per-layer prefix keys/values captured by an earlier pass)."""

    spec: Spec
    context: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    kernels: bool = True  # False: the dense PyTorch path only (--backend torch: the references throughout)
    _cache: dict = field(default_factory=dict, repr=False)  # CPU kernel / dense path: index maps, once per pass

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """q [1, H, Nq, hd], k/v [1, Hkv, N, hd] (after rotary) -> [1, Nq, H, hd] as HF attention functions
        return."""
        spec, layer = self.spec, module.layer_idx
        q3, k3, v3 = (x.squeeze(0).transpose(0, 1) for x in (q, k, v))  # [rows, heads, hd]; a view both ways
        if self.capture is not None:
            rows = spec.capture_rows
            self.capture[layer] = (k3, v3) if rows is None else (k3.index_select(0, rows), v3.index_select(0, rows))
        context = self.context[layer] if self.context is not None else None
        return varlen_causal(q3, k3, v3, spec, scaling, self._cache, context, self.kernels).unsqueeze(0)


def select_kv(kv: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor
              ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Rows `rows` of every layer's captured keys and values: the context one pass's snippets attend to."""
    return {layer: (k.index_select(0, rows), v.index_select(0, rows)) for layer, (k, v) in kv.items()}


def dense_mask(q_len: torch.Tensor, k_len: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    """[B, 1, max_q, max_k] bool: query i of sequence b sees keys j < k_len[b] with j <= i + k_len[b] - q_len[b]
    (bottom-right causal). Padding queries see every real key, so no row is empty (no NaN)."""
    i = torch.arange(max_q, device=q_len.device)[None, :, None]
    j = torch.arange(max_k, device=q_len.device)[None, None, :]
    shift = (k_len - q_len)[:, None, None]
    return ((j < k_len[:, None, None]) & (j <= i + shift)).unsqueeze(1)


def repeat_heads(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Grouped-query attention: key/value head h serves query heads h * groups .. (h + 1) * groups - 1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def dispatch(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The registered attention function: ours when the call carries an Attend object, else plain SDPA."""
    attend = kwargs.pop(KWARG, None)
    if attend is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported in packed passes")
    return attend(module, query, key, value, scaling), None


@lru_cache(maxsize=1)
def register() -> str:
    """Register `dispatch` with transformers once; returns the implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, dispatch)
    return NAME


@lru_cache(maxsize=1)
def _varlen_kernel() -> Callable | None:
    """f(q, k, v, cu_q, cu_k, max_q, max_k, scale) running causal varlen flash attention with fewer k/v heads
    allowed: torch's `varlen_attn` (torch >= 2.11; its GQA flag and `window_size` causal form are newer than its
    first release, so the signature is inspected) or flash-attn's `flash_attn_varlen_func`; None without either.
    Both align causal masks bottom-right, per sequence."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        takes_gqa = "enable_gqa" in params

        def run(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            groups = q.shape[1] // k.shape[1]
            gqa = {}
            if groups > 1 and takes_gqa:
                gqa = {"enable_gqa": True}
            elif groups > 1:
                k, v = repeat_heads(k, groups, 1), repeat_heads(v, groups, 1)
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **causal, **gqa)

        return run
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def run_fa(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # flash-attn takes fewer k/v heads natively
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)

    return run_fa


def use_kernel(q: torch.Tensor) -> bool:
    """The varlen flash kernel runs CUDA tensors in half dtypes when one is installed; else the dense path."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None


def implementation(device: torch.device, dtype: torch.dtype) -> str:
    """Which attention packed passes use here (recorded in reports)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None:
        return "flash varlen"
    return "fused" if fused.layer_kernels(device, dtype) is fused.CppKernels else "dense"


def varlen_causal(q, k, v, spec: Spec, scale: float | None, cache: dict | None = None,
                  context: tuple[torch.Tensor, torch.Tensor] | None = None, kernels: bool = True) -> torch.Tensor:
    """Causal attention over packed sequences, bottom-right aligned per sequence: the varlen flash kernel on CUDA
    half dtypes, the C++ kernel on CPU in bf16 or fp32 (fused.varlen_attention), else (or without `kernels`)
    `DenseAttention` on right-padded blocks (`cache` keeps either's index maps across the layers of one pass).
    q [Nq, H, hd]; k/v [Nk, Hkv, hd] in cu_k order, or, with `context` (captured prefix keys and values), the own
    rows whose keys are cat(context, own)[kv_order]. -> [Nq, H, hd]."""
    fast = kernels and use_kernel(q)
    cpu_kernel = kernels and not fast and fused.fits(q, k, v, *(context or ()))
    observed.note("attention", "flash varlen" if fast else "fused" if cpu_kernel else "dense",
                  fallback=None if fast or not kernels or not q.is_cuda or q.dtype not in (torch.bfloat16,
                                                                                           torch.float16) else
                  "no varlen flash kernel (torch >= 2.11 or flash-attn): packed passes attend densely on padded "
                  "blocks, paying for the padding and a mask")
    if fast:
        if context is not None:
            k, v = (torch.cat([c, x]).index_select(0, spec.kv_order) for c, x in zip(context, (k, v), strict=True))
        return _varlen_kernel()(q.contiguous(), k.contiguous(), v.contiguous(), spec.cu_q, spec.cu_k, spec.max_q,
                                spec.max_k, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cache = {} if cache is None else cache
    if cpu_kernel:
        return fused.varlen_attention(q, k, v, context, spec, scale, cache)
    if "maps" not in cache:
        cache["maps"] = BlockMaps.build(spec, q.shape[1] // k.shape[1], 0 if context is None else len(context[0]),
                                        len(k))
    kc, vc = context if context is not None else (None, None)
    return DenseAttention.apply(q, k, v, kc, vc, cache["maps"], scale)


@dataclass
class BlockMaps:
    """Where packed rows sit in the dense path's right-padded blocks, for one pass (all its layers).

    q_src [B * max_q]: the query row of each block slot (Nq: a zero row); q_slot [Nq]: each row's slot.
    k_src [B * max_k]: the row of cat(context, own keys, zero row) in each key slot; own_slot [N own]: each own
    key's slot. bias [B, 1, groups * max_q, max_k] fp32: 0 where a query sees a key, -inf elsewhere (query j * max_q
    + i of a group block is query i of that group's head j; padding queries see every real key, so no row is empty).
    """

    B: int
    groups: int
    max_q: int
    max_k: int
    q_src: torch.Tensor
    q_slot: torch.Tensor
    k_src: torch.Tensor
    own_slot: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def build(cls, spec: Spec, groups: int, n_context: int, n_own: int) -> BlockMaps:
        B, dev = spec.q_len.shape[0], spec.q_slot.device
        nq = len(spec.q_slot)
        q_src = torch.full((B * spec.max_q,), nq, dtype=torch.long, device=dev)
        q_src[spec.q_slot] = torch.arange(nq, device=dev)
        rows = torch.arange(len(spec.k_slot), device=dev) if spec.kv_order is None or not n_context \
            else spec.kv_order  # the row of cat(context, own) holding each key, in cu_k order
        k_src = torch.full((B * spec.max_k,), n_context + n_own, dtype=torch.long, device=dev)
        k_src[spec.k_slot] = rows
        key_of_row = torch.empty_like(rows)
        key_of_row[rows] = torch.arange(len(rows), device=dev)
        own_slot = spec.k_slot[key_of_row[n_context:]]
        allowed = dense_mask(spec.q_len, spec.k_len, spec.max_q, spec.max_k).repeat(1, 1, groups, 1)
        bias = torch.zeros(allowed.shape, device=dev).masked_fill_(~allowed, float("-inf"))
        return cls(B, groups, spec.max_q, spec.max_k, q_src, spec.q_slot, k_src, own_slot, bias)


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous tensor of `dtype`, in one copy."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


class DenseAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v on padded blocks in fp32, forward and backward written out: rows gathered
    into [B, kv heads, groups * max_q | max_k, hd] blocks (grouped-query heads share their key/value block), the
    output gathered back, and gradients for the queries and own keys/values only (context rows are constants)."""

    @staticmethod
    def _blocks(x: torch.Tensor, src: torch.Tensor, B: int, width: int, groups: int) -> torch.Tensor:
        """Rows [N, heads, hd] (last row zero) -> [B, heads // groups, groups * width, hd] fp32."""
        heads, hd = x.shape[1:]
        blocks = x.index_select(0, src).view(B, width, heads // groups, groups, hd).permute(0, 2, 3, 1, 4)
        return _dense(blocks, torch.float32).view(B, heads // groups, -1, hd)

    @staticmethod
    def forward(ctx, q, k, v, kc, vc, maps: BlockMaps, scale: float):
        B, g, mq, mk = maps.B, maps.groups, maps.max_q, maps.max_k

        def keys(x, c):
            zero = x.new_zeros((1,) + x.shape[1:])
            return DenseAttention._blocks(torch.cat([x, zero] if c is None else [c, x, zero]), maps.k_src, B, mk, 1)

        qb = DenseAttention._blocks(torch.cat([q, q.new_zeros((1,) + q.shape[1:])]), maps.q_src, B, mq, g)
        kb, vb = keys(k, kc), keys(v, vc)
        p = torch.softmax(torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale).add_(maps.bias), dim=-1)
        out = torch.matmul(p, vb)  # [B, Hkv, g * mq, hd]
        ctx.save_for_backward(qb, kb, vb, p)
        ctx.maps, ctx.scale, ctx.dtype = maps, scale, q.dtype
        return DenseAttention._rows(out, maps.q_slot, g, mq, q.dtype)

    @staticmethod
    def _rows(blocks: torch.Tensor, slot: torch.Tensor, groups: int, width: int, dtype) -> torch.Tensor:
        """[B, Hkv, groups * width, hd] -> rows [N, Hkv * groups, hd] in `dtype`, taken at `slot`."""
        B, kv_heads, _, hd = blocks.shape
        rows = blocks.view(B, kv_heads, groups, width, hd).permute(0, 3, 1, 2, 4)
        rows = _dense(rows, dtype).view(B * width, kv_heads * groups, hd)
        return rows.index_select(0, slot)

    @staticmethod
    def backward(ctx, grad):
        qb, kb, vb, p = ctx.saved_tensors
        maps, scale, dtype = ctx.maps, ctx.scale, ctx.dtype
        B, g, mq, mk = maps.B, maps.groups, maps.max_q, maps.max_k
        go = DenseAttention._blocks(torch.cat([grad, grad.new_zeros((1,) + grad.shape[1:])]), maps.q_src, B, mq, g)
        dp = torch.matmul(go, vb.transpose(-1, -2))
        dv = torch.matmul(p.transpose(-1, -2), go)
        ds = torch._softmax_backward_data(dp, p, -1, torch.float32).mul_(scale)
        dq = torch.matmul(ds, kb)
        dk = torch.matmul(ds.transpose(-1, -2), qb)
        return (DenseAttention._rows(dq, maps.q_slot, g, mq, dtype),
                DenseAttention._rows(dk, maps.own_slot, 1, mk, dtype),
                DenseAttention._rows(dv, maps.own_slot, 1, mk, dtype), None, None, None, None)


def varlen_causal_ref(q, k, v, cu_q, cu_k, scale: float | None) -> torch.Tensor:
    """Plain-PyTorch definition of varlen causal attention, one sequence at a time (tests; any device, dtype)."""
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)
        ki = repeat_heads(k[cu_k[i]:cu_k[i + 1]], groups, 1).transpose(0, 1)
        vi = repeat_heads(v[cu_k[i]:cu_k[i + 1]], groups, 1).transpose(0, 1)
        m, n = qi.shape[1], ki.shape[1]
        allowed = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + n - m
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(outs)



def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), vectorized. int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.asarray(starts, dtype=np.int64) - cu_seqlens(lengths)[:-1], lengths)
    return offsets + np.arange(total, dtype=np.int64)


def packed_spec(q_len: np.ndarray, prefix_len: np.ndarray | None = None,
                capture_len: np.ndarray | None = None) -> Spec:
    """Packed pass over sequences with q_len[b] own rows each, attending (prefix_len given) to prefix_len[b]
    captured prefix rows first, or capturing (capture_len given) each sequence's first capture_len[b] rows.
    Without any prefix row the pass is plain causal (`has_prefix` False)."""
    q_len = np.asarray(q_len, dtype=np.int64)
    if prefix_len is not None and not np.any(prefix_len):
        prefix_len = None
    k_len = q_len if prefix_len is None else prefix_len + q_len
    B, max_q, max_k = len(q_len), int(q_len.max(initial=0)), int(k_len.max(initial=0))
    cu_q, cu_k = cu_seqlens(q_len), cu_seqlens(k_len)
    seq_q, seq_k = np.repeat(np.arange(B), q_len), np.repeat(np.arange(B), k_len)
    spec = Spec(max_len=max_k, cu_q=torch.from_numpy(cu_q).int(), cu_k=torch.from_numpy(cu_k).int(), max_q=max_q,
                max_k=max_k, q_len=torch.from_numpy(q_len), k_len=torch.from_numpy(k_len),
                q_slot=torch.from_numpy(seq_q * max_q + np.arange(len(seq_q)) - cu_q[seq_q]),
                k_slot=torch.from_numpy(seq_k * max_k + np.arange(len(seq_k)) - cu_k[seq_k]))
    if prefix_len is not None:
        cu_p = cu_seqlens(prefix_len)
        order = np.empty(int(k_len.sum()), dtype=np.int64)
        order[ranges(cu_k[:-1], prefix_len)] = ranges(cu_p[:-1], prefix_len)
        order[ranges(cu_k[:-1] + prefix_len, q_len)] = cu_p[-1] + ranges(cu_q[:-1], q_len)
        spec.kv_order = torch.from_numpy(order)
    if capture_len is not None:
        spec.capture_rows = torch.from_numpy(ranges(cu_q[:-1], capture_len))
    return spec

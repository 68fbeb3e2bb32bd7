"""Attention for prefix sharing and packed batches, plugged into the model's own decoder layers.

One function is registered with transformers' AttentionInterface under `tokdistill`; `Decoder.hidden_states`
selects it only for the duration of a call that passes an `Attend` object through the layers' kwargs, so the
attention modules still do their family-specific work (projections, q/k norms, rotary per layer type, scaling)
and only the softmax(QK^T)V step is ours. An `Attend` can

* capture each layer's keys/values of the positions before every sequence's first new token (a no-grad pass
  over the student's prefixes, or the teacher's own pass when teacher and student are fused), and
* run a pass over the suffixes only (first new token on) that attends to those captured prefix keys/values
  plus its own, which is exact under causal attention: prefix positions are identical in teacher and student.

Two layouts. Padded (every device; the reference for the other): right-padded [B, T] rows, captured prefixes
are the first P = max(p_b) slots, suffix queries see key slot s < p_b (prefix) or P <= s <= P + j (own causal
part) through a boolean mask. Packed (CUDA, bf16/fp16): sequences concatenated without padding ([1, N] rows),
varlen flash attention with cu_seqlens and bottom-right causal alignment, keys of sequence b ordered
[prefix_b; suffix_b]. Sequences never exceed a sliding window (Decoder checks), so sliding layers are plain causal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

NAME = "tokdistill"  # the name registered in transformers' AttentionInterface
KWARG = "tokdistill_attn"  # the layer kwarg that carries the Attend object


@dataclass
class Spec:
    """Static description of one pass's attention, built on the host before the training loop.

    packed: cu_q/cu_k [n + 1] int32 on the device, max_q/max_k as Python ints (no host sync at run time),
    kv_order [sum(p_b + m_b)] int64: row of cat(captured prefix rows, own rows) for each key in [prefix_b;
    suffix_b] order. padded: starts [B] int64 prefix length p_b of each row, prefix_width P.
    capture_rows (packed) selects the rows to capture (None: all); padded captures the first prefix_width slots.
    """

    packed: bool
    max_len: int  # longest sequence attended over (prefix + own part), checked against sliding windows
    prefix_width: int = 0  # padded: P, slots of captured prefix keys (0: no prefix)
    starts: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    kv_order: torch.Tensor | None = None
    capture_rows: torch.Tensor | None = None

    @property
    def has_prefix(self) -> bool:
        """Whether this pass attends to captured prefix keys/values."""
        return self.kv_order is not None or self.starts is not None

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
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def __call__(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None):
        """q [B, H, T, hd], k/v [B, Hkv, T, hd] (after rotary) -> [B, T, H, hd] as HF attention functions return."""
        layer = module.layer_idx
        if self.spec.packed:
            return self._packed(layer, q, k, v, scaling)
        if self.capture is not None:
            P = self.spec.prefix_width
            self.capture[layer] = (k[:, :, :P], v[:, :, :P])
        if self.context is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, q, k, v, None, scaling=scaling)[0]
        kc, vc = self.context[layer]
        groups = q.shape[1] // k.shape[1]
        k = repeat_heads(torch.cat([kc, k], dim=2), groups, dim=1)
        v = repeat_heads(torch.cat([vc, v], dim=2), groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q.shape[2]), scale=scaling)
        return out.transpose(1, 2)

    def mask(self, M: int) -> torch.Tensor:
        """[B, 1, M, P + M] bool: suffix query j of row b sees prefix slots s < p_b and own slots P..P + j."""
        if self._mask is None:
            P, starts = self.spec.prefix_width, self.spec.starts
            s = torch.arange(P + M, device=starts.device)
            j = torch.arange(M, device=starts.device)
            prefix = (s[None, None, :] < starts[:, None, None]) & (s < P)[None, None, :]
            own = (s[None, :] >= P) & (s[None, :] - P <= j[:, None])
            self._mask = (prefix | own[None]).unsqueeze(1)
        return self._mask

    def _packed(self, layer: int, q, k, v, scaling):
        spec = self.spec
        q3, k3, v3 = (x[0].transpose(0, 1) for x in (q, k, v))  # [N, heads, hd]
        if self.capture is not None:
            keep = (lambda x: x) if spec.capture_rows is None else (lambda x: x.index_select(0, spec.capture_rows))
            self.capture[layer] = (keep(k3), keep(v3))
        if self.context is not None:
            kc, vc = self.context[layer]
            k3 = torch.cat([kc, k3]).index_select(0, spec.kv_order)
            v3 = torch.cat([vc, v3]).index_select(0, spec.kv_order)
        out = varlen_causal(q3.contiguous(), k3.contiguous(), v3.contiguous(), spec.cu_q, spec.cu_k, spec.max_q,
                            spec.max_k, scaling)
        return out.unsqueeze(0)


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
        raise NotImplementedError("attention logit soft-capping is not supported with prefix sharing")
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
    first release, so the signature is inspected) or flash-attn's `flash_attn_varlen_func`; None without either."""
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


def packed_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Packed (varlen) passes need CUDA, a half dtype (flash kernels) and a varlen kernel."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None


def varlen_causal(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float | None) -> torch.Tensor:
    """Causal attention over packed sequences, aligned bottom-right (query i of a sequence with m queries and
    n keys sees keys <= n - m + i). q [Nq, H, hd], k/v [Nk, Hkv, hd] -> [Nq, H, hd]."""
    return _varlen_kernel()(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def varlen_causal_ref(q, k, v, cu_q, cu_k, scale: float | None) -> torch.Tensor:
    """Plain-PyTorch definition of `varlen_causal`, one sequence at a time (tests; any device and dtype)."""
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


def cu(lengths: np.ndarray) -> np.ndarray:
    """cu_seqlens of `lengths`: [0, l0, l0 + l1, ...] int64."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), vectorized. int64."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - cu(lengths)[:-1], lengths)
    return offsets + np.arange(total, dtype=np.int64)


def packed_spec(q_len: np.ndarray, prefix_len: np.ndarray | None = None, capture_len: np.ndarray | None = None,
                ) -> Spec:
    """Packed pass over sequences with q_len[b] own tokens each, attending (prefix_len given) to prefix_len[b]
    captured prefix rows first, or capturing (capture_len given) each sequence's first capture_len[b] rows.
    Without any prefix token the pass is plain causal (`has_prefix` False)."""
    if prefix_len is not None and not prefix_len.any():
        prefix_len = None
    cu_q = cu(q_len)
    k_len = q_len if prefix_len is None else prefix_len + q_len
    spec = Spec(packed=True, max_len=int(k_len.max(initial=0)), cu_q=torch.from_numpy(cu_q).int(),
                cu_k=torch.from_numpy(cu(k_len)).int(), max_q=int(q_len.max(initial=0)),
                max_k=int(k_len.max(initial=0)))
    if prefix_len is not None:
        cu_p = cu(prefix_len)
        order = np.empty(int(k_len.sum()), dtype=np.int64)
        key_start = cu(k_len)[:-1]
        order[ranges(key_start, prefix_len)] = ranges(cu_p[:-1], prefix_len)
        order[ranges(key_start + prefix_len, q_len)] = cu_p[-1] + ranges(cu_q[:-1], q_len)
        spec.kv_order = torch.from_numpy(order)
    if capture_len is not None:
        spec.capture_rows = torch.from_numpy(ranges(cu_q[:-1], capture_len))
    return spec


def padded_spec(q_len: np.ndarray, prefix_len: np.ndarray | None = None, capture_width: int = 0) -> Spec:
    """Padded pass over rows with q_len[b] own tokens, attending to captured prefixes of prefix_len[b] tokens
    (kept in max(prefix_len) slots), or capturing the first capture_width slots of every row."""
    if prefix_len is None or not prefix_len.any():
        return Spec(packed=False, max_len=int(q_len.max(initial=0)), prefix_width=capture_width)
    return Spec(packed=False, max_len=int((prefix_len + q_len).max()), prefix_width=int(prefix_len.max()),
                starts=torch.from_numpy(prefix_len.astype(np.int64)))

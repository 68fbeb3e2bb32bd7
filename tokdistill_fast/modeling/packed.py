"""The fast path of the frozen model's decoder layers: on CPU, linears with their weights prepacked for oneDNN
(bf16); on CPU and GPU, the fused norms, rotary embeddings and gated activations of fused.py, with q/k/v and
gate/up as one product each.

A bf16 `F.linear` on CPU runs oneDNN, which reorders the weight into its blocked (AMX / AVX-512-BF16) layout on
every call; at the student's pass sizes (about 120 rows) that costs a third of the product (SmolLM2's 576 x 1536:
208 against 142 us, forward and backward alike, on a 2-core Xeon with AMX). The model is frozen, so each weight is
packed once: W for forward, and W^T for the input gradient (dX = dY W) of passes that need one. The forward is
bit-identical to `F.linear`; the input gradient equals autograd's up to the summation order of some shapes.
`Packs.active` swaps the packed forward into a decoder call's linear layers, and the fused kernels into its norms,
attention modules and MLPs (the forwards below, which call fused.py's kernels and take their input projections as
one product: q/k/v and gate/up), and restores them after it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..control import observed
from ..kernels import backend as kernel_backend
from . import attention, fused
from .fused import gated, rms_norm, rotary

# Hugging Face norm classes and how each applies its weight: 0 rounds the normalized row to the input dtype and
# multiplies by w there (Llama family); 1 multiplies by (1 + w) in fp32 and rounds once (Gemma).
NORMS = {"LlamaRMSNorm": 0, "Qwen2RMSNorm": 0, "Qwen3RMSNorm": 0, "MistralRMSNorm": 0, "Gemma3RMSNorm": 1}
# Attention classes whose forward is project, (q/k norms,) rotate, attend, project: `attention_forward` runs it.
ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention", "Gemma3Attention")
# Gated MLP classes (down(a(gate(x)) * up(x))) and their activations, by the class of their act_fn: 0 SiLU, 1 GELU
# with the tanh approximation.
MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Gemma3MLP")
ACTIVATIONS = {"SiLUActivation": 0, "SiLU": 0, "GELUTanh": 1, "PytorchGELUTanh": 1}

# project(linears) -> f(x): the outputs of linears that read the same input, side by side, as one product.
Project = Callable[[tuple[nn.Linear, ...]], Callable[[torch.Tensor], torch.Tensor]]

PACK_ROWS = 128  # oneDNN's row-count hint for the packed layout (a pass's size; any row count runs)
MAX_PACK_BYTES = 2 << 30  # packs of larger models would double a CPU run's weight memory past this: not packed


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W and W^T prepacked; gradient to x only (frozen weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, packed_t: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.packed_t = packed_t
        return _linear(x.contiguous(), packed, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _linear(grad.contiguous(), ctx.packed_t, None), None, None, None


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU bf16 where oneDNN runs bf16 products (fp32 runs MKL's sgemm, which has no per-call reorder to save)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def copy_fits(weights: list[torch.Tensor]) -> bool:
    """Whether a second copy of the layers' linear weights fits: within MAX_PACK_BYTES of doubled weights on a CPU,
    within a quarter of the free memory on a GPU (Llama-3.1-8B's 14 GB of layers: 56 GB free, as on an 80 GB card
    that holds the model)."""
    size = sum(w.numel() * w.element_size() for w in weights)
    if weights[0].device.type == "cuda":
        return 4 * size <= torch.cuda.mem_get_info(weights[0].device)[0]
    return 2 * size <= MAX_PACK_BYTES


class Packs:
    """The fast path of a model's decoder layers: packed weights of their linears (CPU bf16), built on first use
    (forward packs per layer called, gradient packs per layer a pass with a gradient runs through), and the fused
    forwards of their norms, attention modules and MLPs (fused.py's C++ kernels on CPU, Triton on GPU), whose input
    projections run as one product over concatenated weights. `enabled` False: neither."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.fwd: dict = {}  # linear or tuple of linears -> packed W (or, unpacked, the concatenated W)
        self.bwd: dict = {}  # the same -> packed W^T
        self.swaps: dict[tuple[int, bool], list] = {}
        weights = [m.weight for m in layers.modules() if isinstance(m, nn.Linear)]
        frozen = bool(weights) and not any(w.requires_grad for w in weights)
        self.copies = frozen and copy_fits(weights)
        self.pack = self.copies and supported(weights[0].device, weights[0].dtype)
        kernels = fused.layer_kernels(weights[0].device, weights[0].dtype) if frozen else None
        self.fuse = kernels is not None
        self.enabled = self.pack or self.fuse
        # what the layers' norms, rotations and activations run, for reports
        self.kernel_impl = "torch" if kernels is None else kernels.name
        self.fallback = None if not frozen or self.fuse else slow_layers(weights[0].device, weights[0].dtype)

    def _product(self, key, weight, bias: torch.Tensor | None, grad: bool):
        """x -> x W^T + b for W = weight() (a callable: built at first use and kept under `key`), packed where
        `pack`, else F.linear."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            if key not in self.fwd:
                self.fwd[key] = _pack(weight()) if self.pack else weight()
            if not self.pack:
                return F.linear(x, self.fwd[key], bias)
            if not (grad and x.requires_grad):
                return _linear(x.contiguous(), self.fwd[key], bias)
            if key not in self.bwd:
                self.bwd[key] = _pack(weight().t())
            return PackedLinearFunction.apply(x, self.fwd[key], self.bwd[key], bias)

        return forward

    def _project(self, linears: tuple[nn.Linear, ...], grad: bool):
        """x -> the outputs of `linears` (one input) side by side, as one product over their concatenated weights
        (Project); as separate products where no copy of the weights fits."""
        if not self.copies:
            return lambda x: torch.cat([m(x) for m in linears], dim=-1)
        bias = None if all(m.bias is None for m in linears) else torch.cat(
            [m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
        return self._product(linears, lambda: torch.cat([m.weight for m in linears]), bias, grad)

    def _swap(self, m: nn.Module, grad: bool):
        """The fast forward of module m, or None."""
        if isinstance(m, nn.Linear):
            return self._product(m, lambda: m.weight, m.bias, grad) if self.pack else None
        return fused_forward(m, lambda linears: self._project(linears, grad)) if self.fuse else None

    @contextmanager
    def active(self, upto: int):
        """Within the block, the linears of layers [0, upto) run packed (bf16) and their supported norms,
        attention modules and MLPs fused (bf16 or fp32, fused.py); a no-op where neither applies."""
        key = (upto, torch.is_grad_enabled())
        if self.enabled and key not in self.swaps:  # built once per depth and grad mode: the modules never change
            self.swaps[key] = [(m, forward) for layer in self.layers[:upto] for m in layer.modules()
                               if (forward := self._swap(m, key[1])) is not None]
        swapped = self.swaps[key] if self.enabled else []
        # the kernels ran only where a family's norms, attention or MLP were swapped (Phi-3's are not: linears only)
        fused_here = any(not isinstance(m, nn.Linear) for m, _ in swapped)
        observed.note("layers", self.kernel_impl if fused_here else "torch", fallback=self.fallback)
        if not swapped:
            yield
            return
        swaps = [(m, m.__dict__.get("forward"), forward) for m, forward in swapped]
        for m, _, forward in swaps:  # an instance's own forward (hooks) is kept and put back
            m.forward = forward
        try:
            yield
        finally:
            for m, before, _ in swaps:
                if before is None:
                    del m.forward
                else:
                    m.forward = before


def slow_layers(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the layers run the Hugging Face modules where kernels were expected there, and what it costs (a warning
    once per run), or None where no kernel covers the device and dtype: Triton on CUDA, the C++ extension on a CPU."""
    if device.type == "cuda":
        return (f"the decoder layers run the Hugging Face modules on CUDA (Triton kernels unusable: "
                f"{kernel_backend.unusable_reason(device)}): about twice the kernel launches a layer")
    if device.type == "cpu" and dtype in fused.FUSED_DTYPES and fused.extension() is None:
        return (f"C++ layer kernels {fused.missing()}: the decoder layers' norms, rotations, activations and "
                "attention run the Hugging Face modules, the student stage about 1.5x slower (SmolLM2, bf16); "
                "reinstall with a C++17 compiler and TOKDISTILL_REQUIRE_EXT=1")
    return None


def attention_forward(m: nn.Module, project: Project):
    """The forward of a Llama-, Qwen- or Gemma-3-style attention module m: the q/k/v projections as one product,
    the q/k norms where the family has them, the fused rotation, the model's attention function (ours for packed
    passes, see attention.py), the output projection."""
    qkv = project((m.q_proj, m.k_proj, m.v_proj))
    sizes = [m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features]
    # as each family passes it: the module's (Qwen, Gemma-3) or the config's (Mistral); masks carry it for SDPA
    window = getattr(m, "sliding_window", getattr(getattr(m, "config", None), "sliding_window", None))

    def forward(hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs):
        for unused in ("position_ids", "cache", "past_key_values", "use_cache", "cache_position"):
            kwargs.pop(unused, None)
        shape = (*hidden_states.shape[:-1], -1, m.head_dim)
        q, k, v = (t.view(shape) for t in qkv(hidden_states).split(sizes, dim=-1))
        if hasattr(m, "q_norm"):
            q, k = m.q_norm(q), m.k_norm(k)
        q, k = rotary(q, k, *position_embeddings)
        out, weights = attention.dispatch(m, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attention_mask, scaling=m.scaling, dropout=0.0, sliding_window=window,
                                          **kwargs)
        return m.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    return forward


def mlp_forward(m: nn.Module, project: Project):
    """The forward of a gated MLP m: gate and up as one product, the fused activation, the down projection."""
    gate_up, act = project((m.gate_proj, m.up_proj)), ACTIVATIONS[type(m.act_fn).__name__]
    return lambda x: m.down_proj(gated(gate_up(x), act))


def fused_forward(m: nn.Module, project: Project):
    """A fused replacement for module m's forward (a supported norm, attention or MLP), or None."""
    name = type(m).__name__
    if name in NORMS:
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if eps is None or not hasattr(m, "weight"):
            return None
        return lambda x: rms_norm(x, m.weight, float(eps), NORMS[name])
    if name in ATTENTIONS:
        return attention_forward(m, project)
    if name in MLPS and type(getattr(m, "act_fn", None)).__name__ in ACTIVATIONS:
        return mlp_forward(m, project)
    return None

"""The fast path of the frozen model's decoder layers: on CPU, linears with their weights prepacked for oneDNN
(bf16); on CPU and GPU, the fused norms, rotary embeddings and gated activations of fused.py, with q/k/v and
gate/up as one product each.

A bf16 `F.linear` on CPU runs oneDNN, which reorders the weight into its blocked (AMX / AVX-512-BF16) layout on
every call; at the student's pass sizes (about 120 rows) that costs a third of the product (SmolLM2's 576 x 1536:
208 against 142 us, forward and backward alike, on a 2-core Xeon with AMX). The model is frozen, so each weight is
packed once: W for forward, and W^T for the input gradient (dX = dY W) of passes that need one. The forward is
bit-identical to `F.linear`; the input gradient equals autograd's up to the summation order of some shapes.
`Packs.active` swaps the packed forward into a decoder call's linear layers, and the fused kernels into its norms,
attention modules and MLPs (fused.py; their input projections as one product: q/k/v and gate/up), and restores
them after it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..control import observed
from ..kernels import backend as kernel_backend
from . import fused

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
    forwards of their norms, attention modules and MLPs (fused.py: C++ kernels on CPU, Triton on GPU), whose input
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
        # what the layers' norms, rotations and activations run, for reports; on CUDA without Triton, a slow path
        self.kernel_impl = "torch" if kernels is None else kernels.name
        self.fallback = None if not frozen or self.fuse or weights[0].device.type != "cuda" else (
            "the decoder layers run the Hugging Face modules on CUDA (Triton kernels unusable: "
            f"{kernel_backend.unusable_reason(weights[0].device)}): about twice the kernel launches a layer")

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
        (fused.Project); as separate products where no copy of the weights fits."""
        if not self.copies:
            return lambda x: torch.cat([m(x) for m in linears], dim=-1)
        bias = None if all(m.bias is None for m in linears) else torch.cat(
            [m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
        return self._product(linears, lambda: torch.cat([m.weight for m in linears]), bias, grad)

    def _swap(self, m: nn.Module, grad: bool):
        """The fast forward of module m, or None."""
        if isinstance(m, nn.Linear):
            return self._product(m, lambda: m.weight, m.bias, grad) if self.pack else None
        return fused.fused_forward(m, lambda linears: self._project(linears, grad)) if self.fuse else None

    @contextmanager
    def active(self, upto: int):
        """Within the block, the linears of layers [0, upto) run packed (bf16) and their supported norms,
        attention modules and MLPs fused (bf16 or fp32, fused.py); a no-op where neither applies."""
        observed.note("layers", self.kernel_impl if self.enabled else "torch", fallback=self.fallback)
        if not self.enabled:
            yield
            return
        key = (upto, torch.is_grad_enabled())
        if key not in self.swaps:  # built once per depth and grad mode: the modules never change
            self.swaps[key] = [(m, forward) for layer in self.layers[:upto] for m in layer.modules()
                               if (forward := self._swap(m, key[1])) is not None]
        swaps = [(m, m.__dict__.get("forward"), forward) for m, forward in self.swaps[key]]
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

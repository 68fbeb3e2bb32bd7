"""The CPU fast path of the frozen model: the prepacked linears against F.linear, when the fast path is on, and a
pass without room for weight copies against the plain pass (the fused kernels themselves: test_kernels_layers.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import hidden_and_grad, tiny_config
from transformers import AutoModelForCausalLM

from tokdistill_fast.modeling import fused, packed
from tokdistill_fast.modeling.models import Decoder

needs_ext = pytest.mark.skipif(fused.extension() is None, reason="the fused C++ extension is not built")
needs_packs = pytest.mark.skipif(not packed.supported(torch.device("cpu"), torch.bfloat16),
                                 reason="oneDNN runs no bf16 products on this CPU")


@needs_packs
@pytest.mark.parametrize("rows,d_in,d_out", [(118, 576, 1536), (5, 64, 128), (300, 128, 64)])
def test_packed_linear_matches_f_linear(rows, d_in, d_out):
    """Forward bit-identical to F.linear; the input gradient as autograd's up to bf16 rounding."""
    torch.manual_seed(0)
    w = (torch.randn(d_out, d_in) * d_in ** -0.5).to(torch.bfloat16)
    b = torch.randn(d_out).to(torch.bfloat16)
    x = torch.randn(1, rows, d_in).to(torch.bfloat16).requires_grad_()
    ref = F.linear(x, w, b)
    ours = packed.PackedLinearFunction.apply(x, packed._pack(w), packed._pack(w.t()), b)
    assert torch.equal(ours, ref)
    g = torch.randn_like(ref)
    (d_ours,), (d_ref,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(d_ours, d_ref, rtol=1.6e-2, atol=1e-2)


def test_fast_path_stays_off_for_trainable_weights_and_packs_bf16_only():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32).eval()
    assert not Decoder(model).packs.enabled  # weights still require grad: not a frozen model
    packs = Decoder(model.requires_grad_(False)).packs
    assert not packs.pack and packs.fuse == (fused.layer_kernels(torch.device("cpu"), torch.float32) is not None)


@needs_ext
def test_fast_path_without_room_for_weight_copies_keeps_the_kernels(monkeypatch):
    """Layers too large for a second copy of their weights: no packs, no concatenated projections (separate products
    joined), the kernels still run, and the pass matches the plain one."""
    monkeypatch.setattr(packed, "MAX_PACK_BYTES", 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32).eval()
    dec = Decoder(model.requires_grad_(False))
    assert dec.packs.fuse and not dec.packs.copies and not dec.packs.pack
    h0 = dec.embed(torch.randint(0, 300, (2, 9)))
    fast = hidden_and_grad(dec, h0, 3)
    assert not dec.packs.fwd  # nothing copied
    dec.packs.enabled = False
    for a, b in zip(fast, hidden_and_grad(dec, h0, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())

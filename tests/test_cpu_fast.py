"""The CPU fast path of the frozen model: the fused RMSNorm and rotary kernels (C++) against their PyTorch
references, the prepacked linears against F.linear, and decoder passes with them against the same passes without."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_as_reference, tiny_config
from transformers import AutoModelForCausalLM

from tokdistill_fast.modeling import fused, packed
from tokdistill_fast.modeling.models import Decoder

needs_ext = pytest.mark.skipif(fused.extension() is None, reason="the fused C++ extension is not built")
needs_packs = pytest.mark.skipif(not packed.supported(torch.device("cpu"), torch.bfloat16),
                                 reason="oneDNN runs no bf16 products on this CPU")


def rms_norm_gold(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
    """RMSNorm in float64 without intermediate rounding."""
    x, w = x.double(), weight.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + w if offset else w)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", [(118, 576), (2, 7, 64), (1, 3, 4, 16)])
def test_fused_rms_norm_matches_reference(offset, shape, dtype):
    """Values and input gradients of the C++ kernel, Llama-style (0) and Gemma-style (1) weights."""
    torch.manual_seed(offset)
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    w = (torch.randn(shape[-1]) * 0.5).to(dtype)
    x64 = x.detach().double().requires_grad_()
    ours, same = fused.rms_norm(x, w, 1e-6, offset), fused.rms_norm_ref(x, w, 1e-6, offset)
    gold = rms_norm_gold(x64, w, 1e-6, offset)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert_close_as_reference(ours, same, gold, floor=1e-3)
    g = torch.randn(shape).to(dtype)
    (d_ours,), (d_same,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(same, x, g)
    (d_gold,) = torch.autograd.grad(gold, x64, g.double())
    assert_close_as_reference(d_ours, d_same, d_gold, floor=1e-3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 9, 3), (2, 4, 4)])
def test_fused_rotary_matches_reference(batch, heads, kv_heads, dtype):
    """Queries' and keys' rotations and their gradients: the kernels round where autograd's operators do."""
    torch.manual_seed(heads)
    T, hd = 13, 16
    q = torch.randn(batch, T, heads, hd).to(dtype).requires_grad_()
    k = torch.randn(batch, T, kv_heads, hd).to(dtype).requires_grad_()
    angle = torch.randn(1, T, hd // 2)
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    ours = fused.rotary(q, k, cos, sin)
    same = fused.rotary_ref(q, cos, sin), fused.rotary_ref(k, cos, sin)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    gold = fused.rotary_ref(q64, cos.double(), sin.double()), fused.rotary_ref(k64, cos.double(), sin.double())
    for a, b, c in zip(ours, same, gold, strict=True):
        assert_close_as_reference(a, b, c, floor=1e-3)
    g = [torch.randn_like(x) for x in ours]
    d_ours, d_same = torch.autograd.grad(ours, (q, k), g), torch.autograd.grad(same, (q, k), g)
    d_gold = torch.autograd.grad(gold, (q64, k64), [x.double() for x in g])
    for a, b, c in zip(d_ours, d_same, d_gold, strict=True):
        assert_close_as_reference(a, b, c, floor=1e-3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("rows,inter", [(118, 1536), (3, 40)])
def test_fused_gated_activation_matches_reference(act, rows, inter, dtype):
    """SiLU (0) and tanh-GELU (1) gates times up, values and gradients to both halves, against the Hugging Face
    math in the same dtype and in float64."""
    torch.manual_seed(act)
    gu = (torch.randn(rows, 2 * inter) * 3).to(dtype).requires_grad_()
    gu64 = gu.detach().double().requires_grad_()
    ours, same, gold = fused.gated(gu, act), fused.gated_ref(gu, act), fused.gated_ref(gu64, act)
    assert ours.dtype == dtype and ours.shape == (rows, inter)
    assert_close_as_reference(ours, same, gold, floor=1e-3)
    g = torch.randn(rows, inter).to(dtype)
    (d_ours,), (d_same,) = torch.autograd.grad(ours, gu, g), torch.autograd.grad(same, gu, g)
    (d_gold,) = torch.autograd.grad(gold, gu64, g.double())
    for half in (slice(0, inter), slice(inter, None)):  # the gate's and up's gradients, each at its own scale
        assert_close_as_reference(d_ours[:, half], d_same[:, half], d_gold[:, half], floor=1e-3)


def test_fused_kernels_fall_back_to_the_references_where_they_do_not_run():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.equal(fused.rms_norm(x, w, 1e-6, 0), fused.rms_norm_ref(x, w, 1e-6, 0))
    q, cos = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 8, dtype=torch.float64)
    assert torch.equal(fused.rotary(q, q, cos, cos)[0], fused.rotary_ref(q, cos, cos))
    assert torch.equal(fused.gated(x, 1), fused.gated_ref(x, 1))


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


def hidden_and_grad(dec: Decoder, h0: torch.Tensor, layer: int):
    h = h0.clone().requires_grad_()
    out = dec.hidden_states(h, [layer])[layer]
    (grad,) = torch.autograd.grad(out.float().pow(2).sum(), h)
    return out, grad


@needs_ext
@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("gemma3", torch.bfloat16),
                                          ("llama", torch.float32), ("qwen2", torch.float32)])
def test_decoder_fast_path_matches_plain_pass_and_restores_modules(family, dtype):
    """A decoder pass with packed linears (bf16), q/k/v and gate/up as one product each, and fused norms,
    rotations and activations matches the plain pass (values and gradients up to rounding), and leaves every
    module's forward as it was."""
    if dtype == torch.bfloat16 and not packed.supported(torch.device("cpu"), dtype):
        pytest.skip("oneDNN runs no bf16 products on this CPU")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 300), dtype=dtype).eval()
    model.requires_grad_(False)
    dec = Decoder(model)
    assert dec.packs.enabled and dec.packs.fuse and dec.packs.pack == (dtype == torch.bfloat16)
    linear = model.model.layers[0].mlp.down_proj
    hooked = linear.forward  # an instance-level forward (as hooks install) survives the swap
    linear.forward = lambda x: hooked(x)
    kept = linear.forward
    h0 = dec.embed(torch.randint(0, 300, (2, 9)))
    fast = hidden_and_grad(dec, h0, 3)
    assert sum(isinstance(key, tuple) for key in dec.packs.fwd) == 2 * 3  # q/k/v and gate/up of 3 layers
    assert linear.forward is kept
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not linear)
    dec.packs.enabled = False
    plain = hidden_and_grad(dec, h0, 3)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_fast_path_stays_off_for_trainable_weights_and_packs_bf16_only():
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300), dtype=torch.float32).eval()
    assert not Decoder(model).packs.enabled  # weights still require grad: not a frozen model
    packs = Decoder(model.requires_grad_(False)).packs
    assert not packs.pack and packs.fuse == (fused.extension() is not None)


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

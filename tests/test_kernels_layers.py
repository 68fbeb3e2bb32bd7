"""The fused layer kernels (RMSNorm, rotary embedding, gated activation) by both implementations: csrc/fused.cpp's
on CPU and the Triton kernels of kernels/ (on a GPU, or interpreted on CPU under `make test-interpret`), each
against the Hugging Face math in the same dtype and in float64, values and input gradients; and decoder passes
through them against the plain pass."""

import pytest
import torch
from conftest import assert_close_as_reference, hidden_and_grad, tiny_config
from kernel_checks import DEVICE, needs_kernels
from transformers import AutoModelForCausalLM

from tokdistill_fast.modeling import fused, packed
from tokdistill_fast.modeling.models import Decoder

needs_ext = pytest.mark.skipif(fused.extension() is None, reason="the fused C++ extension is not built")
IMPLS = [pytest.param("cpp", marks=needs_ext), pytest.param("triton", marks=needs_kernels)]


@pytest.fixture
def device(request, monkeypatch) -> torch.device:
    """The device the implementation `request.param` runs on; fused.py's dispatch made to pick it there."""
    kernels = fused.CppKernels if request.param == "cpp" else fused.TritonKernels
    monkeypatch.setattr(fused, "layer_kernels", lambda device, dtype: kernels)
    return torch.device("cpu") if request.param == "cpp" else DEVICE


def rms_norm_gold(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: int) -> torch.Tensor:
    """RMSNorm in float64 without intermediate rounding."""
    x, w = x.double(), weight.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + w if offset else w)


@pytest.mark.parametrize("device", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", [(118, 576), (2, 7, 64), (1, 3, 4, 16)])
def test_rms_norm_matches_reference(device, offset, shape, dtype):
    """Values and input gradients, Llama-style (0) and Gemma-style (1) weights."""
    torch.manual_seed(offset)
    x = (torch.randn(shape) * 3).to(device, dtype).requires_grad_()
    w = (torch.randn(shape[-1]) * 0.5).to(device, dtype)
    x64 = x.detach().double().requires_grad_()
    ours, same = fused.rms_norm(x, w, 1e-6, offset), fused.rms_norm_ref(x, w, 1e-6, offset)
    gold = rms_norm_gold(x64, w, 1e-6, offset)
    assert ours.dtype == dtype and ours.shape == x.shape and type(ours.grad_fn).__name__ == "RMSNormFunctionBackward"
    assert_close_as_reference(ours, same, gold, floor=1e-3)
    g = torch.randn(shape).to(device, dtype)
    (d_ours,), (d_same,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(same, x, g)
    (d_gold,) = torch.autograd.grad(gold, x64, g.double())
    assert_close_as_reference(d_ours, d_same, d_gold, floor=1e-3)


@pytest.mark.parametrize("device", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,heads,kv_heads,hd", [(1, 9, 3, 16), (2, 4, 4, 20)])
def test_rotary_matches_reference(device, batch, heads, kv_heads, hd, dtype):
    """Queries' and keys' rotations and their gradients (head sizes whose halves are and are not powers of two): the
    kernels round where autograd's operators do."""
    torch.manual_seed(heads)
    T = 13
    q = torch.randn(batch, T, heads, hd).to(device, dtype).requires_grad_()
    k = torch.randn(batch, T, kv_heads, hd).to(device, dtype).requires_grad_()
    angle = torch.randn(1, T, hd // 2)
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin))
    ours = fused.rotary(q, k, cos, sin)
    assert type(ours[0].grad_fn).__name__ == "RotaryFunctionBackward"
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


@pytest.mark.parametrize("device", IMPLS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("rows,inter", [(118, 1536), (3, 40)])
def test_gated_activation_matches_reference(device, act, rows, inter, dtype):
    """SiLU (0) and tanh-GELU (1) gates times up, values and gradients to both halves, against the Hugging Face
    math in the same dtype and in float64."""
    torch.manual_seed(act)
    gu = (torch.randn(rows, 2 * inter) * 3).to(device, dtype).requires_grad_()
    gu64 = gu.detach().double().requires_grad_()
    ours, same, gold = fused.gated(gu, act), fused.gated_ref(gu, act), fused.gated_ref(gu64, act)
    assert ours.dtype == dtype and ours.shape == (rows, inter)
    assert type(ours.grad_fn).__name__ == "GatedFunctionBackward"
    assert_close_as_reference(ours, same, gold, floor=1e-3)
    g = torch.randn(rows, inter).to(device, dtype)
    (d_ours,), (d_same,) = torch.autograd.grad(ours, gu, g), torch.autograd.grad(same, gu, g)
    (d_gold,) = torch.autograd.grad(gold, gu64, g.double())
    for half in (slice(0, inter), slice(inter, None)):  # the gate's and up's gradients, each at its own scale
        assert_close_as_reference(d_ours[:, half], d_same[:, half], d_gold[:, half], floor=1e-3)


def test_layer_kernels_by_device_and_dtype():
    """C++ on CPU where built, Triton on CUDA (and interpreted on CPU without the extension), else the references."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = fused.CppKernels if fused.extension() is not None else (
        fused.TritonKernels if fused.kernel_backend.unusable_reason(cpu) is None else None)
    assert fused.layer_kernels(cpu, torch.bfloat16) is on_cpu
    triton = fused.kernel_backend.triton is not None
    assert fused.layer_kernels(cuda, torch.bfloat16) is (fused.TritonKernels if triton else None)
    assert fused.layer_kernels(cuda, torch.float16) is (fused.TritonKernels if triton else None)
    assert fused.layer_kernels(cuda, torch.float64) is None


def test_kernels_fall_back_to_the_references_where_they_do_not_run():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert fused.layer_kernels(x.device, x.dtype) is None
    assert torch.equal(fused.rms_norm(x, w, 1e-6, 0), fused.rms_norm_ref(x, w, 1e-6, 0))
    q, cos = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 8, dtype=torch.float64)
    assert torch.equal(fused.rotary(q, q, cos, cos)[0], fused.rotary_ref(q, cos, cos))
    assert torch.equal(fused.gated(x, 1), fused.gated_ref(x, 1))


@pytest.mark.parametrize("device", IMPLS, indirect=True)
@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("gemma3", torch.bfloat16),
                                          ("llama", torch.float32), ("qwen2", torch.float32)])
def test_decoder_fast_path_matches_plain_pass_and_restores_modules(device, family, dtype):
    """A decoder pass with q/k/v and gate/up as one product each, fused norms, rotations and activations (and on
    CPU packed bf16 linears) matches the plain pass (values and gradients up to rounding), and leaves every
    module's forward as it was."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 300), dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    dec = Decoder(model)
    assert dec.packs.enabled and dec.packs.fuse
    assert dec.packs.pack == packed.supported(device, dtype)
    linear = model.model.layers[0].mlp.down_proj
    hooked = linear.forward  # an instance-level forward (as hooks install) survives the swap
    linear.forward = lambda x: hooked(x)
    kept = linear.forward
    h0 = dec.embed(torch.randint(0, 300, (2, 9), device=device))
    fast = hidden_and_grad(dec, h0, 3)
    assert sum(isinstance(key, tuple) for key in dec.packs.fwd) == 2 * 3  # q/k/v and gate/up of 3 layers
    assert linear.forward is kept
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not linear)
    dec.packs.enabled = False
    plain = hidden_and_grad(dec, h0, 3)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())

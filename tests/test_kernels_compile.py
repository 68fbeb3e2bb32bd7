"""Every kernel compiles for an H100 (sm_90) down to a cubin, on this machine without a GPU: the interpreter runs
the kernels' Python, this checks the code path a GPU takes (typing, constexpr branches, the bf16 rounding cast).
Uses the ptxas that ships inside the triton wheel; needs triton and no TRITON_INTERPRET."""

from __future__ import annotations

import re

import pytest
from tokdistill_fast.kernels import backend
from tokdistill_fast.kernels import embedding_rows as E
from tokdistill_fast.kernels import gated as G
from tokdistill_fast.kernels import masked_mse as M
from tokdistill_fast.kernels import rms_norm as R
from tokdistill_fast.kernels import rotary as P

pytestmark = pytest.mark.skipif(backend.triton is None or backend.INTERPRET,
                                reason="needs triton, compiled (not interpreted)")

KERNELS = {  # kernel -> argument types; "{x}" is the activation dtype under test; constexprs in CONSTEXPRS
    E._embedding_rows_fwd_kernel: dict(ids="*i64", table="*{x}", new_rows="*fp32", out="*{x}", V="i32", D="i32",
                                       table_stride="i32", new_stride="i32", scale="fp32"),
    E._embedding_rows_bwd_kernel: dict(ids="*i32", grad_out="*{x}", grad_new="*fp32", V="i32", D="i32",
                                       g_stride="i32", scale="fp32"),
    E._embedding_rows_bwd_sorted_kernel: dict(order="*i64", bounds="*i32", grad_out="*{x}", grad_new="*fp32",
                                              D="i32", g_stride="i32", scale="fp32"),
    M._masked_mse_fwd_kernel: dict(S="*{x}", T="*bf16", s_idx="*i64", t_idx="*i32", row_sum="*fp32", D="i32",
                                   s_stride="i32", t_stride="i32"),
    M._masked_mse_bwd_kernel: dict(S="*{x}", T="*fp32", t_idx="*i64", pair_of="*i32", grad_loss="*fp32",
                                   dS="*{x}", D="i32", s_stride="i32", t_stride="i32", coef="fp32"),
    R._rms_norm_fwd_kernel: dict(X="*{x}", W="*{x}", Y="*{x}", rstd="*fp32", D="i32", eps="fp32"),
    R._rms_norm_bwd_kernel: dict(DY="*{x}", X="*{x}", W="*{x}", rstd="*fp32", DX="*{x}", D="i32"),
    P._rotary_kernel: dict(X="*{x}", COS="*{x}", SIN="*{x}", Y="*{x}", heads="i32", hd="i32"),
    G._gated_kernel: dict(GU="*{x}", DH="*{x}", OUT="*{x}", inter="i32"),
}
# constexprs: the production sizes of Llama-3.1-8B (D 4096, 32 heads of 128, 14,336 intermediate), the variants a
# run can take (the backward, Gemma's norm offset and GELU) compiled through their branches
CONSTEXPRS = {R._rms_norm_fwd_kernel: dict(OFFSET=1, BLOCK_D=4096),
              R._rms_norm_bwd_kernel: dict(OFFSET=0, BLOCK_D=4096),
              P._rotary_kernel: dict(BACKWARD=True, BLOCK_H=32, BLOCK_HALF=64),
              G._gated_kernel: dict(ACT=1, BACKWARD=True, BLOCK_N=G.BLOCK)}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm90(kernel, dtype):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = CONSTEXPRS.get(kernel, {"BLOCK_D": 1024})
    signature = {name: t.format(x=dtype) for name, t in KERNELS[kernel].items()} | dict.fromkeys(constexprs,
                                                                                              "constexpr")
    compiled = backend.triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options=backend.LAUNCH_OPTIONS)
    assert compiled.asm["cubin"]
    if dtype == "bf16" and {"out", "dS", "Y", "DX", "OUT"} & signature.keys():
        # the store rounds to nearest even: a conversion, or native bf16 arithmetic (LLVM narrows a product of two
        # bf16 values rounded to bf16 to mul.bf16, and contracts it into an fma with the sum after it)
        assert re.search(r"cvt\.rn\.bf16|(mul|fma\.rn|add)\.bf16", compiled.asm["ptx"])

"""Every kernel compiles for an H100 (sm_90) down to a cubin, on this machine without a GPU: the interpreter runs
the kernels' Python, this checks the code path a GPU takes (typing, constexpr branches, the bf16 rounding cast).
Uses the ptxas that ships inside the triton wheel; needs triton and no TRITON_INTERPRET."""

from __future__ import annotations

import pytest
from tokdistill_fast.kernels import backend
from tokdistill_fast.kernels import embedding_rows as E
from tokdistill_fast.kernels import masked_mse as M

pytestmark = pytest.mark.skipif(backend.triton is None or backend.INTERPRET,
                                reason="needs triton, compiled (not interpreted)")

KERNELS = {  # kernel -> argument types; "{x}" is the activation dtype under test
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
}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm90(kernel, dtype):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: t.format(x=dtype) for name, t in KERNELS[kernel].items()} | {"BLOCK_D": "constexpr"}
    compiled = backend.triton.compile(ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_D": 1024}),
                                      target=GPUTarget("cuda", 90, 32), options=backend.LAUNCH_OPTIONS)
    assert compiled.asm["cubin"]
    if dtype == "bf16" and {"out", "dS"} & signature.keys():
        assert "cvt.rn.bf16.f32" in compiled.asm["ptx"]  # the store rounds to nearest even

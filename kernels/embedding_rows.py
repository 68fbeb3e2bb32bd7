"""Embedding gather for a frozen table plus trainable new rows; gradients go only into the new rows.

out[..., :] = scale * (table[i] if i < V else new_rows[i - V]) for i = ids[...], in the table's dtype: new rows are
first rounded to the table's dtype and the product is rounded once, as Gemma's scaled embedding does, so rows at
their mean init reproduce the model's own embedding bit for bit. ids [...] int32/int64 in [0, V + n_new) (not
checked: that would sync with the host every step), table [V, D] frozen (never gets a gradient, on either path),
new_rows [n_new, D] fp32 trainable. The backward pass writes an [n_new, D] fp32 gradient and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import LAUNCH_OPTIONS, cast, check_device, dispatch, jit, row_major, tl, triton


def embedding_rows_ref(ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch definition: the spec the kernel is tested against. ids [...] -> [..., D] table dtype.
    Forward traffic for N ids, bf16 table: about 32 N D bytes; the kernel reads one row and writes one, 4-6 N D."""
    V = table.shape[0]
    is_new = (ids >= V).unsqueeze(-1)  # [..., 1] bool
    base = table.detach()[ids.clamp(max=V - 1)]  # reads 2 N D, writes 2 N D
    # F.embedding, not new_rows[...]: its CPU backward sums each row's gradients in a fixed order, where an indexing
    # backward adds them with parallel atomics, so the same run gave rows differing by ~1e-7 (issue 18)
    new = F.embedding((ids - V).clamp(min=0), new_rows).to(table.dtype)  # reads 8 N D, writes 6 N D
    out = torch.where(is_new, new, base)  # reads 4 N D, writes 2 N D
    return out if scale is None else out * scale  # reads 2 N D, writes 2 N D


# 1024 columns per program: a 4 KB fp32 tile, 8 values per thread at Triton's default 4 warps, for any hidden size.
# Not swept: on an H100 this kernel already ran 74x faster than PyTorch at 256 x 256 ids (bench/results/kernels.json);
# a block-size sweep would go into `make bench-kernels`.
MAX_BLOCK_D = 1024


@jit
def _embedding_rows_fwd_kernel(ids, table, new_rows, out, V, D, table_stride, new_stride, scale,
                               BLOCK_D: tl.constexpr):
    p = tl.program_id(0)  # one position per program along axis 0, one column block along axis 1
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.load(ids + p).to(tl.int64)  # int64: V * D passes 2**31 for a 128k x 4096 table
    is_new = i >= V
    # Two masked loads; only the one whose source holds the row touches memory. Masks are written `cols < width`
    # with width 0 for the other source, not `(cols < D) & is_new`: the interpreter mistypes block & scalar.
    base = tl.load(table + tl.where(is_new, 0, i) * table_stride + cols, mask=cols < tl.where(is_new, 0, D),
                   other=0.0)
    new = tl.load(new_rows + tl.where(is_new, i - V, 0) * new_stride + cols, mask=cols < tl.where(is_new, D, 0),
                  other=0.0)
    row = tl.where(is_new, cast(new, out.dtype.element_ty), base).to(tl.float32)  # new rows: round to table dtype
    tl.store(out + p.to(tl.int64) * D + cols, cast(row * scale, out.dtype.element_ty), mask=cols < D)


@jit
def _embedding_rows_bwd_kernel(ids, grad_out, grad_new, V, D, g_stride, scale, BLOCK_D: tl.constexpr):
    """Atomic scatter: grad_new[ids[p] - V] += scale * grad_out[p] for every position p with a new id."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.load(ids + p).to(tl.int64)
    is_new = i >= V
    m = cols < tl.where(is_new, D, 0)  # positions of original tokens read nothing and write nothing
    g = tl.load(grad_out + p.to(tl.int64) * g_stride + cols, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(grad_new + tl.where(is_new, i - V, 0) * D + cols, g * scale, mask=m)


@jit
def _embedding_rows_bwd_sorted_kernel(order, bounds, grad_out, grad_new, D, g_stride, scale,
                                      BLOCK_D: tl.constexpr):
    """Deterministic segmented sum: the program of new row r adds up grad_out[order[j]] for j in
    bounds[r]..bounds[r + 1] (that row's positions, in position order) and writes its row once."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(tl.load(bounds + r), tl.load(bounds + r + 1)):
        p = tl.load(order + j).to(tl.int64)
        acc += tl.load(grad_out + p * g_stride + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(grad_new + r.to(tl.int64) * D + cols, acc * scale, mask=m)  # rows without positions get zeros


def _block_d(D: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(max(D, 1)))


def _embedding_rows_fwd(ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """ids [N] -> out [N, D] in table dtype."""
    N, D = ids.numel(), table.shape[1]
    out = torch.empty(N, D, device=table.device, dtype=table.dtype)
    if N and D:
        BLOCK_D = _block_d(D)
        _embedding_rows_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
            ids, table, new_rows, out, table.shape[0], D, table.stride(0), new_rows.stride(0), scale,
            BLOCK_D=BLOCK_D, **LAUNCH_OPTIONS)
    return out


def _embedding_rows_bwd(ids: torch.Tensor, grad_out: torch.Tensor, V: int, n_new: int, scale: float,
                        deterministic: bool) -> torch.Tensor:
    """grad_out [N, D] -> gradient of the new rows [n_new, D] fp32.

    Many positions hit the same new row. Default: fp32 atomics, one program per (position, column block). A batch
    hits each new row only a few times (about one new token per snippet), so contention is low and no sort is
    needed, but the order of the additions, hence the last bits, can change from run to run. deterministic=True:
    sort positions by id (argsort of N ids, stable, so each segment is in position order), find each new row's
    segment with searchsorted, and let one program per (row, column block) sum its segment in that fixed order
    and store it: no atomics, same bits every run; its time grows with the most repeated token's count."""
    N, D = grad_out.shape
    BLOCK_D = _block_d(D)
    if deterministic:
        grad_new = torch.empty(n_new, D, device=grad_out.device, dtype=torch.float32)
        if n_new and D:
            sorted_ids, order = torch.sort(ids, stable=True)  # [N], [N]
            first_id = V + torch.arange(n_new + 1, device=ids.device, dtype=sorted_ids.dtype)
            # [n_new + 1] int32 (N < 2**31): row r owns positions order[bounds[r]:bounds[r + 1]]
            bounds = torch.searchsorted(sorted_ids, first_id, out_int32=True)
            _embedding_rows_bwd_sorted_kernel[(n_new, triton.cdiv(D, BLOCK_D))](
                order, bounds, grad_out, grad_new, D, grad_out.stride(0), scale, BLOCK_D=BLOCK_D, **LAUNCH_OPTIONS)
        return grad_new
    grad_new = torch.zeros(n_new, D, device=grad_out.device, dtype=torch.float32)
    if N and n_new and D:
        _embedding_rows_bwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
            ids, grad_out, grad_new, V, D, grad_out.stride(0), scale, BLOCK_D=BLOCK_D, **LAUNCH_OPTIONS)
    return grad_new


class EmbeddingRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor, scale: float,
                deterministic: bool) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.V, ctx.n_new, ctx.scale, ctx.deterministic = table.shape[0], new_rows.shape[0], scale, deterministic
        ctx.new_dtype = new_rows.dtype
        return _embedding_rows_fwd(ids, table, new_rows, scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad_new = None
        if ctx.needs_input_grad[2]:
            grad_new = _embedding_rows_bwd(ids, row_major(grad_out), ctx.V, ctx.n_new, ctx.scale,
                                           ctx.deterministic).to(ctx.new_dtype)
        return None, None, grad_new, None, None


def embedding_rows(ids: torch.Tensor, table: torch.Tensor, new_rows: torch.Tensor, scale: float | None = None,
                   *, backend: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """Rows of `table` for ids < V and of `new_rows` for ids >= V, times `scale`: [...] -> [..., D] table dtype.

    backend: auto | torch | triton (see backend.py). deterministic: the Triton backward sums each new row's
    gradient in a fixed order instead of with atomics; also on when torch.use_deterministic_algorithms(True)."""
    if dispatch(backend, table.device) == "torch":
        return embedding_rows_ref(ids, table, new_rows, scale)
    check_device("embedding_rows", table.device, ids=ids, new_rows=new_rows)
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    out = EmbeddingRowsFunction.apply(ids.reshape(-1).contiguous(), row_major(table), row_major(new_rows),
                                      1.0 if scale is None else float(scale), deterministic)
    return out.view(*ids.shape, table.shape[1])

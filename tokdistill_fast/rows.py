"""Embedding-row arithmetic: the start rows of new tokens (subtoken mean, random) and the norm clip applied to
trained rows. Every function takes and returns [n, D] tables; nothing here knows about snippets or steps."""

from __future__ import annotations

import torch

from .tokens import NewToken


def subtoken_mean(table: torch.Tensor, toks: list[NewToken]) -> torch.Tensor:
    """Mean of each token's original subtoken rows, in fp32 (the paper's start point, a.k.a. FVT)."""
    return torch.stack([table[t.sub_ids].float().mean(0) for t in toks])


def primaries_of(toks: list[NewToken], index: list[int]) -> list[int]:
    """The index in `toks` of each variant's primary word, for the variants at `index`."""
    index_of = {t.word: i for i, t in enumerate(toks) if t.variant_of is None}
    return [index_of[toks[i].variant_of] for i in index]


def moved_rows(rows: torch.Tensor, means: torch.Tensor, index: list[int], primary: list[int]) -> torch.Tensor:
    """The rows of the variants at `index`: their primaries' rows moved by the difference of the two forms'
    subtoken means, the offset the vocabulary itself has between them."""
    return rows[primary] + (means[index] - means[primary]).to(rows)


def random_rows(table: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Rows drawn per channel from N(mean, std) of the original table (the paper's random baseline)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = table.float().cpu()
    return t.mean(0) + t.std(0) * torch.randn(n, t.shape[1], generator=g)


def written_quantile(quantile: float, tied: bool) -> float:
    """The quantile of the table's norms new rows are written within: `quantile` for tied models (a large input row
    is also a large output row), the largest norm for untied ones (inside the vocabulary's range, which `tokdistill
    check` verifies)."""
    return quantile if tied else 1.0


def norm_limit(table: torch.Tensor, quantile: float) -> float:
    """The given quantile of the original rows' norms: the largest norm a new row is written with."""
    return float(torch.quantile(torch.linalg.vector_norm(table, dim=1, dtype=torch.float32).cpu(), quantile))


def bound_norms(rows: torch.Tensor, limit: float) -> torch.Tensor:
    """`rows` with those over `limit` scaled down to it (differentiable: training reads rows through it)."""
    return rows * torch.clamp(limit / rows.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)


def clip_norms(rows: torch.Tensor, table: torch.Tensor, quantile: float) -> tuple[torch.Tensor, int]:
    """Scale rows whose norm exceeds the given quantile of the original rows' norms down to it. With tied
    embeddings a large input row is also a large output row, which makes the model over-predict the token."""
    limit = norm_limit(table, quantile)
    rows = rows.cpu()
    return bound_norms(rows, limit), int((rows.norm(dim=1) > limit).sum())

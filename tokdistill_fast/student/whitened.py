"""Adam in the embedding table's whitened coordinates: rows = mean + z S with S = C^(1/2), C the covariance of the
table's rows, and Adam's moments kept for z. A step then has the table's own spread in every direction instead of
the same size along each raw channel: plain Adam moved new rows far along directions the table barely uses, where
a tied row also raises its own logit after many contexts (docs/defaults.md, "Steps shaped like the table").
The learning rate is a share of the table's spread, so one rate serves tables of any scale."""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_SQRT_COV = WeakTensorKeyDictionary()  # per table, for the run's lifetime (the search trains several candidates)


@torch.no_grad()
def sqrt_cov(table: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """[D, D] fp32 symmetric square root of the covariance of `table`'s rows (eigenvalues floored at 1e-8 of the
    largest), computed once per table in chunks of rows."""
    if table in _SQRT_COV:
        return _SQRT_COV[table]
    n, d = table.shape
    second = torch.zeros(d, d, dtype=torch.float64, device=table.device)
    total = torch.zeros(d, dtype=torch.float64, device=table.device)
    for start in range(0, n, chunk):
        x = table[start:start + chunk].float()
        second += (x.T @ x).double()
        total += x.sum(0).double()
    mean = total / n
    w, v = torch.linalg.eigh(second / n - torch.outer(mean, mean))
    s = ((v * w.clamp(min=float(w.max()) * 1e-8).sqrt()) @ v.T).float()
    _SQRT_COV[table] = s
    return s


class WhitenedAdam(torch.optim.Optimizer):
    """Adam without weight decay on z for each parameter p = mean + z S (one S per parameter, `sqrt_covs`): the
    gradient for z is grad S, and the step for z maps back to p through S. With S = I it is AdamW(weight_decay=0)."""

    def __init__(self, params: list[torch.nn.Parameter], sqrt_covs: list[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        if len(params) != len(sqrt_covs):
            raise ValueError("one sqrt_cov per parameter")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.sqrt_covs = {p: s.to(p.device, torch.float32) for p, s in zip(params, sqrt_covs)}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s, state = self.sqrt_covs[p], self.state[p]
                if not state:
                    state["step"] = torch.zeros((), device=p.device)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                g = p.grad @ s
                state["step"] += 1
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                t = state["step"]
                m_hat = state["exp_avg"] / (1 - b1 ** t)
                v_hat = state["exp_avg_sq"] / (1 - b2 ** t)
                p.sub_((m_hat / (v_hat.sqrt() + group["eps"])) @ s, alpha=group["lr"])

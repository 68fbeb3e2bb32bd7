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


def staged(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A short host list as a tensor on `device`, copied without waiting for the device (pinned and non-blocking on
    CUDA: a plain copy would wait for every queued step)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


# A row's gradient over this many times the RMS of its own earlier gradients is dropped from its step: a snippet
# that makes the row an attention sink there gave ` ITU-T` (SmolLM2 / FOLDOC) a loss of 10^6 and a gradient 10^5
# times its history, whose square then held Adam's second moment up and froze the row far from its teacher
# (docs/defaults.md, "Gradient spikes dropped"). Ordinary steps stay below ~10x.
SPIKE_LIMIT = 100.0


def spike_rows(norm: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, limit: float) -> torch.Tensor:
    """[rows] bool: rows whose gradient norm `norm` [rows] exceeds `limit` times the RMS norm of the gradients that
    their second moment `v` [rows, D] holds (`seen`: the same average over ones, so v / seen is the row's own mean
    square whatever its step count); a row without history is never one."""
    held = (v.sum(1) / seen.clamp_min(1e-30)).sqrt()
    return (seen > 0) & (norm > limit * held)


class WhitenedAdam(torch.optim.Optimizer):
    """Adam without weight decay on z for each parameter p = p0 + z S (one S per parameter, `sqrt_covs`; p0 the
    parameter at the first step): the gradient for z is grad S, and Adam's step is taken on z. With S = I it is
    AdamW(weight_decay=0). A step that names the only `rows` with a gradient costs O(n D + rows D^2) instead of
    O(n D^2) and leaves p stale: sync() computes the rows a pass is about to read (2,500 rows of a 4096-wide
    table: 0.2 instead of 170 GFLOP per step). `spike`: a row's gradient over that many times its own history
    (spike_rows) counts as zero in its step; state["dropped"] counts them."""

    def __init__(self, params: list[torch.nn.Parameter], sqrt_covs: list[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, spike: float | None = None):
        params = list(params)
        if len(params) != len(sqrt_covs):
            raise ValueError("one sqrt_cov per parameter")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "spike": spike})
        self.sqrt_covs = {p: s.to(p.device, torch.float32) for p, s in zip(params, sqrt_covs)}

    @torch.no_grad()
    def step(self, closure=None, rows: torch.Tensor | None = None):
        """One step. `rows`: the rows that have a gradient (every other row's must be zero); p is then left for
        sync(). Without it every row is read and p is up to date after the step."""
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s, state = self.sqrt_covs[p], self.state[p]
                if not state:
                    state["step"] = torch.zeros((), device=p.device)
                    state["start"] = p.detach().clone()
                    state["z"], state["exp_avg"], state["exp_avg_sq"] = (torch.zeros_like(p) for _ in range(3))
                    state["seen"] = torch.zeros(p.shape[0], device=p.device)  # v's average over ones
                    state["dropped"] = torch.zeros((), dtype=torch.int64, device=p.device)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                g = (p.grad if rows is None else p.grad.index_select(0, rows)) @ s
                if group["spike"] is not None:
                    g = self._drop_spikes(g, state, rows, group["spike"], b2)
                if rows is None:
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                else:  # the other rows' gradient is zero: their moments only decay
                    m.mul_(b1).index_add_(0, rows, g, alpha=1 - b1)
                    v.mul_(b2).index_add_(0, rows, g * g, alpha=1 - b2)
                t = state["step"]
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                state["z"].sub_(m.div(denom).mul_(group["lr"] / (1 - b1 ** t)))
                if rows is None:
                    self._sync(p, None)

    @torch.no_grad()
    def group_steps(self, p: torch.nn.Parameter, parts: list[torch.Tensor], part_of: torch.Tensor,
                    grad: torch.Tensor, lrs: list[float]) -> None:
        """len(parts) steps in which step j's gradient is `grad`'s rows for parts[j] (rows of cat(parts), in that
        order, part_of[i] the part of row i; parts disjoint, every other row's gradient zero) and its rate lrs[j]:
        as many step(rows=parts[j]) calls, with the whitening and the spike check done once for the group (a row's
        spike ratio does not change while its moments only decay), so a group issues about a fifth of the
        operators (Rewind.take_steps). Needs a state (a first step taken); p is left for sync()."""
        state, group = self.state[p], self.param_groups[0]
        (b1, b2), eps = group["betas"], group["eps"]
        m, v, z, k = state["exp_avg"], state["exp_avg_sq"], state["z"], len(parts)
        g = grad @ self.sqrt_covs[p]
        if group["spike"] is not None:
            g = self._drop_spikes(g, state, torch.cat(parts), group["spike"], b2, k - 1 - part_of, k)
        t = state["step"] + 1 + torch.arange(k, device=p.device)
        scale = staged(lrs, p.device, t.dtype) / (1 - b1 ** t)
        bias2 = 1 - b2 ** t
        start = 0
        for j, part in enumerate(parts):
            gj = g[start:start + len(part)]
            start += len(part)
            m.mul_(b1).index_add_(0, part, gj, alpha=1 - b1)
            v.mul_(b2).index_add_(0, part, gj * gj, alpha=1 - b2)
            z.sub_(m.div((v / bias2[j]).sqrt_().add_(eps)).mul_(scale[j]))
        state["step"] += k

    @staticmethod
    def _drop_spikes(g: torch.Tensor, state: dict, rows: torch.Tensor | None, limit: float, b2: float,
                     after: torch.Tensor | None = None, steps: int = 1) -> torch.Tensor:
        """g (the whitened gradient of `rows`, None: of every row) with its spike rows (spike_rows) zeroed, counted
        in state["dropped"]; the rows left with a gradient add a step to their history state["seen"]. A group of
        `steps` steps (group_steps): `after` [rows] counts those after each row's own, over which its step decays."""
        v, seen = state["exp_avg_sq"], state["seen"]
        norm = g.norm(dim=1)
        spike = spike_rows(norm, *((v, seen) if rows is None else (v[rows], seen[rows])), limit)
        state["dropped"] += spike.sum()
        stepped = ((norm > 0) & ~spike).float()
        if rows is None:
            seen.mul_(b2).add_(stepped, alpha=1 - b2)
        else:
            seen.mul_(b2 ** steps).index_add_(0, rows, stepped if after is None else stepped * b2 ** after,
                                              alpha=1 - b2)
        return g * (~spike).unsqueeze(1)

    @torch.no_grad()
    def look_ahead(self, p: torch.nn.Parameter, rows: torch.Tensor, step_of: torch.Tensor,
                   lrs: list[float]) -> torch.Tensor:
        """[len(rows), D]: rows of p as they will be at their step step_of[i] of the coming len(lrs) steps, where a
        row has no gradient before its own step and step i runs at lrs[i]: p0 + z S after the steps before its own,
        in which its moments only decay (each term of those steps at once, instead of stepping; Rewind.ahead).
        Needs a state (a first step taken)."""
        state, group = self.state[p], self.param_groups[0]
        (b1, b2), eps = group["betas"], group["eps"]
        k, device = len(lrs), p.device
        i = torch.arange(k, device=device)
        t = state["step"] + 1 + i  # the step counts of the coming steps
        scale = (staged(lrs, device, t.dtype) / (1 - b1 ** t))[:, None, None]
        bias2 = (1 - b2 ** t)[:, None, None]
        m = b1 ** (i + 1.0)[:, None, None] * state["exp_avg"][rows]  # [k, rows, D]: decayed i + 1 times
        v = b2 ** (i + 1.0)[:, None, None] * state["exp_avg_sq"][rows]
        moves = scale * m / ((v / bias2).sqrt() + eps)
        before = (i[:, None] < step_of[None, :]).unsqueeze(-1)  # step i comes before the row's own step
        z = state["z"][rows] - (moves * before).sum(0)
        return torch.addmm(state["start"][rows], z, self.sqrt_covs[p])

    @torch.no_grad()
    def sync(self, rows: torch.Tensor | None = None) -> None:
        """Set `rows` (None: all) of every parameter to p0 + z S, their values after the steps taken."""
        for p in self.sqrt_covs:
            if self.state.get(p):  # get: no empty state left behind (Rewind.ahead restores what it found)
                self._sync(p, rows)

    def _sync(self, p: torch.nn.Parameter, rows: torch.Tensor | None) -> None:
        state, s = self.state[p], self.sqrt_covs[p]
        if rows is None:
            p.copy_(torch.addmm(state["start"], state["z"], s))
        else:
            p.index_copy_(0, rows, torch.addmm(state["start"][rows], state["z"][rows], s))

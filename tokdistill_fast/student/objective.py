"""What a student step optimizes (`Objective`): the four objectives of the paper's comparison (distillation of
hidden states by MSE or of logits by KL / MSE, next-token prediction, and their sums), alpha-NTP's output side
alone at the teacher's states (alpha-mass), and the layers each reads, with the loss of one step assembled from
losses.py; and what a step trains (`Trainable`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..modeling import losses
from ..modeling.models import Decoder

if TYPE_CHECKING:
    from ..align import Alignment
    from ..config import DistillConfig
    from ..control.distributed import Shard
    from ..teacher import TeacherCache
    from .steps import Batch


@dataclass
class Trainable:
    """The parameters a run optimizes: the new input rows and, for untied models that learn them, the new output
    rows (both [n_new, D] fp32)."""

    rows: torch.nn.Parameter
    out_rows: torch.nn.Parameter | None
    tied: bool

    @classmethod
    def start(cls, init_rows: torch.Tensor, init_out: torch.Tensor | None, objective: Objective, tied: bool,
              device: torch.device) -> Trainable:
        def param(t: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(t.detach().to(device=device, dtype=torch.float32).clone())

        return cls(param(init_rows), param(init_out) if objective.train_output and not tied else None, tied)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.rows] + ([self.out_rows] if self.out_rows is not None else [])

    @property
    def head(self) -> torch.Tensor:
        """The output rows next-token prediction reads for the new ids."""
        return self.rows if self.tied or self.out_rows is None else self.out_rows


@dataclass
class Objective:
    """What one step optimizes. `distill` is None (NTP only), "mse", "kl" or "logits-mse"; `ntp` is None,
    "plain" (added to the distillation loss) or "alpha" (scaled by stop_grad(L_distill / L_ntp)). `mass` (tied
    models): plus alpha * NTP at the teacher's final states (losses.teacher_ntp), whose gradient reaches the new
    rows only as output rows and only in their own steps: the output side alpha-NTP regularizes, without running
    the student to the last layer."""

    distill: str | None = "mse"
    ntp: str | None = None
    layer: int = -1  # target layer for mse (1..L)
    train_output: bool = False  # untied models: learn the new output rows with NTP on detached states
    mass: bool = False

    @classmethod
    def for_config(cls, cfg: DistillConfig, layer: int, tied: bool) -> Objective:
        """The objective of cfg.method (with cfg.loss for the token-distill methods) at target `layer`."""
        method = cfg.method
        distill = cfg.distill_loss
        ntp = {"token-distill+ntp": "plain", "token-distill+alpha-ntp": "alpha", "ntp": "plain",
               "ntp-all": "plain"}.get(method)
        train_output = not tied and (cfg.output_embeddings == "ntp" or method == "ntp-all")
        return cls(distill=distill, ntp=ntp, layer=layer, train_output=train_output,
                   mass=method == "token-distill+alpha-mass")

    def compared_layer(self, num_layers: int) -> int:
        """The layer its distillation compares: the target layer for mse, the last layer for logit losses."""
        return self.layer if self.distill == "mse" else num_layers

    def cache_layers(self, num_layers: int) -> list[int]:
        """Teacher layers this objective reads: the compared layer, and the last layer for alpha-mass."""
        return sorted({self.compared_layer(num_layers)} | ({num_layers} if self.mass else set()))

    @staticmethod
    def head_stats(decoder: Decoder, cache: TeacherCache, al: Alignment, chunk: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logsumexp of the original logits, cross-entropy of the next original token or 0 where there is none)
        at every cached final-layer teacher state [K], fp32 on the compute device: what alpha-mass reads, computed
        once instead of a [K, V] head product in every step."""
        device, L, V = decoder.embed_weight.device, decoder.num_layers, decoder.embed_weight.shape[0]
        states = cache.states[L]
        nxt = torch.from_numpy(al.pair_next_ids())
        nxt = torch.where(torch.from_numpy(al.pair_has_next()) & (nxt < V), nxt, -1).to(device)
        lse, ce = (torch.empty(len(nxt), device=device) for _ in range(2))
        with torch.no_grad():
            for i in range(0, len(nxt), chunk):
                logits = decoder.logits(states[i:i + chunk].to(device, decoder.embed_weight.dtype)).float()
                t, lse[i:i + chunk] = nxt[i:i + chunk], logits.logsumexp(-1)
                target = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
                ce[i:i + chunk] = torch.where(t >= 0, lse[i:i + chunk] - target, 0.0)
        return lse, ce

    def student_layers(self, num_layers: int, learns_output: bool) -> list[int]:
        """Student layers a step computes: the one its distillation compares, plus the last layer for logits
        (logit losses, NTP, output rows); alpha-mass reads only the teacher's last layer."""
        final = self.distill in ("kl", "logits-mse") or self.ntp is not None or learns_output
        return sorted({self.compared_layer(num_layers)} | ({num_layers} if final else set()))

    def idle(self, shard: Shard) -> None:
        """A step with no aligned pair on this rank: join the collectives that `loss` runs on the other ranks."""
        if (self.ntp == "alpha" or self.mass) and self.distill is not None:
            zero = shard.weights.new_zeros(())
            shard.total(zero, zero)

    def loss(self, decoder: Decoder, flat: dict[int, torch.Tensor], targets: tuple[dict | None, torch.Tensor | None],
             b: Batch, trainable: Trainable, weights: tuple[float, float] = (1.0, 1.0), shard: Shard | None = None,
             backend: str = "auto", mass: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, per-pair distillation loss [K] or None) of one step. flat: the student's flattened states per
        layer; targets: (teacher states per layer, their row of each aligned pair). `weights` (distill, ntp): a
        rank's share of the step's pairs (distributed.py), so that the ranks' losses add up to the step's mean;
        `shard` also totals the alpha-NTP ratio over the ranks. `mass` (alpha-mass): head_stats' (lse, ce) and the
        step (0, 1, ...) of the pass in which each new row trains, -1 for the rows it does not train."""
        L, V = decoder.num_layers, decoder.embed_weight.shape[0]
        states, t_idx = targets
        w_distill, w_ntp = weights
        loss, row_loss = torch.zeros((), device=decoder.embed_weight.device), None
        if self.distill == "mse":
            loss, row_loss = losses.hidden_mse(flat[self.layer], states[self.layer], b.s_idx, t_idx, backend=backend)
        elif self.distill is not None:
            loss, row_loss = losses.logits_distill(self.distill, decoder.logits, flat[L], states[L], b.s_idx, t_idx)
        loss = loss * w_distill
        if self.mass:
            lse, ce, row_step = mass
            part = b.part if b.part is not None else torch.zeros_like(t_idx)
            out = losses.teacher_ntp(states[L], t_idx, trainable.rows, part[:, None] == row_step[None, :],
                                     lse.index_select(0, b.t_idx), ce.index_select(0, b.t_idx),  # by cache row
                                     getattr(decoder.config, "final_logit_softcapping", None))
            if shard is None:  # alpha per step of a pass: its distillation over its alpha-mass, as if run alone
                bins = torch.zeros(len(out), device=out.device)
                alpha = (bins.index_add(0, part, row_loss.float())
                         / bins.index_add(0, part, out.detach()).clamp_min(1e-8))[part]
            else:
                d, n = shard.total(loss.detach(), out.detach().mean() * w_ntp)
                alpha = d / n.clamp_min(1e-8) * w_ntp
            out = (alpha * out).sum() / max(len(out), 1)
            loss = loss + (out - out.detach())  # its gradient only: the step's loss stays the distillation loss
        if self.ntp is not None:
            ntp, _ = losses.next_token(decoder.logits, trainable.head, flat[L], b.ntp_idx, b.ntp_target, V)
            ntp = ntp * w_ntp
            if self.distill is None:
                loss = ntp
            elif self.ntp == "alpha":
                d, n = (loss.detach(), ntp.detach()) if shard is None else shard.total(loss.detach(), ntp.detach())
                loss = loss + (d / n.clamp_min(1e-8)) * ntp
            else:
                loss = loss + ntp
        if trainable.out_rows is not None and self.ntp is None:  # output rows only: states detached
            out_loss, _ = losses.next_token(decoder.logits, trainable.out_rows, flat[L].detach(), b.ntp_idx,
                                            b.ntp_target, V)
            loss = loss + out_loss * w_ntp
        return loss, row_loss

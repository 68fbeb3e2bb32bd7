"""What a student step optimizes (`Objective`): the four objectives of the paper's comparison (distillation of
hidden states by MSE or of logits by KL / MSE, next-token prediction, and their sums) and the layers each reads,
with the loss of one step assembled from losses.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..modeling import losses
from ..modeling.models import Decoder

if TYPE_CHECKING:
    from ..config import DistillConfig
    from ..control.distributed import Shard
    from .loop import Trainable
    from .steps import Batch


@dataclass
class Objective:
    """What one step optimizes. `distill` is None (NTP only), "mse", "kl" or "logits-mse"; `ntp` is None,
    "plain" (added to the distillation loss) or "alpha" (scaled by stop_grad(L_distill / L_ntp))."""

    distill: str | None = "mse"
    ntp: str | None = None
    layer: int = -1  # target layer for mse (1..L)
    train_output: bool = False  # untied models: learn the new output rows with NTP on detached states

    @classmethod
    def for_config(cls, cfg: DistillConfig, layer: int, tied: bool) -> Objective:
        """The objective of cfg.method (with cfg.loss for the token-distill methods) at target `layer`."""
        method = cfg.method
        distill = cfg.loss if method.startswith("token-distill") else None
        ntp = {"token-distill+ntp": "plain", "token-distill+alpha-ntp": "alpha", "ntp": "plain",
               "ntp-all": "plain"}.get(method)
        train_output = not tied and (cfg.output_embeddings == "ntp" or method == "ntp-all")
        return cls(distill=distill, ntp=ntp, layer=layer, train_output=train_output)

    def cache_layers(self, num_layers: int) -> list[int]:
        """Teacher layers this objective reads: the target layer for mse, the last layer for logit losses."""
        return [self.layer] if self.distill == "mse" else [num_layers]

    def student_layers(self, num_layers: int, learns_output: bool) -> list[int]:
        """Student layers a step computes: those the teacher targets are read at, plus the last layer for
        logits (logit losses, NTP, output rows)."""
        final = self.distill in ("kl", "logits-mse") or self.ntp is not None or learns_output
        return sorted(set(self.cache_layers(num_layers)) | ({num_layers} if final else set()))

    def loss(self, decoder: Decoder, flat: dict[int, torch.Tensor], targets: tuple[dict | None, torch.Tensor | None],
             b: Batch, trainable: Trainable, weights: tuple[float, float] = (1.0, 1.0), shard: Shard | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, per-pair distillation loss [K] or None) of one step. flat: the student's flattened states per
        layer; targets: (teacher states per layer, their row of each aligned pair). `weights` (distill, ntp): a
        rank's share of the step's pairs (distributed.py), so that the ranks' losses add up to the step's mean;
        `shard` also totals the alpha-NTP ratio over the ranks."""
        L, V = decoder.num_layers, decoder.embed_weight.shape[0]
        states, t_idx = targets
        w_distill, w_ntp = weights
        loss, row_loss = torch.zeros((), device=decoder.embed_weight.device), None
        if self.distill == "mse":
            loss, row_loss = losses.hidden_mse(flat[self.layer], states[self.layer], b.s_idx, t_idx, backend=backend)
        elif self.distill is not None:
            loss, row_loss = losses.logits_distill(self.distill, decoder.logits, flat[L], states[L], b.s_idx, t_idx)
        loss = loss * w_distill
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

"""Stage 5: train only the new embedding rows so the student (one new token) reproduces the teacher.

The frozen model runs truncated at the target layer; the new rows are one fp32 parameter [n_new, D] read by
the fused gather (kernels/embedding_rows.py), so no gradient ever touches the model's weights or its
embedding table. AdamW without weight decay, linear warm-up over the first half of the steps, then constant
(the paper's recipe). Every batch's index tensors are built before the loop, and losses stay on the device
until the end, so the loop itself never waits for the host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from tokdistill_fast.kernels.embedding_rows import embedding_rows

from . import losses
from .align import Alignment
from .models import Decoder
from .teacher import TeacherCache, aligned_rows, pad_batch

log = logging.getLogger(__name__)


@dataclass
class Objective:
    """What one step optimizes. `distill` is None (NTP only), "mse", "kl" or "logits-mse"; `ntp` is None,
    "plain" (added to the distillation loss) or "alpha" (scaled by stop_grad(L_distill / L_ntp))."""

    distill: str | None = "mse"
    ntp: str | None = None
    layer: int = -1  # target layer for mse (1..L)
    train_output: bool = False  # untied models: learn the new output rows with NTP on detached states


@dataclass
class Schedule:
    lr: float
    epochs: int = 1
    batch_size: int = 16
    warmup_fraction: float = 0.5
    seed: int = 0
    backend: str = "auto"  # kernels: auto | torch (references) | triton (fused kernels), see kernels/backend.py


@dataclass
class TrainResult:
    rows: torch.Tensor  # [n_new, D] fp32 input rows
    out_rows: torch.Tensor | None  # [n_new, D] fp32 output rows when learned
    step_loss: np.ndarray  # [steps]
    token_loss: np.ndarray  # [n_tokens] mean loss over the last epoch's aligned rows (nan if none)
    seconds: float
    steps: int
    extra: dict = field(default_factory=dict)


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] extended ids (>= V: new rows)
    s_idx: torch.Tensor  # [K] flat student positions
    t_idx: torch.Tensor  # [K] packed teacher rows
    tok: torch.Tensor  # [K] token (row) index of each aligned pair, for per-token loss
    ntp_idx: torch.Tensor  # [K'] flat student positions that have a next token
    ntp_target: torch.Tensor  # [K'] extended id of that next token


def make_batches(al: Alignment, snippet_row: np.ndarray, rows_per_batch: int, epochs: int, seed: int,
                 device: torch.device) -> list[Batch]:
    """Shuffled batches for every epoch, with all index tensors prepared up front."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        order = rng.permutation(al.n)
        for start in range(0, al.n, rows_per_batch):
            rows = order[start:start + rows_per_batch]
            ids = pad_batch(al.student_ids, al.cu_student, rows, torch.device("cpu"))
            T = ids.shape[1]
            s_flat = aligned_rows(al.cu_aligned, al.s_pos, rows, T)
            t_idx = np.concatenate([np.arange(al.cu_aligned[i], al.cu_aligned[i + 1]) for i in rows])
            tok = np.repeat(snippet_row[rows], al.cu_aligned[rows + 1] - al.cu_aligned[rows])
            # next-token targets: aligned positions except each sequence's last one
            lens = al.cu_student[rows + 1] - al.cu_student[rows]
            s_pos = np.concatenate([al.s_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]] for i in rows])
            seq_len = np.repeat(lens, al.cu_aligned[rows + 1] - al.cu_aligned[rows])
            has_next = s_pos + 1 < seq_len
            ntp_idx = s_flat[has_next]
            ntp_target = ids.reshape(-1)[torch.from_numpy(ntp_idx + 1)]
            tensors = (torch.from_numpy(a).to(device) for a in (s_flat, t_idx, tok, ntp_idx))
            batches.append(Batch(ids.to(device), *tensors, ntp_target.to(device)))
    return batches


def warmup_then_constant(optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up over the first `warmup_fraction` of the steps, constant afterwards (the paper's schedule)."""
    warm = max(1, round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))


def train(decoder: Decoder, al: Alignment, cache: TeacherCache | None, snippet_row: np.ndarray,
          init_rows: torch.Tensor, init_out: torch.Tensor | None, objective: Objective, schedule: Schedule,
          tied: bool, desc: str = "train") -> TrainResult:
    """Optimize the new rows (and, for untied models asked to, the new output rows)."""
    device = decoder.embed_weight.device
    n_rows = init_rows.shape[0]
    table, V, D = decoder.embed_weight, decoder.embed_weight.shape[0], decoder.hidden_size
    rows = torch.nn.Parameter(init_rows.detach().to(device=device, dtype=torch.float32).clone())
    params = [rows]
    out_rows = None
    if objective.train_output and not tied:
        out_rows = torch.nn.Parameter(init_out.detach().to(device=device, dtype=torch.float32).clone())
        params.append(out_rows)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0, **fused)
    batches = make_batches(al, snippet_row, schedule.batch_size, schedule.epochs, schedule.seed, device)
    sched = warmup_then_constant(opt, len(batches), schedule.warmup_fraction)
    L = decoder.num_layers
    needs_final = objective.distill in ("kl", "logits-mse") or objective.ntp is not None or out_rows is not None
    layers = sorted({objective.layer} | ({L} if needs_final else set())) if objective.distill == "mse" else [L]
    step_loss = torch.zeros(len(batches), device=device)
    tok_sum = torch.zeros(n_rows, device=device)
    tok_cnt = torch.zeros(n_rows, device=device)
    last_epoch_start = len(batches) - len(batches) // schedule.epochs
    t0 = time.perf_counter()
    for step, b in enumerate(tqdm(batches, desc=desc, unit="step", leave=False)):
        h0 = embedding_rows(b.ids, table, rows, decoder.embed_scale, backend=schedule.backend)
        hidden = decoder.hidden_states(h0, layers)
        flat = {l: h.reshape(-1, D) for l, h in hidden.items()}
        loss, row_loss = torch.zeros((), device=device), None
        if objective.distill == "mse":
            loss, row_loss = losses.hidden_mse(flat[objective.layer], cache.states[objective.layer], b.s_idx, b.t_idx,
                                               backend=schedule.backend)
        elif objective.distill is not None:
            loss, row_loss = losses.logits_distill(objective.distill, decoder.logits, flat[L], cache.states[L],
                                                   b.s_idx, b.t_idx)
        if objective.ntp is not None:
            out = rows if tied or out_rows is None else out_rows
            ntp, ntp_rows = losses.next_token(decoder.logits, out, flat[L], b.ntp_idx, b.ntp_target, V)
            if objective.distill is None:
                loss = ntp
            elif objective.ntp == "alpha":
                loss = loss + (loss.detach() / ntp.detach().clamp_min(1e-8)) * ntp
            else:
                loss = loss + ntp
        if out_rows is not None and objective.ntp is None:  # output rows only: states detached
            out_loss, _ = losses.next_token(decoder.logits, out_rows, flat[L].detach(), b.ntp_idx, b.ntp_target, V)
            loss = loss + out_loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_loss[step] = loss.detach()
        if step >= last_epoch_start and row_loss is not None:
            tok_sum.index_add_(0, b.tok, row_loss.float())
            tok_cnt.index_add_(0, b.tok, torch.ones_like(row_loss, dtype=torch.float32))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    token_loss = (tok_sum / tok_cnt).cpu().numpy()  # nan where a token had no aligned rows
    return TrainResult(rows.detach(), None if out_rows is None else out_rows.detach(), step_loss.cpu().numpy(),
                       token_loss, seconds, len(batches))

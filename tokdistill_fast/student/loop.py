"""The student loop: train only the new embedding rows so the student (one new token) reproduces the teacher.

The frozen model runs truncated at the target layer; the new rows are one fp32 parameter [n_new, D] read by
the fused gather (kernels/embedding_rows.py), so no gradient ever touches the model's weights or its
embedding table. Adam without weight decay in the table's whitened coordinates (whitened.py; `adamw`: the
paper's plain AdamW), linear warm-up over the first half of the steps, then constant (the schedule the paper
states) with a linear cooldown over the last COOLDOWN of the run (`decay`: linearly to zero at the last step, as
the reference code decays after its warm-up).
Every batch's layouts and index tensors are built before the loop, and losses stay on the device (logged
asynchronously), so the loop itself never waits for the host.

How a step is prepared and run (prefix sharing, step groups) is in steps.py; what it optimizes in objective.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..align import Alignment
from ..config import progress
from ..modeling.models import Decoder
from ..rows import bound_norms, norm_limit, written_quantile
from ..teacher import SINK_FACTOR, TeacherCache, sink_pairs
from .feed import TargetFeed
from .objective import Objective, Trainable
from .steps import RUN_STEPS, Batch, Passes, Rewind, batch_plan, plan_groups, rate_scale, step_spacing, student_states
from .whitened import SPIKE_LIMIT, WhitenedAdam, sqrt_cov

if TYPE_CHECKING:
    from ..config import DistillConfig
    from ..control.distributed import Shard

log = logging.getLogger(__name__)


# The default schedule's last fifth: the rate falls linearly to 1/(cooldown steps + 1) of the constant rate at the
# last step, so the rows end near the last steps' mean instead of one step's noise around it: held-out KL per word
# -4.5% on Gemma-3 (13 corpora), -2.2% on SmolLM2 (12) (docs/defaults.md, "A cooldown at the end").
COOLDOWN = 0.2


@dataclass
class Schedule:
    lr: float
    epochs: int = 1
    batch_size: int = 16
    warmup_fraction: float = 0.5
    decay: bool = False  # after the warm-up, decay linearly to zero at the last step (default: constant)
    # The share of the whole run's steps (more epochs included) over which the rate cools down linearly at its end.
    cooldown: float = 0.0
    # Then this many more epochs at the constant rate, after the schedule above ran its `epochs`; the rows at that
    # point are kept beside the final ones (TrainResult.before). Not with decay: the rate is zero by then.
    more_epochs: int = 0
    optimizer: str = "whitened"  # whitened.WhitenedAdam | adamw (plain AdamW without weight decay)
    seed: int = 0
    log_every: int = 0  # log the mean loss of every this many steps (0: never), without waiting for the device
    group: int = RUN_STEPS  # at most this many consecutive steps with disjoint tokens run as one pass (1: step by step)
    # Steps read the input rows with norms over this quantile of the table's (tied; untied: over the largest) scaled
    # down to it, as the output writes them (None: as they are): a row trained past it is written as one the student
    # never read, and one had become an attention sink there (docs/defaults.md, "Rows trained as they are written").
    max_norm_quantile: float | None = None
    backend: str = "auto"  # kernels: auto | torch (references) | triton (fused kernels), see kernels/backend.py

    @classmethod
    def for_config(cls, cfg: DistillConfig, lr: float, epochs: int, backend: str, log_every: int = 0) -> Schedule:
        """A run's schedule: batch size, warm-up, --lr-schedule and seed from cfg (the main run and the search's
        candidates alike); the learning rate, epochs and kernels as resolved for it."""
        return cls(lr=lr, epochs=epochs, batch_size=cfg.batch_size, warmup_fraction=cfg.warmup_fraction,
                   decay=cfg.lr_schedule == "decay", cooldown=COOLDOWN if cfg.lr_schedule == "cooldown" else 0.0,
                   optimizer=cfg.run_optimizer(), seed=cfg.seed, log_every=log_every,
                   backend=backend, max_norm_quantile=cfg.max_norm_quantile)

    def __post_init__(self):
        if self.decay and self.more_epochs:
            raise ValueError("more epochs follow a constant rate; a decaying one is zero by then")
        if self.decay and self.cooldown:
            raise ValueError("a decaying rate has no cooldown: it falls to zero already")


@dataclass
class TrainResult:
    rows: torch.Tensor  # [n_new, D] fp32 input rows
    out_rows: torch.Tensor | None  # [n_new, D] fp32 output rows when learned
    step_loss: np.ndarray  # [steps]
    token_loss: np.ndarray  # [n_tokens] mean loss over the aligned rows of the last half-epoch (nan if none)
    word_loss: np.ndarray  # [n_tokens] the same over the word's own pairs only (comparable across tokens)
    seconds: float
    steps: int
    extra: dict = field(default_factory=dict)
    # With Schedule.more_epochs: the rows, losses and steps before those epochs (seconds and extra: the whole run's)
    before: TrainResult | None = None


def optimizer(params: list[torch.nn.Parameter], tables: list[torch.Tensor], schedule: Schedule, n_steps: int,
              device: torch.device, row_sparse: bool = False, run_steps: int | None = None):
    """(the optimizer, its learning-rate schedule) over `params`: warm-up and decay over the schedule's own n_steps,
    the cooldown over the end of the whole run's run_steps (more epochs included; default n_steps): Adam in the whitened
    coordinates of each parameter's table in `tables` (the embedding table of the new input rows, the output
    table of new output rows), or plain AdamW; neither decays weights. `row_sparse` (each row's gradient comes
    from its own snippets only): whitened steps drop a row's gradient spikes (SPIKE_LIMIT); with NTP every row
    also steps as an output row in every step, a history its own snippets' gradients would dwarf."""
    if schedule.optimizer == "whitened":
        opt = WhitenedAdam(params, [sqrt_cov(t) for t in tables], lr=schedule.lr,
                           spike=SPIKE_LIMIT if row_sparse else None)
    else:
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0, **fused)
    return opt, warmup_schedule(opt, n_steps, schedule.warmup_fraction, schedule.decay, schedule.cooldown,
                                run_steps)


def warmup_schedule(optimizer, total_steps: int, warmup_fraction: float, decay: bool, cooldown: float = 0.0,
                    run_steps: int | None = None):
    """Linear warm-up over the first `warmup_fraction` of the steps, then constant (the schedule the paper states)
    or, with `decay`, linearly down to zero at the last step; `cooldown`: linearly down over the last that share of
    run_steps (default total_steps), to 1/(its steps + 1) at the last step (times the warm-up's factor, in short
    runs where the two overlap)."""
    warm = max(1, round(warmup_fraction * total_steps))
    run = total_steps if run_steps is None else run_steps
    cool = round(cooldown * run)

    def factor(step: int) -> float:
        if step + 1 <= warm or not decay:
            return min(1.0, (step + 1) / warm) * min(1.0, (run - step) / (cool + 1))
        return 1.0 - (step + 1 - warm) / max(1, total_steps - warm)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossLog:
    """Logs the mean loss of every `every` steps without waiting for the device: each window is copied to host
    memory asynchronously and logged once its copy has completed (polled, never waited for, until close)."""

    def __init__(self, losses: torch.Tensor, every: int, desc: str):
        self.losses, self.every, self.desc = losses, every, desc
        self.cuda = losses.device.type == "cuda"
        self.pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def step(self, step: int) -> None:
        if self.every <= 0 or (step + 1) % self.every:
            return
        window = self.losses[step + 1 - self.every:step + 1]
        host = torch.empty(window.shape, dtype=window.dtype, pin_memory=self.cuda).copy_(window, non_blocking=True)
        done = torch.cuda.Event() if self.cuda else None
        if done is not None:
            done.record()
        self.pending.append((step, host, done))
        while self.pending and (self.pending[0][2] is None or self.pending[0][2].query()):
            self._emit(*self.pending.pop(0))

    def close(self) -> None:
        for step, host, done in self.pending:
            if done is not None:
                done.synchronize()
            self._emit(step, host, done)
        self.pending = []

    def _emit(self, step: int, host: torch.Tensor, _done) -> None:
        log.info("%s: steps %d-%d, mean loss %.5g", self.desc, step + 2 - self.every, step + 1, float(host.mean()))


def train(decoder: Decoder, al: Alignment, cache: TeacherCache | None, snippet_row: np.ndarray,
          init_rows: torch.Tensor, init_out: torch.Tensor | None, objective: Objective, schedule: Schedule,
          tied: bool, desc: str = "train", passes: Passes | None = None,
          teacher: tuple[np.ndarray, np.ndarray] | None = None, shard: Shard | None = None,
          hook=None) -> TrainResult:
    """Optimize the new rows (and, for untied models asked to, the new output rows). `passes` picks the
    reference (default) or the prefix-sharing steps; fused steps take (teacher_ids, cu_teacher) as `teacher`
    instead of a cache and compute the targets batch by batch; prefix steps over disjoint tokens run in groups of
    up to schedule.group (steps.py). `shard`: this rank's part of every step of a several-process run
    (distributed.py); `al`, `cache` and `teacher` then hold this rank's snippets only. `hook`
    (checkpoint.StudentHook) restores a saved state before the first step and checkpoints at step boundaries.
    An mse objective leaves out the aligned pairs whose cached teacher state is an attention sink (sink_pairs)."""
    device = decoder.embed_weight.device
    passes = passes or Passes()
    if passes.fused and objective.distill is None:
        passes = dataclasses.replace(passes, fused=False)  # nothing to distill: the student's own prefixes
    if passes.fused and teacher is None:
        raise ValueError("fused passes need the teacher sequences (teacher_ids, cu_teacher)")
    n_rows = init_rows.shape[0]
    trainable = Trainable.start(init_rows, init_out, objective, tied, device)
    rows, params = trainable.rows, trainable.params
    q = schedule.max_norm_quantile
    limit = None if q is None else norm_limit(decoder.embed_weight, written_quantile(q, tied))

    def read(x: torch.Tensor) -> torch.Tensor:
        """The input rows as the steps (and the output) read them."""
        return x if limit is None else bound_norms(x, limit)
    if shard is not None and schedule.more_epochs:
        raise ValueError("more epochs run in one process: each rank's plan holds the schedule's epochs only")
    total_epochs = schedule.epochs + schedule.more_epochs
    plan = batch_plan(snippet_row, schedule.batch_size, total_epochs, schedule.seed) if shard is None else shard.plan
    n_steps = len(plan)
    # The schedule's own epochs end at step `first` (a plan's epochs do not depend on how many follow them): the
    # warm-up and the rate rule read those steps only, so the rows there are those of a run without more epochs.
    first = len(batch_plan(snippet_row, schedule.batch_size, schedule.epochs, schedule.seed)) \
        if schedule.more_epochs else n_steps
    tables = [decoder.embed_weight] + ([decoder.model.get_output_embeddings().weight]
                                       if trainable.out_rows is not None else [])
    # Row-sparse objectives: their gradients stay in the rows of each snippet's own token (NTP reads every new row
    # through the output layer, and learned output rows step with it).
    row_sparse = objective.ntp is None and trainable.out_rows is None
    # Their rows step only with their snippets: rows that step rarely (many tokens per run) take smaller rates, so
    # a row moves as in the jobs the rates were chosen on. Sharded runs (each rank sees its own snippets) keep it.
    spacing = step_spacing(plan[:first], snippet_row) if shard is None else None
    if row_sparse and spacing is not None:
        schedule = dataclasses.replace(schedule, lr=schedule.lr * rate_scale(spacing))
    opt, sched = optimizer(params, tables, schedule, first, device, row_sparse, n_steps)
    L = decoder.num_layers
    if objective.mass and cache.head is None:  # on the whole cache, which later runs on its subsets then reuse
        cache.head = Objective.head_stats(decoder, cache, al)
    sinks = 0
    if cache is not None and objective.distill == "mse":
        drop, cache.pair_median[objective.layer] = sink_pairs(
            al, cache.states[objective.layer], cache.pair_median.get(objective.layer),
            None if shard is None else functools.partial(shard.median, al))
        hit, sinks = (snippet_row[al.pair_snippet()[drop]], int(drop.sum())) if shard is None else \
            shard.left_out(al, drop, snippet_row)  # a snippet may sit on several ranks: each counted once
        if sinks:
            log.info("%s: %d aligned pair(s) of %d row(s) left out, their teacher states attention sinks (norm over "
                     "%gx the median)", desc, sinks, len(np.unique(hit)), SINK_FACTOR)
            al, cache = al.keep_pairs(~drop), cache.keep_pairs(~drop)
            if shard is not None:
                shard.reweigh(al)
    layers = objective.student_layers(L, trainable.out_rows is not None)
    # Prefix steps read the prefix keys/values the teacher pass kept, when it kept every layer they run through.
    kv = cache.prefix if cache is not None else None
    if passes.prefix and not passes.fused and kv is not None and set(range(max(layers))) <= kv.keys():
        passes = dataclasses.replace(passes, cached=True)
    teacher_layers = objective.cache_layers(L) if passes.fused else None
    step_loss = torch.zeros(n_steps, device=device)
    losses_log = LossLog(step_loss, schedule.log_every, desc)
    # Per-token loss sums and counts [4, rows]: over the last epoch, and over its second half, where rows are near
    # their final values (a token's early pairs can be thousands of times its final loss, e.g. where its initial
    # row makes a new attention sink); then the same over the word's own pairs (each snippet's first), whose loss
    # is comparable across tokens whatever text follows them. A token seen only in the first half is reported
    # over the whole epoch. With more epochs, the same again for the last epoch before them (TrainResult.before).
    windows = []  # (last epoch's first step, its second half's first step, end) of each part
    for end, epochs in ((first, schedule.epochs), (n_steps, total_epochs))[:1 + (first < n_steps)]:
        last_epoch = end // epochs
        windows.append((end - last_epoch, end - last_epoch + last_epoch // 2, end))
    tok_sum = torch.zeros(4 * len(windows), n_rows, device=device)
    tok_cnt = torch.zeros(4 * len(windows), n_rows, device=device)
    state = {"params": params, "optimizer": opt, "scheduler": sched, "step_loss": step_loss, "tok_sum": tok_sum,
             "tok_cnt": tok_cnt, "steps": n_steps}
    start = hook.restore(state) if hook is not None else 0
    # Groups: the fast passes, for row-sparse objectives.
    grouped = passes.prefix and shard is None and row_sparse
    # Whitened steps told their rows compute only the rows each pass reads (sharded steps' rows span the ranks).
    lazy = isinstance(opt, WhitenedAdam) and shard is None and row_sparse
    breaks = {step for window in windows for step in window}  # checkpoints fall where groups end: rows as without
    groups = plan_groups(al, snippet_row, plan, passes, schedule.group if grouped else 1, breaks, start, teacher,
                         device, cache.prefix_cu if passes.cached else None)
    feed = None if passes.fused or objective.distill is None else TargetFeed(cache, [g.batch for g in groups],
                                                                            device)
    rewind = Rewind(opt, sched, rows, lazy)
    head = cache.head if objective.mass else None
    t0 = time.perf_counter()
    for g in progress(groups, desc=desc, unit="pass", leave=False):
        b, step = g.batch, g.steps[0]
        if lazy:
            opt.sync(g.tokens[0])
        # A group's steps read their rows as they will be at their own step; the pass's gradient goes to `x`.
        x = rows if len(g.steps) == 1 else rewind.ahead(g)
        if b.main is None:  # no aligned pair in the batch: zero gradients, as the reference computes
            loss, row_loss = sum(p.sum() for p in params) * 0.0, None
            if shard is not None:
                objective.idle(shard)
        else:
            x_in = read(x)
            flat, targets = student_states(decoder, b, decoder.embed_weight, x_in, layers, passes, teacher_layers,
                                           schedule.backend, kv if passes.cached else None)
            targets = (targets, b.t_idx) if passes.fused else feed(step, b) if feed else (None, None)
            # Sharded: each loss is weighted by this rank's share of the step's pairs (its mean -> part of the mean).
            weights = (1.0, 1.0) if shard is None else shard.weights[step]
            mass = None
            if head is not None:  # the step of the pass each row trains in (sharded: the whole step's, all ranks')
                trained, at = (g.trained, g.trained_step) if shard is None else \
                    (shard.touched[step], torch.zeros_like(shard.touched[step]))
                mass = (*head, torch.full((n_rows,), -1, device=device).index_copy_(0, trained, at))
            loss, row_loss = objective.loss(decoder, flat, targets, b, dataclasses.replace(trainable, rows=x_in),
                                            weights, shard, schedule.backend, mass)
        loss.backward()
        if len(g.steps) == 1:
            if shard is not None:  # gradients and loss summed over ranks: the one-process step's values
                loss = shard.reduce(step, params, loss,
                                    dense=objective.ntp is not None or trainable.out_rows is not None)
            rewind.step(g.tokens[0])
            opt.zero_grad(set_to_none=True)
            step_loss[step] = loss.detach()
        else:
            step_loss[g.steps.start:g.steps.stop] = rewind.take_steps(x.grad, g, row_loss)
        for s in g.steps:
            losses_log.step(s)
        if row_loss is not None:
            loss_f, word = row_loss.float(), b.word.float()
            for at, (since, tail, end) in enumerate(windows):
                for part, start_at in enumerate((since, tail)):
                    if start_at <= step < end:
                        for k, w in ((4 * at + part, torch.ones_like(loss_f)), (4 * at + part + 2, word)):
                            tok_sum[k].index_add_(0, b.tok, loss_f * w)
                            tok_cnt[k].index_add_(0, b.tok, w)
        if g.steps.stop == first < n_steps:  # the schedule's epochs are done: keep their rows
            if lazy:
                opt.sync()
            state["before"] = [p.detach().clone() for p in params]
        if hook is not None:
            hook.after_steps(g.steps, state)
    if lazy:
        opt.sync()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses_log.close()
    positions = computed_positions([g.batch for g in groups], passes)
    if shard is not None:
        positions = shard.finish(tok_sum, tok_cnt, positions)
    mean = tok_sum / tok_cnt

    def losses(at: int) -> tuple[np.ndarray, np.ndarray]:
        """Token and word losses over window `at` (nan: a token without aligned rows)."""
        return tuple(torch.where(tok_cnt[k + 1] > 0, mean[k + 1], mean[k]).cpu().numpy() for k in (4 * at, 4 * at + 2))

    dropped = int(opt.state[rows]["dropped"]) if isinstance(opt, WhitenedAdam) and opt.state.get(rows) else 0
    if dropped:
        log.info("%s: %d row step(s) left out, their gradient over %gx the row's earlier ones (attention-sink "
                 "spikes)", desc, dropped, SPIKE_LIMIT)
    out_rows = trainable.out_rows
    step_losses = step_loss.cpu().numpy()
    out = TrainResult(read(rows.detach()), None if out_rows is None else out_rows.detach(), step_losses,
                      *losses(len(windows) - 1), seconds, n_steps,
                      extra={"passes": passes.describe(), "positions": positions, "groups": len(groups),
                             "epoch_loss": None if shard is not None else epoch_means(step_losses, plan,
                                                                                      len(snippet_row)),
                             "step_spacing": None if spacing is None else round(spacing, 3), "lr": schedule.lr,
                             "spikes_dropped": dropped, "sink_pairs": sinks})
    if len(windows) > 1:  # the rows, losses and steps at `first`; seconds and positions are the whole run's
        kept, (token_loss, word_loss) = state["before"], losses(0)
        out.before = dataclasses.replace(out, rows=read(kept[0]), out_rows=kept[1] if len(kept) > 1 else None,
                                         step_loss=out.step_loss[:first], token_loss=token_loss, word_loss=word_loss,
                                         steps=first)
    return out


def epoch_means(step_loss: np.ndarray, plan: list[np.ndarray], n_snippets: int) -> list[float]:
    """The mean step loss of each epoch of `plan`, each of which reads all `n_snippets` once: a training curve over
    the same snippets, where the first and last steps' losses are of different snippets and words."""
    epoch = (np.cumsum([len(b) for b in plan]) - 1) // n_snippets  # no batch spans two epochs
    return (np.bincount(epoch, weights=step_loss) / np.bincount(epoch)).tolist()


def computed_positions(batches: list[Batch], passes: Passes) -> dict[str, int]:
    """Real (non-padding) token positions the steps ran through the decoder: with gradient (forward and
    input-gradient backward) and without (the student's prefixes, or the fused teacher pass)."""
    no_grad = sum(b.prefix.tokens for b in batches if b.prefix is not None)
    return {"with_grad": sum(b.main.tokens for b in batches if b.main is not None),
            "teacher" if passes.fused else "prefix": no_grad}

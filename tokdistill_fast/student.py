"""Stage 5: train only the new embedding rows so the student (one new token) reproduces the teacher.

The frozen model runs truncated at the target layer; the new rows are one fp32 parameter [n_new, D] read by
the fused gather (kernels/embedding_rows.py), so no gradient ever touches the model's weights or its
embedding table. AdamW without weight decay, linear warm-up over the first half of the steps, then constant
(this project's recipe; the reference code decays the rate after its warm-up). Every batch's layouts and index
tensors are built before the loop, and losses stay on the device (logged asynchronously), so the loop itself
never waits for the host.

Prefix sharing (`Passes`): positions before a sequence's first new token are identical in teacher and student,
so a step runs only the suffix with gradient, attending to the prefix keys/values of a no-grad pass (the
student's prefixes, or, fused, the teacher pass over the same snippets that also yields the step's targets).
The reference steps run whole padded sequences; both give the same states at the aligned positions.

Step groups (`group_steps`): a new row's gradient depends only on that row (each snippet trains one token), and
AdamW updates every element on its own, so consecutive steps that train disjoint sets of tokens can run as one
pass over all their snippets; each step's rows enter the pass with the values they would have at that step (the
optimizer's own zero-gradient updates of the steps before it, then rewound), and the optimizer then takes the
steps one by one with each step's share of the gradient. Exact up to rounding; it turns many small launch-bound
steps into fewer large ones (2,500 tokens x 25 snippets: about 4 steps per pass).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from tokdistill_fast.kernels.embedding_rows import embedding_rows

from . import losses
from .align import Alignment
from .attention import Attend, ranges
from .config import UserInputError
from .layout import Layout, lay_out
from .models import Decoder
from .teacher import TeacherCache

if TYPE_CHECKING:
    from .distributed import Shard

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
    log_every: int = 0  # log the mean loss of every this many steps (0: never), without waiting for the device
    group: int = 16  # at most this many consecutive steps with disjoint tokens run as one pass (1: step by step)
    backend: str = "auto"  # kernels: auto | torch (references) | triton (fused kernels), see kernels/backend.py


@dataclass
class TrainResult:
    rows: torch.Tensor  # [n_new, D] fp32 input rows
    out_rows: torch.Tensor | None  # [n_new, D] fp32 output rows when learned
    step_loss: np.ndarray  # [steps]
    token_loss: np.ndarray  # [n_tokens] mean loss over the aligned rows of the last half-epoch (nan if none)
    seconds: float
    steps: int
    extra: dict = field(default_factory=dict)


@dataclass
class Passes:
    """How a step runs the student. prefix: packed rows (no padding) from each sequence's first new token on,
    attending to the keys/values of the positions before it, which are identical in teacher and student, carry
    no gradient and are not in the loss (exact under causal attention). fused: those keys/values, and the step's
    targets, come from a teacher pass over the same snippets run just before, instead of a no-grad student prefix
    pass (each snippet is then seen once: epochs == 1). Neither: whole right-padded sequences (the reference)."""

    prefix: bool = False
    fused: bool = False

    def describe(self) -> str:
        return "fused" if self.fused else "prefix" if self.prefix else "off"


def resolve_passes(prefix_sharing: str, backend: str, epochs: int) -> Passes:
    """auto: off with the reference backend (torch), fused when every snippet is seen once, else on."""
    if prefix_sharing == "auto":
        prefix_sharing = "off" if backend == "torch" else "fused" if epochs == 1 else "on"
    if prefix_sharing == "fused" and epochs != 1:
        raise UserInputError("--prefix-sharing fused needs --epochs 1: the teacher pass runs inside each step")
    return Passes(prefix=prefix_sharing != "off", fused=prefix_sharing == "fused")


@dataclass
class Batch:
    """One step's inputs, prepared before the loop. `main` is what runs with gradient: whole right-padded
    student sequences (reference) or, with prefix sharing, their suffixes from the first new token on, which
    attend to keys/values captured by the no-grad pass `prefix` (the student's prefixes or, fused, the teacher's
    sequences). main is None when no snippet of the batch has an aligned pair (the step trains nothing)."""

    main: Layout | None
    s_idx: torch.Tensor  # [K] rows of main's flattened output at the aligned positions
    t_idx: torch.Tensor  # [K] teacher rows: in the cache, or (fused) in the prefix pass's flattened output
    t_rows: np.ndarray  # [K] cache rows of the pairs (host copy for a host-resident cache)
    tok: torch.Tensor  # [K] token (row) index of each aligned pair, for per-token loss
    ntp_idx: torch.Tensor  # [K'] rows of main's output that have a next token
    ntp_target: torch.Tensor  # [K'] extended id of that next token
    prefix: Layout | None = None
    part: torch.Tensor | None = None  # [K] step (0, 1, ...) of each pair when the batch runs a group of steps

    def to(self, device: torch.device) -> Batch:
        s_idx, t_idx, tok, ntp_idx, ntp_target = (t.to(device, non_blocking=True) for t in (
            self.s_idx, self.t_idx, self.tok, self.ntp_idx, self.ntp_target))
        return Batch(None if self.main is None else self.main.to(device), s_idx, t_idx, self.t_rows, tok, ntp_idx,
                     ntp_target, None if self.prefix is None else self.prefix.to(device),
                     None if self.part is None else self.part.to(device, non_blocking=True))


def make_batch(al: Alignment, snippet_row: np.ndarray, rows: np.ndarray, passes: Passes,
               teacher: tuple[np.ndarray, np.ndarray] | None = None, step_of: np.ndarray | None = None) -> Batch:
    """Layouts and index arrays of one step over snippets `rows` (host side). `teacher` = (teacher_ids,
    cu_teacher) for fused passes. `step_of` [len(rows)]: for a group of steps, the step of each snippet."""
    cu_a, cu_s = al.cu_aligned, al.cu_student
    if passes.prefix:
        keep = cu_a[rows + 1] > cu_a[rows]  # snippets without aligned pairs contribute nothing
        rows, step_of = rows[keep], None if step_of is None else step_of[keep]
    counts = cu_a[rows + 1] - cu_a[rows]
    pairs = ranges(cu_a[rows], counts)  # aligned pairs of the batch = their rows in the teacher cache
    seq = np.repeat(np.arange(len(rows)), counts)  # batch row of each pair
    s_pos = al.s_pos[pairs].astype(np.int64)
    lens = cu_s[rows + 1] - cu_s[rows]
    has_next = s_pos + 1 < lens[seq]  # next-token targets: aligned positions except each sequence's last one
    ntp_target = al.student_ids[(cu_s[rows][seq] + s_pos + 1)[has_next]]
    tok = np.repeat(snippet_row[rows], counts)
    t_idx, prefix = pairs, None
    if len(pairs) == 0:  # nothing to train (also a rank's empty share of a batch, see distributed.py)
        main, s_flat = None, np.zeros(0, dtype=np.int64)
    elif not passes.prefix:
        main = lay_out(al.student_ids, cu_s[rows], lens, np.zeros(len(rows)), packed=False)
        s_flat = main.rows(seq, s_pos)
    else:
        p = al.s_pos[cu_a[rows]].astype(np.int64)  # first new token of each sequence = its prefix length
        if passes.fused:
            teacher_ids, cu_t = teacher
            prefix = lay_out(teacher_ids, cu_t[rows], cu_t[rows + 1] - cu_t[rows], np.zeros(len(rows)), True,
                             capture=p)
            t_idx = prefix.rows(seq, al.t_pos[pairs].astype(np.int64))
        elif p.any():  # sequences without a prefix are left out; captured rows stay in cu(p) order
            some = p > 0
            prefix = lay_out(al.student_ids, cu_s[rows[some]], p[some], np.zeros(int(some.sum())), True)
        main = lay_out(al.student_ids, cu_s[rows] + p, lens - p, p, True, prefix_len=p)
        s_flat = main.rows(seq, s_pos - p[seq])
    tensors = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
               for a in (s_flat, t_idx, tok, s_flat[has_next], ntp_target))
    s_idx, t_idx_t, tok_t, ntp_idx, ntp_t = tensors
    part = None if step_of is None else torch.from_numpy(np.ascontiguousarray(step_of[seq], dtype=np.int64))
    return Batch(main, s_idx, t_idx_t, pairs, tok_t, ntp_idx, ntp_t, prefix, part)


@dataclass
class Group:
    """Consecutive steps run as one pass: their snippets in one Batch, and per step the rows it trains and its
    number of aligned pairs (the step's loss is the mean over them)."""

    steps: range
    batch: Batch
    tokens: list[torch.Tensor]  # [n_j] rows trained by each step (empty for a single step)
    pairs: torch.Tensor  # [len(steps)] fp32 aligned pairs per step (empty for a single step)

    def to(self, device: torch.device) -> Group:
        return Group(self.steps, self.batch.to(device), [t.to(device, non_blocking=True) for t in self.tokens],
                     self.pairs.to(device, non_blocking=True))


def group_steps(plan: list[np.ndarray], snippet_row: np.ndarray, max_steps: int,
                breaks: set[int] = frozenset()) -> list[range]:
    """Cut the steps into runs of consecutive steps that train pairwise disjoint sets of rows (then exact as
    one pass, see the module docstring), at most max_steps long, never running across a step in `breaks`."""
    groups, first, seen = [], 0, set()
    for step in range(len(plan)):
        rows = set(snippet_row[plan[step]].tolist())
        if step > first and (step - first >= max_steps or step in breaks or not seen.isdisjoint(rows)):
            groups.append(range(first, step))
            first, seen = step, set()
        seen |= rows
    if first < len(plan):
        groups.append(range(first, len(plan)))
    return groups


def make_group(al: Alignment, snippet_row: np.ndarray, plan: list[np.ndarray], steps: range, passes: Passes,
               teacher: tuple[np.ndarray, np.ndarray] | None) -> Group:
    """The host-side Group of `steps`. One step is just its own batch: nothing is rewound, so it needs no
    per-step rows or pair counts."""
    parts = [plan[s] for s in steps]
    if len(parts) == 1:
        return Group(steps, make_batch(al, snippet_row, parts[0], passes, teacher), [], torch.zeros(0))
    step_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    batch = make_batch(al, snippet_row, np.concatenate(parts), passes, teacher, step_of)
    counts = [int((al.cu_aligned[p + 1] - al.cu_aligned[p]).sum()) for p in parts]
    tokens = [torch.from_numpy(np.unique(snippet_row[p]).astype(np.int64)) for p in parts]
    return Group(steps, batch, tokens, torch.tensor(counts, dtype=torch.float32))


def batch_plan(n: int, rows_per_batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The snippets of every step: each epoch a fresh shuffle of the n snippets cut into batches."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(epochs):
        order = rng.permutation(n)
        plan.extend(order[start:start + rows_per_batch] for start in range(0, n, rows_per_batch))
    return plan


def student_states(decoder: Decoder, b: Batch, table: torch.Tensor, rows: torch.Tensor, layers: list[int],
                   passes: Passes, teacher_layers: list[int] | None = None, backend: str = "auto"
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """Flattened student states {layer: [rows of main, D]} of one step and, fused, the teacher pass's
    flattened states {layer: [rows, D]} that b.t_idx indexes."""
    D = decoder.hidden_size
    if not passes.prefix:
        h0 = embedding_rows(b.main.ids, table, rows, decoder.embed_scale, backend=backend)
        return {l: h.reshape(-1, D) for l, h in decoder.hidden_states(h0, layers).items()}, None
    context, targets = None, None
    if b.prefix is not None:
        context = {}
        depth = [max(layers)] if teacher_layers is None else sorted(set(teacher_layers) | {max(layers)})
        with torch.no_grad():
            pre = decoder.hidden_states(decoder.embed(b.prefix.ids), depth, b.prefix.positions,
                                        Attend(b.prefix.spec, capture=context))
        if teacher_layers is not None:
            targets = {l: pre[l].reshape(-1, D) for l in teacher_layers}
    h0 = embedding_rows(b.main.ids, table, rows, decoder.embed_scale, backend=backend)
    attend = Attend(b.main.spec, context=context if b.main.spec.has_prefix else None)
    hidden = decoder.hidden_states(h0, layers, b.main.positions, attend)
    return {l: h.reshape(-1, D) for l, h in hidden.items()}, targets


class TargetFeed:
    """Each step's teacher rows on the compute device, as (states {layer: [.., D]}, row index). A cache on the
    device is indexed in place. A host cache (pinned, teacher.compute spills there) is gathered per step into one
    of two pinned staging buffers and copied asynchronously; a buffer is refilled only after the copy queued from
    it two steps earlier has completed, so the host prepares step k + 1 while the device still reads step k."""

    def __init__(self, cache: TeacherCache, batches: list[Batch], device: torch.device, staged: bool | None = None):
        self.cache, self.device = cache, device
        self.on_device = all(t.device == device for t in cache.states.values()) if staged is None else not staged
        if not self.on_device:
            k_max = max((len(b.t_rows) for b in batches), default=0)
            pin = device.type == "cuda"
            self.staging = [{l: torch.empty((k_max, t.shape[1]), dtype=t.dtype, pin_memory=pin)
                             for l, t in cache.states.items()} for _ in range(2)]
            self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]

    def __call__(self, step: int, b: Batch) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        if self.on_device:
            return self.cache.states, b.t_idx
        slot, k = step % 2, len(b.t_rows)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        idx = torch.from_numpy(b.t_rows)
        out = {}
        for l, t in self.cache.states.items():
            buf = self.staging[slot][l][:k]
            torch.index_select(t, 0, idx, out=buf)
            out[l] = buf.to(self.device, non_blocking=True)
        if self.copied[slot] is not None:
            self.copied[slot].record()
        return out, torch.arange(k, device=self.device)


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


def warmup_then_constant(optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up over the first `warmup_fraction` of the steps, constant afterwards (the paper's schedule)."""
    warm = max(1, round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))


def train(decoder: Decoder, al: Alignment, cache: TeacherCache | None, snippet_row: np.ndarray,
          init_rows: torch.Tensor, init_out: torch.Tensor | None, objective: Objective, schedule: Schedule,
          tied: bool, desc: str = "train", passes: Passes | None = None,
          teacher: tuple[np.ndarray, np.ndarray] | None = None, shard: Shard | None = None,
          hook=None) -> TrainResult:
    """Optimize the new rows (and, for untied models asked to, the new output rows). `passes` picks the
    reference (default) or the prefix-sharing steps; fused steps take (teacher_ids, cu_teacher) as `teacher`
    instead of a cache and compute the targets batch by batch; prefix steps over disjoint tokens run in groups of
    up to schedule.group (module docstring). `shard`: this rank's part of every step of a several-process run
    (distributed.py); `al`, `cache` and `teacher` then hold this rank's snippets only. `hook`
    (checkpoint.StudentHook) restores a saved state before the first step and checkpoints at step boundaries."""
    device = decoder.embed_weight.device
    passes = passes or Passes()
    if passes.fused and objective.distill is None:
        passes = dataclasses.replace(passes, fused=False)  # nothing to distill: the student's own prefixes
    if passes.fused and teacher is None:
        raise ValueError("fused passes need the teacher sequences (teacher_ids, cu_teacher)")
    n_rows = init_rows.shape[0]
    table, V = decoder.embed_weight, decoder.embed_weight.shape[0]
    rows = torch.nn.Parameter(init_rows.detach().to(device=device, dtype=torch.float32).clone())
    params = [rows]
    out_rows = None
    if objective.train_output and not tied:
        out_rows = torch.nn.Parameter(init_out.detach().to(device=device, dtype=torch.float32).clone())
        params.append(out_rows)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0, **fused)
    plan = batch_plan(al.n, schedule.batch_size, schedule.epochs, schedule.seed) if shard is None else shard.plan
    n_steps = len(plan)
    sched = warmup_then_constant(opt, n_steps, schedule.warmup_fraction)
    L = decoder.num_layers
    needs_final = objective.distill in ("kl", "logits-mse") or objective.ntp is not None or out_rows is not None
    layers = sorted({objective.layer} | ({L} if needs_final else set())) if objective.distill == "mse" else [L]
    teacher_layers = ([objective.layer] if objective.distill == "mse" else [L]) if passes.fused else None
    step_loss = torch.zeros(n_steps, device=device)
    losses_log = LossLog(step_loss, schedule.log_every, desc)
    tok_sum = torch.zeros(n_rows, device=device)
    tok_cnt = torch.zeros(n_rows, device=device)
    # Per-token loss over the second half of the last epoch: rows near their final values (a token's early pairs
    # can be thousands of times its final loss, e.g. where its initial row makes a new attention sink).
    last_epoch = n_steps // schedule.epochs
    tail_start = n_steps - last_epoch + last_epoch // 2
    state = {"params": params, "optimizer": opt, "scheduler": sched, "step_loss": step_loss, "tok_sum": tok_sum,
             "tok_cnt": tok_cnt, "steps": n_steps}
    start = hook.restore(state) if hook is not None else 0
    # Groups: the fast passes, for objectives whose gradients stay in the rows of each snippet's own token (NTP
    # reads every new row through the output layer). Cut from step 0 so that a resumed run groups alike (a resume
    # inside a group, after a change of --checkpoint-every, runs the group's remaining steps: still disjoint).
    grouped = passes.prefix and shard is None and objective.ntp is None and out_rows is None
    breaks = {tail_start} | (set(range(0, n_steps, hook.every)) if hook is not None and hook.every else set())
    runs = [range(max(g.start, start), g.stop)
            for g in group_steps(plan, snippet_row, schedule.group if grouped else 1, breaks) if g.stop > start]
    groups = [make_group(al, snippet_row, plan, g, passes, teacher if passes.fused else None).to(device)
              for g in runs]
    feed = None if passes.fused or objective.distill is None else TargetFeed(cache, [g.batch for g in groups],
                                                                            device)
    rewind = Rewind(opt, sched, rows) if any(len(g.steps) > 1 for g in groups) else None
    t0 = time.perf_counter()
    for g in tqdm(groups, desc=desc, unit="pass", leave=False):
        b, step = g.batch, g.steps[0]
        # Sharded: each loss is weighted by this rank's share of the step's pairs (its mean -> a part of the mean).
        w_distill, w_ntp = (1.0, 1.0) if shard is None else shard.weights[step]
        # A group's steps read their rows as they will be at their own step; the pass's gradient goes to `x`.
        x = rows if len(g.steps) == 1 else rewind.ahead(g.tokens)
        if b.main is None:  # no aligned pair in the batch: zero gradients, as the reference computes
            loss, row_loss = sum(p.sum() for p in params) * 0.0, None
            if shard is not None:
                shard.idle(objective)
        else:
            flat, targets = student_states(decoder, b, table, x, layers, passes, teacher_layers, schedule.backend)
            states, t_idx = (targets, b.t_idx) if passes.fused else feed(step, b) if feed else (None, None)
            loss, row_loss = torch.zeros((), device=device), None
            if objective.distill == "mse":
                loss, row_loss = losses.hidden_mse(flat[objective.layer], states[objective.layer], b.s_idx, t_idx,
                                                   backend=schedule.backend)
            elif objective.distill is not None:
                loss, row_loss = losses.logits_distill(objective.distill, decoder.logits, flat[L], states[L],
                                                       b.s_idx, t_idx)
            loss = loss * w_distill
            if objective.ntp is not None:
                out = rows if tied or out_rows is None else out_rows
                ntp, ntp_rows = losses.next_token(decoder.logits, out, flat[L], b.ntp_idx, b.ntp_target, V)
                ntp = ntp * w_ntp
                if objective.distill is None:
                    loss = ntp
                elif objective.ntp == "alpha":
                    d, n = (loss.detach(), ntp.detach()) if shard is None else shard.total(loss.detach(), ntp.detach())
                    loss = loss + (d / n.clamp_min(1e-8)) * ntp
                else:
                    loss = loss + ntp
            if out_rows is not None and objective.ntp is None:  # output rows only: states detached
                out_loss, _ = losses.next_token(decoder.logits, out_rows, flat[L].detach(), b.ntp_idx,
                                                b.ntp_target, V)
                loss = loss + out_loss * w_ntp
        loss.backward()
        if len(g.steps) == 1:
            if shard is not None:  # gradients and loss summed over ranks: the one-process step's values
                loss = shard.reduce(step, params, loss, dense=objective.ntp is not None or out_rows is not None)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_loss[step] = loss.detach()
        else:
            step_loss[g.steps.start:g.steps.stop] = rewind.take_steps(x.grad, g, row_loss)
        for s in g.steps:
            losses_log.step(s)
        if step >= tail_start and row_loss is not None:
            tok_sum.index_add_(0, b.tok, row_loss.float())
            tok_cnt.index_add_(0, b.tok, torch.ones_like(row_loss, dtype=torch.float32))
        if hook is not None:
            hook.after_steps(g.steps, state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    losses_log.close()
    positions = computed_positions([g.batch for g in groups], passes)
    if shard is not None:
        positions = shard.finish(tok_sum, tok_cnt, positions)
    token_loss = (tok_sum / tok_cnt).cpu().numpy()  # nan where a token had no aligned rows
    return TrainResult(rows.detach(), None if out_rows is None else out_rows.detach(), step_loss.cpu().numpy(),
                       token_loss, seconds, n_steps,
                       extra={"passes": passes.describe(), "positions": positions, "groups": len(groups)})


class Rewind:
    """The optimizer side of a group of steps (module docstring). ahead(): the rows each step of the group will
    read, taken while the optimizer runs the group's steps with zero gradients, then rewound to where it was.
    take_steps(): the group's steps for real, each with its own rows' share of the pass's gradient."""

    def __init__(self, opt: torch.optim.Optimizer, sched, rows: torch.nn.Parameter):
        self.opt, self.sched, self.rows = opt, sched, rows

    @torch.no_grad()
    def ahead(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """[n_new, D] leaf holding, for the rows of step j of the group, their values at step j."""
        p, opt = self.rows, self.opt
        state = {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None
        sched, lrs, before = self.sched.state_dict(), [g["lr"] for g in opt.param_groups], p.detach().clone()
        x = before.clone()
        p.grad = torch.zeros_like(p)
        for rows_j in tokens[1:]:
            opt.step()
            self.sched.step()
            x.index_copy_(0, rows_j, p.index_select(0, rows_j))
        p.copy_(before)
        if state is None:
            opt.state.pop(p, None)
        else:
            for k, v in state.items():
                opt.state[p][k].copy_(v)
        self.sched.load_state_dict(sched)
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        p.grad = None
        return x.requires_grad_(True)

    def take_steps(self, grad: torch.Tensor | None, g: Group, row_loss: torch.Tensor | None) -> torch.Tensor:
        """Run the group's steps; returns their losses [len(g.steps)]. The pass's loss is the mean over all of
        the group's pairs, a step's the mean over its own: its rows' gradient is scaled by (all pairs / its)."""
        p, per_step = self.rows, g.pairs.clamp_min(1)
        scale = g.pairs.sum() / per_step
        for j, rows_j in enumerate(g.tokens):
            p.grad = torch.zeros_like(p)
            if grad is not None:
                p.grad.index_copy_(0, rows_j, grad.index_select(0, rows_j) * scale[j])
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        losses = torch.zeros_like(per_step)
        if row_loss is not None:
            losses.index_add_(0, g.batch.part, row_loss.float())
        return losses / per_step


def computed_positions(batches: list[Batch], passes: Passes) -> dict[str, int]:
    """Real (non-padding) token positions the steps ran through the decoder: with gradient (forward and
    input-gradient backward) and without (the student's prefixes, or the fused teacher pass)."""
    no_grad = sum(b.prefix.tokens for b in batches if b.prefix is not None)
    return {"with_grad": sum(b.main.tokens for b in batches if b.main is not None),
            "teacher" if passes.fused else "prefix": no_grad}

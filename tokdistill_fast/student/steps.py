"""The steps of the student loop, prepared on the host before it runs: which snippets each step takes
(`batch_plan`), their layouts and index tensors (`make_batch`), how a step runs the model (`Passes`,
`student_states`) and which consecutive steps run as one pass (`group_steps`, `make_group`, `Rewind`).

Prefix sharing (`Passes`): positions before a sequence's first new token are identical in teacher and student,
so a step runs only the suffix with gradient, attending to prefix keys/values: those the teacher pass kept
(cached: no step runs a prefix, in any epoch), or a no-grad pass's (the student's prefixes, or, fused, the
teacher pass over the same snippets that also yields the step's targets).
The reference steps run whole padded sequences; both give the same states at the aligned positions.

Step groups (`group_steps`): a new row's gradient depends only on that row (each snippet trains one token), and the
optimizer updates every row on its own (AdamW element by element, whitened Adam row by row), so consecutive steps
that train disjoint sets of tokens can run as one pass over all their snippets; each step's rows enter the pass with
the values they would have at that step (their moments only decay before it: WhitenedAdam computes those values at
once, other optimizers step with zero gradients and rewind), and the optimizer then takes the steps with each
step's share of the gradient (WhitenedAdam all at once, others one by one). Exact up to rounding; it turns many
small launch-bound steps into fewer large ones. `batch_plan` follows each batch with others over other rows where
it can, so that small jobs, whose random batches share rows, still run two steps a pass (half the weight reads per
step), and large ones up to 16 (2,500 tokens x 25 snippets: about 16 steps a pass, against 4 for random batches).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokdistill_fast.kernels.embedding_rows import embedding_rows

from ..align import Alignment
from ..config import UserInputError
from ..modeling.attention import Attend, ranges, select_kv
from ..modeling.layout import Layout, lay_out
from ..modeling.models import Decoder

if TYPE_CHECKING:
    from ..config import DistillConfig


@dataclass
class Passes:
    """How a step runs the student. prefix: packed rows (no padding) from each sequence's first new token on,
    attending to the keys/values of the positions before it, which are identical in teacher and student, carry
    no gradient and are not in the loss (exact under causal attention). fused: those keys/values, and the step's
    targets, come from a teacher pass over the same snippets run just before, instead of a no-grad student prefix
    pass (each snippet is then seen once: epochs == 1). cached: they come from the teacher cache, which kept them
    (teacher.compute capture), so no step runs a prefix in any epoch. Neither: whole right-padded sequences (the
    reference)."""

    prefix: bool = False
    fused: bool = False
    cached: bool = False

    def describe(self) -> str:
        return "fused" if self.fused else "cached" if self.cached else "prefix" if self.prefix else "off"

    @classmethod
    def for_config(cls, cfg: DistillConfig) -> Passes:
        """How the student's steps run for this config (--prefix-sharing, --backend, --epochs, --more-epochs)."""
        return resolve_passes(cfg.prefix_sharing, cfg.backend, cfg.epochs + cfg.run_more_epochs(),
                              cached_teacher=cfg.method == "token-distill+alpha-mass",
                              sink_guard=cfg.method.startswith("token-distill") and cfg.loss == "mse")


def resolve_passes(prefix_sharing: str, backend: str, epochs: int, cached_teacher: bool = False,
                   sink_guard: bool = False) -> Passes:
    """auto: off with the reference backend (torch), fused when every snippet is seen once and the objective needs
    no cached teacher pass (`cached_teacher`: alpha-mass reads statistics of the whole pass; `sink_guard`: the MSE
    leaves out pairs whose teacher state is an attention sink by the median norm of all of them, teacher.sink_pairs,
    so that a one-epoch run trains the rows that `compare`, which caches, trains), else on. An explicit fused run
    of the MSE has no sink guard."""
    if prefix_sharing == "auto":
        fused = epochs == 1 and not cached_teacher and not sink_guard
        prefix_sharing = "off" if backend == "torch" else "fused" if fused else "on"
    if prefix_sharing == "fused" and epochs != 1:
        raise UserInputError("--prefix-sharing fused needs one epoch in all (--epochs 1 --more-epochs 0): the teacher "
                             "pass runs inside each step")
    if prefix_sharing == "fused" and cached_teacher:
        raise UserInputError("--prefix-sharing fused runs the teacher inside each step; token-distill+alpha-mass "
                             "needs its cached pass")
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
    word: torch.Tensor  # [K] bool: the pair is its snippet's first, the word's own position
    ntp_idx: torch.Tensor  # [K'] rows of main's output that have a next token
    ntp_target: torch.Tensor  # [K'] extended id of that next token
    prefix: Layout | None = None
    part: torch.Tensor | None = None  # [K] step (0, 1, ...) of each pair when the batch runs a group of steps
    kv_rows: torch.Tensor | None = None  # cached passes: rows of the teacher cache's prefix keys/values, in cu order

    def to(self, device: torch.device) -> Batch:
        s_idx, t_idx, tok, word, ntp_idx, ntp_target = (t.to(device, non_blocking=True) for t in (
            self.s_idx, self.t_idx, self.tok, self.word, self.ntp_idx, self.ntp_target))
        part, kv_rows = (None if t is None else t.to(device, non_blocking=True) for t in (self.part, self.kv_rows))
        return Batch(None if self.main is None else self.main.to(device), s_idx, t_idx, self.t_rows, tok, word,
                     ntp_idx, ntp_target, None if self.prefix is None else self.prefix.to(device), part, kv_rows)


def make_batch(al: Alignment, snippet_row: np.ndarray, snippets: np.ndarray, passes: Passes,
               teacher: tuple[np.ndarray, np.ndarray] | None = None, step_of: np.ndarray | None = None,
               prefix_cu: np.ndarray | None = None) -> Batch:
    """Layouts and index arrays (host side) of one step over `snippets` (indices into the alignment; `snippet_row`
    maps a snippet to the embedding row it trains). `teacher` = (teacher_ids, cu_teacher) for fused passes,
    `prefix_cu` (TeacherCache.prefix_cu) for cached ones. `step_of` [len(snippets)]: for a group of steps, the
    step of each snippet."""
    cu_a, cu_s = al.cu_aligned, al.cu_student
    if passes.prefix:
        keep = cu_a[snippets + 1] > cu_a[snippets]  # snippets without aligned pairs contribute nothing
        snippets, step_of = snippets[keep], None if step_of is None else step_of[keep]
    counts = cu_a[snippets + 1] - cu_a[snippets]
    pairs = ranges(cu_a[snippets], counts)  # aligned pairs of the batch = their rows in the teacher cache
    seq = np.repeat(np.arange(len(snippets)), counts)  # batch row of each pair
    s_pos = al.s_pos[pairs].astype(np.int64)
    lens = cu_s[snippets + 1] - cu_s[snippets]
    has_next = s_pos + 1 < lens[seq]  # next-token targets: aligned positions except each sequence's last one
    ntp_target = al.student_ids[(cu_s[snippets][seq] + s_pos + 1)[has_next]]
    tok = np.repeat(snippet_row[snippets], counts)
    word = torch.from_numpy(pairs == np.repeat(cu_a[snippets], counts))
    t_idx, prefix, kv_rows = pairs, None, None
    if len(pairs) == 0:  # nothing to train (also a rank's empty share of a batch, see distributed.py)
        main, s_flat = None, np.zeros(0, dtype=np.int64)
    elif not passes.prefix:
        main = lay_out(al.student_ids, cu_s[snippets], lens, np.zeros(len(snippets)), packed=False)
        s_flat = main.rows(seq, s_pos)
    else:
        p = al.s_pos[cu_a[snippets]].astype(np.int64)  # first new token of each sequence = its prefix length
        if passes.fused:
            teacher_ids, cu_t = teacher
            prefix = lay_out(teacher_ids, cu_t[snippets], cu_t[snippets + 1] - cu_t[snippets],
                             np.zeros(len(snippets)), True, capture=p)
            t_idx = prefix.rows(seq, al.t_pos[pairs].astype(np.int64))
        elif passes.cached:
            kv_rows = torch.from_numpy(ranges(prefix_cu[snippets], p))
        elif p.any():  # sequences without a prefix are left out; captured rows stay in cu(p) order
            some = p > 0
            prefix = lay_out(al.student_ids, cu_s[snippets[some]], p[some], np.zeros(int(some.sum())), True)
        main = lay_out(al.student_ids, cu_s[snippets] + p, lens - p, p, True, prefix_len=p)
        s_flat = main.rows(seq, s_pos - p[seq])
    tensors = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
               for a in (s_flat, t_idx, tok, s_flat[has_next], ntp_target))
    s_idx, t_idx_t, tok_t, ntp_idx, ntp_t = tensors
    part = None if step_of is None else torch.from_numpy(np.ascontiguousarray(step_of[seq], dtype=np.int64))
    return Batch(main, s_idx, t_idx_t, pairs, tok_t, word, ntp_idx, ntp_t, prefix, part, kv_rows)


@dataclass
class Group:
    """Consecutive steps run as one pass: their snippets in one Batch, and per step the rows it trains and its
    number of aligned pairs (the step's loss is the mean over them)."""

    steps: range
    batch: Batch
    tokens: list[torch.Tensor]  # [n_j] rows trained by each step
    pairs: torch.Tensor  # [len(steps)] fp32 aligned pairs per step (empty for a single step)
    trained: torch.Tensor | None = None  # cat(tokens): every row the group trains (derived on the host when None)
    trained_step: torch.Tensor | None = None  # the step (0, 1, ...) of each of them

    def __post_init__(self):
        if self.trained is None:
            self.trained = torch.cat(self.tokens)
            self.trained_step = torch.repeat_interleave(torch.arange(len(self.tokens)),
                                                        torch.tensor([len(t) for t in self.tokens]))

    def to(self, device: torch.device) -> Group:
        tokens, pairs, trained, trained_step = ([t.to(device, non_blocking=True) for t in self.tokens],
                                                *(t.to(device, non_blocking=True)
                                                  for t in (self.pairs, self.trained, self.trained_step)))
        return Group(self.steps, self.batch.to(device), tokens, pairs, trained, trained_step)


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
               teacher: tuple[np.ndarray, np.ndarray] | None, prefix_cu: np.ndarray | None = None) -> Group:
    """The host-side Group of `steps`. One step is just its own batch: nothing is rewound, so it needs no
    pair counts."""
    parts = [plan[s] for s in steps]
    tokens = [torch.from_numpy(np.unique(snippet_row[p]).astype(np.int64)) for p in parts]
    if len(parts) == 1:
        return Group(steps, make_batch(al, snippet_row, parts[0], passes, teacher, prefix_cu=prefix_cu), tokens,
                     torch.zeros(0))
    step_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    batch = make_batch(al, snippet_row, np.concatenate(parts), passes, teacher, step_of, prefix_cu)
    counts = [int((al.cu_aligned[p + 1] - al.cu_aligned[p]).sum()) for p in parts]
    return Group(steps, batch, tokens, torch.tensor(counts, dtype=torch.float32))


# Batches' worth of snippets after a batch in which batch_plan looks for the next batch of its run.
RUN_WINDOW = 4
# A run grows past its first two batches while the rows it trains are at most this share of the job's rows, so
# every batch it adds draws from at least three quarters of them (batches drawn from a fixed half of the rows put more
# of the next-token mass after the words: docs/defaults.md, "Batches in pairs"); jobs of up to about 80 rows keep
# their pairs exactly as before.
RUN_SHARE = 0.25
# The most batches in a run: the loop's step groups (Schedule.group) hold at most this many steps.
RUN_STEPS = 16


def batch_plan(snippet_row: np.ndarray, snippets_per_batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The snippets of every step: each epoch a fresh shuffle cut into batches, in runs over disjoint rows where the
    shuffle allows: after a batch, the next takes the first snippets of the following RUN_WINDOW batches' worth
    whose rows the run does not train yet; a run ends where too few are left, at RUN_STEPS batches, or, past a pair,
    once it trains over RUN_SHARE of the rows. `group_steps` runs each run as one pass."""
    rng = np.random.default_rng(seed)
    row, bs, plan = snippet_row.tolist(), snippets_per_batch, []
    share = RUN_SHARE * len(set(row))
    for _ in range(epochs):
        queue = deque(rng.permutation(len(row)).tolist())
        while queue:
            batch = [queue.popleft() for _ in range(min(bs, len(queue)))]
            plan.append(np.array(batch, dtype=np.int64))
            taken, size = {row[s] for s in batch}, 1
            while queue and size < RUN_STEPS and (size == 1 or len(taken) <= share):
                ahead = [queue.popleft() for _ in range(min(RUN_WINDOW * bs, len(queue)))]
                batch = [s for s in ahead if row[s] not in taken][:bs]
                found = len(batch) == bs
                if found:
                    plan.append(np.array(batch, dtype=np.int64))
                    taken.update(row[s] for s in batch)
                    size += 1
                    chosen = set(batch)
                    ahead = [s for s in ahead if s not in chosen]
                queue.extendleft(reversed(ahead))
                if not found:
                    break
    return plan


# Steps between a row's steps in the 40-word jobs the learning rates were chosen on (about 3; "Rows that sit out
# most steps" in docs/defaults.md).
SPACING_REF = 4.0


def step_spacing(plan: list[np.ndarray], snippet_row: np.ndarray) -> float:
    """Steps per step of a trained row, on average over the rows: len(plan) x rows / (row, step) pairs with a
    gradient (1.0: every row in every step)."""
    pairs = sum(len(np.unique(snippet_row[b])) for b in plan)
    return len(plan) * len(np.unique(snippet_row)) / max(pairs, 1)


def rate_scale(spacing: float) -> float:
    """Learning-rate factor for rows that step once every `spacing` steps: Adam's moments decay on the steps a row
    sits out, so its moves grow as sqrt(spacing); rarer steps than SPACING_REF get the rate scaled back."""
    return min(1.0, (SPACING_REF / spacing) ** 0.5)


def student_states(decoder: Decoder, b: Batch, table: torch.Tensor, rows: torch.Tensor, layers: list[int],
                   passes: Passes, teacher_layers: list[int] | None = None, backend: str = "auto",
                   prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """Flattened student states {layer: [rows of main, D]} of one step and, fused, the teacher pass's
    flattened states {layer: [rows, D]} that b.t_idx indexes. `prefix_kv`: the teacher cache's prefix
    keys/values, which cached passes read at b.kv_rows."""
    D = decoder.hidden_size
    if not passes.prefix:
        h0 = embedding_rows(b.main.ids, table, rows, decoder.embed_scale, backend=backend)
        return {l: h.reshape(-1, D) for l, h in decoder.hidden_states(h0, layers).items()}, None
    context, targets = None, None
    if b.kv_rows is not None:
        context = select_kv({l: kv for l, kv in prefix_kv.items() if l < max(layers)}, b.kv_rows)
    elif b.prefix is not None:
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


class Rewind:
    """The optimizer side of a group of steps (module docstring). ahead(): the rows each step of the group will
    read. take_steps(): the group's steps for real, each with its own rows' share of the pass's gradient. `lazy`:
    the optimizer is a WhitenedAdam told each step's rows, whose values it computes on sync(), and which does both
    at once once it has a state; other optimizers step (with zero gradients and a rewind, for ahead())."""

    def __init__(self, opt: torch.optim.Optimizer, sched, rows: torch.nn.Parameter, lazy: bool = False):
        self.opt, self.sched, self.rows, self.lazy = opt, sched, rows, lazy

    def step(self, rows: torch.Tensor) -> None:
        """One optimizer and scheduler step in which only `rows` have a gradient."""
        if self.lazy:
            self.opt.step(rows=rows)
        else:
            self.opt.step()
        self.sched.step()

    @torch.no_grad()
    def ahead(self, g: Group) -> torch.Tensor:
        """[n_new, D] leaf holding, for the rows of step j of the group, their values at step j: computed at once
        by a lazy WhitenedAdam that has taken a step (look_ahead), else by stepping with zero gradients and
        rewinding."""
        p, opt, tokens = self.rows, self.opt, g.tokens
        if self.lazy and opt.state.get(p):
            x = p.detach().clone()
            x.index_copy_(0, g.trained, opt.look_ahead(p, g.trained, g.trained_step, self.rates(len(tokens))))
            return x.requires_grad_(True)
        state = {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None
        sched, lrs, before = self.sched.state_dict(), [g["lr"] for g in opt.param_groups], p.detach().clone()
        x = before.clone()
        p.grad = torch.zeros_like(p)
        for rows_j in tokens[1:]:
            self.step(rows_j[:0])
            if self.lazy:
                opt.sync(rows_j)
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
        if self.lazy and self.opt.state.get(p):
            grads = torch.zeros(len(g.trained), p.shape[1], device=p.device) if grad is None else \
                grad.index_select(0, g.trained) * scale[g.trained_step][:, None]
            self.opt.group_steps(p, g.tokens, g.trained_step, grads, self.rates(len(g.tokens)))
            for _ in g.tokens:
                self.sched.step()
            return self.losses(g, row_loss, per_step)
        for j, rows_j in enumerate(g.tokens):
            p.grad = torch.zeros_like(p)
            if grad is not None:
                p.grad.index_copy_(0, rows_j, grad.index_select(0, rows_j) * scale[j])
            self.step(rows_j)
        self.opt.zero_grad(set_to_none=True)
        return self.losses(g, row_loss, per_step)

    def rates(self, k: int) -> list[float]:
        """The learning rates of the next k steps, as the schedule will set them."""
        return [self.sched.base_lrs[0] * self.sched.lr_lambdas[0](self.sched.last_epoch + i) for i in range(k)]

    @staticmethod
    def losses(g: Group, row_loss: torch.Tensor | None, per_step: torch.Tensor) -> torch.Tensor:
        """Each step's loss: the mean over its own pairs."""
        losses = torch.zeros_like(per_step)
        if row_loss is not None:
            losses.index_add_(0, g.batch.part, row_loss.float())
        return losses / per_step


def plan_groups(al: Alignment, snippet_row: np.ndarray, plan: list[np.ndarray], passes: Passes, max_steps: int,
                breaks: set[int], start: int, teacher: tuple[np.ndarray, np.ndarray] | None,
                device: torch.device, prefix_cu: np.ndarray | None = None) -> list[Group]:
    """The groups of the steps from `start` on, prepared and moved to `device`. Groups are cut from step 0, so
    that a resumed run groups alike (a resume inside a group runs the group's remaining steps: still
    disjoint). max_steps 1: one step per pass."""
    runs = [range(max(g.start, start), g.stop)
            for g in group_steps(plan, snippet_row, max_steps, breaks) if g.stop > start]
    return [make_group(al, snippet_row, plan, g, passes, teacher if passes.fused else None, prefix_cu).to(device)
            for g in runs]

"""Several processes (`torchrun --nproc-per-node N -m tokdistill_fast.cli distill ...`, one or several nodes).

Every rank builds the same workload (retrieval and alignment are deterministic) and the same plan of global
batches (student.batch_plan). Each global batch is split between the ranks (numpy.array_split of its snippets,
so shares differ by at most one snippet); a rank computes teacher targets (cache or fused pass) only for its own
snippets, runs its share of the student forward/backward, and weights its losses by its share of the step's
aligned pairs (its mean becomes its part of the global mean; the counts are known on the host). The gradients of
the new rows (only the rows of the step's tokens when nothing else can have a gradient) and the step loss are then
summed over ranks in one all-reduce, so every rank takes the optimizer step of a one-process run with the same
global batch, up to the order of floating-point sums. alpha-NTP sums its two scalar losses first.

Before the first collective of training, the ranks exchange (status, workload fingerprint, settings) once
(`Ranks.agree`): a bad input on any rank stops every rank with a clear error instead of leaving the others
waiting, ranks that built different workloads stop, and all ranks take rank 0's target layer and learning rate
(every rank runs the autotune search; one choice, rank 0's, holds for all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..align import take_packed
from ..config import UserInputError, launch

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place among the processes of one run; world 1 is a plain one-process run (no group)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # the process group was created here (and is destroyed at the end of the run)
    agreed: bool = False

    @property
    def writer(self) -> bool:
        """Only rank 0 writes output (export, report, check)."""
        return self.rank == 0

    def agree(self, work, settings: tuple) -> tuple:
        """Exchange (ok, workload fingerprint, settings) with the other ranks; return rank 0's settings. Raises
        UserInputError if another rank failed before this point, RuntimeError if the workloads differ."""
        if self.world == 1:
            return settings
        got = self._exchange(("ok", fingerprint(work), settings))
        if len({fp for _, fp, _ in got}) > 1:
            raise RuntimeError("the ranks built different workloads (snippets or alignment differ between processes); "
                               "generated contexts must be deterministic, or give a corpus with enough snippets")
        return got[0][2]

    def fail(self, error: BaseException) -> None:
        """Called on an exception before `agree`: tell the other ranks, which are on their way to `agree`."""
        if self.world > 1 and not self.agreed:
            self._exchange(("failed", f"{type(error).__name__}: {error}", None))

    def _exchange(self, mine: tuple) -> list[tuple]:
        self.agreed = True
        got: list = [None] * self.world
        dist.all_gather_object(got, mine)
        failed = [(r, message) for r, (status, message, _) in enumerate(got) if status == "failed"]
        if failed and mine[0] == "ok":
            r, message = failed[0]
            raise UserInputError(f"rank {r} stopped: {message}")
        return got

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if error is not None:
                self.fail(error)
        except (RuntimeError, OSError) as e:  # the other ranks are gone already: the original error matters
            log.warning("could not tell the other ranks about the error: %s", e)
        finally:
            self.close()


def setup(device: str) -> Ranks:
    """Join the process group of a torchrun launch (WORLD_SIZE > 1): NCCL with this process on cuda:LOCAL_RANK
    when the run uses CUDA, else gloo. A group the caller already initialized is used as is."""
    env = launch()
    if env.world_size <= 1:
        return Ranks()
    cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if cuda and ":" in device:
        raise UserInputError(f"--device {device}: under torchrun give --device cuda (or auto); each process then "
                             "uses cuda:LOCAL_RANK")
    if cuda and env.local_rank >= torch.cuda.device_count():
        raise UserInputError(f"LOCAL_RANK {env.local_rank}, but {torch.cuda.device_count()} GPU(s) visible: start at "
                             "most one process per GPU (--nproc-per-node), or use --device cpu")
    if cuda:
        torch.cuda.set_device(env.local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() != env.world_size:
        raise RuntimeError(f"process group of {dist.get_world_size()} processes, WORLD_SIZE {env.world_size}")
    log.info("rank %d of %d (%s)", dist.get_rank(), env.world_size, dist.get_backend())
    return Ranks(dist.get_rank(), env.world_size, owned)


def fingerprint(work) -> str:
    """Hash of what the ranks must agree on: the snippets, their rows and their alignment (None: no training)."""
    if work is None:
        return "none"
    h = hashlib.sha256()
    al = work.alignment
    for a in (work.snippet_row, work.teacher_ids, work.cu_teacher, al.student_ids, al.cu_student, al.s_pos,
              al.t_pos, al.cu_aligned):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class Shard:
    """One rank's part of the training steps: its snippets of every global batch (`plan`, indices into its own
    workload), its share of each step's aligned pairs and NTP targets (`weights` [steps, 2]), and the trainable
    rows each global batch touches (whose gradients are the only ones summed when no other row can have one)."""

    ranks: Ranks
    plan: list[np.ndarray]
    weights: torch.Tensor
    touched: list[torch.Tensor]
    snippets: np.ndarray  # the one-process workload's index of each of this rank's snippets

    def gather(self, al, values: np.ndarray) -> np.ndarray:
        """Per-pair `values` [pairs, ...] of this rank's snippets (alignment `al`) from every rank, in the
        one-process run's order of pairs; a snippet on several ranks counts once."""
        parts: list = [None] * self.ranks.world
        dist.all_gather_object(parts, (self.snippets, np.diff(al.cu_aligned), values))
        seen: dict[int, np.ndarray] = {}
        for snippets, counts, part in parts:
            for g, seg in zip(snippets.tolist(), np.split(part, np.cumsum(counts)[:-1])):
                seen.setdefault(g, seg)
        return np.concatenate([values[:0]] + [seen[g] for g in sorted(seen)])

    def median(self, al, norms: torch.Tensor) -> float:
        """The median of every rank's pair norms, as one process takes it (torch's: the lower of two middles)."""
        return float(torch.from_numpy(self.gather(al, norms.cpu().numpy())).median())

    def left_out(self, al, drop: np.ndarray, snippet_row: np.ndarray) -> tuple[np.ndarray, int]:
        """(the new row of each pair left out, how many) over every rank's pairs, each once."""
        both = self.gather(al, np.stack([drop.astype(np.int64), snippet_row[al.pair_snippet()]], axis=1))
        return both[both[:, 0] == 1, 1], int(both[:, 0].sum())

    def reweigh(self, al) -> None:
        """The distillation column of `weights` from alignment `al` (pairs left out): this rank's share of each
        step's aligned pairs."""
        counts = np.diff(al.cu_aligned)
        mine = torch.tensor([int(counts[p].sum()) for p in self.plan], dtype=torch.float64,
                            device=self.weights.device)
        total = mine.clone()
        dist.all_reduce(total)
        self.weights[:, 0] = (mine / total.clamp_min(1)).to(self.weights.dtype)

    def reduce(self, step: int, params: list[torch.Tensor], loss: torch.Tensor, dense: bool) -> torch.Tensor:
        """Sum the parameters' gradients (all rows if `dense`, else the step's touched rows) and the loss over
        ranks, in one all-reduce; return the summed loss."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        idx = None if dense else self.touched[step]
        parts = [(g if idx is None else g.index_select(0, idx)).reshape(-1) for g in grads]
        buf = torch.cat(parts + [loss.detach().float().reshape(1)])
        dist.all_reduce(buf)
        offset = 0
        for p, g, part in zip(params, grads, parts):
            summed = buf[offset:offset + part.numel()].view(-1, g.shape[1])
            offset += part.numel()
            if idx is None:
                g.copy_(summed)
            else:
                g.index_copy_(0, idx, summed)
            p.grad = g
        return buf[-1]

    def total(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The sums over ranks of scalar tensors (alpha-NTP's or alpha-mass's two weighted losses)."""
        buf = torch.stack([v.float() for v in values])
        dist.all_reduce(buf)
        return tuple(buf.unbind())

    def finish(self, tok_sum: torch.Tensor, tok_cnt: torch.Tensor, positions: dict[str, int]) -> dict[str, int]:
        """Sum the per-token loss accumulators in place and the computed-position counts over ranks."""
        buf = torch.cat([tok_sum, tok_cnt])
        dist.all_reduce(buf)
        tok_sum.copy_(buf[:len(tok_sum)])
        tok_cnt.copy_(buf[len(tok_sum):])
        counts = torch.tensor(list(positions.values()), dtype=torch.int64, device=tok_sum.device)
        dist.all_reduce(counts)
        return dict(zip(positions, counts.tolist()))


def pair_counts(al) -> tuple[np.ndarray, np.ndarray]:
    """Per snippet: aligned pairs (distillation terms) and aligned positions with a next token (NTP terms), as
    student.make_batch counts them."""
    return np.diff(al.cu_aligned), np.bincount(al.pair_snippet()[al.pair_has_next()], minlength=al.n)


def split(ranks: Ranks, work, plan_of: Callable[[np.ndarray], list[np.ndarray]], device: torch.device):
    """(this rank's workload, its Shard): the rank's snippets of every global batch of the one-process plan
    (`plan_of(snippet_row)`: student.batch_plan), with their teacher sequences and alignment. A one-process run
    keeps its workload and gets no Shard."""
    if ranks.world == 1 or work is None:
        return work, None
    al = work.alignment
    plan = plan_of(work.snippet_row)
    parts = [np.array_split(step, ranks.world)[ranks.rank] for step in plan]
    mine = np.unique(np.concatenate([np.zeros(0, dtype=np.int64), *parts])).astype(np.int64)
    local_index = np.full(al.n, -1, dtype=np.int64)
    local_index[mine] = np.arange(len(mine))
    shares = []
    for counts in pair_counts(al):
        shares.append([counts[part].sum() / max(int(counts[step].sum()), 1) for part, step in zip(parts, plan)])
    weights = torch.tensor(np.asarray(shares, dtype=np.float64).T.reshape(len(plan), 2), dtype=torch.float32,
                           device=device)
    touched = [torch.from_numpy(np.unique(work.snippet_row[step])).to(device) for step in plan]
    teacher_ids, cu_teacher = take_packed(work.teacher_ids, work.cu_teacher, mine)
    local = dataclasses.replace(work, snippets=[work.snippets[i] for i in mine], snippet_row=work.snippet_row[mine],
                                teacher_ids=teacher_ids, cu_teacher=cu_teacher, alignment=al.take(mine))
    log.info("rank %d: %d of %d snippets, %d steps", ranks.rank, len(mine), al.n, len(plan))
    return local, Shard(ranks, [local_index[part] for part in parts], weights, touched, mine)

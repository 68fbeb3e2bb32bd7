"""Large vocabularies: the trainable tokens are trained in chunks, one after the other, each with its own teacher
pass and cache, so the teacher states of tens of thousands of tokens are never held at once.

A chunk is a contiguous range of rows (token order) with all of its tokens' snippets. Its size is given
(--chunk-tokens) or derived from a budget for the teacher cache (--memory-budget): aligned positions x hidden size
x cache dtype bytes x cached layers, counted exactly per token from the alignment. Retrieval and alignment stay
one pass over the corpus for all tokens; the layer / learning-rate search runs once, before the chunks.

How chunking changes results: under Adam without weight decay (plain or whitened) each new row only receives
gradient from its own snippets and moves on its own, so rows interact only through batch composition (which
snippets share a step, and the loss normalised over that step's aligned positions) and the learning-rate schedule,
whose warm-up spans the chunk's steps instead of the run's. A run with one chunk is exactly the unchunked run.
Chunks are also the unit of resumption: finished chunks are checkpointed and not trained again (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import student
from ..align import Alignment, take_packed
from ..config import DistillConfig, progress
from ..teacher import TeacherCache
from .checkpoint import WorkDir

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Row ranges [start, end) of the chunks, in order, covering all rows."""

    bounds: list[tuple[int, int]]

    @property
    def single(self) -> bool:
        return len(self.bounds) <= 1


def row_cache_bytes(al: Alignment, snippet_row: np.ndarray, n_rows: int, bytes_per_position: int) -> np.ndarray:
    """[n_rows] teacher-cache bytes of each row: its snippets' aligned positions x bytes per position."""
    positions = np.bincount(snippet_row, weights=np.diff(al.cu_aligned), minlength=n_rows)
    return positions.astype(np.int64) * bytes_per_position


def plan(cfg: DistillConfig, al: Alignment, snippet_row: np.ndarray, n_rows: int, bytes_per_position: int) -> Plan:
    """Chunks of cfg.chunk_tokens rows, or greedy runs of rows whose cache fits cfg.memory_budget (a row over
    the budget alone gets a chunk of its own), or one chunk."""
    if cfg.chunk_tokens is not None:
        starts = list(range(0, n_rows, cfg.chunk_tokens))
        return Plan([(s, min(s + cfg.chunk_tokens, n_rows)) for s in starts])
    if cfg.memory_budget is None:
        return Plan([(0, n_rows)])
    need = row_cache_bytes(al, snippet_row, n_rows, bytes_per_position)
    bounds, start, used = [], 0, 0
    for r, b in enumerate(need):
        if r > start and used + b > cfg.memory_budget:
            bounds.append((start, r))
            start, used = r, 0
        used += int(b)
    bounds.append((start, n_rows))
    if need.max(initial=0) > cfg.memory_budget:
        log.warning("--memory-budget %.3g GiB: one token's teacher states alone take %.3g GiB",
                    cfg.memory_budget / 2**30, need.max() / 2**30)
    log.info("teacher cache of all %d tokens: %.3g GiB; %d chunk(s) within --memory-budget %.3g GiB", n_rows,
             need.sum() / 2**30, len(bounds), cfg.memory_budget / 2**30)  # in the unit _size reads (1024s)
    return Plan(bounds)


def snippets_of(snippet_row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices of the snippets of `rows`, in snippet order: the snippets take_rows takes."""
    return np.flatnonzero(np.isin(snippet_row, rows))


def take_rows(al: Alignment, teacher_ids: np.ndarray, cu_teacher: np.ndarray, snippet_row: np.ndarray,
              rows: np.ndarray, V: int) -> tuple[Alignment, np.ndarray, np.ndarray, np.ndarray]:
    """The snippets of `rows` (distinct row indices), with those rows (and the new ids V + row in the student
    sequences) renumbered 0..len(rows)-1 in their order: (alignment, teacher_ids, cu_teacher, snippet_row)."""
    rows = np.asarray(rows, dtype=np.int64)
    renumber = np.full(max(int(snippet_row.max(initial=-1)), int(rows.max(initial=-1))) + 1, -1, dtype=np.int64)
    renumber[rows] = np.arange(len(rows))
    idx = snippets_of(snippet_row, rows)
    sub = al.take(idx)
    new = sub.student_ids >= V
    moved = renumber[sub.student_ids[new] - V]
    if (moved < 0).any():
        raise ValueError("take_rows: a snippet holds the id of a row outside `rows`")
    sub.student_ids = sub.student_ids.copy()
    sub.student_ids[new] = V + moved
    ids, cu = take_packed(teacher_ids, cu_teacher, idx)
    return sub, ids, cu, renumber[snippet_row[idx]]


def merge(results: list[student.TrainResult], device: torch.device) -> student.TrainResult:
    """One TrainResult of the chunks' results, rows in chunk order."""
    out = [r.out_rows for r in results]
    before = merge([r.before for r in results], device) if all(r.before is not None for r in results) else None
    positions: dict[str, int] = {}
    for r in results:
        for k, v in r.extra["positions"].items():
            positions[k] = positions.get(k, 0) + v
    curves = [r.extra.get("epoch_loss") for r in results]
    epoch_loss = None  # the chunks' curves, each epoch's mean weighted by the chunk's steps
    if curves and all(c and len(c) == len(curves[0]) for c in curves):
        epoch_loss = np.average(np.array(curves), axis=0, weights=[max(r.steps, 1) for r in results]).tolist()
    return student.TrainResult(
        torch.cat([r.rows for r in results]).to(device),
        None if out[0] is None else torch.cat(out).to(device),
        np.concatenate([r.step_loss for r in results]), np.concatenate([r.token_loss for r in results]),
        np.concatenate([r.word_loss for r in results]),
        sum(r.seconds for r in results), sum(r.steps for r in results),
        extra={"passes": results[0].extra["passes"], "positions": positions, "chunks": len(results),
               "groups": sum(r.extra.get("groups", r.steps) for r in results),
               "teacher_seconds": sum(r.extra.get("teacher_seconds", 0.0) for r in results),
               "epoch_loss": epoch_loss, "sink_pairs": sum(r.extra.get("sink_pairs", 0) for r in results),
               "spikes_dropped": sum(r.extra.get("spikes_dropped", 0) for r in results)}, before=before)


@dataclass
class Rate:
    """Seconds per token of the chunks trained so far, for the ETA: the teacher pass per token of each chunk, and
    the training per token of the steps run here (a chunk resumed part way ran only the rest of its steps)."""

    tokens: int = 0
    teacher_s: float = 0.0
    trained: float = 0.0  # tokens x the share of their steps run in this process
    train_s: float = 0.0

    def add(self, tokens: int, teacher_s: float, train_s: float, done: float) -> None:
        self.tokens, self.teacher_s = self.tokens + tokens, self.teacher_s + teacher_s
        self.trained, self.train_s = self.trained + tokens * done, self.train_s + train_s

    def per_token(self) -> float | None:
        """None until a chunk has trained some of its steps here (one restored at its last step ran none)."""
        return self.teacher_s / self.tokens + self.train_s / self.trained if self.trained else None

    def describe(self) -> str:
        return "no rate yet" if (s := self.per_token()) is None else f"{s:.4f} s/token"

    def eta(self, tokens_left: int) -> str:
        return "unknown" if (s := self.per_token()) is None else f"{s * tokens_left:.0f} s"


class ChunkedTrainer:
    """student.train() over the chunks of `plan` in turn: per chunk, the teacher cache (`cache_fn`, when the
    objective reads one and the passes do not compute targets in-step), training with checkpoints, and the
    result saved in the work directory. Logs seconds per token and an ETA after each chunk."""

    def __init__(self, plan: Plan, work: WorkDir,
                 cache_fn: Callable[[Alignment, np.ndarray, np.ndarray], TeacherCache]):
        self.plan, self.work, self.cache_fn = plan, work, cache_fn

    def __call__(self, decoder, al: Alignment, cache: TeacherCache | None, snippet_row: np.ndarray,
                 init_rows: torch.Tensor, init_out: torch.Tensor | None, objective: student.Objective,
                 schedule: student.Schedule, tied: bool, desc: str = "train", passes: student.Passes | None = None,
                 teacher: tuple[np.ndarray, np.ndarray] | None = None) -> student.TrainResult:
        passes = passes or student.Passes()
        V, n_rows, n = decoder.embed_weight.shape[0], init_rows.shape[0], len(self.plan.bounds)
        results, offset = [], 0
        rate = Rate()
        for c, (start, end) in enumerate(progress(self.plan.bounds, desc="chunks", unit="chunk")):
            result = self.work.load(f"chunk-{c:04d}")
            if result is not None:
                log.info("resume: chunk %d/%d (%d tokens) from the checkpoint", c + 1, n, end - start)
            else:
                t0 = time.perf_counter()
                sub, ids, cu, rows = take_rows(al, teacher[0], teacher[1], snippet_row, np.arange(start, end), V)
                needs_cache = objective.distill is not None and not passes.fused
                chunk_cache = self.cache_fn(sub, ids, cu) if needs_cache else None
                t_teacher = time.perf_counter() - t0
                hook = self.work.student_hook(f"student-{c:04d}", offset)
                result = student.train(decoder, sub, chunk_cache, rows, init_rows[start:end],
                                       None if init_out is None else init_out[start:end], objective, schedule, tied,
                                       desc=f"{desc} {c + 1}/{n}", passes=passes, teacher=(ids, cu), hook=hook)
                del chunk_cache
                result = dataclasses.replace(result, rows=result.rows.cpu(),
                                             out_rows=None if result.out_rows is None else result.out_rows.cpu(),
                                             extra={**result.extra, "teacher_seconds": t_teacher})
                self.work.save(f"chunk-{c:04d}", result)
                self.work.remove(f"student-{c:04d}")
                done = 1.0 - (hook.restored if hook is not None else 0.0)  # a resumed chunk: the steps left
                rate.add(end - start, t_teacher, time.perf_counter() - t0 - t_teacher, done)
                log.info("chunk %d/%d: %d tokens in %.1f s%s (%s); %d tokens left, ETA %s", c + 1, n, end - start,
                         time.perf_counter() - t0, f", {done:.0%} of its steps" if done < 1 else "",
                         rate.describe(), n_rows - end, rate.eta(n_rows - end))
            results.append(result)
            offset += result.steps
        return merge(results, init_rows.device)

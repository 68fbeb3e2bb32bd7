"""Rows that train again on their own snippets after the main run: words whose loss ended an outlier
(retry_outliers), the hardest quarter (continue_hardest) and the start-of-text variants (train_variants), each
through train_alone or a run of its own, keeping whichever row ends with the lower loss."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import contexts, hubs, student, teacher
from .config import HARDEST_FRACTION, HARDEST_WARMUP, VARIANT_SHARE, DistillConfig
from .control import chunks
from .report import outlier_rows
from .rows import moved_rows, primaries_of
from .workload import Workload, build_workload

if TYPE_CHECKING:
    from .results import Prepared

log = logging.getLogger(__name__)


def retry_outliers(prep: Prepared, work: Workload, result: student.TrainResult,
                   start: tuple[torch.Tensor, torch.Tensor | None], objective: student.Objective,
                   schedule: student.Schedule, passes: student.Passes, cache: teacher.TeacherCache | None = None,
                   among: list[int] | None = None) -> dict[int, dict]:
    """Rows whose word loss ended over OUTLIER_FACTOR x the median train again alone: from their `start` rows, on
    their own snippets, with the same objective and schedule (train_alone), in batches cut by their share of the
    run's rows, so that a row takes about as many steps as it had in the run (one row of 40: one snippet a step;
    in batches of 16 it took 2 steps an epoch and ended near its subtoken-mean KL). A row can tip into the
    attention-sink regime mid-run (massive activations at its own position, a loss thousands of times the
    others', and a tied row that the model then predicts after other words); alone, it did not (docs/defaults.md,
    "Rows that fall into the sink"). `among`: only these rows may retry (the rows the more epochs sent back, whose
    loss is new; the others had their retry)."""
    _, bad = outlier_rows(result.word_loss)
    bad = bad if among is None else np.intersect1d(bad, among)
    alone = dataclasses.replace(schedule, batch_size=max(1, round(schedule.batch_size * len(bad) / len(result.rows))))
    return train_alone(prep, work, result, bad, pick_rows(start, bad), objective, alone, passes, "again alone",
                       cache)


def continue_hardest(prep: Prepared, work: Workload, result: student.TrainResult, epochs: int,
                     objective: student.Objective, schedule: student.Schedule, passes: student.Passes,
                     back=None, cache: teacher.TeacherCache | None = None) -> dict[int, dict]:
    """The HARDEST_FRACTION of the rows with the highest word loss train `epochs` more epochs alone, from their
    trained rows (train_alone): the gain of more passes goes mostly to the words still furthest from their teacher
    (docs/defaults.md, "More passes for the hardest quarter"), at a fraction of the cost of more passes for all.
    `back` (tied models: (rows before, rows after, continued rows, desc) -> {row sent back: mass}, send_back's rule):
    trained alone, rows can become hubs the loss does not see (the Python Library Reference on Gemma-3: ` built-in`
    took 0.94 after a word), so the rows it names go back to their rows and losses from before."""
    loss = np.asarray(result.word_loss, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(loss))
    hardest = np.sort(ok[np.argsort(-loss[ok], kind="stable")[:int(round(HARDEST_FRACTION * len(ok)))]])
    if epochs < 1 or not len(hardest):
        return {}
    more = dataclasses.replace(schedule, epochs=epochs, warmup_fraction=HARDEST_WARMUP, more_epochs=0)
    before = dataclasses.replace(result, rows=result.rows.clone(), token_loss=result.token_loss.copy(),
                                 word_loss=result.word_loss.copy(),
                                 out_rows=None if result.out_rows is None else result.out_rows.clone())
    out = train_alone(prep, work, result, hardest, pick_rows((result.rows, result.out_rows), hardest), objective,
                      more, passes, "hardest", cache)
    moved = [r for r, v in out.items() if v["kept"] == "alone"]
    sent = back(before.rows, result.rows, moved, "hardest") if back is not None and moved else {}
    hubs.restore_rows(result, before, sent)
    for r, mass in sent.items():
        out[r].update(kept="first", over_predicted=mass)
    return out


def train_variants(prep: Prepared, cfg: DistillConfig, epochs: int, rows: torch.Tensor, means: torch.Tensor,
                   trained: set[int], objective: student.Objective, schedule: student.Schedule,
                   passes: student.Passes, word_loss: np.ndarray, after_words=None) -> dict[int, dict]:
    """Variants of trained words (the start-of-text form, "word" after "(", ":" or a newline; casing variants) train
    `epochs` epochs (the run's --variant-epochs, pipeline.extra_epochs; more where the stage has fewer batches than a
    variant may have snippets) alone on their own corpus snippets (at most VARIANT_SHARE of cfg.snippets_per_token each,
    a uniform sample of their hits), from the row they would take otherwise (their primary's trained row moved by the
    subtoken-mean offset), and keep the trained row (`rows` is updated). Unless they train, a variant reads text no
    snippet showed it: on Gemma-3 / Git's manuals, where a fifth of the words' occurrences are bare, their held-out KL
    was 0.45 of subtoken-mean rows' against 0.17 at the running-text forms (docs/defaults.md, "Start-of-text variants
    trained on their own text"). A variant whose loss ends over OUTLIER_FACTOR x the median of the words' (`word_loss`)
    and the variants' trains as many steps again alone, from its trained row, on all its snippets at once, and keeps the
    lower loss (train_alone: Gemma-3's `rw-r--r`, on the Debian Reference's `ls -l` lines, "-rw-r--r-- 1 root", went
    from 11x the median to 5.5x; docs/defaults.md, "Variants whose loss is an outlier train again"). `after_words` (tied
    models: (rows, trained tokens) -> the [trained words, new tokens] next-token mass after each word, and the columns'
    tokens): the variants that raise some word's mass over what it was with their moved rows go back to those
    (send_back). Returns {token: {"snippets", "epochs", "word_loss", "kept"}, and "retried" (train_alone's record) for
    an outlier}."""
    toks, decoder = prep.toks, prep.decoder
    variants = [i for i, t in enumerate(toks) if t.variant_of is not None]
    variants = [i for i, p in zip(variants, primaries_of(toks, variants)) if p in trained]
    if epochs < 1 or not variants or cfg.contexts != "retrieve":
        return {}
    if cfg.chunk_tokens is not None or cfg.memory_budget is not None:
        log.info("variants: not trained in chunked runs (--chunk-tokens, --memory-budget); they keep their moved rows")
        return {}
    V = decoder.embed_weight.shape[0]
    keep = max(1, int(VARIANT_SHARE * cfg.snippets_per_token))
    left = prep.work.retrieval.get("left_context", cfg.left_context)  # the words' own: one left context a run
    work = build_workload(cfg.replace(snippets_per_token=keep, left_context=left), decoder.model, prep.tokenizer,
                          toks, prep.corpus, contexts.start_id(prep.tokenizer), V, train=variants,
                          extended_tokenizer=prep.new_tokenizer)
    per_row = work.snippets_per_row()
    have = np.flatnonzero(per_row > 0)
    log.info("variants: %d of %d variant(s) have corpus snippets of their own (%d in all)", len(have),
             len(variants), int(per_row.sum()))
    if not len(have):
        return {}
    al, ids, cu, row = chunks.take_rows(work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row, have, V)

    def stage_epochs(snippets: int) -> int:
        """As many steps as a variant with `keep` snippets takes in a stage of `keep` or more batches, however few
        the stage's `snippets`: a stage of one batch took `epochs` steps, too few for a row to leave its start."""
        return max(epochs, math.ceil(epochs * keep / math.ceil(snippets / schedule.batch_size)))

    cache = None
    if objective.distill is not None and not passes.fused:
        cache = teacher.without_prefix(decoder, prep.dtype, al, ids, cu, objective.cache_layers(decoder.num_layers),
                                       passes.prefix)
    index = [variants[r] for r in have.tolist()]
    start = moved_rows(rows, means, index, primaries_of(toks, index))
    alone = dataclasses.replace(schedule, epochs=stage_epochs(len(row)), warmup_fraction=HARDEST_WARMUP,
                                more_epochs=0)
    result = student.train(decoder, al, cache, row, start, None, objective, alone, prep.tied, desc="variants",
                           passes=passes, teacher=(ids, cu))
    _, over = outlier_rows(np.concatenate([word_loss, result.word_loss]))
    bad = over[over >= len(word_loss)] - len(word_loss)
    again = train_alone(prep, dataclasses.replace(work, primaries=index, alignment=al, teacher_ids=ids,
                                                  cu_teacher=cu, snippet_row=row),
                        result, bad, pick_rows((result.rows, None), bad), objective,
                        dataclasses.replace(alone, epochs=stage_epochs(int(np.isin(row, bad).sum()))), passes,
                        "variants again", cache) if len(bad) else {}
    out = {i: {"snippets": int(per_row[r]), "epochs": alone.epochs, "word_loss": float(result.word_loss[k]),
               "kept": True, **({"retried": again[k]} if k in again else {})}
           for k, (i, r) in enumerate(zip(index, have.tolist()))}
    trial = rows.clone()
    trial[index] = result.rows.to(trial.device, trial.dtype)
    if after_words is not None:
        sent = hubs.send_back(prep, after_words, trial, {i: start[k].to(trial.device, trial.dtype)
                                                    for k, i in enumerate(index)}, trained, "variants")
        for i, mass in sent.items():
            out[i].update(kept=False, over_predicted=mass)
    rows[index] = trial[index]
    log.info("variants: %d row(s) trained in %.1f s, %d kept", len(index), result.seconds,
             sum(v["kept"] for v in out.values()))
    return out


def pick_rows(rows: tuple[torch.Tensor, torch.Tensor | None], index: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input rows, output rows or None) at `index`."""
    return tuple(None if t is None else t[torch.from_numpy(index).to(t.device)] for t in rows)


def train_alone(prep: Prepared, work: Workload, result: student.TrainResult, index: np.ndarray,
                start: tuple[torch.Tensor, torch.Tensor | None], objective: student.Objective,
                schedule: student.Schedule, passes: student.Passes, desc: str,
                cache: teacher.TeacherCache | None = None) -> dict[int, dict]:
    """Rows `index` of `result` train on their own snippets only, from their `start` rows, and each keeps whichever
    row ends with the lower word loss (`result` is updated). `cache`: the run's teacher cache, which they read their
    snippets' targets (and prefix keys/values) from; None: a teacher pass over those snippets runs first.
    Returns {row: {"first", "alone": word losses, "kept": "alone" or "first"}}."""
    if not len(index):
        return {}
    decoder = prep.decoder
    sub, ids, cu, sub_row = chunks.take_rows(work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row,
                                             index, decoder.embed_weight.shape[0])
    if cache is not None:
        cache = cache.take(chunks.snippets_of(work.snippet_row, index))
    elif objective.distill is not None and not passes.fused:
        cache = teacher.without_prefix(decoder, prep.dtype, sub, ids, cu, objective.cache_layers(decoder.num_layers),
                                       passes.prefix)
    again = student.train(decoder, sub, cache, sub_row, *start, objective, schedule, prep.tied, desc=desc,
                          passes=passes, teacher=(ids, cu))
    out = {}
    for i, r in enumerate(index.tolist()):
        alone = float(again.word_loss[i])
        keep = bool(alone < result.word_loss[r])
        out[r] = {"first": float(result.word_loss[r]), "alone": alone, "kept": "alone" if keep else "first"}
        if keep:
            result.rows[r] = again.rows[i].to(result.rows.device)
            if result.out_rows is not None:
                result.out_rows[r] = again.out_rows[i].to(result.out_rows.device)
            result.token_loss[r], result.word_loss[r] = again.token_loss[i], alone
    log.info("%s: %d row(s) trained alone in %.1f s, %d kept their new row", desc, len(index), again.seconds,
             sum(v["kept"] == "alone" for v in out.values()))
    return out

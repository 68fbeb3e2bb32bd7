"""Where a tied model's new rows draw its next-token probability onto new tokens (a hub: the model would predict
them after other words), read on training snippets, and what a run does about it: the rows that raised it go back
(send_back), and the more epochs are kept or sent back row by row (keep_more_epochs)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import student, teacher
from .align import prefix_lengths
from .config import HUB_AFTER_RUN, MASS_RISE
from .evaluation import heldout

if TYPE_CHECKING:
    from .results import Prepared

log = logging.getLogger(__name__)

MASS_SNIPPETS = 8  # training snippets per word on which new_token_mass reads the trained rows


def mass_snippets(snippet_row: np.ndarray) -> np.ndarray:
    """The first MASS_SNIPPETS training snippets of each word (sorted indices), on which new_token_mass reads rows:
    where the model sends its next-token probability is a property of the rows, which a few contexts show."""
    order = np.argsort(snippet_row, kind="stable")
    rank = np.empty(len(snippet_row), dtype=np.int64)
    rank[order] = np.arange(len(snippet_row)) - np.searchsorted(snippet_row[order], snippet_row[order])
    return np.flatnonzero(rank < MASS_SNIPPETS)


def new_token_mass(prep: Prepared, rows: torch.Tensor, out_rows: torch.Tensor | None,
                   cache: teacher.TeacherCache | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """heldout.new_token_mass of `rows` (every new token's; untied: and `out_rows`) on the mass_snippets of each
    trained word: the [trained words, new tokens] mass, the token index of each row and of each column. `cache`:
    the run's teacher pass over prep.work, whose prefix keys/values and states of those snippets
    (pipeline.teacher_cache keeps them) the check continues from instead of running their prefixes through the
    layers it ran."""
    work, n = prep.work, len(prep.toks)
    words = list(work.primaries)
    trained = set(words)
    cols = words + [i for i in range(n) if i not in trained]  # the alignment's ids V + r come first
    scorer = heldout.Scorer(prep.decoder, rows=rows[cols], backend=prep.backend,
                            out_rows=None if out_rows is None else out_rows[cols])
    sel = mass_snippets(work.snippet_row)
    start = None
    depth = max(cache.states) if cache is not None and cache.prefix is not None else 0
    if depth and np.array_equal(np.diff(cache.prefix_cu), prefix_lengths(work.alignment)) and (
            depth == prep.decoder.num_layers or (cache.kept is not None and np.array_equal(cache.kept, sel))):
        start = heldout.PrefixStart(depth, cache.prefix, cache.prefix_cu[sel], cache.prefix_states)
    mass = heldout.new_token_mass(scorer, work.alignment.take(sel), work.snippet_row[sel], len(words), start)
    return mass, words, cols


def send_back(prep: Prepared, after_words, trial: torch.Tensor, start: dict[int, torch.Tensor], trained: set[int],
              desc: str) -> dict[int, float]:
    """Tied rows trained further (`trial` at the tokens of `start`: alone after the words' run, which never shows
    them the states after the other words, or the more epochs) can become rows the model predicts: while they raise
    some trained word's next-token mass on new tokens (`after_words`: (rows, trained tokens) -> [trained words, new
    tokens] mass and the columns' tokens) over what it was with their `start` rows by more than MASS_RISE, the row
    taking most of that rise goes back to its start row (`trial` is updated) and the mass is measured again.
    Returns {token sent back: the word's mass then}."""
    base = trial.clone()
    for i, row in start.items():
        base[i] = row
    before = after_words(base, trained)[0]
    kept, sent = set(start), {}
    while kept:
        mass, cols = after_words(trial, trained | kept)
        rise = np.where(np.isin(cols, list(kept))[None, :], mass - before, 0.0)  # only the kept rows moved
        word = int(rise.sum(axis=1).argmax())
        if rise[word].sum() <= MASS_RISE:
            break
        hub = cols[int(rise[word].argmax())]
        log.warning("%s: with the trained rows %r put %.2f of its next-token probability on new tokens (%.2f with "
                    "the rows before), most on %r: that row goes back", desc, prep.toks[prep.work.primaries[word]].form,
                    mass[word].sum(), before[word].sum(), prep.toks[hub].form)
        trial[hub] = start[hub]
        sent[hub] = float(mass[word].sum())
        kept.remove(hub)
    return sent


def keep_more_epochs(result: student.TrainResult, epochs: int, worst_mass=None, back=None
                     ) -> tuple[student.TrainResult, dict]:
    """The rows after the schedule's `epochs` more epochs (`result`), but where, on a tied model (`worst_mass`:
    result -> the most new-token mass after a trained word), the model would put over HUB_AFTER_RUN of its
    next-token probability on new tokens right after some trained word, the rows that raised it go back to theirs
    from before them (`back`: (rows before, rows after, rows moved, desc) -> {row sent back: mass}, send_back's
    rule); without `back`, every row does. More passes made SmolLM2 / FOLDOC's rows a hub (0.77), and one word of
    Exim's that predicted itself took every row's more epochs from Gemma-3 (docs/defaults.md, "Four more passes in
    the same run", "A word that predicts itself sends back its own row"). Returns (the rows kept, what report.json's
    `more_epochs` says; "sent_back": {row: mass}, where some rows went back)."""
    mass = worst_mass(result) if worst_mass is not None else None
    info = {"epochs": epochs, "steps": result.steps - result.before.steps, "kept": True, "mass_after": mass}
    b, result.before = result.before, None
    if mass is None or mass <= HUB_AFTER_RUN:
        return result, info
    log.warning("more epochs: with their rows a trained word put %.2f of its next-token probability on new tokens",
                mass)
    rows = range(len(result.rows))
    sent = back(b.rows, result.rows, list(rows), "more epochs") if back is not None else dict.fromkeys(rows, mass)
    restore_rows(result, b, sent)
    info.update(kept=len(sent) < len(result.rows), sent_back=sent)
    log.warning("more epochs: %d of %d row(s) sent back to their rows from before them", len(sent), len(result.rows))
    return result, info


def restore_rows(result: student.TrainResult, source: student.TrainResult, index) -> None:
    """Set rows `index` of `result` (input and output rows, token and word losses) to `source`'s."""
    for r in index:
        result.rows[r] = source.rows[r]
        result.token_loss[r], result.word_loss[r] = source.token_loss[r], source.word_loss[r]
        if result.out_rows is not None:
            result.out_rows[r] = source.out_rows[r]

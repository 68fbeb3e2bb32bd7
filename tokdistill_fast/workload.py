"""Stages 2-3 for the tokens to train: their snippets (retrieved from the corpus, topped up with the model's own
continuations of them, or generations from the word, where the corpus has too few) and the alignment of those
snippets, in one Workload."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from . import align, contexts, swap
from .config import DistillConfig
from .tokens import NewToken

log = logging.getLogger(__name__)


@dataclass
class Workload:
    """Snippets and alignment for the trainable tokens (the primaries, or the variants that train after them)."""

    primaries: list[int]  # indices into tokens of the trainable rows, in row order
    snippets: list[contexts.Snippet]
    snippet_row: np.ndarray  # row of each snippet
    teacher_ids: np.ndarray
    cu_teacher: np.ndarray
    alignment: align.Alignment
    sources: dict[int, str]  # token index -> "corpus" | "corpus+continued" | "corpus+generated" | "generated"
    found: dict[int, int]  # token index -> corpus snippets used
    retrieval: dict = field(default_factory=dict)  # corpus statistics (contexts.RetrievalStats.summary and hits)

    def snippets_per_row(self) -> np.ndarray:
        """[rows] snippets of each trainable row."""
        return np.bincount(self.snippet_row, minlength=len(self.primaries))


def trained_tokens(cfg: DistillConfig, toks: list[NewToken]) -> list[int]:
    """Indices of the tokens to train: the primaries, less words shorter than --distill-min-chars (those keep their
    start rows)."""
    short = swap.short_tokens(toks, cfg.distill_min_chars)
    return [i for i, t in enumerate(toks) if t.variant_of is None and i not in short]


def gather_contexts(cfg: DistillConfig, model, tokenizer, toks: list[NewToken], corpus: list,
                    start: int | None, train: list[int] | None = None, extended_tokenizer=None
                    ) -> tuple[list[contexts.Snippet], dict, dict, dict]:
    """Retrieve snippets for the tokens to train; top up tokens with too few (cfg.top_up) from the model's own
    continuations of their snippets, or from generations prompted with the word where the corpus has none.
    `train`: other tokens to retrieve for (start-of-text variants), which take only what the corpus has;
    `extended_tokenizer`: a hit counts only where it emits the word's id, and windows end before an occurrence of
    their word that only it reads (contexts.cut_snippets)."""
    primaries = trained_tokens(cfg, toks) if train is None else train
    found = dict.fromkeys(primaries, 0)
    stats: dict = {}
    snippets: list[contexts.Snippet] = []
    if cfg.contexts == "retrieve":
        sub = [toks[i] for i in primaries]
        extended = None if extended_tokenizer is None else contexts.Extended.of(extended_tokenizer, sub, toks)
        got, rstats, dropped = contexts.retrieve(corpus, tokenizer, sub, cfg.snippets_per_token,
                                                 cfg.snippet_length, cfg.seed, start, cfg.stop_when_full,
                                                 cfg.max_corpus_bytes, cfg.left_context, extended=extended)
        for s in got:
            s.token = primaries[s.token]
            found[s.token] += 1
        snippets.extend(got)
        stats = {**rstats.summary(),
                 "hits": {toks[i].word: h for i, h in zip(primaries, rstats.hits)},
                 "dropped_tokenized_differently": {toks[i].word: d for i, d in zip(primaries, dropped) if d},
                 "other_normalization": {toks[i].word: n for i, n in zip(primaries, rstats.other_form) if n}}
        lost = [toks[i].word for i, d in zip(primaries, dropped) if d and not found[i]]
        if lost and train is None:  # variants take no other text: they keep their moved rows
            log.warning("%d word(s) found in the corpus without a snippet kept: each occurrence sampled is read "
                        "otherwise, by the extended tokenizer (inside a longer new word) or the original one (a Han "
                        "or kana word after a space, its first subtoken taking the space), so they train on the "
                        "model's own text: %s", len(lost), ", ".join(map(repr, lost[:10])))
    # Only the first --loss-positions aligned positions are trained (align.trim_suffix): sample no more than that.
    positions = cfg.run_loss_positions()
    new_tokens = positions - 1 if positions else None
    if train is not None:
        fill, short = {}, []
    elif cfg.top_up == "continue":
        fill = {i: cfg.snippets_per_token - found[i] for i in primaries if 0 < found[i] < cfg.snippets_per_token}
        short = [i for i in primaries if found[i] == 0]
    else:
        fill, short = {}, [i for i in primaries if found[i] < max(1, cfg.snippets_per_token // 4)]
    if fill:  # seed + 1: a random stream apart from the generated contexts' below
        log.info("continuing the corpus snippets of %d token(s) with fewer than %d", len(fill), cfg.snippets_per_token)
        snippets.extend(contexts.sample(model, tokenizer, contexts.from_corpus(toks, snippets, fill),
                                        cfg.snippet_length, new_tokens, cfg.seed + 1, cfg.generate_temperature,
                                        source="continued"))
    if short:
        log.info("generating contexts for %d token(s) %s", len(short), "from the words (--contexts generate)"
                 if cfg.contexts == "generate" else "with too few corpus snippets")
        snippets.extend(contexts.generate(model, tokenizer, toks, {i: cfg.snippets_per_token - found[i] for i in short},
                                          cfg.snippet_length, cfg.seed, start, cfg.generate_temperature, new_tokens))
    sources = {i: "+".join(["corpus"] * (found[i] > 0) + ["continued"] * (i in fill) + ["generated"] * (i in short))
               for i in primaries}
    return snippets, found, sources, stats


def build_workload(cfg: DistillConfig, model, tokenizer, toks: list[NewToken], corpus: list, start: int | None,
                   V: int, train: list[int] | None = None, extended_tokenizer=None) -> Workload:
    """Snippets of the tokens to train (`train` and `extended_tokenizer`: see gather_contexts) and their alignment;
    student ids of new tokens are V + their row."""
    snippets, found, sources, retrieval = gather_contexts(cfg, model, tokenizer, toks, corpus, start, train,
                                                          extended_tokenizer)
    primaries = trained_tokens(cfg, toks) if train is None else train
    row_of = {tok_i: r for r, tok_i in enumerate(primaries)}
    teacher_ids, cu_teacher = align.pack([s.ids for s in snippets], cfg.align_impl)
    al = align.align((teacher_ids, cu_teacher), [toks[i].sub_ids for i in primaries],
                     [row_of[s.token] for s in snippets], [V + r for r in range(len(primaries))], cfg.align_impl)
    positions = cfg.run_loss_positions()
    if positions:
        al, teacher_ids, cu_teacher = align.trim_suffix(al, teacher_ids, cu_teacher, positions)
    return Workload(primaries, snippets, np.asarray([row_of[s.token] for s in snippets], dtype=np.int64),
                    teacher_ids, cu_teacher, al, sources, found, retrieval)

"""Bring your own tokenizer: rows for the new ids of a tokenizer T2 that an extension tool already built (for
instance by continuing the BPE merges of the model's tokenizer), with T2 and its ids kept exactly as given.

The new ids are T2's ids at or above the original tokenizer's size, plus any listed in --new-ids (reserved ids
whose rows were never trained). T2 must extend the original: every other id keeps its piece, and text on which T2
emits no new id tokenizes exactly as before (a changed normalizer or pre-tokenizer fails this); both are checked
before the model loads. Contexts come from the corpus where T2 emits each new id (a uniform sample per id, as
contexts.py keeps), cut at character offsets where both tokenizations have a boundary; the teacher reads the
snippet with the original tokenizer, the student with T2, both after the same leading id (contexts.start_id), and
align.cross_align pairs the positions where the two end at the same offset. A snippet may hold several new ids;
all of them are rows of the one trainable block, so each gets gradient from every snippet it appears in.

Student steps run whole sequences (prefix sharing off): the first aligned position can lie after new pieces
that start earlier (a merge that moves a boundary), so the positions before it are not shared with the teacher;
every snippet ends --loss-positions pairs after its own id. Settings left to "auto" take the measured defaults
(settings.resolve_settings) without a search, so the NTP guard has no measurement: on tied models token-distill
trains with alpha-NTP outright (not the guard's alpha-mass, which only pushes new ids down where the teacher's
text goes on: here they must also be learned as the next token). T2's new ids are predicted wherever T2 emits
them, and plain distillation, which never trains the output side of a tied row, left SmolLM2 putting 19% of its
next-token mass on new ids right after one (docs/bring-your-own-tokenizer.md). Next-token prediction then also
reads the position before each snippet's first new piece (align.pair_before_divergence), so it learns to predict
the piece, not only the text after it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np

from . import align, contexts, export, pipeline, student, swap
from .config import DistillConfig, UserInputError, launch, pick_device, pick_dtype
from .contexts import CHARS_PER_TOKEN, Hit, Snippet, left_context
from .control import checkpoint
from .control.observed import StageTimer
from .control.settings import guards
from .corpus import Corpus
from .corpus import corpus_files as find_corpus_files
from .kernels import backend as kernels
from .modeling import models
from .report import RunReport
from .results import DistillResult, Prepared
from .tokens import NewToken
from .workload import Workload

log = logging.getLogger(__name__)

MIN_CONTEXTS = 1  # ids with fewer corpus snippets than this keep their start row (reported as "none")
BYOT_TIED_METHOD = "token-distill+alpha-ntp"  # what token-distill trains on tied models here (module docstring)
ENCODE_BATCH = 256  # documents per encode_batch call: large enough for the Rust tokenizer's threads


def load_tokenizer(source, what: str = "--tokenizer") -> tuple[object, float | None]:
    """A fast tokenizer from a directory, and the seconds its load took (an in-memory one as it is, None)."""
    return (source, None) if not isinstance(source, (str, Path)) else models.load_tokenizer(source, what)


def read_new_ids(path: str | Path | None) -> set[int]:
    """--new-ids FILE: one integer id per line (blank lines ignored)."""
    if path is None:
        return set()
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--new-ids {path}: cannot read it: {e}") from None
    try:
        return {int(line) for line in lines if line}
    except ValueError:
        raise UserInputError(f"--new-ids {path}: expected one integer id per line") from None


def new_ids_of(original, target, listed: set[int]) -> list[int]:
    """T2's ids the model has no trained row for: those at or above the original tokenizer's size, and `listed`,
    reused ids (an original id T2 gives another piece): an id that keeps its piece, or the id snippets start with,
    holds a row the model reads, and is refused."""
    size = len(original)
    ids = set(target.get_vocab().values())
    missing = sorted(listed - ids)
    if missing:
        raise UserInputError(f"--new-ids: id(s) {missing[:5]} are not ids of the target tokenizer")
    lead = contexts.start_id(original)
    kept = sorted(i for i in listed if i == lead or (i < size and original.convert_ids_to_tokens(i) ==
                                                     target.convert_ids_to_tokens(i)))
    if kept:
        raise UserInputError(f"--new-ids: id(s) {kept[:5]} ({original.convert_ids_to_tokens(kept[0])!r} first) keep "
                             "the piece the model was trained on, or start every snippet: their rows are in use; "
                             "list only ids the target tokenizer gives a new piece")
    return sorted({i for i in ids if i >= size} | listed)


def validate_extension(original, target, new_ids: list[int], texts: list[str]) -> None:
    """Refuse T2 unless it extends the original: every id that is not new keeps its piece (and no original id is
    dropped), each text on which T2 emits no new id tokenizes exactly as the original tokenizes it, each other
    decodes to the same text (a normalizer that changes text is caught where new pieces are everywhere), and T2
    adds the same special tokens around a text (BOS)."""
    new = set(new_ids)
    t_vocab = target.get_vocab()
    t_piece = {i: p for p, i in t_vocab.items()}
    changed = [(i, p, t_piece.get(i)) for p, i in original.get_vocab().items() if i not in new and t_piece.get(i) != p]
    if changed:
        i, was, now = min(changed)
        gone = sum(1 for _, _, p in changed if p is None)
        hint = ("a tokenizer of another model? --tokenizer must extend the model's own; --new-tokens-from-tokenizer "
                "takes another tokenizer's words" if len(changed) > len(t_vocab) // 2 else
                "list reused ids in --new-ids if that is intended" if not gone else
                f"{gone} of them missing from --tokenizer: ids must be kept")
        raise UserInputError(f"--tokenizer is not an extension of the model's tokenizer: {len(changed)} id(s) "
                             f"changed their piece, e.g. id {i} was {was!r} and is "
                             f"{'missing' if now is None else repr(now)} ({hint})")
    encs_t = target.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    encs_o = original.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    not_an_extension = "--tokenizer is not an extension of the model's tokenizer: it"
    for text, et, eo in zip(texts, encs_t, encs_o):
        if not new.intersection(et.ids):
            if et.ids != eo.ids:
                k = next(k for k, (a, b) in enumerate(zip(et.ids + [-1], eo.ids + [-1])) if a != b)
                raise UserInputError(
                    f"{not_an_extension} tokenizes text differently without using a new piece (a different "
                    f"normalizer or pre-tokenizer?), from token {k} of {text[:60]!r}: "
                    f"{target.convert_ids_to_tokens(et.ids[k:k + 3])} vs "
                    f"{original.convert_ids_to_tokens(eo.ids[k:k + 3])}")
            continue
        read, want = (tok.decode(e.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                      for tok, e in ((target, et), (original, eo)))
        if read != want:  # where it uses new pieces, it must still read the same text
            k = next(k for k, (a, b) in enumerate(zip(read + "\0", want + "\0")) if a != b)
            raise UserInputError(f"{not_an_extension} reads text as other text (a different normalizer?): "
                                 f"{want[max(0, k - 20):k + 30]!r} comes back as {read[max(0, k - 20):k + 30]!r}")
    if (framed := target("")["input_ids"]) != (was := original("")["input_ids"]):  # the frame alone: no new piece
        raise UserInputError(f"{not_an_extension} adds other special tokens around a text (its post-processor): "
                             f"{target.convert_ids_to_tokens(framed)} where the model's adds "
                             f"{original.convert_ids_to_tokens(was)}")


def plan_tokens(original, target, new_ids: list[int]) -> list[NewToken]:
    """One NewToken per new id: its stored piece, its text (decoded: leading space included, word-internal pieces
    bare) and its original subtokens, the original model's segmentation of the stored piece itself (so a
    word-internal piece is not split as if it started a word)."""
    backend = original.backend_tokenizer
    toks = []
    for i in new_ids:
        piece = target.convert_ids_to_tokens(i)
        text = target.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # a vocabulary entry is segmented as stored (a word-internal piece stays bare); an added token's content is
        # text, not the model's stored form, so it is encoded as text (" résumé" as "Ġr", "Ã©", ...)
        stored = piece is not None and target.backend_tokenizer.model.token_to_id(piece) == i
        sub = [t.id for t in backend.model.tokenize(piece)] if stored else []
        if not sub or any(s >= len(original) for s in sub):
            sub = original(text, add_special_tokens=False)["input_ids"]
        if not sub:
            raise UserInputError(f"--tokenizer: new id {i} ({piece!r}) has no text the original tokenizer can "
                                 "encode, so it has no start row")
        toks.append(NewToken(word=text, form=text, sub_ids=sub, new_id=i, piece=piece or "", kind="target"))
    return toks


def ends_of(enc) -> np.ndarray:
    """End character offset of each token, never decreasing (offsets trimmed of whitespace can step back)."""
    ends = np.fromiter((e for _, e in enc.offsets), dtype=np.int64, count=len(enc.ids))
    return np.maximum.accumulate(ends) if len(ends) else ends


def find_target_hits(pieces, target, new_ids: list[int], keep: int, window_chars: int, seed: int
                     ) -> tuple[list[list[Hit]], list[int]]:
    """Per new id, a uniform sample (reservoir) of at most `keep` places where T2 emits it, each with up to
    `window_chars` characters of its document on either side. Returns the samples and the counts of places."""
    row_of = np.full(max(max(new_ids) + 1, len(target)), -1, dtype=np.int64)
    row_of[new_ids] = np.arange(len(new_ids))
    draw = random.Random(seed).random
    kept: list[list[Hit]] = [[] for _ in new_ids]
    counts = [0] * len(new_ids)
    batch: list[str] = []

    def scan() -> None:
        for text, enc in zip(batch, target.backend_tokenizer.encode_batch(batch, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            for k in np.nonzero(row_of[np.minimum(ids, len(row_of) - 1)] >= 0)[0].tolist():
                r = int(row_of[ids[k]])
                counts[r] += 1
                slot = len(kept[r])
                if slot == keep:  # the n-th place replaces a random kept one with probability keep/n
                    slot = int(draw() * counts[r])
                    if slot >= keep:
                        continue
                start, end = enc.offsets[k]
                lo, hi = max(0, start - window_chars), min(len(text), end + window_chars)
                hit = Hit(text[lo:hi], start - lo, end - lo, lo == 0, hi == len(text))
                kept[r][slot:slot + 1] = [hit]
        batch.clear()

    for piece in pieces:
        batch.append(piece.text)
        if len(batch) == ENCODE_BATCH:
            scan()
    scan()
    return kept, counts


def cut(t_ends: np.ndarray, s_ends: np.ndarray, lo_char: int, hi_char: int, budget: int, hit: Hit,
        max_before: int | None = None) -> tuple[int, int] | None:
    """Character range (lo, hi] of a snippet around the hit: both ends at offsets where both tokenizations end,
    the hit inside, at most `budget` tokens on either side, centred where the text allows or (max_before) grown
    to the left only while at most max_before tokens of either side precede the hit. None if no such cut."""
    common = np.intersect1d(t_ends, s_ends)
    if hit.at_doc_start:  # the document's start is a boundary of both
        common = np.union1d(common, [0])
    common = common[(common >= lo_char) & (common <= hi_char)]
    left, right = common[common < hit.end], common[common >= hit.end]
    left = left[left <= hit.start]
    if not len(left) or not len(right):
        return None
    li, ri = len(left) - 1, 0  # the tightest cut, widened one boundary at a time while it fits
    def size(a, b):
        return max(np.searchsorted(t_ends, b, "right") - np.searchsorted(t_ends, a, "right"),
                   np.searchsorted(s_ends, b, "right") - np.searchsorted(s_ends, a, "right"))

    def fits(i, j):
        return size(left[i], right[j]) <= budget and (
            max_before is None or i == li or size(left[i], hit.start) <= max_before)
    if size(left[li], right[ri]) > budget:
        return None
    grew = True
    while grew:
        grew = False
        for dl, dr in ((1, 0), (0, 1)):
            if li - dl >= 0 and ri + dr < len(right) and fits(li - dl, ri + dr):
                li, ri, grew = li - dl, ri + dr, True
    return int(left[li]), int(right[ri])


def cut_snippets(original, target, toks: list[NewToken], hits: list[list[Hit]], length: int, bos: int | None,
                 max_before: int | None = None):
    """Teacher and student ids with end offsets for each hit (the shared leading id first, end offset 0) and the
    position of the hit's own id among the student ids, and per token the hits dropped because no common cut fits
    `length` or T2 reads the window otherwise. `max_before`: cut()'s cap on the tokens before the hit."""
    budget = length - (bos is not None)
    lead = [bos] if bos is not None else []
    flat = [(r, h) for r, hs in enumerate(hits) for h in hs]
    dropped = [0] * len(toks)
    out = []
    for c in range(0, len(flat), 4096):
        part = flat[c:c + 4096]
        texts = [h.text for _, h in part]
        e_t = original.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        e_s = target.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for (r, h), et, es in zip(part, e_t, e_s):
            te, se = ends_of(et), ends_of(es)
            # a window cut mid-text may start or end inside a word: keep away from its first and last token
            lo_char = 0 if h.at_doc_start else int(se[0]) if len(se) else 0
            hi_char = len(h.text) if h.at_doc_end else int(se[-2]) if len(se) > 1 else 0
            k = np.searchsorted(se, h.end)
            if k >= len(se) or se[k] != h.end or es.ids[k] != toks[r].new_id:
                dropped[r] += 1
                continue
            span = cut(te, se, lo_char, hi_char, budget, h, max_before)
            if span is None:
                dropped[r] += 1
                continue
            a, b = span
            sides = []
            for enc, ends in ((et, te), (es, se)):
                i, j = np.searchsorted(ends, a, "right"), np.searchsorted(ends, b, "right")
                sides.append((lead + enc.ids[i:j], [0] * len(lead) + (ends[i:j] - a).tolist()))
            out.append((r, *sides[0], *sides[1], len(lead) + k - int(np.searchsorted(se, a, "right"))))
    return out, dropped


def build_workload(cfg: DistillConfig, original, target, toks: list[NewToken], corpus: list, bos: int | None,
                   V: int, ntp: bool = False) -> Workload:
    """Snippets, alignment and bookkeeping of the new ids in the form pipeline.learn_rows trains on: student ids
    of new pieces become V + their row (the trainable block of kernels/embedding_rows.py). `ntp` (the run's
    objective predicts next tokens): each snippet also pairs the position before its first new piece."""
    if not corpus:
        raise UserInputError("no corpus given: pass --corpus FILE (a target tokenizer needs corpus contexts)")
    reader = Corpus(corpus, cfg.max_corpus_bytes)
    hits, counts = find_target_hits(reader, target, [t.new_id for t in toks], cfg.snippets_per_token,
                                    CHARS_PER_TOKEN * cfg.snippet_length, cfg.seed)
    left, per_token = left_context(original, hits, cfg.left_context)
    cut_out, dropped = cut_snippets(original, target, toks, hits, cfg.snippet_length, bos, left)
    lut = {t.new_id: V + r for r, t in enumerate(toks)}
    t_seqs, t_ends, s_seqs, s_ends, rows, own = [], [], [], [], [], []
    for r, t_ids, te, s_ids, se, k in cut_out:
        t_seqs.append(t_ids)
        t_ends.append(te)
        s_seqs.append([lut.get(i, i) for i in s_ids])
        s_ends.append(se)
        rows.append(r)
        own.append(k)
    impl = cfg.align_impl
    teacher_ids, cu_t = align.pack(t_seqs, impl)
    student_ids, cu_s = align.pack(s_seqs, impl)
    al = align.cross_align(teacher_ids, cu_t, align.pack(t_ends, impl)[0], student_ids, cu_s,
                           align.pack(s_ends, impl)[0], impl)
    if ntp:  # NTP also predicts each snippet's first new piece (see pair_before_divergence)
        al = align.pair_before_divergence(al, teacher_ids, cu_t)
    positions = cfg.run_loss_positions(target_tokenizer=True)
    if positions:  # as for words: the first --loss-positions pairs from the snippet's own id on
        seg = np.repeat(np.arange(al.n), np.diff(al.cu_aligned))
        before = np.bincount(seg, weights=al.s_pos < np.asarray(own)[seg], minlength=al.n).astype(np.int64)
        al, teacher_ids, cu_t = align.trim_suffix(al, teacher_ids, cu_t, before + positions)
    snippet_row = np.asarray(rows, dtype=np.int64)
    found = dict(enumerate(np.bincount(snippet_row, minlength=len(toks)).tolist()))
    sources = {i: "corpus" if n >= MIN_CONTEXTS else "none" for i, n in found.items()}
    retrieval = {"corpus_files": len(reader.files), "corpus_bytes": reader.bytes_read,
                 "stopped_early": "max_bytes" if reader.truncated else None,
                 "left_context": left, "chars_per_token": per_token,
                 "hits": {t.piece: n for t, n in zip(toks, counts)},
                 "dropped_no_common_cut": {t.piece: d for t, d in zip(toks, dropped) if d}}
    snippets = [Snippet(r, ids, "corpus") for r, ids in zip(rows, t_seqs)]
    return Workload(list(range(len(toks))), snippets, snippet_row, teacher_ids, cu_t, al, sources, found,
                             retrieval)


# Options of added words that a given tokenizer leaves nothing to do for: T2's own ids and the corpus's text.
UNUSED = {"contexts": "--contexts", "top_up": "--top-up", "tokenizer_mode": "--tokenizer-mode",
          "casing_variants": "--casing-variants", "add_variants": "--no-variants"}


def distill_target(model, target_tokenizer, corpus, out, cfg: DistillConfig, tokenizer) -> DistillResult:
    """api.distill with a given target tokenizer (module docstring). One process, no chunks or checkpoints."""
    if given := [flag for field, flag in UNUSED.items() if getattr(cfg, field) != getattr(DistillConfig, field)]:
        raise UserInputError(f"{', '.join(given)}: not used with --tokenizer, which trains T2's new ids on the corpus "
                             "where T2 emits them; leave them out")
    if cfg.prefix_sharing not in ("auto", "off"):
        raise UserInputError("--prefix-sharing on/fused cannot run with --tokenizer: the student's first aligned "
                             "position may follow new pieces, so its prefix is not the teacher's (use off or auto)")
    if cfg.chunk_tokens or cfg.memory_budget or cfg.resume or cfg.distill_min_chars or launch().world_size > 1:
        raise UserInputError("--tokenizer runs in one process, without --chunk-tokens, --memory-budget, --resume "
                             "and --distill-min-chars")
    if cfg.method not in ("token-distill", "token-distill+alpha-ntp", "mean", "random") or cfg.loss != "mse":
        raise UserInputError("--tokenizer supports --method token-distill, token-distill+alpha-ntp (loss mse), mean "
                             "and random")
    cfg = cfg.replace(prefix_sharing="off", optimizer=cfg.run_optimizer(target_tokenizer=True),
                      loss_positions=cfg.run_loss_positions(target_tokenizer=True))
    timer = StageTimer()
    if out is not None:
        export.check_out_dir(out, cfg.overwrite, [model, target_tokenizer, *corpus])
        checkpoint.claim_out(out)  # one run per output at a time (this run keeps no checkpoint)
    corpus_files = find_corpus_files(corpus)
    if not isinstance(model, (str, Path)) and tokenizer is None:
        raise UserInputError("an in-memory model needs its tokenizer: distill(model, ..., tokenizer=tok, "
                             "target_tokenizer=t2)")
    with timer("tokens"):  # everything about T2 is checked before the model loads
        original, tokenizer_seconds = load_tokenizer(model if tokenizer is None else tokenizer, "--model")
        target, _ = load_tokenizer(target_tokenizer)
        new_ids = new_ids_of(original, target, read_new_ids(cfg.new_ids))
        from .check import PROBE_TEXT

        validate_extension(original, target, new_ids, [PROBE_TEXT] + pipeline.probe_sample(corpus_files, 50_000))
        if not new_ids:
            raise UserInputError("--tokenizer has no new ids: every id is below the model tokenizer's size and "
                                 "--new-ids lists none")
        toks = plan_tokens(original, target, new_ids)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    backend = kernels.resolve(cfg.backend, device)
    with timer("load"):
        decoder, _, source, _ = pipeline.load(model, original, device, dtype)
    if cfg.backend == "torch":
        decoder.use_references()
    tied = export.is_tied(decoder.model)
    cfg.check_tied(tied)
    V = decoder.embed_weight.shape[0]
    prep = Prepared(cfg, decoder, original, target, toks, [], None, tied, device, dtype, backend, source,
                             list(corpus), timer, checkpoint.WorkDir(None), tokenizer_seconds,
                    f"the new ids of the tokenizer in {Path(target.name_or_path).absolute()}"
                    if isinstance(target_tokenizer, (str, Path)) else "the new ids of an in-memory tokenizer",
                    swap.read_init(cfg.init_from, toks, decoder.hidden_size) if cfg.init_from else None)
    settings, _ = pipeline.settle(prep, cfg)  # no workload yet: the measured defaults, no search
    method = cfg.method
    if guards(cfg, tied):  # nothing to measure without the search: alpha-NTP outright (module docstring)
        method = BYOT_TIED_METHOD
        log.info("tied model: training %s (--no-ntp-guard keeps plain token-distill)", method)
    run_cfg = cfg.replace(epochs=settings[2], method=method)
    cache = None
    if method.startswith("token-distill"):
        with timer("contexts"):
            ntp = student.Objective.for_config(run_cfg, settings[0], tied).ntp is not None
            prep.work = build_workload(cfg, original, target, toks, list(corpus), contexts.start_id(original), V,
                                       ntp)
        fallback = [t.piece for i, t in enumerate(toks) if prep.work.sources[i] == "none"]
        if fallback:
            log.warning("%d new id(s) have no corpus snippet and keep their start row: %s", len(fallback),
                        ", ".join(map(repr, fallback[:20])))
        with timer("teacher"):
            cache = pipeline.teacher_cache(prep, prep.work, pipeline.teacher_layers(prep, [(run_cfg, settings[0])]))
    # alone=False: a snippet holds many new ids here, so no row trains alone on its snippets
    learned = pipeline.learn_rows(prep, run_cfg, settings, cache=cache, timer=timer, alone=False)
    if prep.work is not None:  # ids without snippets of their own: back to their start rows (trained only as context)
        start = pipeline.learn_rows(prep, run_cfg.replace(method="mean"), settings)
        for i, src in prep.work.sources.items():
            if src == "none":
                learned.rows[i] = start.rows[i]
                if learned.out_rows is not None:
                    learned.out_rows[i] = start.out_rows[i]
    report = RunReport.build(prep, cfg, settings, learned, method=method)
    trained = {i for i, src in prep.work.sources.items() if src != "none"} if prep.work is not None else set()
    report.record_methods(method, trained, learned.init_used, set())
    report.add(retrieval=prep.work.retrieval if prep.work is not None else None,
               target_tokenizer={"source": str(target_tokenizer) if isinstance(target_tokenizer, (str, Path))
                                 else type(target_tokenizer).__name__, "size": len(target),
                                 "original_size": len(original), "new_ids": len(new_ids),
                                 "fallback_start_rows": fallback if prep.work is not None else []})
    for entry, t in zip(report.data["tokens"], toks):
        entry["text"] = t.form
    if out is not None:
        with timer("export"):
            pipeline.write_output(Path(out), prep, learned, report)
    return DistillResult(target, toks, learned.rows, learned.out_rows, report.finish(), [])

"""Held-out measurement: how closely a model with new tokens reproduces the original model with the original
tokenization, on text that training never saw.

Snippets come from the same retrieval (contexts.py) and alignment (align.py) as training. The original model reads
the subtokens, the adapted one the single new token; at every aligned position (the new token and everything after
it) we compare next-token distributions over the original vocabulary (KL(original || adapted) and top-1
agreement; new-token columns left out and the rest renormalized), the adapted model's
probability mass on new tokens, optionally the hidden states at chosen layers, and per snippet the NLL of the
continuation (the text after the first new token) under each model. Each metric is averaged per snippet, then per
token, then over tokens (every token weighs the same); confidence intervals come from stats.py's two-level
bootstrap (tokens, then snippets within each token), whose draws depend only on the snippet layout and the seed, so
two methods scored on the same snippets are compared on the same resamples (paired differences).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokdistill_fast.kernels.embedding_rows import embedding_rows

from .. import align, contexts, corpus, teacher
from ..align import Alignment, cu_seqlens, prefix_lengths
from ..config import UserInputError
from ..modeling import fused
from ..modeling.attention import Attend, ranges, select_kv
from ..modeling.layout import lay_out, token_batches
from ..modeling.models import Decoder
from ..teacher import aligned_rows, length_batches, pad_batch
from ..tokens import NewToken
from .stats import group_mean

log = logging.getLogger(__name__)


def logit_rows(device: torch.device) -> int:
    """Rows per logits chunk. A chunk makes several [rows, vocab] fp32 temporaries; on a CPU 128 rows keep them
    near 100 MB (Gemma-3's 262k vocabulary: `tokdistill eval` of 40 words took 106.7 s at 1,024 rows, 51.8 at 128,
    59.0 at 64; SmolLM2's 49k: 36.9 and 33.6 s). On a GPU, 1,024: fewer, larger products."""
    return 1024 if device.type == "cuda" else 128


class Scorer:
    """A causal LM as the measure sees it: embeddings of (possibly extended) ids, hidden states, logits.

    Three cases: the original model (no new tokens); an adapted model saved with its new rows (`new_ids` are its
    own ids); or the original model plus in-memory rows `rows` [n, D] (table space) for ids V + r, with output
    rows `out_rows` (tied models: the input rows). `backend`: the embedding gather's (kernels/backend.py), the
    run's own when a run scores (the layer search)."""

    def __init__(self, decoder: Decoder, new_ids: list[int] | None = None, rows: torch.Tensor | None = None,
                 out_rows: torch.Tensor | None = None, backend: str = "auto"):
        self.decoder, self.backend = decoder, backend
        device = decoder.embed_weight.device
        self.rows = None if rows is None else rows.to(device=device, dtype=torch.float32)
        self.out_rows = None
        if rows is not None:
            out = rows if out_rows is None else out_rows
            self.out_rows = out.to(device=device, dtype=decoder.embed_weight.dtype)
            new_ids = [decoder.embed_weight.shape[0] + r for r in range(rows.shape[0])]
        self.new_ids = list(new_ids or [])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.decoder.embed(ids)
        return embedding_rows(ids, self.decoder.embed_weight, self.rows, self.decoder.embed_scale,
                              backend=self.backend)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the model's whole vocabulary, new tokens included, in fp32."""
        out = self.decoder.logits(h).float()
        if self.out_rows is None:
            return out
        extra = (h @ self.out_rows.t()).float()
        cap = getattr(self.decoder.config, "final_logit_softcapping", None)
        if cap:
            extra = torch.tanh(extra / cap) * cap
        return torch.cat([out, extra], dim=-1)


def original_columns(vocab: int, new_ids: list[int], device: torch.device) -> torch.Tensor | None:
    """Columns of the original vocabulary [0, vocab) that are not new tokens (padded-vocab models give spare rows
    to new tokens), or None when that is the whole range."""
    inside = sorted(i for i in new_ids if i < vocab)
    if not inside:
        return None
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[inside] = False
    return keep.nonzero().squeeze(1).to(device)


def restrict(logits: torch.Tensor, vocab: int, keep: torch.Tensor | None) -> torch.Tensor:
    return logits[:, :vocab] if keep is None else logits.index_select(1, keep)


def logit_stats(t: torch.Tensor, s: torch.Tensor, vocab: int, keep: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of teacher logits `t` and student logits `s` (new tokens' columns included), fp32: the KL of the
    teacher's next-token distribution to the student's over the original columns (restrict), and whether their
    largest columns agree. On a CPU with every original column kept, csrc/fused.cpp's logit_stats makes two passes
    over each row, its sums in double, where the reference makes a dozen over [rows, vocab] temporaries in fp32:
    `tokdistill eval` of Gemma-3 / Exim's 40 words 111.9 -> 84.2 s."""
    ext = fused.extension()
    if (ext is None or keep is not None or t.device.type != "cpu" or t.dtype != torch.float32
            or s.dtype != torch.float32 or t.shape[1] != vocab):
        return logit_stats_ref(t, s, vocab, keep)
    t, s = t.contiguous(), s.contiguous()
    kl = torch.empty(len(t), dtype=torch.float64)
    top_t, top_s = torch.empty(len(t), dtype=torch.long), torch.empty(len(t), dtype=torch.long)
    ext.logit_stats(t.data_ptr(), s.data_ptr(), len(t), vocab, s.shape[1], kl.data_ptr(), top_t.data_ptr(),
                    top_s.data_ptr())
    return kl, top_t == top_s


def logit_stats_ref(t: torch.Tensor, s: torch.Tensor, vocab: int, keep: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """logit_stats in PyTorch: the reference, and the path on GPUs (where these passes are cheap)."""
    t_logp = F.log_softmax(restrict(t, vocab, keep), dim=-1)
    s_logp = F.log_softmax(restrict(s, vocab, keep), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl, t_logp.max(-1).indices == s_logp.max(-1).indices


@dataclass
class HeldoutSet:
    """Held-out snippets of the measured tokens, aligned to student sequences that use `new_ids`."""

    tokens: list[NewToken]  # measured (primary) tokens
    new_ids: list[int]  # student-side id of each measured token
    snippet_token: np.ndarray  # [n] index into tokens
    teacher_ids: np.ndarray
    cu_teacher: np.ndarray
    alignment: Alignment
    hits: list[int]  # held-out occurrences found per token (before sampling)
    inside: list[int] = field(default_factory=list)  # matches inside longer words per token: not measured
    cont_pos: np.ndarray = field(init=False)  # teacher positions of each continuation (first aligned to the end)
    cu_cont: np.ndarray = field(init=False)

    def __post_init__(self):
        al = self.alignment
        lens = np.diff(self.cu_teacher)
        first = al.t_pos[al.cu_aligned[:-1]].astype(np.int64) if al.n else np.zeros(0, dtype=np.int64)
        counts = lens - first
        self.cu_cont = align.cu_seqlens(counts)
        self.cont_pos = (np.arange(self.cu_cont[-1]) - np.repeat(self.cu_cont[:-1] - first, counts)).astype(np.int32)

    @property
    def n(self) -> int:
        return self.alignment.n

    def per_token(self) -> np.ndarray:
        """[tokens] snippets measured per token (a token's sampled hits can all be left out: read otherwise)."""
        return np.bincount(self.snippet_token, minlength=len(self.tokens))

    def unmeasured(self) -> list[str]:
        """Words found in the held-out text without a snippet measured (each sampled hit read otherwise)."""
        return [t.word for t, hits, n in zip(self.tokens, self.hits, self.per_token()) if hits and not n]

    def aligned_in_cont(self) -> np.ndarray:
        """[K] row of each aligned pair's teacher position among the continuation rows."""
        al = self.alignment
        per = np.diff(al.cu_aligned)
        first = np.repeat(self.cont_pos[self.cu_cont[:-1]], per)
        return (np.repeat(self.cu_cont[:-1], per) + al.t_pos - first).astype(np.int64)


def build_heldout(paths: list[str | Path], tokenizer, toks: list[NewToken], new_ids: list[int], per_token: int,
                  length: int, seed: int, start: int | None, align_impl: str = "auto",
                  extended: contexts.Extended | None = None) -> HeldoutSet:
    """Retrieve held-out snippets for `toks` (primaries) and align them, merging each token's subtokens into its
    id in `new_ids`; with `extended`, a hit counts only where the extended tokenizer emits the word's id, and windows
    end before an occurrence of their word that it reads and the merge cannot (contexts.cut_snippets). Tokens
    without held-out hits get no snippets (the report lists them)."""
    snippets, stats, _ = contexts.retrieve(paths, tokenizer, toks, per_token, length, seed, start, option="--heldout",
                                           extended=extended)
    # two hits in a short document (or a passage the text repeats) cut the same window, aligned from the same first
    # occurrence: it is scored once, not once per hit
    unique: dict[tuple, contexts.Snippet] = {}
    for s in snippets:
        unique.setdefault((s.token, tuple(s.ids)), s)
    snippets = list(unique.values())
    if not snippets:
        inside = (f" ({sum(stats.inside)} match(es) inside longer words, 'Fortrans' for ' Fortran', which the held-out"
                  " measure leaves out)" if sum(stats.inside) else "")
        raise UserInputError(f"no held-out snippet contains any of the new tokens{inside}; pass more --heldout text")
    teacher_ids, cu_teacher = align.pack([s.ids for s in snippets])
    al = align.align([s.ids for s in snippets], [t.sub_ids for t in toks], [s.token for s in snippets], new_ids,
                     align_impl)
    return HeldoutSet(toks, list(new_ids), np.asarray([s.token for s in snippets], dtype=np.int64), teacher_ids,
                      cu_teacher, al, stats.hits, stats.inside)


@dataclass
class Reference:
    """The original model on the held-out snippets: final states at continuation positions (logits are
    recomputed from them per scored model, D instead of V numbers per position), states at the hidden-state
    layers at aligned positions, and the NLL of each snippet's continuation."""

    final: torch.Tensor  # [Kc, D]
    hidden: dict[int, torch.Tensor]  # layer -> [K, D]
    nll: np.ndarray  # [n]
    vocab: int  # original vocabulary size (rows of the original output matrix)
    logits: Callable[[torch.Tensor], torch.Tensor]  # the original model's head
    shared: SharedPrefix | None = None  # reference(share_prefix=True)


@dataclass
class SharedPrefix:
    """The reference pass's keys/values of every layer at the positions before each snippet's first new token
    (`lengths` [n]), which a Scorer over the same decoder reads identically: its passes then run only from the
    new token on (exact under causal attention, attention.py)."""

    decoder: Decoder
    lengths: np.ndarray
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def reference(decoder: Decoder, hs: HeldoutSet, layers: tuple[int, ...] = (), dtype: torch.dtype | None = None,
              share_prefix: bool = False) -> Reference:
    """One truncated-to-the-end pass of the original model over the held-out snippets. share_prefix: packed,
    keeping the keys/values before each first new token for Scorers over this same decoder (the layer search
    scores several row sets on one held-out sample), unless they would take more than teacher.prefix_kv_budget."""
    L = decoder.num_layers
    device = decoder.embed_weight.device
    dtype = dtype or decoder.embed_weight.dtype
    # teacher.compute gathers rows at alignment.t_pos; handing it the continuation positions gathers those.
    cont = Alignment(hs.alignment.student_ids, hs.alignment.cu_student, hs.cont_pos, hs.cont_pos, hs.cu_cont)
    before = None
    if share_prefix and teacher.prefix_kv_fits(decoder, hs.alignment, L):
        before = prefix_lengths(hs.alignment)
    elif share_prefix:
        log.info("held-out prefixes' keys/values exceed teacher.prefix_kv_budget: scoring whole sequences")
    cache = teacher.compute(decoder, hs.teacher_ids, hs.cu_teacher, cont, sorted({L, *layers}),
                            max_tokens=teacher.batch_tokens(device), cache_dtype=dtype, packed=share_prefix,
                            capture=before)
    final = cache.states[L]
    in_cont = torch.from_numpy(hs.aligned_in_cont()).to(final.device)
    hidden = {l: cache.states[l].index_select(0, in_cont) for l in layers}
    # NLL of each continuation: every continuation position but the last predicts the next teacher id.
    has_next = np.ones(len(hs.cont_pos), dtype=bool)
    has_next[hs.cu_cont[1:] - 1] = False
    snippet = np.repeat(np.arange(hs.n), np.diff(hs.cu_cont))
    target = hs.teacher_ids[hs.cu_teacher[snippet] + hs.cont_pos + 1 - (~has_next)]
    vocab = decoder.model.get_output_embeddings().weight.shape[0]
    row_nll = np.zeros(len(hs.cont_pos))
    chunk = logit_rows(device)
    for c in range(0, len(hs.cont_pos), chunk):
        sl = slice(c, c + chunk)
        logp = F.log_softmax(decoder.logits(final[sl].to(device)).float(), dim=-1)
        row_nll[sl] = -logp.gather(1, torch.from_numpy(target[sl]).to(device).unsqueeze(1)).squeeze(1).cpu().numpy()
    nll = np.bincount(snippet, weights=np.where(has_next, row_nll, 0.0), minlength=hs.n)
    shared = None if before is None else SharedPrefix(decoder, before, cache.prefix)
    return Reference(final, hidden, nll, vocab, decoder.logits, shared)


@dataclass
class Scores:
    """Per aligned pair [K] and per snippet [n] results of one scored model."""

    kl: np.ndarray
    top1: np.ndarray
    new_mass: np.ndarray  # adapted model's probability on new tokens (full softmax)
    at_new: np.ndarray  # bool: the student token at this position is a new token
    mse: dict[int, np.ndarray]  # layer -> per-pair mean squared error of hidden states
    nll: np.ndarray  # [n] student NLL of the continuation (full vocabulary, new tokens included)
    new_probs_at_new: np.ndarray  # [pairs at new tokens, new ids] the probability on each new id (model.new_ids order)


@torch.no_grad()
def score(model: Scorer, hs: HeldoutSet, ref: Reference) -> Scores:
    """Run the adapted model over the held-out student sequences and compare it with the reference."""
    dec = model.decoder
    device = dec.embed_weight.device
    al = hs.alignment
    K, L = len(al.s_pos), dec.num_layers
    layers = sorted({L, *ref.hidden})
    kl, top1, new_mass, mse = np.zeros(K), np.zeros(K, dtype=bool), np.zeros(K), {l: np.zeros(K) for l in ref.hidden}
    row_nll = np.zeros(K)
    keep = original_columns(ref.vocab, model.new_ids, device)
    new_cols = torch.tensor(model.new_ids, dtype=torch.long, device=device)
    in_cont = torch.from_numpy(hs.aligned_in_cont())
    snippet = al.pair_snippet()
    has_next = al.pair_has_next()
    target_all = al.pair_next_ids()
    at_new = np.isin(al.student_ids[al.cu_student[snippet] + al.s_pos], np.asarray(model.new_ids, dtype=np.int64))
    at_row = np.cumsum(at_new) - 1  # row of each at-new pair in new_probs_at_new
    new_probs = np.zeros((int(at_new.sum()), len(model.new_ids)))
    chunk = logit_rows(device)
    for batch, hidden, rows in _passes(model, al, layers, ref.shared):
        idx = torch.from_numpy(rows).to(device)
        dest = np.concatenate([np.arange(al.cu_aligned[i], al.cu_aligned[i + 1]) for i in batch])
        for l in ref.hidden:
            s = hidden[l].reshape(-1, dec.hidden_size).index_select(0, idx).float()
            t = ref.hidden[l].index_select(0, torch.from_numpy(dest).to(ref.hidden[l].device)).to(device).float()
            mse[l][dest] = (s - t).pow(2).mean(-1).cpu().numpy()
        h = hidden[L].reshape(-1, dec.hidden_size).index_select(0, idx)
        for c in range(0, len(dest), chunk):
            d = dest[c:c + chunk]
            full = model.logits(h[c:c + chunk])
            t_rows = ref.final.index_select(0, in_cont[d].to(ref.final.device)).to(device)
            kl_d, top1_d = logit_stats(ref.logits(t_rows).float(), full, ref.vocab, keep)
            kl[d], top1[d] = kl_d.cpu().numpy(), top1_d.cpu().numpy()
            full_logp = F.log_softmax(full, dim=-1)  # as the reference's NLL reads the original model's
            if len(model.new_ids):
                p_new = full_logp.index_select(1, new_cols).exp().cpu().numpy()
                new_mass[d] = p_new.sum(-1)
                new_probs[at_row[d[at_new[d]]]] = p_new[at_new[d]]
            tgt = torch.from_numpy(target_all[d]).to(device).unsqueeze(1)
            row_nll[d] = -full_logp.gather(1, tgt).squeeze(1).cpu().numpy()
    nll = np.bincount(snippet, weights=np.where(has_next, row_nll, 0.0), minlength=al.n)
    return Scores(kl, top1, new_mass, at_new, mse, nll, new_probs)


def top_new_token(s: Scores, hs: HeldoutSet) -> list[tuple[int, float] | None]:
    """Per measured token, the new id (index into the scored model's new_ids) that takes the most next-token
    probability right after the token, and that mean probability (per snippet, then per token, as every metric);
    None for a token without held-out text."""
    snippet = hs.alignment.pair_snippet()[s.at_new]
    has = np.bincount(snippet, minlength=hs.n) > 0
    per_snippet = group_mean(s.new_probs_at_new, snippet, hs.n)[has]
    per_token = group_mean(per_snippet, hs.snippet_token[has], len(hs.new_ids))
    scored = np.bincount(hs.snippet_token[has], minlength=len(hs.new_ids)) > 0
    return [(int(m.argmax()), float(m.max())) if ok and m.size else None for m, ok in zip(per_token, scored)]


@torch.no_grad()
def original_prob_at_new(s: Scores, hs: HeldoutSet, ref: Reference, ids: list[int | None]) -> list[float | None]:
    """Per measured token, the probability the original model gives the original id `ids[i]` (None: not asked)
    right after the token, at the pairs and with the averaging of top_new_token. Given the first subtoken of the
    new token that takes the most mass there, a high value says that token takes its own first piece's mass."""
    snippet = hs.alignment.pair_snippet()[s.at_new]
    want = np.asarray([-1 if ids[t] is None else ids[t] for t in hs.snippet_token[snippet]], dtype=np.int64)
    rows = np.flatnonzero(want >= 0)
    probs = np.full(len(snippet), np.nan)
    cont = torch.from_numpy(hs.aligned_in_cont()[s.at_new][rows]).to(ref.final.device)
    target = torch.from_numpy(want[rows]).to(ref.final.device).unsqueeze(1)
    chunk = logit_rows(ref.final.device)
    for c in range(0, len(rows), chunk):
        logits = ref.logits(ref.final.index_select(0, cont[c:c + chunk])).float()[:, :ref.vocab]
        probs[rows[c:c + chunk]] = logits.softmax(-1).gather(1, target[c:c + chunk]).squeeze(1).cpu().numpy()
    has = np.bincount(snippet[rows], minlength=hs.n) > 0
    per_token = group_mean(group_mean(probs, snippet, hs.n)[has], hs.snippet_token[has], len(hs.new_ids))
    return [None if ids[i] is None or not np.isfinite(p) else float(p) for i, p in enumerate(per_token)]


def _passes(model: Scorer, al: Alignment, layers: list[int], shared: SharedPrefix | None):
    """(snippets, hidden states {layer: [.., D]}, flat row of each of their aligned pairs) per batch of the
    scored model's passes: whole right-padded sequences, or, with a prefix shared by the same decoder, packed
    rows from the first new token on attending to the reference's keys/values."""
    dec = model.decoder
    device, lengths = dec.embed_weight.device, np.diff(al.cu_student)
    if shared is None or shared.decoder is not dec:
        for batch in length_batches(lengths, teacher.batch_tokens(device)):
            ids = pad_batch(al.student_ids, al.cu_student, batch, device)
            yield batch, dec.hidden_states(model.embed(ids), layers), aligned_rows(al.cu_aligned, al.s_pos, batch,
                                                                                   ids.shape[1])
        return
    p, cu_p = shared.lengths, cu_seqlens(shared.lengths)
    for batch in token_batches(lengths - p, teacher.batch_tokens(device)):
        lay, hidden = _after_prefix(model, al, batch, p, lengths - p, shared.kv, ranges(cu_p[batch], p[batch]), layers)
        counts = np.diff(al.cu_aligned)[batch]
        seq = np.repeat(np.arange(len(batch)), counts)
        yield batch, hidden, lay.rows(seq, al.s_pos[ranges(al.cu_aligned[batch], counts)] - p[batch][seq])


def _after_prefix(model: Scorer, al: Alignment, batch: np.ndarray, first: np.ndarray, n: np.ndarray,
                  kv: dict[int, tuple[torch.Tensor, torch.Tensor]], kv_rows: np.ndarray, layers: list[int]):
    """(layout, hidden states) of one packed pass over the snippets `batch` from their first new token on (n[i]
    tokens each), attending to the prefix keys/values at rows `kv_rows` of `kv` (exact under causal attention)."""
    device = model.decoder.embed_weight.device
    p = first[batch]
    lay = lay_out(al.student_ids, al.cu_student[batch] + p, n[batch], p, True, prefix_len=p).to(device)
    context = select_kv(kv, torch.from_numpy(kv_rows).to(device)) if lay.spec.has_prefix else None
    return lay, model.decoder.hidden_states(model.embed(lay.ids), layers, lay.positions,
                                            Attend(lay.spec, context=context))


@dataclass
class PrefixStart:
    """A pass over the same snippets that ran the positions before each first new token through `depth` layers
    and kept every layer's keys/values there (`kv`, snippet i's from row kv_start[i] on) and, short of the last
    layer, the states after its own last (`states` [positions, D], in cu_seqlens(prefix_lengths) order; teacher.compute
    capture and keep_states): a deeper pass reads them."""

    depth: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    kv_start: np.ndarray
    states: torch.Tensor | None


def _word_states(model: Scorer, al: Alignment, first: np.ndarray, start: PrefixStart | None):
    """(snippets, [B, D] final-layer states at each one's first new token) per batch: whole sequences up to the
    word, or, from `start`, the word alone through its layers (on their keys/values) and the whole sequences only
    through the layers after them (on their states): the same states for about half the work."""
    dec, device, L = model.decoder, model.decoder.embed_weight.device, model.decoder.num_layers
    if start is None:
        for batch in length_batches(first + 1, teacher.batch_tokens(device)):
            ids = lay_out(al.student_ids, al.cu_student[batch], first[batch] + 1, np.zeros(len(batch)),
                          packed=False).ids.to(device)
            h = dec.hidden_states(model.embed(ids), [L])[L]
            yield batch, h[torch.arange(len(batch), device=device), torch.from_numpy(first[batch]).to(device)]
        return
    d, cu_p, one = start.depth, cu_seqlens(first), np.ones(len(first), dtype=np.int64)
    for batch in token_batches(first + 1, teacher.batch_tokens(device)):
        p = first[batch]
        h = _after_prefix(model, al, batch, first, one, start.kv, ranges(start.kv_start[batch], p), [d])[1][d][0]
        if d == L:  # the teacher pass ran every layer: nothing to continue
            yield batch, h
            continue
        whole = lay_out(al.student_ids, al.cu_student[batch], p + 1, np.zeros(len(batch)), True).to(device)
        last = torch.from_numpy(whole.base + p).to(device)
        x = h.new_empty((whole.tokens, h.shape[-1]))
        x[torch.from_numpy(ranges(whole.base, p)).to(device)] = start.states.index_select(
            0, torch.from_numpy(ranges(cu_p[batch], p)).to(start.states.device))
        x[last] = h
        out = dec.hidden_states(x[None], [L], whole.positions, Attend(whole.spec), start=d)[L][0]
        yield batch, out.index_select(0, last)


@torch.no_grad()
def new_token_mass(model: Scorer, al: Alignment, snippet_row: np.ndarray, n_rows: int,
                   start: PrefixStart | None = None) -> np.ndarray:
    """[n_rows, new tokens] per trained word (snippet_row; its new id V + row), the mean over its snippets of the
    next-token probability `model` (in-memory rows) puts on each new token right after the word: a tied row is
    also an output row, and one the model predicts where the original model cannot makes sampling emit it there.
    `start`: a teacher pass's prefix keys/values and states for these snippets, which spare rerunning them."""
    probs = np.zeros((al.n, len(model.new_ids)))
    for batch, at in _word_states(model, al, prefix_lengths(al), start):
        probs[batch] = F.softmax(model.logits(at), dim=-1)[:, -len(model.new_ids):].cpu().numpy()
    return group_mean(probs, snippet_row, n_rows)


def snippet_metrics(s: Scores, hs: HeldoutSet, ref: Reference) -> dict[str, np.ndarray]:
    """Per-snippet values [n] of every metric: means over the snippet's aligned positions ("at_new": over the
    positions of new tokens only), and the continuation NLL difference (adapted - original, nats)."""
    al = hs.alignment
    snippet = al.pair_snippet()

    def mean(x: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        w = np.ones(len(x)) if where is None else where.astype(float)
        return np.bincount(snippet, weights=x * w, minlength=al.n) / np.maximum(
            np.bincount(snippet, weights=w, minlength=al.n), 1e-12)

    out = {"kl": mean(s.kl), "kl_at_new": mean(s.kl, s.at_new), "top1": mean(s.top1.astype(float)),
           "top1_at_new": mean(s.top1.astype(float), s.at_new), "nll_diff": s.nll - ref.nll,
           "new_mass": mean(s.new_mass), "new_mass_at_new": mean(s.new_mass, s.at_new)}
    for l, v in s.mse.items():
        out[f"mse@{l}"] = mean(v)
    return out


OFFSET_EDGES = (0, 1, 2, 4, 8, 16, 32)  # first distance from the new token of each kl_by_offset bucket


def by_offset(s: Scores, hs: HeldoutSet, edges: tuple[int, ...] = OFFSET_EDGES) -> list[dict]:
    """Mean KL over the aligned pairs at each distance from the snippet's first new token (0: the token itself),
    in buckets starting at `edges`: where in the text the remaining KL sits (pairs, not tokens, weigh equally)."""
    al = hs.alignment
    snippet = al.pair_snippet()
    bucket = np.searchsorted(edges, al.s_pos - prefix_lengths(al)[snippet], side="right") - 1
    out = []
    for b, lo in enumerate(edges):
        sel = bucket == b
        if sel.any():
            hi = edges[b + 1] - 1 if b + 1 < len(edges) else None
            name = str(lo) if hi == lo else f"{lo}-{hi}" if hi is not None else f"{lo}+"
            out.append({"offsets": name, "pairs": int(sel.sum()), "kl": float(s.kl[sel].mean())})
    return out


def tokens_saved(paths: list[str | Path], original_tokenizer, adapted_tokenizer, max_chars: int = 20_000_000
                 ) -> dict:
    """Sequence-length ratio (adapted / original tokenizer) over the held-out documents, up to max_chars."""
    docs = corpus.leading_documents(paths, max_chars)
    n_orig = n_new = 0
    for c in range(0, len(docs), 1024):
        part = docs[c:c + 1024]
        n_orig += sum(map(len, original_tokenizer(part, add_special_tokens=False)["input_ids"]))
        n_new += sum(map(len, adapted_tokenizer(part, add_special_tokens=False)["input_ids"]))
    return {"chars": sum(map(len, docs)), "original_tokens": n_orig, "adapted_tokens": n_new,
            "length_ratio": n_new / max(n_orig, 1), "saved_fraction": 1 - n_new / max(n_orig, 1)}

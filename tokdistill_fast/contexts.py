"""Stage 2: snippets of text around each new word, as original-tokenizer ids (the teacher's input).

Retrieval streams the corpus (corpus.py: text, JSON lines and Parquet files, directories, globs) in chunks of
about 1 MiB, so memory stays flat however large the corpus is, and finds the running-text form (" word") of every
token in one Aho-Corasick pass, where no word character of a spaced script touches it (a word written without
spaces, "パッケージ", wherever it occurs, as its added token matches). It keeps a uniform sample of hits per token
(reservoir sampling over the part of the corpus read), then tokenizes a character window around each kept hit and
cuts at most `length` tokens with the word inside. A hit is used only when the original tokenizer splits the word
there exactly as in running text, so the teacher sees natural tokenization and the alignment stage finds the
subtokens. Tokens with too few snippets are topped up by the model (workload.py): it continues their own snippets
after the word (`from_corpus`), or, without any, generates contexts from the word itself (the paper's prompt: BOS
+ " word", sampled).

By default the whole corpus is read, so each token's sample is uniform over all its occurrences. `stop_when_full`
stops as soon as every token has `keep` hits and `max_bytes` caps the bytes read: both save time on large corpora,
but the sample then comes from the first part of the corpus only (less diverse if the files are ordered by topic
or source).
"""

from __future__ import annotations

import bisect
import inspect
import logging
import random
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import regex
import torch

from .config import LEFT_CONTEXT, LEFT_CONTEXT_CHARS, LEFT_CONTEXT_MAX, UserInputError, progress
from .corpus import Corpus, Piece
from .tokens import TEXT_WORD_CHAR, NewToken, spaceless

log = logging.getLogger(__name__)
NO_CORPUS = "no corpus given: pass --corpus FILE, or --contexts generate"

WORD_CHAR = regex.compile(TEXT_WORD_CHAR, flags=regex.V1)
# GPT-2-style tokenizers (SmolLM2, Qwen2, StarCoder, Pythia) put this token between documents in pretraining.
DOC_SEPARATOR = "<|endoftext|>"
CHARS_PER_TOKEN = 8  # character margin per wanted token around a hit; English averages ~4.5 chars per token
INSIDE_MIN = 3  # matches inside longer words that split_inside_words takes as evidence (once or twice is not)


def start_id(tokenizer) -> int | None:
    """The id every snippet, prompt and held-out sequence starts with. A causal LM's first position is an attention
    sink whose hidden state is thousands of times larger than the rest (SmolLM2 at layer 22: norm ~23,000 vs
    ~300, whatever the token), so a new word must never sit there: BOS where the tokenizer adds one (Gemma), else
    the document separator that pretraining put before each document (SmolLM2's <|endoftext|>), else the BOS or
    EOS token the tokenizer names. None only for a tokenizer without any of them."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return bos
    sep = tokenizer.get_vocab().get(DOC_SEPARATOR)
    if sep is not None:
        return sep
    return bos if bos is not None else tokenizer.eos_token_id


@dataclass
class Snippet:
    """Teacher input for one token: original ids with the word's subtokens inside, the start id first (start_id)."""

    token: int  # index into the planned token list
    ids: list[int]
    source: str  # "corpus" | "continued" (the model's text after the word in a corpus snippet) | "generated"


class Hit(NamedTuple):
    """A kept occurrence (a tuple: made once per kept match, so cheap to build)."""

    text: str  # character window around the hit
    start: int  # the form's span inside `text`
    end: int
    at_doc_start: bool
    at_doc_end: bool


class Extended(NamedTuple):
    """How the extended tokenizer reads the text: the `tokenizer`, and per token the new ids it emits for that word
    (its running-text form and its variants)."""

    tokenizer: object
    ids: list[frozenset[int]]

    @classmethod
    def of(cls, tokenizer, tokens: list[NewToken], every: list[NewToken]) -> Extended:
        """`tokenizer` with, per token of `tokens`, the new ids of all forms of its word among `every`."""
        forms: dict[str, set[int]] = {}
        for t in every:
            forms.setdefault(t.variant_of or t.word, set()).add(t.new_id)
        return cls(tokenizer, [frozenset(forms[t.variant_of or t.word]) for t in tokens])


@dataclass
class RetrievalStats:
    hits: list[int] = field(default_factory=list)  # occurrences found per token
    inside: list[int] = field(default_factory=list)  # matches of its form inside longer words, per token
    other_form: list[int] = field(default_factory=list)  # occurrences in another Unicode normalization, per token
    chars: int = 0  # document characters searched
    bytes_read: int = 0  # corpus bytes consumed (Parquet: the text column's compressed bytes)
    files: int = 0
    stopped_early: str | None = None  # why the pass ended before the corpus did: "full" | "max_bytes"
    left_context: int | None = None  # tokens kept before the word (--left-context as resolved)
    chars_per_token: float | None = None  # of the hits' windows, where --left-context auto measured it

    def summary(self) -> dict:
        return {"corpus_files": self.files, "corpus_bytes": self.bytes_read, "corpus_chars": self.chars,
                "stopped_early": self.stopped_early, "left_context": self.left_context,
                "chars_per_token": self.chars_per_token}


class WordChars(dict):
    """Character -> whether WORD_CHAR matches it, computed once per distinct character."""

    def __missing__(self, char: str) -> bool:
        self[char] = WORD_CHAR.match(char) is not None
        return self[char]


def find_hits(pieces: Iterable[Piece], tokens: list[NewToken], keep: int, window_chars: int, seed: int,
              stop_when_full: bool = False) -> tuple[list[list[Hit]], RetrievalStats]:
    """One Aho-Corasick pass: for each token, a uniform sample of at most `keep` hits at word boundaries, each
    with up to `window_chars` characters of its document on either side. Long documents arrive in pieces: the
    tail of the document read so far is kept (`buf`) so that hits across piece boundaries are found once, with
    the same windows as in the whole document. With `stop_when_full`, stops once every token has `keep` hits."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for i, tok in enumerate(tokens):  # a bare form ("word") must also not follow a word character or a space; a
        # word written without spaces is its own running-text form, and stands wherever it occurs (bare None)
        bare = None if spaceless(tok.form) else tok.form[:1] != " "
        automaton.add_word(tok.form, (i, len(tok.form), bare))
    for i, tok in enumerate(tokens):  # the same text composed or decomposed: counted, as ~i, not kept
        for other in other_normalizations(tok.form):
            if other not in automaton:
                automaton.add_word(other, (~i, len(other), None if spaceless(other) else other[:1] != " "))
    automaton.make_automaton()
    longest = max((n for _, (_, n, _) in automaton.items()), default=1)  # other normalizations may be longer
    draw = random.Random(seed).random
    kept: list[list[Hit]] = [[] for _ in tokens]
    stats = RetrievalStats(hits=[0] * len(tokens), inside=[0] * len(tokens), other_form=[0] * len(tokens))
    if not tokens:
        return [], stats
    counts, inside = stats.hits, stats.inside
    is_word = WordChars()
    full = 0  # tokens holding `keep` hits
    buf, buf_first, done, last = "", True, 0, True  # open document's tail; hits ending at <= done are handled

    def scan(upto: int, doc_end: bool) -> None:
        """Handle the hits in buf that end in (done, upto]; buf extends past upto by a window unless doc_end.
        Runs once per raw match, so it avoids calls: ~1 us per match is the cost of retrieval on dense text."""
        nonlocal full
        size = len(buf)
        for pos, (i, n, bare) in automaton.iter(buf, max(0, done + 1 - longest), upto):
            end = pos + 1
            if end <= done:
                continue  # handled with the previous piece
            start = end - n
            if bare and start > 0 and buf[start - 1] == " ":
                continue  # where its running-text form (" word") matches, and is what the tokenizer emits
            if bare is not None and (end < size and is_word[buf[end]] or bare and start > 0
                                     and is_word[buf[start - 1]]):
                if i >= 0:
                    inside[i] += 1  # "palatable" inside "palatableness", a bare form inside a word
                continue
            if i < 0:
                stats.other_form[~i] += 1
                continue
            counts[i] += 1
            held = kept[i]
            slot = len(held)
            if slot == keep:  # reservoir sampling: the n-th hit replaces a random kept one with probability keep/n
                slot = int(draw() * counts[i])
                if slot >= keep:
                    continue
            lo, hi = max(0, start - window_chars), min(size, end + window_chars)
            hit = Hit(buf[lo:hi], start - lo, end - lo, lo == 0 and buf_first, hi == size and doc_end)
            if slot == len(held):
                held.append(hit)
                full += slot + 1 == keep
            else:
                held[slot] = hit

    for text, first, last in pieces:
        stats.chars += len(text)
        if first:
            buf, buf_first, done = text, True, 0
        else:
            buf += text
        upto = len(buf) if last else len(buf) - window_chars - 1  # a hit needs its right window and next char
        if upto > done:
            scan(upto, last)
            done = upto
        if stop_when_full and full == len(tokens):
            stats.stopped_early = "full"
            break
        if not last:  # keep what later hits may need: their left window and the char before them
            cut = max(0, done - longest - window_chars - 1)
            if cut:
                buf, buf_first, done = buf[cut:], False, done - cut
    else:
        if not last:  # the corpus was cut off inside a document (max_bytes): take its remaining hits
            scan(len(buf), False)
    return kept, stats


def other_normalizations(form: str) -> set[str]:
    """`form` composed and decomposed (Unicode NFC, NFD), where that is other text: a tokenizer reads "é" and "e" +
    U+0301, or Tamil "ோ" and "ெ" + "ா", apart, so an added token for one is not emitted on the other."""
    return {unicodedata.normalize(f, form) for f in ("NFC", "NFD")} - {form}


def split_inside_words(paths: list[str | Path], tokens: list[NewToken], max_bytes: int | None,
                       option: str = "--corpus", share: Callable[[NewToken], float] | None = None) -> dict[str, str]:
    """{form: why} of the `tokens` whose form the corpus shows inside longer words more often than as itself (or
    than `share(token)` times as often, where given), and INSIDE_MIN times or more, which an added token for it
    would split: the start-of-text "man's" inside "woman's", where no vocabulary token can show it
    (extend.vocabulary_collisions). One pass of find_hits over at most `max_bytes` of the corpus."""
    if not paths or not tokens:
        return {}
    _, stats = find_hits(Corpus(paths, max_bytes, option=option), tokens, 0, 0, 0)
    return {t.form: f"which as an added token would split longer words: {n} time(s) in the corpus, against {own} "
                    "as itself" for t, own, n in zip(tokens, stats.hits, stats.inside)
            if n > (share(t) if share else 1.0) * own and n >= INSIDE_MIN}


def left_context(tokenizer, hits: list[list[Hit]], setting: int | str | None, sample: int = 1024
                 ) -> tuple[int | None, float | None]:
    """--left-context as a token count (None: centred) and, for auto, the characters per token of the hits' windows
    (up to `sample` of them spread over the list): LEFT_CONTEXT tokens, or as many as hold LEFT_CONTEXT_CHARS
    characters where that is more (at most LEFT_CONTEXT_MAX). Marathi text reads at 0.9 characters a SmolLM2 token,
    so 8 tokens are less than one word before it."""
    if setting != "auto":
        return setting, None
    texts = [h.text for hs in hits for h in hs]
    texts = texts[::max(1, len(texts) // sample)][:sample]
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    if not tokens:
        return LEFT_CONTEXT, None
    per_token = sum(map(len, texts)) / tokens
    return min(LEFT_CONTEXT_MAX, max(LEFT_CONTEXT, round(LEFT_CONTEXT_CHARS / per_token))), round(per_token, 3)


def place_window(left: int, word: int, right: int, budget: int, max_before: int | None = None
                 ) -> tuple[int, int]:
    """Tokens to keep before and after the word (`left`/`right` available) so that the snippet is at most
    `budget` tokens with the word centred where the text allows, or with at most `max_before` tokens before it
    (the rest of the budget goes after it)."""
    room = max(budget - word, 0)
    cap = left if max_before is None else min(left, max_before)
    before = min(cap, room // 2)
    after = min(right, room - before)
    before = min(cap, room - after)
    return before, after


def end_before_word(ids: list[int], end: int, after: int, sub: list[int]) -> int:
    """`after`, shortened so that a window ending at ids[end + after] does not cut a later occurrence of the word
    (`sub`, whose rest follows in `ids` as far as they go): the positions inside a cut occurrence read subtokens that
    the extended tokenizer never emits for the word, where the original model copies the word's next subtoken from
    its earlier occurrence and a model reading the new token cannot (up to 8 nats of KL a pair in `tokdistill eval`)."""
    stop = end + after
    for k in range(min(len(sub) - 1, after), 0, -1):
        if ids[stop - k:stop] == sub[:k] and ids[stop:stop + len(sub) - k] == sub[k:k + len(ids) - stop]:
            return end_before_word(ids, end, after - k, sub)  # a word can overlap itself: the new end again
    return after


def end_before_unmerged(ids: list[int], ends: list[int], end: int, after: int, sub: list[int],
                        emitted: list[int]) -> int:
    """`after`, shortened so that a window ending at ids[end + after] stops before the first later occurrence of the
    word that the extended tokenizer emits (`emitted`: the character offsets where its ids start; `ends`: where each
    of `ids` ends) and the subtokens do not spell there, inside a longer word (" commit-graph" in " commit-graphs",
    tokenized " commit", "-", "graphs"): there a model reading the merge would read subtokens that the extended
    tokenizer never gives it, after the new token, and the original copies the word's rest from its earlier
    occurrence (8.9 of one window's 11.1 nats of KL on Git's manuals / Gemma-3)."""
    for at in sorted(emitted):
        k = bisect.bisect_right(ends, at)  # the id whose text holds the occurrence's first character
        if k >= end + after:
            break
        if k >= end and ids[k:k + len(sub)] != sub:
            return k - end
    return after


def cut_snippets(tokenizer, tokens: list[NewToken], hits: list[list[Hit]], length: int, start: int | None,
                 max_before: int | None = None, extended: Extended | None = None) -> tuple[list[Snippet], list[int]]:
    """Tokenize each hit's window once (batched, with offsets) and cut snippets of at most `length` ids, with at
    most `max_before` of them before the word (None: the word centred); with `extended`, a hit counts only where the
    extended tokenizer emits the word's id (not " ALGOL" inside a new " ALGOL-like"), and each window ends before an
    occurrence of its word that the extended tokenizer emits and the subtokens do not spell.
    Returns the snippets and, per token, how many hits were dropped because the word tokenized differently."""
    flat = [(i, h) for i, hs in enumerate(hits) for h in hs]
    budget = length - (start is not None)
    dropped = [0] * len(tokens)
    snippets: list[Snippet] = []
    for chunk in range(0, len(flat), 4096):
        part = flat[chunk:chunk + 4096]
        texts = [h.text for _, h in part]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ext = extended.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if extended else None
        for n, ((i, h), ids, offsets) in enumerate(zip(part, enc["input_ids"], enc["offset_mapping"])):
            first = next((k for k, (s, e) in enumerate(offsets) if e > h.start), None)
            sub = tokens[i].sub_ids
            emitted = None if ext is None else [a for t, (a, _) in zip(ext["input_ids"][n], ext["offset_mapping"][n])
                                                if t in extended.ids[i]]
            if first is None or ids[first:first + len(sub)] != sub or not h.start <= offsets[first][0] <= h.start + 1 \
                    or emitted is not None and h.start not in emitted:  # " ALGOL" in " ALGOL-like", both new
                dropped[i] += 1
                continue
            lo = 0 if h.at_doc_start else 1  # a window cut mid-text may start and end inside a word
            hi = len(ids) if h.at_doc_end else len(ids) - 1
            end = first + len(sub)
            before, after = place_window(first - lo, len(sub), max(hi - end, 0), budget, max_before)
            if emitted is not None:
                after = end_before_unmerged(ids, [e for _, e in offsets], end, after, sub, emitted)
            window = ids[first - before:end + end_before_word(ids, end, after, sub)]
            snippets.append(Snippet(i, ([start] if start is not None else []) + window, "corpus"))
    return snippets, dropped


def retrieve(paths: list[str | Path], tokenizer, tokens: list[NewToken], per_token: int, length: int, seed: int,
             start: int | None, stop_when_full: bool = False, max_bytes: int | None = None,
             max_before: int | str | None = None, option: str = "--corpus", extended: Extended | None = None
             ) -> tuple[list[Snippet], RetrievalStats, list[int]]:
    """Snippets from the corpus for every primary token (variants take their primary's rows). `stop_when_full`
    and `max_bytes` end the pass early (see the module docstring for what that costs); `max_before` caps the
    tokens kept before the word (None: centred windows; auto: left_context); `option` names the files in error
    messages; `extended`: see cut_snippets."""
    if not paths:
        raise UserInputError(NO_CORPUS)
    corpus = Corpus(paths, max_bytes, option=option)
    hits, stats = find_hits(corpus, tokens, per_token, CHARS_PER_TOKEN * length, seed, stop_when_full)
    stats.files, stats.bytes_read = len(corpus.files), corpus.bytes_read
    if corpus.truncated:
        stats.stopped_early = "max_bytes"
    log.info("searched %.1f MB of %d corpus file(s)%s", corpus.bytes_read / 1e6, len(corpus.files),
             f" (stopped early: {stats.stopped_early})" if stats.stopped_early else "")
    warn_other_normalizations(tokens, stats, extended)
    stats.left_context, stats.chars_per_token = left_context(tokenizer, hits, max_before)
    if stats.chars_per_token is not None:
        log.info("left context: %s tokens before the word (the windows read at %.2f characters a token)",
                 stats.left_context, stats.chars_per_token)
    snippets, dropped = cut_snippets(tokenizer, tokens, hits, length, start, stats.left_context, extended)
    return snippets, stats, dropped


def warn_other_normalizations(tokens: list[NewToken], stats: RetrievalStats, extended: Extended | None) -> None:
    """Log the words the corpus also writes in another Unicode normalization, where the output tokenizer (when
    given) does not emit their new id; those occurrences are neither hits nor trained on. Keeps the counts of the
    others at zero in `stats`, so that the report lists only these."""
    found = []
    for i, n in enumerate(stats.other_form):
        if not n:
            continue
        others = other_normalizations(tokens[i].form)
        if extended is not None and all(extended.ids[i] & set(extended.tokenizer(o, add_special_tokens=False)
                                                              ["input_ids"]) for o in others):
            stats.other_form[i] = 0  # a tokenizer that normalizes the text emits the word's id there too
            continue
        found.append(f"{tokens[i].word!r} {n}")
    if found:
        log.warning("%d word(s) also occur written in another Unicode normalization (composed or decomposed "
                    "characters), which the tokenizer reads as other text: their new ids are not emitted there, and "
                    "those occurrences are not trained on (%s); normalize the corpus and the model's inputs to one "
                    "form (NFC) to use them", len(found), ", ".join(found[:8]) + (", ..." if len(found) > 8 else ""))


@contextmanager
def contiguous_head_input(model) -> Iterator[None]:
    """Within it, `model`'s LM head gets a contiguous input. generate() hands it a strided [B, 1, D] slice of the
    prompt's states; on a CPU, with frozen weights, a strided bf16 input takes the batched oneDNN path, which copies
    the [V, D] weight once per row (12 s for 16 rows of Gemma-3's head, 0.04 s contiguous) and, when the copy does
    not fit in memory, fails and turns oneDNN off for the rest of the process (later bf16 matmuls ~7x slower)."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def sub_end(ids: list[int], sub: list[int]) -> int | None:
    """Index just past the first occurrence of `sub` in `ids` after the start id, or None."""
    n = len(sub)
    return next((k + n for k in range(1, len(ids) - n + 1) if ids[k:k + n] == sub), None)


def from_word(tokens: list[NewToken], wanted: dict[int, int], start: int | None) -> list[tuple[int, list[int]]]:
    """The paper's prompts: the start id + the word's subtokens, `wanted[token]` times for each token."""
    return [(i, ([start] if start is not None else []) + tokens[i].sub_ids) for i, n in wanted.items()
            for _ in range(n)]


def from_corpus(tokens: list[NewToken], snippets: list[Snippet], wanted: dict[int, int]
                ) -> list[tuple[int, list[int]]]:
    """Prompts cut from each token's corpus snippets right after the word, cycling through them until the token
    has `wanted[token]` of them: new text after the word, in the corpus's own left contexts."""
    heads: dict[int, list[list[int]]] = {i: [] for i in wanted}
    for s in snippets:
        if s.token in heads and s.source == "corpus":
            end = sub_end(s.ids, tokens[s.token].sub_ids)
            if end is not None:
                heads[s.token].append(s.ids[:end])
    return [(i, heads[i][k % len(heads[i])]) for i, n in wanted.items() if heads[i] for k in range(n)]


def draw(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One id per row of `logits` [B, V], sampled from softmax(logits / temperature) by inverting the CDF with one
    uniform per row: torch.multinomial draws an exponential per vocabulary entry, which on a CPU took 57% of
    sampling Gemma-3's 262k-entry vocabulary."""
    cdf = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1, dtype=torch.float32).cumsum_(-1)
    u = torch.rand(logits.shape[0], 1, generator=gen).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[tuple[int, list[int]]], length: int, new_tokens: int | None, seed: int,
           temperature: float = 1.0, chunk: int = 256, source: str = "generated") -> list[Snippet]:
    """Snippets sampled from the model: each prompt (token index, ids) continued to at most `length` ids and at most
    `new_tokens` new ones (None: no cap), or to the first EOS; a prompt of `length` ids or more keeps them all and
    one sampled id, as a corpus window keeps a long word whole. Prompts run shortest first in chunks, padded on the
    left, through a plain loop over the model's key/value cache that samples every step (`draw`): a forward pass
    reads every weight whatever its batch, so a few wide passes cost what one narrow one does. A chunk reads each
    distinct prompt once and copies its cache to the rows that repeat it (a word with few corpus snippets is
    continued from each of them many times)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eos = tokenizer.eos_token_id
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x
    order = sorted(prompts, key=lambda p: (len(p[1]), p[1]))  # a prompt's repeats side by side
    snippets: list[Snippet] = []
    with contiguous_head_input(model):
        bar = progress(total=len(prompts), desc="generate", unit="snippet", leave=False)
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            distinct: dict[tuple[int, ...], int] = {}
            for _, p in part:
                distinct.setdefault(tuple(p), len(distinct))
            rep = torch.tensor([distinct[tuple(p)] for _, p in part], device=device)  # row -> its prompt's
            lens = [len(p) for p in distinct]
            width, caps = max(lens), [max(min(length - len(p), new_tokens or length), 1) for _, p in part]
            ids = torch.tensor([[eos or 0] * (width - n) + list(p) for p, n in zip(distinct, lens)], device=device)
            mask = torch.tensor([[0] * (width - n) + [1] * n for n in lens], device=device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_(min=0),
                        use_cache=True, logits_to_keep=1)
            cache = getattr(out, kv)
            cache.reorder_cache(rep)
            logits, mask = out.logits[:, -1].index_select(0, rep), mask.index_select(0, rep)
            pos = mask.sum(1, keepdim=True) - 1
            new: list[torch.Tensor] = []
            ended = torch.zeros(len(part), 1, dtype=torch.bool, device=device)
            for step in range(max(caps)):
                new.append(draw(logits, temperature, gen).view(-1, 1))
                if eos is not None:
                    ended |= new[-1] == eos
                if step + 1 == max(caps) or bool(ended.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(len(part), 1)], 1)
                pos = pos + 1
                out = model(input_ids=new[-1], attention_mask=mask, position_ids=pos, **{kv: cache},
                            use_cache=True, logits_to_keep=1)
                cache, logits = getattr(out, kv), out.logits[:, -1]
            for (i, p), cap, row in zip(part, caps, torch.cat(new, 1).tolist()):
                row = row[:cap]
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                snippets.append(Snippet(i, (p + row)[:max(length, len(p) + 1)], source))
            bar.update(len(part))
        bar.close()
    return snippets


def generate(model, tokenizer, tokens: list[NewToken], wanted: dict[int, int], length: int, seed: int,
             start: int | None, temperature: float = 1.0, new_tokens: int | None = None) -> list[Snippet]:
    """`wanted[token]` contexts for each token, sampled from the model itself, prompted with the start id + the
    word's subtokens (the paper's recipe: BOS + word), at most `length` ids and `new_tokens` sampled ones each."""
    return sample(model, tokenizer, from_word(tokens, wanted, start), length, new_tokens, seed, temperature)

"""`tokdistill select`: candidate new tokens from a corpus, with the paper's filters, ranked by tokens saved.

A candidate is a whole word (split at whitespace, outer punctuation stripped, none glued to a dash) that contains
no digit and none of []{}()<>.,;:!?@#$%^&*+_=|\\/, is split into at least two subtokens
in running text, occurs at least `min_count` times, and whose added token would not cut longer words apart: not a
longer vocabulary token (" perh" would split " perhaps", " specif" " specific": extend.vocabulary_collisions), nor
longer words of the corpus more often than the word stands alone there (" fasten" in " fastened" and
" fastening": contexts.split_inside_words), nor found in the text llama.cpp's converter hashes to recognize the
tokenizer (" he's": extend.converter_text_forms). Rank: count * (subtokens - 1), the tokens a corpus pass saves.

Scripts written without spaces (tokens.SPACELESS) have no whitespace between words: there a candidate is a run of
one script (Japanese Katakana "デスクトップ", Han "設定", Hiragana "します"; at least two characters), and a run seen
inside longer runs of its script more often than alone is left out ("ポート" in "サポート"). Where runs of Han or
Thai average PHRASE_RUN_CHARS characters or more (Chinese, Thai: phrases, not words), the candidates are the words
discover_words finds inside them instead ("软件包", "档案库" in "的软件包提供的档案库"); a segmenter's list may
serve better.

With `max_words` over 1 (`--max-words`), phrases of up to that many words one space apart compete too (" such as",
" for example"; the multi-word tokens of the paper), ranked alike, with punctuation only at their outer ends. Left
out: a phrase seen inside longer words PHRASE_INSIDE_SHARE as often as alone; a candidate whose form overlaps a
better-ranked one's (" as well" after " well as"), since llama.cpp and transformers would read text holding both
apart; and one the corpus rarely shows where the longer and overlapping candidates are read first.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import regex

from ..corpus import iter_documents
from ..extend import converter_text_forms, overlapping_forms, string_automaton, vocabulary_collisions
from ..tokens import (
    MARK,
    SPACELESS_LETTER,
    TEXT_WORD_CHAR,
    NewToken,
    original_ids,
    running_form,
    spaceless,
    trie_pattern,
)

log = logging.getLogger(__name__)

FORBIDDEN = set("[]{}()<>.,;:!?@#$%^&*+_=|\\/")
# Outer punctuation: quotes and brackets of every language („Wort“, « mot », (word)) before the word, any after it.
# A chunk glued to a dash is no word: "-rw-r--r--", "--verbose", "--Dryden." (a dictionary's citation); stripping
# the dash would propose "rw-r--r", a piece of text that never follows a space.
OPENING = r"[\p{P}\p{Cf}`--\p{Pd}\p{Pc}]"  # punctuation a word may follow in its chunk: not a dash or underscore
LEADING = regex.compile(rf"^{OPENING}+", flags=regex.V1)
TRAILING = regex.compile(r"[\p{P}\p{Cf}`]+$")  # \p{Cf}: a zero-width space after "Preferences…" (AsciiDoc)
DASH = regex.compile(r"[\p{Pd}\p{Pc}]")
# A run of letters of one script written without spaces; Katakana first, so that the long-vowel mark "ー" it shares
# with Hiragana stays in a Katakana word.
SPACELESS_RUN = regex.compile("|".join(rf"[[\p{{L}}\p{{M}}]&&\p{{scx={script}}}]+" for script in (
    "Katakana", "Han", "Hiragana", "Thai", "Lao", "Khmer", "Myanmar")), flags=regex.V1)
SPACELESS_MIN_CHARS = 2  # many Chinese and Japanese words have two characters
# Scripts whose runs may hold several words (Japanese kana break its runs of Han: 1.8 characters a run on the Japanese
# Debian Reference, against 5.7 on the Chinese one); runs this long on average are phrases more than words.
PHRASE_SCRIPTS = regex.compile(r"[\p{scx=Han}\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}\p{scx=Myanmar}]+", flags=regex.V1)
PHRASE_RUN_CHARS = 4.0
# Words inside such runs ("new word discovery"): 2-6 characters that go together far more often than chance and that
# many different characters precede and follow (discover_words).
DISCOVER_CHARS = 6
COHESION = 50.0  # p(word) / (p(left part) p(right part)) at the weakest cut
FREEDOM = 1.0  # nats of the characters before and after the word, each side
# A phrase is left out where a tenth of its matches or more fall inside longer words (" in a" in " in any", " and
# the" in " and then": 108 and 99 against 218 and 287 alone in GIMP's help): it saves one token where it stands
# alone, and each match inside a word hands the model a split it never trained on (a word: more than alone).
PHRASE_INSIDE_SHARE = 0.1


def chunk_word(chunk: str) -> str:
    """The word of a whitespace-delimited chunk, outer punctuation stripped; "" where it starts with a dash."""
    word = LEADING.sub("", chunk)
    return "" if DASH.match(word) else TRAILING.sub("", word)


def chunk_words(chunk: str) -> list[str]:
    """The words of a whitespace-delimited chunk: its chunk_word, or where it holds letters of a script written
    without spaces, each run of one such script and each piece of other text between them (chunk_word of it)."""
    if not SPACELESS_LETTER.search(chunk):
        return [chunk_word(chunk)]
    words, pos = [], 0
    for run in SPACELESS_RUN.finditer(chunk):
        words += [chunk_word(chunk[pos:run.start()]), run.group()]
        pos = run.end()
    return words + [chunk_word(chunk[pos:])]


@dataclass
class Suggestion:
    word: str
    count: int
    subtokens: int

    @property
    def saved(self) -> int:
        return self.count * (self.subtokens - 1)


def word_counts(paths) -> Counter:
    """How often each word of the corpus's whitespace-delimited chunks (chunk_words) occurs in running text: all but
    a document's first word, which is in its start-of-text form, unless it is written without spaces."""
    counts: Counter = Counter()
    for doc in iter_documents(paths):
        if not SPACELESS_LETTER.search(doc):  # spaced scripts only (most text): one pass, half the time per chunk
            counts.update(chunk_word(w) for w in regex.findall(r"(?<=\s)\S+", doc))
            continue
        for chunk in regex.finditer(r"\S+", doc):
            words = chunk_words(chunk.group())
            counts.update(words[1:] if chunk.start() == 0 and not spaceless(words[0]) else words)
    counts.pop("", None)
    return counts


def phrase_words(doc: str) -> Iterator[list[tuple[str, bool, bool]]]:
    """The runs of two or more of a document's words that stand one space apart (not its first word, which is in its
    start-of-text form), as (word, punctuation before it, punctuation after it) per chunk: a phrase may have
    punctuation only at its outer ends, where a single word may too."""
    run: list[tuple[str, bool, bool]] = []
    end = None
    for m in regex.finditer(r"\S+", doc):
        chunk = m.group()
        word = chunk_word(chunk)
        if end is None or doc[end:m.start()] != " ":
            if len(run) > 1:
                yield run
            run = []
        if m.start() > 0 and word:  # a document's first word, a chunk glued to a dash: no phrase starts there
            run.append((word, not chunk.startswith(word), not chunk.endswith(word)))
        else:
            if len(run) > 1:
                yield run
            run = []
        end = m.end()
    if len(run) > 1:
        yield run


def phrase_counts(paths, max_words: int, min_count: int) -> Counter:
    """How often each phrase of 2 to `max_words` words occurs in running text of scripts with spaces (documents
    holding a script without spaces are left out), as phrase_words cuts it. Counted one length at a time, only
    where both shorter phrases inside it are frequent (`min_count`), so memory follows the frequent phrases."""
    counts: Counter = Counter()
    frequent: set[str] | None = None  # the words, at the first level: all of them
    for k in range(2, max_words + 1):
        level: Counter = Counter()
        for doc in iter_documents(paths):
            if SPACELESS_LETTER.search(doc):
                continue
            for run in phrase_words(doc):
                for i in range(len(run) - k + 1):
                    part = run[i:i + k]
                    if part[0][2] or part[-1][1] or any(b or a for _, b, a in part[1:-1]):
                        continue  # punctuation inside the phrase
                    words = [w for w, _, _ in part]
                    if frequent is None or " ".join(words[:-1]) in frequent and " ".join(words[1:]) in frequent:
                        level[" ".join(words)] += 1
        kept = {p: n for p, n in level.items() if n >= min_count}
        counts.update(kept)
        frequent = set(kept)
    return counts


def select_tokens(tokenizer, paths, top: int | None = None, min_count: int = 10,
                  min_chars: int = 3, max_words: int = 1) -> list[Suggestion]:
    """Ranked candidates that pass the filters (see the module docstring); with `max_words` over 1, phrases of up
    to that many words too, and no candidate that overlaps a better-ranked one (extend.overlapping_forms)."""
    out = []
    counts = word_counts(paths)
    found: Counter = Counter()
    runs, mean = phrase_runs(counts)
    if runs:
        for run in runs:
            del counts[run]
        counts.update(found := discover_words(runs, min_count))
        log.warning("the corpus's %d runs of Han, Thai, Lao, Khmer or Myanmar letters average %.1f characters: "
                    "phrases more than words; found %d words inside them by how often their characters go together "
                    "and how freely they combine (no dictionary): check the list, a word list from a segmenter may "
                    "serve better (docs/vocabulary-extension.md)", sum(runs.values()), mean, len(found))
    if max_words > 1:
        counts.update(phrase_counts(paths, max_words, min_count))
    for word, count in counts.items():
        shortest = min(min_chars, SPACELESS_MIN_CHARS) if spaceless(word) else min_chars
        if count < min_count or len(word) < shortest:
            continue
        if any(c.isdigit() or c in FORBIDDEN for c in word) or not any(c.isalpha() for c in word):
            continue  # box-drawing table rules and other strings without a letter are no words
        ids = original_ids(tokenizer, running_form(word))
        if ids and len(ids) >= 2:
            out.append(Suggestion(word, count, len(ids)))
    out.sort(key=lambda c: (-c.saved, c.word))
    from ..contexts import split_inside_words  # here: contexts loads torch, which the package import must not

    if hashed := converter_text_forms([running_form(c.word) for c in out]):
        out = [c for c in out if running_form(c.word) not in hashed]
        log.info("left out %d word(s) that llama.cpp's converter would find in the text whose ids it hashes to "
                 "recognize the tokenizer, so that it would refuse the output (%s)", len(hashed),
                 ", ".join(repr(f) for f in list(hashed)[:8]))
    splits = vocabulary_collisions(tokenizer, [running_form(c.word) for c in out])
    unsplit = [NewToken(c.word, form, []) for c in out if (form := running_form(c.word)) not in splits]
    inside = split_inside_words(paths, unsplit, None, share=lambda t: PHRASE_INSIDE_SHARE if " " in t.word else 1.0)
    inside.update(inside_runs(counts, [c.word for c in out if spaceless(c.word) and c.word not in found]))
    if splits or inside:
        out = [c for c in out if running_form(c.word) not in splits and running_form(c.word) not in inside]
        log.info("left out %d word(s) whose added token would split longer vocabulary words wherever those occur "
                 "(%s) and %d that the corpus shows inside longer words more often than alone, or a phrase a tenth "
                 "as often (%s)", len(splits), ", ".join(f"{f!r} in {text!r}" for f, text in list(splits.items())[:8]),
                 len(inside),
                 ", ".join(repr(f) for f in list(inside)[:8]))
    if max_words > 1:  # phrases overlap each other (" as well", " well as") far more often than words do
        overlaps = overlapping_forms([NewToken(c.word, running_form(c.word), []) for c in out], [])
        out = [c for c in out if running_form(c.word) not in overlaps]
        log.info("left out %d candidate(s) that overlap a better-ranked one (%s)", len(overlaps),
                 ", ".join(repr(f) for f in list(overlaps)[:8]))
        out = alone_often_enough(paths, out, min_count)
    out = out[:top] if top else out
    twins: dict[str, list[str]] = {}
    for c in out:
        twins.setdefault(unicodedata.normalize("NFC", c.word), []).append(c.word)
    if same := [ws for ws in twins.values() if len(ws) > 1]:
        log.warning("%d word(s) are proposed more than once, the same text composed and decomposed (Unicode NFC and "
                    "NFD: %s): the tokenizer reads them apart, so each form is a token of its own; a corpus "
                    "normalized to one form (NFC) proposes one", len(same),
                    ", ".join(" / ".join(ascii(w) for w in ws) for ws in same[:8]))
    return out


def alone_often_enough(paths, ranked: list[Suggestion], min_count: int) -> list[Suggestion]:
    """The candidates of a script with spaces still found `min_count` times where the corpus is read as the
    tokenizer reads added tokens, leftmost-longest among them all (a longer or overlapping one takes the text:
    " image menubar" never stands alone where GIMP's help always writes " image menubar through"); counted again
    over what is kept until nothing more goes. Candidates of scripts without spaces are kept as they are."""
    kept = list(ranked)
    while True:
        spaced = [c.word for c in kept if not spaceless(c.word)]
        if not spaced:
            return kept
        # where word_counts counted it: after whitespace and any opening punctuation (" word", "\nword", "(word")
        pattern = regex.compile(rf"(?<=\s{OPENING}*)({trie_pattern(spaced)})(?!{TEXT_WORD_CHAR})",
                                flags=regex.V1)
        found = Counter(m.group(1) for doc in iter_documents(paths) for m in pattern.finditer(doc))
        alone = [c for c in kept if spaceless(c.word) or found[c.word] >= min_count]
        if len(alone) == len(kept):
            break
        kept = alone
    if len(kept) < len(ranked):
        words = {c.word for c in kept}
        log.info("left out %d candidate(s) found fewer than %d times where the longer or overlapping candidates are "
                 "read first (%s)", len(ranked) - len(kept), min_count,
                 ", ".join(repr(c.word) for c in ranked if c.word not in words)[:400])
    return kept


def phrase_runs(counts: Counter) -> tuple[dict[str, int], float]:
    """The corpus's runs of Han, Thai, Lao, Khmer or Myanmar letters with their counts where they average
    PHRASE_RUN_CHARS or more characters (Chinese, Thai: phrases more than words), else none; and that average."""
    runs = {w: n for w, n in counts.items() if PHRASE_SCRIPTS.fullmatch(w)}
    mean = sum(len(w) * n for w, n in runs.items()) / max(1, sum(runs.values()))
    return (runs if mean >= PHRASE_RUN_CHARS else {}), mean


def discover_words(runs: dict[str, int], min_count: int) -> Counter:
    """Words inside runs of a script written without spaces, found without a dictionary: substrings of 2 to
    DISCOVER_CHARS characters seen `min_count` times or more whose parts go together far more often than chance
    (COHESION) and that many different characters precede and follow (FREEDOM; a run's edge counts as a new
    character each time), with their counts. A substring that starts or stops inside a character (a Thai vowel
    mark) is none. Counted one length at a time, only where both shorter parts are frequent, so memory follows the
    frequent substrings: 0.7 s for the 56,000 characters of Han in the Chinese Debian Reference's training text; 40
    s and 314 MB for 2 M characters of Zipf-distributed synthetic words (29 s and 598 MB counted in one pass)."""
    def substrings(run: str, k: int):
        for i in range(len(run) - k + 1):
            if not MARK.match(run[i]) and not MARK.match(run[i + k:i + k + 1]):
                yield i, run[i:i + k]

    def cuts(s: str) -> list[int]:
        """Where `s` splits between two characters (not before a mark)."""
        return [i for i in range(1, len(s)) if not MARK.match(s[i])]

    seen: Counter = Counter()  # substrings seen min_count times or more
    for k in range(1, DISCOVER_CHARS + 1):
        level: Counter = Counter()
        for run, n in runs.items():
            for _, s in substrings(run, k):
                if not (at := cuts(s)) or seen[s[:at[-1]]] and seen[s[at[0]:]]:
                    level[s] += n
        seen.update({s: n for s, n in level.items() if n >= min_count})
    sides: dict[str, tuple[Counter, Counter]] = {}
    for run, n in runs.items():
        for k in range(2, DISCOVER_CHARS + 1):
            for i, s in substrings(run, k):
                if s in seen:
                    before, after = sides.setdefault(s, (Counter(), Counter()))
                    before[run[i - 1] if i else None] += n
                    after[run[i + k] if i + k < len(run) else None] += n
    chars = sum(len(r) * n for r, n in runs.items())

    def freedom(side: Counter) -> float:
        total = sum(side.values())  # an edge (None) is a new character each time: n of them at 1/total each
        return side[None] / total * math.log(total) - sum(
            v / total * math.log(v / total) for c, v in side.items() if c is not None)

    def cohesion(s: str) -> float:
        """The least, over the cuts between two characters, of p(s) / (p(left part) p(right part)); 0 for one
        character written with marks."""
        return min((seen[s] * chars / (seen[s[:i]] * seen[s[i:]]) for i in cuts(s)), default=0.0)

    return Counter({s: seen[s] for s, (before, after) in sides.items()
                    if cohesion(s) >= COHESION and min(freedom(before), freedom(after)) >= FREEDOM})


def inside_runs(counts: Counter, words: list[str]) -> dict[str, str]:
    """{word: why} of the `words` (runs of a script written without spaces) that `counts` shows inside longer runs
    more often than alone (and contexts.INSIDE_MIN times or more): an added token would cut those runs apart."""
    from ..contexts import INSIDE_MIN

    if not words:
        return {}
    automaton = string_automaton(words)
    inside: Counter = Counter()
    for run, n in counts.items():
        if len(run) > 1 and spaceless(run):
            for _, w in automaton.iter(run):
                if w != run:
                    inside[w] += n
    return {w: f"which as an added token would split longer runs of its script: {inside[w]} time(s) in the corpus, "
               f"against {counts[w]} as itself" for w in words if inside[w] > counts[w] and inside[w] >= INSIDE_MIN}

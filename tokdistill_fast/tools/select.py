"""`tokdistill select`: candidate new tokens from a corpus, with the paper's filters, ranked by tokens saved.

A candidate is a whole word (split at whitespace, outer punctuation stripped, none glued to a dash) that is not in
the vocabulary, contains no digit and none of []{}()<>.,;:!?@#$%^&*+_=|\\/, is split into at least two subtokens
in running text, occurs at least `min_count` times, and whose added token would not cut longer words apart: not a
longer vocabulary token (" perh" would split " perhaps", " specif" " specific": tokens.vocabulary_collisions), nor
longer words of the corpus more often than the word stands alone there (" fasten" in " fastened" and
" fastening": contexts.split_inside_words). Rank: count * (subtokens - 1), the tokens a corpus pass saves.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import regex

from ..corpus import iter_documents
from ..tokens import NewToken, original_ids, vocabulary_collisions

log = logging.getLogger(__name__)

FORBIDDEN = set("[]{}()<>.,;:!?@#$%^&*+_=|\\/")
# Outer punctuation: quotes and brackets of every language („Wort“, « mot », (word)) before the word, any after it.
# A chunk glued to a dash is no word: "-rw-r--r--", "--verbose", "--Dryden." (a dictionary's citation); stripping
# the dash would propose "rw-r--r", a piece of text that never follows a space.
LEADING = regex.compile(r"^[\p{P}\p{Cf}`--\p{Pd}\p{Pc}]+", flags=regex.V1)
TRAILING = regex.compile(r"[\p{P}\p{Cf}`]+$")  # \p{Cf}: a zero-width space after "Preferences…" (AsciiDoc)
DASH = regex.compile(r"[\p{Pd}\p{Pc}]")


def chunk_word(chunk: str) -> str:
    """The word of a whitespace-delimited chunk, outer punctuation stripped; "" where it starts with a dash."""
    word = LEADING.sub("", chunk)
    return "" if DASH.match(word) else TRAILING.sub("", word)


@dataclass
class Suggestion:
    word: str
    count: int
    subtokens: int

    @property
    def saved(self) -> int:
        return self.count * (self.subtokens - 1)


def word_counts(paths) -> Counter:
    """How often each whitespace-delimited word (chunk_word) follows a space in the corpus."""
    counts: Counter = Counter()
    for doc in iter_documents(paths):
        counts.update(chunk_word(w) for w in regex.findall(r"(?<=\s)\S+", doc))
    counts.pop("", None)
    return counts


def select_tokens(tokenizer, paths, top: int | None = None, min_count: int = 10,
                  min_chars: int = 3) -> list[Suggestion]:
    """Ranked candidates that pass the filters (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    out = []
    for word, count in word_counts(paths).items():
        if count < min_count or len(word) < min_chars or word in vocab:
            continue
        if any(c.isdigit() or c in FORBIDDEN for c in word) or not any(c.isalpha() for c in word):
            continue  # box-drawing table rules and other strings without a letter are no words
        ids = original_ids(tokenizer, " " + word)
        if ids and len(ids) >= 2:
            out.append(Suggestion(word, count, len(ids)))
    out.sort(key=lambda c: (-c.saved, c.word))
    from ..contexts import split_inside_words  # here: contexts loads torch, which the package import must not

    splits = vocabulary_collisions(tokenizer, [" " + c.word for c in out])
    inside = split_inside_words(paths, [NewToken(c.word, " " + c.word, []) for c in out if " " + c.word not in splits],
                                None)
    if splits or inside:
        out = [c for c in out if " " + c.word not in splits and " " + c.word not in inside]
        log.info("left out %d word(s) whose added token would split longer vocabulary words wherever those occur "
                 "(%s) and %d that the corpus shows inside longer words more often than alone (%s)", len(splits),
                 ", ".join(f"{f!r} in {text!r}" for f, text in list(splits.items())[:8]), len(inside),
                 ", ".join(repr(f) for f in list(inside)[:8]))
    return out[:top] if top else out

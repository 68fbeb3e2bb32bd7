"""Stage 1: new words -> the tokens to add, with the original subtoken ids of each (extend.py makes the tokenizer
that emits their new ids).

A new word ("palatable", "spill the beans") becomes the token for its running-text form " palatable" and, when
the bare form "palatable" (start of text, after a newline or punctuation) is split too, a variant token for it;
a word of a script written without spaces ("パッケージ") is its own running-text form, with no variant; an option
adds casing variants ("Palatable"). Variants take their primary's trained row moved by the offset between
their subtoken means (pipeline.learn_rows). Subtoken ids always come from the original tokenizer.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import regex

from .config import UserInputError, not_a_file

log = logging.getLogger(__name__)

# Characters that continue a word: letters, marks, digits, "_", and the zero-width non-joiner and joiner, which
# Unicode's word segmentation never breaks at (UAX #29: Extend, ZWJ): Persian "می‌کنید" is one word, not "می" and
# "کنید". Literal characters, not escapes, for every regex engine a tokenizer's pre-tokenizer may run.
WORD_CHARS = "\\p{L}\\p{M}\\p{N}_\u200c\u200d"
# Scripts written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Burmese): a word of theirs has
# no spaced running-text form, and their letters next to a form in text do not make it part of a longer word
# (Japanese "のデスクトップ環境" holds the word "デスクトップ"; "GNOMEの" the word "GNOME").
SPACELESS = r"\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}\p{scx=Myanmar}"
SPACELESS_LETTER = regex.compile(rf"[[\p{{L}}\p{{M}}]&&[{SPACELESS}]]", flags=regex.V1)
TEXT_WORD_CHAR = rf"[[{WORD_CHARS}]--[{SPACELESS}]]"  # in text, a form must not touch these (regex.V1 syntax)
SPACE_MARK = "\u2581"  # SentencePiece's visible space
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": byte-level BPE's stored space
BYTE_PIECE = regex.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces: <0x41>
MARK = regex.compile(r"\p{M}")  # a combining mark continues the character before it (Thai vowels and tones)
INVISIBLE = "\u200b\u2060\ufeff"  # zero-width space, word joiner, byte-order mark: no part of a word at its ends
WORD_FIELDS = ("entity", "token", "word")  # a JSON word-list object's word: the reference code's field first


@dataclass
class NewToken:
    """One token to add. `form` is the text span it replaces; `variant_of` names the primary word whose trained
    rows a variant takes (moved by the subtoken-mean offset); `variant` says which kind ("" primary, "start",
    "casing", "casing+start")."""

    word: str
    form: str
    sub_ids: list[int]
    new_id: int = -1
    piece: str = ""  # the string stored in the tokenizer (vocab key or added-token content)
    kind: str = ""  # "vocab" | "added"
    variant_of: str | None = None
    variant: str = ""


@dataclass
class Skipped:
    word: str
    reason: str
    form_only: bool = False  # the word is added; only this form of it (a variant) is left out


def spaceless(word: str) -> bool:
    """Whether `word` starts with a letter of a script written without spaces (SPACELESS)."""
    return SPACELESS_LETTER.match(word) is not None


def running_form(word: str) -> str:
    """The form a word takes in running text: " word", or the word itself in a script written without spaces."""
    return word if spaceless(word) else " " + word


def read_word_list(path: str | Path) -> list[str]:
    """The new tokens of a word-list file, as they appear in running text: one per line; or, in a `.jsonl` /
    `.ndjson` file, one per line as a JSON string or object (the reference code's `{"entity": " Hg", "count": 539}`);
    or, in a `.json` file, a list of them or an object of such lists (its `{"places": [...], "people": [...]}`).
    Space around a word is not part of it, and blank words are ignored (and logged)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--new-tokens {path}: {not_a_file(path)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--new-tokens {path}: cannot read it as UTF-8 text: {e}") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        words = [_json_word(path, value, f"line {n}") for n, value in _json_lines(path, text)]
    elif suffix == ".json":
        words = _json_words(path, _json(path, text, "the file"))
    else:
        words = text.splitlines()
        _refuse_non_words(path, words)
    return clean_words(words, f"--new-tokens {path}")


def clean_words(words: list[str], source: str) -> list[str]:
    """The words of a list as they are read: space and INVISIBLE around a word are not part of it, blank words are
    left out (and logged), and a list without any is a user error naming its `source`."""
    wrong = [w for w in words if not isinstance(w, str)]
    if wrong:
        raise UserInputError(f"{source}: every word must be a string, not {wrong[0]!r}")
    words = [w.strip().strip(INVISIBLE).strip() for w in words]
    blanks = sum(1 for w in words if not w)
    if blanks:
        log.warning("%s: ignored %d blank word(s)", source, blanks)
    words = [w for w in words if w]
    if not words:
        raise UserInputError(f"{source}: no tokens in it")
    return words


def _json(path: Path, text: str, where: str):
    """`text` parsed as JSON; a user error naming `where` if it is not."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserInputError(f"--new-tokens {path}: {where} is not JSON: {e}") from None


def _json_lines(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON-lines file (lines end at a line feed only: a JSON
    string may hold U+2028 or U+0085 as they are)."""
    return [(n, _json(path, line, f"line {n}")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _json_word(path: Path, value, where: str) -> str:
    """The word a JSON value gives: a string, or an object's first field of WORD_FIELDS (a string)."""
    if isinstance(value, dict):
        field = next((f for f in WORD_FIELDS if f in value), None)
        value = value[field] if field else None
    if not isinstance(value, str):
        raise UserInputError(f"--new-tokens {path}: {where} is not a word: give a string or an object with a string "
                             f"field {' / '.join(map(repr, WORD_FIELDS))}")
    return value


def _json_words(path: Path, value) -> list[str]:
    """The words of a JSON file: a list of words, or an object whose values are such lists, in the file's order."""
    lists = value.items() if isinstance(value, dict) else [("", value)]
    words = []
    for key, items in lists:
        where = f"key {key!r}" if key else "the file"
        if not isinstance(items, list):
            raise UserInputError(f"--new-tokens {path}: {where} holds no list of words")
        words += [_json_word(path, item, f"{where}, item {i}") for i, item in enumerate(items, 1)]
    return words


def _refuse_non_words(path: Path, lines: list[str]) -> None:
    """A plain word list's line that holds something other than a word is refused rather than added as one: JSON
    (an object, a list or a quoted string: the file was meant to be read as JSON), a tab (a count column) or a
    "# " comment."""
    for n, line in enumerate(lines, 1):
        text = line.strip().strip(INVISIBLE).strip()  # as clean_words reads the word
        why = ("holds a tab (a second column?); give one word per line, and counts in a .jsonl file's \"count\""
               if "\t" in text else "is a comment ('# ')" if regex.match(r"#\s", text) else None)
        if why is None and text.startswith(('{', '[', '"')):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            kind = {dict: "a JSON object", list: "a JSON list", str: "a quoted string"}.get(type(value))
            why = kind and f"is {kind}; name the file .jsonl to read one JSON word per line, or write the word as it is"
        if why:
            raise UserInputError(f"--new-tokens {path}: line {n} {why}")


def encode_span(tokenizer, text: str, start: int, end: int) -> list[int] | None:
    """Original ids of text[start:end] as tokenized inside `text`, or None when no token boundary falls at
    `start` or at `end` (the span is not tokenized on its own there)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if e > start and s < end]
    if not inside:
        return None
    first, last = inside[0], inside[-1]
    # Offsets of byte-level tokens exclude their leading space (trim_offsets); a span starting with a space
    # may therefore begin one char later. A token that starts before the span belongs to the left context.
    lead = len(text[start:end]) - len(text[start:end].lstrip())
    if not start <= offsets[first][0] <= start + lead or offsets[last][1] != end:
        return None
    if last + 1 < len(offsets) and offsets[last + 1][0] < end:
        return None
    return ids[first:last + 1]


def original_ids(tokenizer, form: str) -> list[int] | None:
    """Subtoken ids of `form` in running text: after a word for " word", after a newline or an opening bracket
    for a bare "word"; found by character offsets (no BOS trick, works without a BOS token)."""
    lefts = ("a", ".") if form[:1].isspace() else ("\n", "(")
    for left in lefts:
        ids = encode_span(tokenizer, left + form + " a", len(left), len(left) + len(form))
        if ids:
            return ids
    return None


def casing_variants(word: str) -> list[str]:
    """Other casings a word commonly takes in running text: lower case and a capitalized first letter (title case:
    "ǅemal"), none whose length differs from the word's ("İ" lower-cases to "i" + a combining dot, "ß" to "Ss")."""
    out = []
    for v in (word.lower(), word[:1].title() + word[1:]):
        if v != word and len(v) == len(word) and v not in out:
            out.append(v)
    return out


def plan_new_tokens(tokenizer, words: list[str], add_variants: bool = True,
                    add_casing: bool = False) -> tuple[list[NewToken], list[Skipped]]:
    """Decide which words become tokens, with their forms and original subtoken ids; the rest are skipped with
    a reason (a duplicate, also in another Unicode normalization; a special or added token, or a special token
    inside it; a vocabulary entry, single token, byte piece, unknown chars). Words given in a stored form ("Ġword",
    "▁word") are read as the plain word."""
    backend = tokenizer.backend_tokenizer  # only its normalizer and pre-tokenizer are used, read-only
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    special_ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(getattr(tokenizer, "added_tokens_encoder", {}))
    unk = tokenizer.unk_token_id
    words = [_plain(word) for word in words]
    listed = {unicodedata.normalize("NFC", w) for w in words}  # never planned as another word's casing variant
    seen: dict[str, str] = {}  # NFC form -> the word that claimed it
    pieces: dict[str, str] = {}  # stored piece -> word that claimed it (uncased tokenizers fold casings together)
    planned: list[NewToken] = []
    skipped: list[Skipped] = []

    def plan(word: str, primary: str | None) -> NewToken | None:
        why = _skip_reason(tokenizer, backend, word, vocab, specials, special_ids, added, pieces, unk)
        if why:
            skipped.append(Skipped(word, why if primary is None else f"casing variant of {primary!r}: {why}"))
            return None
        form = running_form(word)
        tok = NewToken(word, form, original_ids(tokenizer, form) or [], variant_of=primary,
                       variant="" if primary is None else "casing")
        planned.append(tok)
        pieces[stored_piece(backend, tok.form, alone_ok=True) or tok.form] = word
        if add_variants and form != word:  # a word without spaces is its own start-of-text form
            bare = original_ids(tokenizer, word) or []
            piece = stored_piece(backend, word) or word
            if len(bare) >= 2 and unk not in bare and piece not in vocab and piece not in pieces:
                planned.append(NewToken(word, word, bare, variant_of=primary or word,
                                        variant="start" if primary is None else "casing+start"))
                pieces[piece] = word
        return tok

    for word in words:
        key = unicodedata.normalize("NFC", word)
        if key in seen:
            skipped.append(Skipped(word, "duplicate line" if seen[key] == word else
                                   f"the word {seen[key]!r} written in another Unicode normalization"))
            continue
        seen[key] = word
        if plan(word, None) and add_casing:
            for v in casing_variants(word):
                key = unicodedata.normalize("NFC", v)
                if key not in listed and key not in seen:
                    seen[key] = v
                    plan(v, word)
    return planned, skipped


def _plain(word: str) -> str:
    """A word given in a stored form ("Ġword", "▁word") as the plain word."""
    if word[:1] in (BYTE_LEVEL_SPACE, SPACE_MARK) and len(word) > 1:
        log.info("reading the stored form %r as the word %r", word, word[1:])
        return word[1:]
    return word


def _skip_reason(tokenizer, backend, word, vocab, specials, special_ids, added, pieces, unk) -> str | None:
    """Why `word` cannot become a new token, or None."""
    if word in specials:
        return "equal to a special token"
    form = running_form(word)
    if word in added or form in added:
        return "equal to an existing added token"
    if BYTE_PIECE.fullmatch(word):
        return "a byte-fallback piece"
    piece = stored_piece(backend, form, alone_ok=True)
    if piece in vocab:
        return f"already a vocabulary entry ({piece!r}, id {vocab[piece]})"
    if piece in pieces:
        return f"same stored form {piece!r} as {pieces[piece]!r} after normalization"
    ids = original_ids(tokenizer, form)
    if not ids:
        return "the original tokenizer does not split it at its boundaries"
    if len(ids) < 2:
        return "already a single token in running text"
    inside = [i for i in ids if i in special_ids and (i != unk or tokenizer.unk_token in word)]
    if inside:  # a control token: an added token holding it would take its place in chat text
        return f"contains the special token {tokenizer.convert_ids_to_tokens(inside[0])!r}"
    if unk is not None and unk in ids:
        return "contains characters the tokenizer maps to its unknown token"
    return None


def adds_prefix_space(tokenizer) -> bool:
    """True when text at its very start is tokenized as if preceded by a space (Llama-2 style)."""
    probe = "hello"
    return tokenizer(probe, add_special_tokens=False)["input_ids"] == tokenizer(" " + probe, add_special_tokens=False)[
        "input_ids"]


def trie_pattern(strings: list[str]) -> str:
    """A regex matching exactly `strings`, factored as a trie: a backtracking engine then tests one branch per
    character instead of every alternative (a flat alternation encoded 4.6x slower at 2,500 forms and did
    not finish 2 MB in 5 minutes at 50,000). Optional
    suffixes are greedy, so the longest form wins ('Parisians' before 'Paris')."""
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        kids = sorted((ch, child) for ch, child in node.items() if ch)
        if not kids:
            return ""
        alts = [regex.escape(ch) + emit(child) for ch, child in kids]
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


def word_pattern(words: list[str], flags: int = 0) -> regex.Pattern:
    """Any of `words` where it stands as a word: no word character of a spaced script (TEXT_WORD_CHAR) touches it
    on either side; a word written without spaces (spaceless) wherever it occurs, as its added token matches."""
    spaced, bare = [w for w in words if not spaceless(w)], [w for w in words if spaceless(w)]
    branches = [f"(?<!{TEXT_WORD_CHAR})(?:{trie_pattern(spaced)})(?!{TEXT_WORD_CHAR})" if spaced else "",
                trie_pattern(bare) if bare else ""]
    return regex.compile("|".join(b for b in branches if b), flags | regex.V1)


def stored_piece(backend, form: str, alone_ok: bool = False) -> str | None:
    """The single pre-token `backend` makes of `form` in running text (after a word for spaced forms, after an
    opening bracket for bare ones), i.e. the string a vocab entry for it must have; None if it is not one.
    `alone_ok`: else the pre-token of the form on its own (a best guess, for telling vocabulary entries apart)."""
    left = "x" if form[:1].isspace() else "("
    norm = backend.normalizer
    full = norm.normalize_str(left + form) if norm else left + form
    start = len(norm.normalize_str(left)) if norm else len(left)
    pre = backend.pre_tokenizer
    splits = pre.pre_tokenize_str(full) if pre else [(full, (0, len(full)))]
    mine = [(p, (s, e)) for p, (s, e) in splits if e > start]
    if len(mine) == 1 and mine[0][1] == (start, len(full)):
        return mine[0][0]
    if not alone_ok:
        return None
    # Tokenizers that pre-tokenize whole texts (Gemma) glue the context on: look at the form alone.
    alone = full[start:]
    splits = pre.pre_tokenize_str(alone) if pre else [(alone, (0, len(alone)))]
    return splits[0][0] if len(splits) == 1 else None

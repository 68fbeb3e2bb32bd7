"""Stage 1, second half: the tokenizer that emits one id for each planned form (tokens.py plans them), and the
forms left out so that every runtime reads the output alike.

Two ways to make the tokenizer emit one id for a form (`--tokenizer-mode`):

* added (the default): plain `AddedToken`s, no flags. Every runtime carries them: transformers, vLLM (HF
  tokenizers) and llama.cpp after `convert_hf_to_gguf.py` (BPE and SentencePiece paths alike) emit the same ids
  (docs/vocabulary-extension.md has the measurements). An added token is matched before pre-tokenization, so
  it also matches inside longer words (" Paris" in " Parisians", "Paris" in "unParisian"); `single_word` would
  refuse that in transformers, but llama.cpp drops the flag, and outputs that tokenize differently by runtime are
  worse than a counted inside-word match. `tokdistill check` counts them per token; a variant whose added token
  would split a longer vocabulary token ("luster" in " cluster") is left out, a word's own form is kept with a
  warning (vocabulary_collisions).
* vocab: a BPE vocabulary entry per form, reached as a whole pre-token. The pre-tokenizer's split regex gets a
  first branch (a trie of the forms, so 50,000 forms cost no encode speed) that isolates the forms at word
  boundaries, and the BPE model looks whole pre-tokens up before merging (`ignore_merges`, as Llama-3 does).
  Text without new words pre-tokenizes as before, and longer words ("Parisians") are untouched. The one change
  `ignore_merges` can make elsewhere: a pre-token equal to an existing entry that BPE never produces becomes that
  entry (`ignore_merges_exceptions` lists them; none in SmolLM2, four odd ones such as "▁yyyy" in Gemma-3).
  transformers-only: llama.cpp's converter keeps the entries but splits text with its own hard-coded regex and
  plain merges, so it never emits them (`tokdistill check` warns).

`auto` uses vocab mode where the tokenizer allows it (BPE with a known pre-tokenizer, loaded by AutoTokenizer as
written) and added tokens for forms it cannot isolate.
"""

from __future__ import annotations

import bisect
import json
import logging
import tempfile
from pathlib import Path

import regex

from .config import UserInputError
from .tokens import (
    BYTE_LEVEL_SPACE,
    BYTE_PIECE,
    SPACE_MARK,
    TEXT_WORD_CHAR,
    WORD_CHARS,
    NewToken,
    Skipped,
    spaceless,
    stored_piece,
    trie_pattern,
)

log = logging.getLogger(__name__)

# Forms that overlap inside a word by this many characters or more share a piece ("boot" of "reboot" and
# "bootloader"), and real text writes words holding both (" rebooting" with " reboot" and "booting"), which llama.cpp
# and transformers may read apart (overlapping_forms).
SHARED_PIECE = 3
# The text llama.cpp's convert_hf_to_gguf.py encodes to recognize a tokenizer.json tokenizer's pre-tokenizer by the
# hash of its ids (`get_vocab_base_pre`, as vendored by llama-cpp-python 0.3.36; SmolLM2 and Gemma-3 without a
# tokenizer.model take that path). An added token found in it changes those ids, and the converter then refuses the
# whole model ("BPE pre-tokenizer was not recognized"): " he's", " I've", " I'll", "工作" (converter_text_forms).
CONVERTER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL")
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own
GENERIC_CLASS = "PreTrainedTokenizerFast"  # loads tokenizer.json exactly as written (model classes may rebuild it)


def isolation_pattern(forms: list[str]) -> str:
    """Regex that matches a form at word boundaries: spaced forms need nothing on the left (the space is the
    boundary), bare forms must not follow a word char, a space or a space mark."""
    spaced = [f for f in forms if f[:1] in (" ", SPACE_MARK)]
    bare = [f for f in forms if f[:1] not in (" ", SPACE_MARK)]
    branches = []
    if spaced:
        branches.append(f"(?:{trie_pattern(spaced)})(?![{WORD_CHARS}])")
    if bare:
        branches.append(f"(?<![{WORD_CHARS} {SPACE_MARK}])(?:{trie_pattern(bare)})(?![{WORD_CHARS}])")
    return "|".join(branches)


def _isolate(pre: dict | None, pattern: str, normalizer_spaces: bool) -> dict | None:
    """The pre-tokenizer with `pattern` isolated first, or None when its shape is not one we can extend
    without changing how text without new words is split."""
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    if pre is None:
        return split if normalizer_spaces else None
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):  # applied to every piece once a split runs first
            return None
        if not pre.get("use_regex", True):
            return {"type": "Sequence", "pretokenizers": [split, pre]}
        return {"type": "Sequence", "pretokenizers": [
            {**split, "pattern": {"Regex": f"{pattern}|{GPT2_SPLIT}"}}, {**pre, "use_regex": False}]}
    if kind == "Sequence":
        subs = pre["pretokenizers"]
        if any(s.get("type") == "ByteLevel" and (s.get("use_regex", True) or s.get("add_prefix_space"))
               for s in subs):
            return None
        first = subs[0] if subs else {}
        if first.get("type") == "Split" and "Regex" in first.get("pattern", {}) and \
                first.get("behavior") == "Isolated" and not first.get("invert"):
            merged = {**first, "pattern": {"Regex": f"{pattern}|{first['pattern']['Regex']}"}}
            return {**pre, "pretokenizers": [merged] + subs[1:]}
        return {"type": "Sequence", "pretokenizers": [split] + subs}
    if kind in ("Split", "Metaspace", "Punctuation", "Digits", "Whitespace", "WhitespaceSplit", "UnicodeScripts"):
        # Each of these only splits (Metaspace also marks spaces and prepends at offset 0); a first split that
        # matches nothing in text without new words leaves them as they were.
        return {"type": "Sequence", "pretokenizers": [split, pre]}
    return None


def _pipeline_only(tj: dict, pre: dict) -> str:
    """tokenizer.json with pre-tokenizer `pre`, an empty model and no added tokens: a cheap Tokenizer for
    normalizing and pre-tokenizing."""
    return json.dumps({**tj, "added_tokens": [], "post_processor": None, "decoder": None, "pre_tokenizer": pre,
                       "model": {"type": "BPE", "vocab": {}, "merges": []}}, ensure_ascii=False)


def _normalized(backend, form: str) -> str:
    """The form as the pre-tokenizer sees it mid-text (after e.g. ' ' -> '▁'); a left context keeps Prepend
    normalizers from marking the form as text start."""
    norm = backend.normalizer
    if norm is None:
        return form
    return norm.normalize_str("x" + form)[len(norm.normalize_str("x")):]


def _next_free_id(tj: dict) -> int:
    used = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(used) + 1


def vocab_extension(tokenizer, planned: list[NewToken]) -> tuple[dict, list[NewToken]] | None:
    """Vocab mode: tokenizer.json (as a dict) extended for the forms it can isolate, and those tokens (with
    `piece`, `kind` and `new_id` set); None when the tokenizer is not BPE or its pre-tokenizer shape is unknown."""
    from tokenizers import Tokenizer

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    if tj.get("model", {}).get("type") != "BPE" or not planned:
        return None
    backend = tokenizer.backend_tokenizer
    # a word without spaces has no boundary in text a pre-tokenizer could isolate it at: an added token
    norm_forms = {t.form: _normalized(backend, t.form) for t in planned if not spaceless(t.form)}
    if not norm_forms:
        return None
    spaces = backend.normalizer is not None and SPACE_MARK in backend.normalizer.normalize_str(" ")
    pre = _isolate(tj.get("pre_tokenizer"), isolation_pattern(sorted(set(norm_forms.values()))), spaces)
    if pre is None:
        return None
    probe = Tokenizer.from_str(_pipeline_only(tj, pre))
    vocab = tj["model"]["vocab"]
    next_id = _next_free_id(tj)
    served = []
    for tok in planned:
        piece = stored_piece(probe, tok.form) if tok.form in norm_forms else None
        if piece is None or piece in vocab:
            continue
        tok.piece, tok.kind, tok.new_id = piece, "vocab", next_id
        vocab[piece] = next_id
        next_id += 1
        served.append(tok)
    if not served:
        return None
    tj["pre_tokenizer"] = pre
    tj["model"]["ignore_merges"] = True
    return tj, served


def _load_as_user(tokenizer, model_config, tokenizer_json: str | None):
    """Save `tokenizer` (with `tokenizer_json` as its tokenizer.json, if given) next to the model's config.json
    under the generic class that the output names (export.save_tokenizer), and load it back the way users will:
    model-specific classes (GemmaTokenizer, Qwen2Tokenizer, ...) rebuild their pipeline from defaults when loaded
    and would drop the isolation regex; the generic class loads tokenizer.json as written."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if model_config is not None:
            model_config.to_json_file(Path(tmp, "config.json"))
        for slow in ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"):
            Path(tmp, slow).unlink(missing_ok=True)
        if tokenizer_json is not None:
            Path(tmp, "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        path = Path(tmp, "tokenizer_config.json")
        config = json.loads(path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = GENERIC_CLASS
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def span_ids(encoding, start: int, end: int) -> list[int]:
    """Ids of the tokens of a `tokenizers` Encoding that overlap characters [start, end)."""
    return [i for i, (s, e) in zip(encoding.ids, encoding.offsets) if e > start and s < end]


def running_texts(toks: list[NewToken]) -> tuple[list[str], list[str]]:
    """Each form in running text: a spaced form after a word, a bare form after an opening bracket (the left
    contexts, the texts)."""
    lefts = [t.form.strip()[:1] if t.form[:1].isspace() else "(" for t in toks]
    return lefts, [left + t.form + " " + t.form.strip()[:1] for left, t in zip(lefts, toks)]


def encodes_as_one(tokenizer, toks: list[NewToken]) -> list[bool]:
    """For each token: its form in running text (running_texts) is covered by its id alone."""
    lefts, texts = running_texts(toks)
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [span_ids(e, len(left), len(left) + len(t.form)) == [t.new_id] for t, e, left in zip(toks, encs, lefts)]


def misread_forms(new, original, toks: list[NewToken]) -> list[tuple[str, str] | None]:
    """For each token: (its running text (running_texts), what that decodes to with the new tokenizer) where the
    two differ and the original tokenizer decodes it right, else None. HF's byte-level decoder reads an added
    token made only of characters of its byte alphabet as those bytes, so a bare form with Latin-1 letters
    ("naïve") decodes as "na\ufffdve"; spaced forms and vocab entries do not."""
    texts = running_texts(toks)[1]

    def decoded(tok) -> list[str]:
        encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return tok.backend_tokenizer.decode_batch([e.ids for e in encs], skip_special_tokens=False)

    return [(text, got) if got != text and before == text else None
            for text, got, before in zip(texts, decoded(new), decoded(original))]


def string_automaton(strings):
    """An Aho-Corasick automaton that finds each of `strings` inside a text, reporting the string itself."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for s in strings:
        automaton.add_word(s, s)
    automaton.make_automaton()
    return automaton


def vocabulary_collisions(tokenizer, forms: list[str]) -> dict[str, str]:
    """The forms whose added token would also cut a longer vocabulary token's text apart wherever it occurs, since
    added tokens match inside words (" yea" in " year", "luster" in " cluster"): {form: the text of one such
    vocabulary token}. Compared as the tokenizer stores them (stored_piece: "Ġyea" in "Ġyear"), so no vocabulary
    token is decoded. A form the pre-tokenizer splits is not checked: no vocabulary token holds it, though text
    may ("man's" in "woman's"). Byte-fallback pieces ("<0x64>") are no text, and hold no form ("x64")."""
    backend = tokenizer.backend_tokenizer
    by_piece: dict[str, list[str]] = {}
    for form in forms:
        piece = stored_piece(backend, form, alone_ok=True)
        if piece:
            by_piece.setdefault(piece, []).append(form)
    if not by_piece:
        return {}
    automaton = string_automaton(by_piece)
    skip = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    found: dict[str, str] = {}
    for key in tokenizer.get_vocab():
        if key in skip or BYTE_PIECE.fullmatch(key):
            continue
        for end, piece in automaton.iter(key):
            start = end + 1 - len(piece)
            if key != piece and (start > 0 and _joins(key[start - 1]) or end + 1 < len(key) and _joins(key[end + 1])):
                for form in by_piece[piece]:
                    found.setdefault(form, key)
    return {form: tokenizer.convert_tokens_to_string([key]) for form, key in found.items()}


def overlapping_forms(toks: list[NewToken], existing: list[str], keep_words: bool = False) -> dict[str, str]:
    """The added forms that would make llama.cpp and HF tokenizers read a text differently: {form: why}. HF matches
    added tokens leftmost-longest, llama.cpp longest first (`tokenizer_st_partition`), so they part where one form
    ends with what another begins with and the later one is as long or longer in UTF-8 bytes ("東京" and "京都" in
    "東京都", " New York" and " York City"). Forms are taken in order, words before variants, after the tokenizer's
    own added tokens (`existing`); each form that overlaps one kept before it is found, and kept for the later
    forms' checks only if it is a word's own form and `keep_words` (a listed word stays: then a word later in the
    list that spans both also clears a pair, as `tokdistill check` reads every form). An overlap of fewer than
    SHARED_PIECE characters that starts or ends inside a word of a script with spaces ("palatable" and "electron",
    " it's" and "submodule") is left alone: such text is one longer word that real text rarely writes, where added
    tokens already match inside words (vocabulary_collisions)."""
    word = regex.compile(f"{TEXT_WORD_CHAR}['’]?{TEXT_WORD_CHAR}", flags=regex.V1)  # "ab", "t's"

    def joined(text: str, i: int, k: int) -> bool:
        """Whether an overlap of k characters is one to leave alone: a word of a script with spaces runs across the
        boundary before text[i], and the overlap is too short to be a piece both forms share."""
        return k < SHARED_PIECE and any(word.fullmatch(text[a:b]) for a, b in ((i - 1, i + 1), (i - 2, i + 1),
                                                                                (i - 1, i + 2)) if a >= 0)

    # Kept forms by each proper prefix and suffix not inside a word, as (UTF-8 length, form) sorted by length.
    starts: dict[str, list[tuple[int, str]]] = {}
    ends: dict[str, list[tuple[int, str]]] = {}
    kept: set[str] = set()
    staying = {t.form for t in toks if not t.variant} if keep_words else set()  # kept wherever they are listed

    def keep(form: str) -> None:
        kept.add(form)
        size = len(form.encode())
        for k in range(1, len(form)):
            if not joined(form, k, k):
                bisect.insort(starts.setdefault(form[:k], []), (size, form))
            if not joined(form, len(form) - k, k):
                bisect.insort(ends.setdefault(form[-k:], []), (size, form))

    def spanned(text: str) -> bool:
        """Whether a form to be added holds the whole overlap, so both runtimes read it as that one token."""
        return text in kept or text in staying

    def conflict(form: str) -> str | None:
        """The first kept form that `form` overlaps where the later-starting one is as long or longer and no kept
        form spans both: then the runtimes part."""
        size = len(form.encode())
        for k in range(1, len(form)):
            if not joined(form, k, k):  # others that end with form[:k]: as long as form or shorter
                for n, other in ends.get(form[:k], ()):
                    if n > size:
                        break
                    if other != form and not spanned(other + form[k:]):
                        return reason(other, form, k, other)
            if not joined(form, len(form) - k, k):  # others that begin with form[-k:]: as long as form or longer
                for n, other in reversed(starts.get(form[-k:], ())):
                    if n < size:
                        break
                    if other != form and not spanned(form + other[k:]):
                        return reason(form, other, k, other)
        return None

    def reason(first: str, second: str, k: int, other: str) -> str:
        return (f"which overlaps {other!r} (text holding both, {first + second[k:]!r}, tokenizes differently in "
                "llama.cpp and in transformers)")

    for form in existing:
        keep(form)
    found: dict[str, str] = {}
    for t in sorted(toks, key=lambda t: bool(t.variant)):
        if why := conflict(t.form):
            found[t.form] = why
        if not why or keep_words and not t.variant:
            keep(t.form)
    return found


def converter_text_forms(forms: list[str]) -> dict[str, str]:
    """The forms found in CONVERTER_CHECK_TEXT: {form: why}. As an added token matches wherever its text occurs, each
    would change the ids llama.cpp's converter hashes there, and the converter would refuse the output."""
    return {f: "which llama.cpp's convert_hf_to_gguf.py would find in the text whose ids it hashes to recognize the "
               "tokenizer, and then refuse the whole model (\"BPE pre-tokenizer was not recognized\")"
            for f in forms if f in CONVERTER_CHECK_TEXT}


def _joins(char: str) -> bool:
    """A stored character that continues a word (not a space, a space mark or byte-level BPE's stored space)."""
    return char not in (BYTE_LEVEL_SPACE, SPACE_MARK) and regex.match(f"[{WORD_CHARS}]", char) is not None


def extend_decodable(tokenizer, planned: list[NewToken], mode: str = "auto", model_config=None,
                     keep_listed: bool = True) -> tuple[object, list[NewToken], list[Skipped]]:
    """extend_tokenizer without the forms that would not serve: forms that running text would not decode back to
    (a word whose running-text form fails goes with all its forms), and forms that as added tokens would cut
    longer vocabulary tokens apart (vocabulary_collisions: the start-of-text form "luster" would split every
    " cluster") or that overlap an earlier form, so that llama.cpp reads text holding both apart from transformers
    (overlapping_forms). A variant only saves tokens, so it is left out; a word's own running-text form is kept
    with a warning where the user listed the word (`keep_listed`), else (words taken from another tokenizer, "reli"
    that would split SmolLM2's " reliable") left out with its variants. A form found in the text llama.cpp's
    converter hashes (converter_text_forms: " he's") goes with its word's other forms, listed or not, since the
    converter would refuse the whole output: (tokenizer, tokens kept, skipped forms).
    In added mode the forms are checked before the extension, which then runs once (3.4 s for Gemma-3's
    tokenizer); in the others after it, on the forms it made added tokens."""
    found: dict[str, str] = {}  # vocabulary_collisions of every form checked so far: the vocabulary is read once
    checked: set[str] = set()

    def collisions(toks: list[NewToken]) -> dict[str, str]:
        forms = [t.form for t in toks if t.form not in checked]
        found.update(vocabulary_collisions(tokenizer, forms))
        checked.update(forms)
        return {t.form: found[t.form] for t in toks if t.form in found}

    def splitting(toks: list[NewToken]) -> dict[str, str]:
        """{form: why} of the forms among `toks` (variants, and words unless kept) that would split a longer
        vocabulary token."""
        hits = collisions(toks)
        return {t.form: f"which as an added token would also split {hits[t.form]!r} wherever it occurs"
                for t in toks if t.form in hits and (t.variant or not keep_listed)}

    overlaps: dict[str, str] = {}  # listed words kept though they overlap an earlier form

    def overlapping(toks: list[NewToken]) -> dict[str, str]:
        """{form: why} of the forms among `toks` (variants, and words unless kept) that overlap an earlier one."""
        over = overlapping_forms(toks, list(getattr(tokenizer, "added_tokens_encoder", {})), keep_listed)
        words = {t.form for t in toks if not t.variant}
        overlaps.update({f: why for f, why in over.items() if keep_listed and f in words})
        return {f: why for f, why in over.items() if f not in overlaps}

    def hashed(toks: list[NewToken]) -> dict[str, str]:
        return converter_text_forms([t.form for t in toks])

    kept, skipped = leave_out(planned, {**splitting(planned), **hashed(planned)} if mode == "added" else {})
    if mode == "added":
        kept, more = leave_out(kept, overlapping(kept))
        skipped += more
    new = extend_tokenizer(tokenizer, kept, mode, model_config)
    bad = {t.form: f"which would not decode back: {misread[0]!r} would decode as {misread[1]!r}"
           for t, misread in zip(kept, misread_forms(new, tokenizer, kept)) if misread is not None}
    if mode != "added":
        added = [t for t in kept if t.kind == "added" and t.form not in bad]
        bad.update(splitting(added))
        bad.update(hashed(added))
        bad.update(overlapping([t for t in added if t.form not in bad]))
    if bad:
        kept, more = leave_out(kept, bad)
        skipped += more
        new = extend_tokenizer(tokenizer, kept, mode, model_config) if kept else new
    splits = collisions([t for t in kept if not t.variant and t.kind == "added"])
    if splits:
        log.warning("%d word(s) will also split longer words wherever those occur, as added tokens match inside "
                    "words: %s; `--tokenizer-mode vocab` avoids it where llama.cpp is not needed "
                    "(docs/vocabulary-extension.md)", len(splits),
                    ", ".join(f"{f!r} in {text!r}" for f, text in list(splits.items())[:5]))
    if listed := {f: why for f, why in overlaps.items() if f in {t.form for t in kept}}:
        log.warning("%d listed word(s) overlap an earlier word, so llama.cpp and transformers tokenize text holding "
                    "both differently: %s; kept as listed (docs/vocabulary-extension.md, \"Forms that overlap\")",
                    len(listed), ", ".join(f"{f!r} {why.split(' (')[0]}" for f, why in list(listed.items())[:5]))
    return new, kept, skipped


def leave_out(planned: list[NewToken], bad: dict[str, str]) -> tuple[list[NewToken], list[Skipped]]:
    """`planned` without the forms in `bad` ({form: why}) and, where a word's running-text form is among them, all
    forms of that word; (tokens kept, the skipped forms with their reasons)."""
    if not bad:
        return planned, []
    gone = {t.word for t in planned if t.form in bad and not t.variant}
    drop = [t.form in bad or t.word in gone or t.variant_of in gone for t in planned]
    which = {"": "its running-text form", "start": "its start-of-text form",
             "casing": "this casing variant", "casing+start": "this casing variant's start-of-text form"}

    def skip(t: NewToken) -> Skipped:
        if t.form not in bad:
            return Skipped(t.word, f"a form of {t.variant_of!r}, skipped")
        word = t.variant_of if t.variant == "casing" else t.word  # the word whose form this is
        return Skipped(word, f"{which[t.variant]} {t.form!r}, {bad[t.form]}",
                       form_only=word not in gone and t.variant_of not in gone)

    skipped = [skip(t) for t, d in zip(planned, drop) if d]
    return [t for t, d in zip(planned, drop) if not d], skipped


def added_token(tok: NewToken):
    """AddedToken for a form, with no flag a runtime could drop: llama.cpp's converter ignores `single_word`, so
    a bare form marked with it would match inside longer words in llama.cpp and not in transformers."""
    from tokenizers import AddedToken

    return AddedToken(tok.form, single_word=False, normalized=False, special=False)


def extend_tokenizer(tokenizer, planned: list[NewToken], mode: str = "auto", model_config=None):
    """Return a new tokenizer that emits one id per planned form, and fill in each token's `new_id`, `piece` and
    `kind`. The input tokenizer is not modified. Ids follow the largest id in use, so padded-vocab models reuse
    their spare rows before the matrix grows. `model_config` lets AutoTokenizer pick the class it will pick for
    the saved model; vocab mode is used only if that class keeps the extension."""
    for t in planned:
        t.piece, t.kind, t.new_id = "", "", -1
    ext = vocab_extension(tokenizer, planned) if mode in ("auto", "vocab") else None
    new = None
    if ext is not None:
        tj, served = ext
        new = _load_as_user(tokenizer, model_config, json.dumps(tj, ensure_ascii=False))
        ok = encodes_as_one(new, served)
        if not all(ok):
            bad = [t.form for t, good in zip(served, ok) if not good]
            why = (f"the tokenizer reloaded as users will ({type(new).__name__}) does not emit one id for "
                   f"{len(bad)} form(s), e.g. {bad[:3]!r}")
            if mode == "auto":
                log.warning("vocab mode: %s; using added tokens", why)
            for t in planned:
                t.piece, t.kind, t.new_id = "", "", -1
            new = None
    spaced = [t for t in planned if not spaceless(t.form)]
    if new is None and mode == "vocab" and spaced:
        raise UserInputError("--tokenizer-mode vocab is not possible for this tokenizer ("
                             + (why if ext is not None else "not BPE, or an unknown pre-tokenizer") + "); use added")
    if new is None:
        new = _load_as_user(tokenizer, model_config, None)
    rest = [t for t in planned if t.kind != "vocab"]
    if rest and mode != "added" and (ext is not None or not spaced):
        log.warning("%d form(s) cannot be isolated as one pre-token and become added tokens: %s",
                    len(rest), ", ".join(repr(t.form) for t in rest[:10]))
    if rest:
        new.add_tokens([added_token(t) for t in rest])
        for t in rest:
            t.piece, t.kind = t.form, "added"
            t.new_id = new.convert_tokens_to_ids(t.form)
    return new

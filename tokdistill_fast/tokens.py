"""Stage 1: new words -> tokenizer additions, with the original subtoken ids and the new id of each.

A new word ("palatable", "spill the beans") becomes the token for its running-text form " palatable" and, when
the tokenizer does not add a space at the start of text, a variant for the bare form "palatable".
Two ways to make the tokenizer emit one id for them:

* vocab: a BPE vocabulary entry per form, reached as a whole pre-token. The pre-tokenizer's split regex gets a
  first branch that isolates the forms at word boundaries, and the BPE model looks whole pre-tokens up before
  merging (`ignore_merges`, as Llama-3 does). Text without new words pre-tokenizes as before, and longer words
  ("palatableness") are untouched.
* added: `AddedToken`s. Works for every tokenizer, but a leading-space added token also matches inside a longer
  word ("Paris" in "Parisians"), so it is used only where vocab mode cannot express a form.

Subtoken ids always come from the original tokenizer, never the extended one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import regex

from .config import UserInputError

log = logging.getLogger(__name__)

# Characters the paper's filter rejects in a new word; also ones that tokenizers treat as syntax.
WORD_CHARS = r"\p{L}\p{N}_"
SPACE_MARK = "\u2581"  # SentencePiece's visible space


@dataclass
class NewToken:
    """One token to add. `form` is the text span it replaces; `variant_of` names the primary word for
    start-of-text forms, whose rows are copied from the primary after training."""

    word: str
    form: str
    sub_ids: list[int]
    new_id: int = -1
    piece: str = ""  # the string stored in the tokenizer (vocab key or added-token content)
    kind: str = ""  # "vocab" | "added"
    variant_of: str | None = None


@dataclass
class Skipped:
    word: str
    reason: str


def read_word_list(path: str | Path) -> list[str]:
    """One new token per line, as it appears in running text. Blank lines are ignored (and logged)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--new-tokens {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--new-tokens {path}: cannot read it as UTF-8 text: {e}") from None
    words = [line.strip() for line in lines]
    blanks = sum(1 for w in words if not w)
    if blanks:
        log.warning("--new-tokens %s: ignored %d blank line(s)", path, blanks)
    words = [w for w in words if w]
    if not words:
        raise UserInputError(f"--new-tokens {path}: the file holds no tokens")
    return words


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
    """Subtoken ids of `form` in running text: tokenized after a neutral left context, by offsets (no BOS trick)."""
    for left in ("a", "\n", "."):
        ids = encode_span(tokenizer, left + form + " a", len(left), len(left) + len(form))
        if ids:
            return ids
    return None


def plan_new_tokens(tokenizer, words: list[str], add_variants: bool = True) -> tuple[list[NewToken], list[Skipped]]:
    """Decide which words become tokens, with their forms and original subtoken ids; the rest are skipped with
    a reason (duplicate, already one token, special token, digits only)."""
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    added = set(getattr(tokenizer, "added_tokens_encoder", {}))
    seen: set[str] = set()
    planned: list[NewToken] = []
    skipped: list[Skipped] = []
    starts_with_space = _adds_prefix_space(tokenizer)
    for word in words:
        if word in seen:
            skipped.append(Skipped(word, "duplicate line"))
            continue
        seen.add(word)
        if word in specials or word in added:
            skipped.append(Skipped(word, "equal to an existing special or added token"))
            continue
        if word.startswith(("Ġ", SPACE_MARK)):
            skipped.append(Skipped(word, "give tokens as plain text ('word'), not as stored pieces ('Ġword')"))
            continue
        if word in vocab:
            skipped.append(Skipped(word, "already a vocabulary entry"))
            continue
        primary = NewToken(word, " " + word, original_ids(tokenizer, " " + word) or [])
        if not primary.sub_ids:
            skipped.append(Skipped(word, "the original tokenizer does not split it at its boundaries"))
            continue
        if len(primary.sub_ids) < 2:
            skipped.append(Skipped(word, "already a single token in running text"))
            continue
        planned.append(primary)
        if add_variants and not starts_with_space:
            bare = original_ids(tokenizer, word) or []
            if len(bare) >= 2:
                planned.append(NewToken(word, word, bare, variant_of=word))
    return planned, skipped


def _adds_prefix_space(tokenizer) -> bool:
    """True when text at its very start is tokenized as if preceded by a space (Llama-2 style)."""
    probe = "hello"
    return tokenizer(probe, add_special_tokens=False)["input_ids"] == tokenizer(" " + probe, add_special_tokens=False)[
        "input_ids"]


def _normalized(backend, form: str) -> str:
    """The form as the pre-tokenizer sees it (after e.g. ' ' -> '▁'); a probe prefix keeps Prepend normalizers
    from marking the form as text start."""
    if backend.normalizer is None:
        return form
    return backend.normalizer.normalize_str("x" + form)[len(backend.normalizer.normalize_str("x")):]


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _isolation_pattern(forms: list[str]) -> str:
    """Regex that matches a form at word boundaries: spaced forms need nothing on the left (the space is the
    boundary), bare forms must not follow a word char or a space mark. Longest first, so alternation prefers
    'Parisians' over 'Paris'."""
    spaced = sorted((f for f in forms if f[:1] in (" ", SPACE_MARK)), key=len, reverse=True)
    bare = sorted((f for f in forms if f[:1] not in (" ", SPACE_MARK)), key=len, reverse=True)
    branches = []
    if spaced:
        branches.append("(?:" + "|".join(regex.escape(f) for f in spaced) + f")(?![{WORD_CHARS}])")
    if bare:
        branches.append(f"(?<![{WORD_CHARS} {SPACE_MARK}])(?:" + "|".join(regex.escape(f) for f in bare)
                        + f")(?![{WORD_CHARS}])")
    return "|".join(branches)


def _with_isolation(tj: dict, normalized_forms: list[str]) -> bool:
    """Rewrite tokenizer.json's pre-tokenizer so each form becomes one pre-token. False if its shape is unknown."""
    pattern = _isolation_pattern(normalized_forms)
    pre = tj.get("pre_tokenizer")
    normalizer_spaces = SPACE_MARK in json.dumps(tj.get("normalizer"), ensure_ascii=False)
    if pre and pre.get("type") == "ByteLevel":
        split_pattern = GPT2_SPLIT if pre.get("use_regex", True) else None
        if split_pattern is None:
            return False
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": f"{pattern}|{split_pattern}"}, "behavior": "Isolated",
             "invert": False},
            {**pre, "use_regex": False}]}
        return True
    if pre and pre.get("type") == "Sequence":
        subs = pre["pretokenizers"]
        splits = [s for s in subs if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
        if splits and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert") and not any(
                s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in subs):
            splits[0]["pattern"]["Regex"] = f"{pattern}|{splits[0]['pattern']['Regex']}"
            return True
        return False
    if normalizer_spaces and (pre is None or (pre.get("type") == "Split" and "String" in pre.get("pattern", {}))):
        isolate = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [isolate] + ([pre] if pre else [])}
        return True
    return False


def _next_free_id(tj: dict) -> int:
    used = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(used) + 1


def _reload(tokenizer, tokenizer_json: dict, model_config, generic: bool):
    """Save `tokenizer` with `tokenizer_json` as its tokenizer.json (and the model's config.json, which steers
    AutoTokenizer's class choice) and load it back the way users will."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if model_config is not None:
            model_config.to_json_file(Path(tmp, "config.json"))
        Path(tmp, "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        for slow in ("tokenizer.model", "vocab.json", "merges.txt"):  # a slow tokenizer would not see the additions
            Path(tmp, slow).unlink(missing_ok=True)
        if generic:
            # Model-specific classes (GemmaTokenizer, ...) rebuild their pipeline from defaults when loaded and
            # would drop the isolation regex; the generic class loads tokenizer.json as written.
            path = Path(tmp, "tokenizer_config.json")
            config = json.loads(path.read_text(encoding="utf-8"))
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def emits_one_id(tokenizer, tok: NewToken) -> bool:
    """The token's form in running text (a spaced form after a word, a bare form at the start of text) encodes
    to its id and decodes back."""
    text = ("x" if tok.form[:1].isspace() else "") + tok.form + " x"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tok.new_id in ids and tokenizer.decode(ids) == text


def _vocab_extension(tokenizer, planned: list[NewToken], model_config) -> tuple[object, list[NewToken]] | None:
    """Vocab mode: the extended tokenizer and the tokens it serves, or None when this tokenizer's pre-tokenizer
    shape is unknown or the reloaded tokenizer does not keep the extension (classes that rebuild their pipeline,
    e.g. Qwen2Tokenizer in transformers 5)."""
    from tokenizers import Tokenizer

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    if tj.get("model", {}).get("type") != "BPE":
        return None
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    forms = {t.form: _normalized(backend, t.form) for t in planned}
    if not _with_isolation(tj, list(forms.values())):
        return None
    pre = Tokenizer.from_str(json.dumps(tj)).pre_tokenizer
    next_id = _next_free_id(tj)
    served = []
    for tok in planned:
        pieces = pre.pre_tokenize_str(forms[tok.form])
        if len(pieces) != 1 or pieces[0][0] in tj["model"]["vocab"]:
            continue
        tok.piece, tok.kind, tok.new_id = pieces[0][0], "vocab", next_id
        tj["model"]["vocab"][tok.piece] = next_id
        next_id += 1
        served.append(tok)
    tj["model"]["ignore_merges"] = True
    new = _reload(tokenizer, tj, model_config, generic=True)
    if not served or not all(emits_one_id(new, t) for t in served):
        for t in served:
            t.piece, t.kind, t.new_id = "", "", -1
        return None
    return new, served


def extend_tokenizer(tokenizer, planned: list[NewToken], mode: str = "auto", model_config=None):
    """Return a new tokenizer that emits one id per planned form, and fill in each token's `new_id`, `piece` and
    `kind`. The input tokenizer is not modified. Vocab-mode ids follow the largest id in use, so padded-vocab
    models reuse their spare rows before the matrix grows; added tokens get the ids the tokenizer assigns.
    `model_config` lets the check reload the tokenizer with the class AutoTokenizer will pick for the model."""
    from tokenizers import AddedToken

    extended = _vocab_extension(tokenizer, planned, model_config) if mode in ("auto", "vocab") else None
    if extended is None and mode == "vocab":
        raise UserInputError("--tokenizer-mode vocab is not possible for this tokenizer (not BPE, an unknown "
                             "pre-tokenizer, or a tokenizer class that rebuilds its pipeline); use added")
    new = extended[0] if extended else _reload(tokenizer, json.loads(tokenizer.backend_tokenizer.to_str()),
                                               model_config, generic=False)
    rest = [t for t in planned if t.kind != "vocab"]
    if rest and extended:
        log.warning("%d token(s) span pre-tokens that vocab mode cannot join and become added tokens: %s",
                    len(rest), ", ".join(repr(t.form) for t in rest[:10]))
    if rest:
        # Bare forms can demand word boundaries on both sides; spaced forms cannot (the char before the space
        # is a word char, which AddedToken's single_word rejects), which is why vocab mode is preferred.
        new.add_tokens([AddedToken(t.form, single_word=t.variant_of is not None, normalized=False)
                        for t in rest])
        for t in rest:
            t.piece, t.kind = t.form, "added"
            t.new_id = new.convert_tokens_to_ids(t.form)
    return new

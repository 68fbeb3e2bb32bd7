"""Tokenizer-swap inputs: new tokens taken from a target tokenizer, start rows produced by another method, and the
rule that routes short tokens to a heuristic instead of distillation.

Start-row file (--init-from), the layout of our own new_embeddings.safetensors so one run's output can seed
another:
  tensor "input_embeddings"   [n, D] float, rows in the model's input-embedding table space (before any
                              embed_scale, e.g. Gemma's sqrt(D)); D must equal the model's hidden size
  tensor "output_embeddings"  [n, D] float, optional: start rows of an untied output matrix
  metadata "forms"            JSON list of n strings: the text span each row stands for, as it appears in running
                              text, e.g. " palatable" (a word after a space) or "palatable" (the start-of-text form)
Rows are matched to new tokens by form, which does not depend on a tokenizer's piece spelling ("Ġ", "▁");
other tensors and metadata (our "token_ids", "tokens") are ignored. Tokens without a row start from the
subtoken mean.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import regex
import torch

from .config import UserInputError, not_a_file
from .modeling import models
from .tokens import BYTE_PIECE, MARK, NewToken, Skipped, spaceless

log = logging.getLogger(__name__)
QUOTED = regex.compile(r"""(['"]).*?\1""")  # a form quoted in a reason: 'する', "won't"


def words_from_tokenizer(directory: str | Path) -> tuple[list[str], list[Skipped]]:
    """Every piece of the tokenizer in `directory` that stands for a word after a space, as that word ("Ġword" and
    "▁word" -> "word"), or for text of a script written without spaces ("設定": no space marks its words), in id
    order; an added token that is not special is a word with or without a leading space (it matches anywhere).
    Other pieces are skipped with a reason: special tokens, byte pieces, word-internal pieces (no leading space:
    suffixes like "ing" cannot be added as whole words), whitespace. Whether the model's tokenizer already
    has the word is decided later, like for a word list."""
    target = models.load_tokenizer(directory, "--new-tokens-from-tokenizer")[0]
    backend = getattr(target, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        raise UserInputError(f"--new-tokens-from-tokenizer {directory}: needs a fast tokenizer (tokenizer.json) "
                             "with a decoder")
    specials = set(target.all_special_ids) | {i for i, t in target.added_tokens_decoder.items() if t.special}
    added = {i for i, t in target.added_tokens_decoder.items() if not t.special}  # matched anywhere, as words
    # Decoding a piece after an anchor shows its leading space, which decoders drop at the start of text.
    anchor = target("x", add_special_tokens=False)["input_ids"]
    if len(anchor) != 1:
        raise UserInputError(f"--new-tokens-from-tokenizer {directory}: 'x' is not one token; cannot decode pieces")
    anchor_piece = backend.id_to_token(anchor[0])
    prefix = backend.decoder.decode([anchor_piece])
    pieces = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    decoded = [backend.decoder.decode([anchor_piece, piece]) for piece, _ in pieces]
    words: list[str] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for (piece, i), text in zip(pieces, decoded):
        surface = text[len(prefix):] if text.startswith(prefix) else None
        bare = surface and (spaceless(surface) or i in added and not surface.startswith(" "))
        word = surface if bare else surface[1:] if surface else ""
        reason = ("special token" if i in specials else
                  "byte-fallback piece" if BYTE_PIECE.fullmatch(piece) else
                  "does not decode after another piece" if surface is None else
                  "part of a UTF-8 character (byte-level piece)" if "\ufffd" in surface else
                  "starts with a combining mark (inside a character)" if MARK.match(surface.lstrip(" ")) else
                  "word-internal piece (no leading space)" if not surface.startswith(" ") and word != surface else
                  "whitespace" if not word.strip() or word != word.strip() else
                  "same text as an earlier piece" if word in seen else None)
        if reason:
            skipped.append(Skipped(piece, reason))
        else:
            seen.add(word)
            words.append(word)
    log.info("target tokenizer %s: %d of %d pieces are words after a space or text of a script written without "
             "spaces", directory, len(words), len(pieces))
    if not words:
        raise UserInputError(f"--new-tokens-from-tokenizer {directory}: no piece stands for a word after a space "
                             "or for text of a script written without spaces")
    return words, skipped


def log_skipped(skipped: list[Skipped], show: int = 20) -> None:
    """Warn about the first `show` skipped tokens one by one and about the rest as counts per reason (details in
    parentheses, such as the existing piece, and quoted forms are left out of the counts)."""
    for s in skipped[:show]:
        if s.form_only:
            log.warning("%r is added, but not %s", s.word, s.reason)
        else:
            log.warning("skipping %r: %s", s.word, s.reason)
    rest = skipped[show:]
    if forms := sum(s.form_only for s in rest):
        log.warning("%d more form(s) of added words left out", forms)
    if words := [s for s in rest if not s.form_only]:
        counts = Counter(QUOTED.sub("...", s.reason.split(" (")[0]) for s in words)
        log.warning("skipping %d more: %s", len(words), "; ".join(f"{n} {r}" for r, n in counts.items()))


def apply_init(init: tuple[dict[str, int], dict[str, torch.Tensor]], path: str | Path, toks: list[NewToken],
               rows: torch.Tensor, out_rows: torch.Tensor | None) -> set[int]:
    """Overwrite the start rows of the tokens whose form has a row in `init` (read_init's result for the
    --init-from file `path`); `out_rows` (untied models) too where the file has output rows. Returns the indices
    of those tokens."""
    row_of, tensors = init
    used = {i for i, t in enumerate(toks) if t.form in row_of}
    index = sorted(used)
    src = torch.tensor([row_of[toks[i].form] for i in index])
    rows[index] = tensors["input_embeddings"][src].to(rows)
    if out_rows is not None and "output_embeddings" in tensors:
        out_rows[index] = tensors["output_embeddings"][src].to(out_rows)
    log.info("--init-from %s: %d of %d new tokens start from its rows, the rest from the subtoken mean", path,
             len(used), len(toks))
    return used


def read_init(path: str | Path, toks: list[NewToken], hidden: int) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The --init-from file's row of each form, and its tensors, checked against the new tokens and the model's
    hidden size; read once, before any work, and kept until the rows start (apply_init)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--init-from {path}: {not_a_file(path)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("input_embeddings", "output_embeddings") if k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"--init-from {path}: not a safetensors file: {e}") from None
    try:
        forms = json.loads(meta["forms"])
    except (KeyError, json.JSONDecodeError):
        forms = None
    if not isinstance(forms, list) or not all(isinstance(f, str) for f in forms):
        raise UserInputError(f"--init-from {path}: needs metadata 'forms', a JSON list of strings (the text span of "
                             "each row, e.g. ' palatable')")
    if len(set(forms)) != len(forms):
        raise UserInputError(f"--init-from {path}: a form appears twice in 'forms'")
    for name, t in tensors.items():
        if t.dim() != 2 or tuple(t.shape) != (len(forms), hidden):
            raise UserInputError(f"--init-from {path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                 f"({len(forms)}, {hidden}): one row of the model's hidden size per form")
        if not torch.isfinite(t).all():
            raise UserInputError(f"--init-from {path}: tensor {name!r} holds NaN or inf")
    if "input_embeddings" not in tensors:
        raise UserInputError(f"--init-from {path}: no tensor 'input_embeddings'")
    row_of = {f: r for r, f in enumerate(forms)}
    if not any(t.form in row_of for t in toks):
        raise UserInputError(f"--init-from {path}: none of its {len(forms)} forms is a new token's form (forms "
                             "include the leading space of a word in running text: ' palatable')")
    return row_of, tensors


def short_tokens(toks: list[NewToken], min_chars: int) -> set[int]:
    """Indices of primary tokens whose word has fewer than `min_chars` characters (not trained)."""
    return {i for i, t in enumerate(toks) if t.variant_of is None and len(t.word) < min_chars}


def requested_words(new_tokens, from_tokenizer: str | None) -> tuple[list[str], list[Skipped]]:
    """The words to add, from exactly one source: a word-list file or list (new_tokens), or a target tokenizer."""
    from .tokens import clean_words, read_word_list

    if (new_tokens is None) == (from_tokenizer is None):
        raise UserInputError("give the new tokens either as --new-tokens or as --new-tokens-from-tokenizer"
                             + (", not both" if from_tokenizer else ""))
    if from_tokenizer is not None:
        return words_from_tokenizer(from_tokenizer)
    if isinstance(new_tokens, (str, Path)):
        return read_word_list(new_tokens), []
    return clean_words(list(new_tokens), "new_tokens"), []

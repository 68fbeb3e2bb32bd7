"""`tokdistill check OUT`: verify every guarantee of an extended model directory, and `distill` runs the same
checks on its output before moving it into place.

Guarantees (a broken one fails the check and names the token): one id per new token in running text (after a
space, before punctuation, at the start of text and, where a start-of-text variant exists, after a newline,
punctuation or a special token); text without new words tokenizes as before (needs the original);
decode(encode(text)) == text wherever the original tokenizer round-trips; original rows of both matrices
bit-identical (needs the original); new rows finite, input norms at most the vocabulary's largest and at least
a quarter of its smallest (below the smallest itself only warns: subtoken means are shorter than their parts);
tie status as the original's; config.vocab_size equal to the row count and above every token id. Reported
without failing: tokenizer reload seconds, inside-word matches of added tokens, probability mass on padding and
new ids, slow-tokenizer files, and settings another runtime would read differently (`check_runtimes`; tools/
runtimes.py runs llama.cpp itself).

Over 400 lines because every guarantee lives here, so that `tokdistill check` and distill's own output check run
one code path; the checks share the Findings record, the probe paragraphs and the report writer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import regex
import torch

from .config import GuaranteeError, UserInputError  # noqa: F401 (GuaranteeError re-exported)
from .extend import converter_text_forms, overlapping_forms, span_ids
from .modeling.models import load_tokenizer, model_dir
from .tokens import BYTE_PIECE, NewToken, adds_prefix_space, word_pattern

log = logging.getLogger(__name__)

MAX_LISTED = 50  # failures/warnings listed in full in report.json; all are counted
PARAGRAPH_CHARS = 2000  # probe text is compared in chunks of at most this many characters
FORWARD_TOKENS = 1024  # probe tokens run through the model for the probability-mass figures
PROBE_TEXT = """\
The committee met on Tuesday, 14 March 2023, and adjourned at 5:45 p.m. Nobody objected.
"Don't go," she said. "It's late; we'll talk tomorrow." He didn't answer - he'd already left...
Prices rose 3.5% (from $1,200 to $1,242) while the index fell by -0.8 points; see https://example.org/a?b=c&d=e.
  Indented line with    several   spaces,	a tab, and two trailing spaces  \n
UPPER CASE WORDS, lower case words, MiXeD cAsE wOrDs, and Title Case Words.
Numbers: 0 1 12 123 1234 12345 3.14159 1e-9 0x1F 1,000,000 ½ ² ³.
Code: def f(x): return {"key": [1, 2, 3], 'other': (4, 5)} # comment
    for i in range(10):\n        print(i ** 2)  // not python <tag attr="v">&amp;</tag>
Accents and scripts: café naïve façade Zürich São Paulo Ελληνικά русский язык 日本語のテキスト 中文文本 한국어 العربية
Emoji and symbols: 🙂 🚀👍🏽 ✓ → ← ∑ ∞ © ® ™ € £ ¥ • … — – ‘quotes’ “double”
Repeated punctuation!!! ??? ... ,,, ;;; ::: --- *** ### @@@ $$$ %%%
Contractions: I'm you're he's she'd we've they'll it's can't won't shouldn't y'all o'clock.
Hyphenated: state-of-the-art well-known e-mail re-enter co-operate twenty-one.
Newlines follow.

Second paragraph after a blank line.
Third line.



Many blank lines above; text ends without a newline"""


@dataclass
class Original:
    """What the output is compared with: the original tokenizer and, when known, its matrices."""

    tokenizer: object
    embed: torch.Tensor | None = None
    head: torch.Tensor | None = None  # None when tied
    tied: bool | None = None
    reload_seconds: float | None = None


@dataclass
class Findings:
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    def fail(self, check: str, detail: str, token: str | None = None) -> None:
        self.failures.append({"check": check, "token": token, "detail": detail})

    def warn(self, check: str, detail: str, token: str | None = None) -> None:
        self.warnings.append({"check": check, "token": token, "detail": detail})


# ------------------------------------------------------------------------------------------- reading

def read_matrices(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, bool, object]:
    """(input embeddings, output embeddings or None when tied, tied, config) of a model directory, reading only
    those tensors from its safetensors files (the parameter names come from a weightless model)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    embed_param = skeleton.get_input_embeddings().weight
    head = skeleton.get_output_embeddings()
    tied = head is None or head.weight is embed_param
    wanted = {"input": aliases[id(embed_param)], "output": [] if tied else aliases[id(head.weight)]}
    found: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name == "new_embeddings.safetensors":
            continue
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for role, names in wanted.items():
                hit = next((n for n in names if n in keys), None)
                if hit and role not in found:
                    found[role] = st.get_tensor(hit)
    if "input" not in found:
        raise UserInputError(f"{path}: no safetensors tensor named {wanted['input']} (the input embeddings)")
    if not tied and "output" not in found:
        raise UserInputError(f"{path}: untied model without a tensor named {wanted['output']} (output embeddings)")
    return found["input"], found.get("output"), tied, config


def load_original(path: str | Path) -> Original:
    path = model_dir(path, "--original")
    tok, seconds = load_tokenizer(path, "--original")
    embed, head, tied, _ = read_matrices(path)
    return Original(tok, embed, head, tied, seconds)


def new_tokens_of(out: Path) -> list[dict]:
    """The new tokens of an output directory: id, form, stored piece, kind and word, from
    new_embeddings.safetensors and report.json."""
    from safetensors import safe_open

    path = out / "new_embeddings.safetensors"
    if not path.is_file():
        raise UserInputError(f"{out}: no new_embeddings.safetensors; is this a tokdistill output directory?")
    with safe_open(str(path), "pt") as st:
        meta = st.metadata() or {}
        ids = st.get_tensor("token_ids").tolist()
    forms, pieces = json.loads(meta.get("forms", "[]")), json.loads(meta.get("tokens", "[]"))
    report = read_report(out)
    by_id = {t["id"]: t for t in report.get("tokens", [])}
    return [{"id": i, "form": f, "piece": p, "kind": by_id.get(i, {}).get("kind", ""),
             "word": by_id.get(i, {}).get("word", f.strip())} for i, f, p in zip(ids, forms, pieces)]


def read_report(out: Path) -> dict:
    """OUT/report.json ({} where there is none); one that is not a JSON object is the user's to mend."""
    path = out / "report.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: not a report.json that distill wrote ({e})") from None
    if not isinstance(report, dict):
        raise UserInputError(f"{path}: not a report.json that distill wrote (not a JSON object)")
    tokens = report.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, dict) and isinstance(t.get("id"), int) for t in tokens):
        raise UserInputError(f"{path}: not a report.json that distill wrote (its tokens have no ids; another "
                             "command's report written over it?)")
    return report


def probe_paragraphs(texts: list[str]) -> list[str]:
    """Probe texts cut at blank lines, then into chunks of at most PARAGRAPH_CHARS at line ends."""
    out = []
    for text in texts:
        for para in regex.split(r"\n[ \t]*\n", text):
            while para:
                cut = len(para) if len(para) <= PARAGRAPH_CHARS else para.rfind("\n", 0, PARAGRAPH_CHARS) + 1 \
                    or PARAGRAPH_CHARS
                out.append(para[:cut])
                para = para[cut:]
    return [p for p in out if p.strip()]


# ------------------------------------------------------------------------------------------- tokenizer checks

def one_id_contexts(word_forms: dict[str, set[str]], special: str | None, prefix_space: bool) -> list[tuple]:
    """(word, context name, text, start, end, needs a bare form) for every word: the places running text puts it."""
    cases = []
    for word in word_forms:
        for name, left, right in (("after a space", "the ", " said"), ("before a full stop", "the ", "."),
                                  ("before a comma", "the ", ", and"), ("before a newline", "the ", "\n")):
            cases.append((word, name, left + word + right, len(left), len(left) + len(word), False))
        bare = [("at the start of text", "", " said"), ("after a newline", "the\n", " said"),
                ("after an opening bracket", "the (", ")")]
        if special:
            bare.append(("after a special token", special, " said"))
        for name, left, right in bare:
            needs_bare = not (prefix_space and name == "at the start of text")
            cases.append((word, name, left + word + right, len(left), len(left) + len(word), needs_bare))
    return cases


def check_one_id(tok, original, new: list[dict], find: Findings) -> dict:
    """Every word is covered by exactly one token wherever running text puts it: its own, or a longer new token
    that holds it (" (「" over "「" after "(", as retrieval reads it: no hit of the shorter word)."""
    forms: dict[str, set[str]] = defaultdict(set)
    ids_of: dict[str, set[int]] = defaultdict(set)
    form_of = {t["id"]: t["form"] for t in new}
    for t in new:
        forms[t["word"]].add(t["form"])
        ids_of[t["word"]].add(t["id"])
    special = next((s for s in (tok.bos_token, tok.eos_token) if s), None)
    cases = one_id_contexts(forms, special, adds_prefix_space(tok))
    texts = [c[2] for c in cases]
    encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    decoded = tok.backend_tokenizer.decode_batch([e.ids for e in encs], skip_special_tokens=False)
    orig_encs = original.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False) if original \
        else [None] * len(texts)
    checked = not_covered = 0
    for (word, name, text, s, e, needs_bare), enc, dec, oenc in zip(cases, encs, decoded, orig_encs):
        got = span_ids(enc, s, e)
        single_before = oenc is not None and len(span_ids(oenc, s, e)) == 1
        has_bare = word in forms[word]
        if needs_bare and not has_bare and not single_before:
            not_covered += 1  # no start-of-text variant was added (--no-variants): not promised
            continue
        checked += 1
        inside = len(got) == 1 and word in form_of.get(got[0], "")  # a longer new token holds the word
        if len(got) != 1 or not (got[0] in ids_of[word] or single_before or inside):
            find.fail("one_id", f"{name}: {text!r} -> {tok.convert_ids_to_tokens(enc.ids)}", word)
        if dec != text and (oenc is None or original.tokenizer.backend_tokenizer.decode(
                oenc.ids, skip_special_tokens=False) == text):
            find.fail("round_trip", f"{name}: {text!r} decodes as {dec!r}", word)
    return {"words": len(forms), "contexts_checked": checked, "not_covered_without_variants": not_covered}


def check_probe(tok, original, new: list[dict], paragraphs: list[str], find: Findings) -> dict:
    """Text without new words tokenizes as before; every paragraph round-trips where the original's does. With a
    given target tokenizer (kind "target"), "without new words" means: the tokenizer emits no new id there."""
    target = any(t["kind"] == "target" for t in new)
    words = [] if target else sorted({t["word"] for t in new})
    norm = tok.backend_tokenizer.normalizer
    uncased = regex.IGNORECASE if norm is not None and norm.normalize_str("A") == "a" else 0
    at_boundary = word_pattern(words, uncased) if words else None
    new_ids = {t["id"]: t for t in new}
    encs = tok.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False)
    decoded = tok.backend_tokenizer.decode_batch([e.ids for e in encs], skip_special_tokens=False)
    stats = {"paragraphs": len(paragraphs), "with_new_words": 0, "compared": 0, "changed": 0,
             "round_trip_failures": 0, "round_trip_inherited": 0, "inside_word_matches": {}}
    inside: Counter = Counter()
    if original is not None:
        ob = original.tokenizer.backend_tokenizer
        oencs = ob.encode_batch(paragraphs, add_special_tokens=False)
        odecoded = ob.decode_batch([e.ids for e in oencs], skip_special_tokens=False)
    for i, (para, enc, dec) in enumerate(zip(paragraphs, encs, decoded)):
        has_new = not new_ids.keys().isdisjoint(enc.ids) if target else bool(at_boundary and at_boundary.search(para))
        stats["with_new_words"] += has_new
        used = [new_ids[x] for x in enc.ids if x in new_ids]
        if dec != para:
            if original is not None and odecoded[i] != para:
                stats["round_trip_inherited"] += 1
            else:
                stats["round_trip_failures"] += 1
                find.fail("round_trip", f"{para[:80]!r}... decodes differently",
                          used[0]["form"] if used else None)
        if original is None or has_new:
            continue
        stats["compared"] += 1
        if enc.ids == oencs[i].ids:
            continue
        stats["changed"] += 1
        added = [t for t in used if t["kind"] == "added"]
        if added and all(t["kind"] == "added" for t in used):
            for t in added:
                inside[t["form"]] += 1
            continue
        first = next(k for k, (a, b) in enumerate(zip(enc.ids + [-1], oencs[i].ids + [-1])) if a != b)
        find.fail("unchanged", f"text without new words tokenizes differently from token {first}: "
                  f"{tok.convert_ids_to_tokens(enc.ids[first:first + 4])} vs "
                  f"{original.tokenizer.convert_ids_to_tokens(oencs[i].ids[first:first + 4])} in {para[:80]!r}",
                  used[0]["form"] if used else None)
    for form, n in inside.most_common():
        find.warn("inside_word", f"added token matched inside a longer word in {n} probe paragraph(s)", form)
    stats["inside_word_matches"] = dict(inside)
    return stats


def ignore_merges_exceptions(tok, original) -> list[str]:
    """Vocabulary entries that BPE never produces from their own text but that ignore_merges (vocab mode) now
    emits whole when a pre-token equals them (added tokens and byte pieces excluded: they never reach BPE)."""
    # the models' own flag (BPE's; other models have none): their JSON state takes 1.4 s for Gemma-3's vocabulary
    if not getattr(tok.backend_tokenizer.model, "ignore_merges", False) or original is None:
        return []
    model = original.tokenizer.backend_tokenizer.model
    if getattr(model, "ignore_merges", False):
        return []
    added = set(original.tokenizer.get_added_vocab())
    return sorted(p for p in original.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
                  if p not in added and not BYTE_PIECE.fullmatch(p) and len(model.tokenize(p)) != 1)


# ------------------------------------------------------------------------------------------- matrix checks

def row_norms(matrix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """fp32 norms of the rows `ids` of `matrix`, without copying the rows out first."""
    return torch.linalg.vector_norm(matrix, dim=1, dtype=torch.float32)[torch.tensor(ids, dtype=torch.long)]


def row_fault(row: torch.Tensor, norm: float, lo: float, hi: float, dtype: torch.dtype,
              out_row: torch.Tensor | None = None) -> tuple[str, str] | None:
    """The guarantee a new row breaks, as (check, detail): NaN or Inf in it (or in its untied output row), or an
    input norm outside [a quarter of the vocabulary's smallest `lo`, its largest `hi`, up to the rounding of a row
    clipped to it in `dtype`]; None where it breaks neither."""
    if not torch.isfinite(row).all() or (out_row is not None and not torch.isfinite(out_row).all()):
        return "finite", "new row has NaN or Inf values"
    if not lo / 4 <= norm <= hi * (1 + 4 * torch.finfo(dtype).eps):
        return "norm", (f"input row norm {norm:.4g} outside [{lo / 4:.4g}, {hi:.4g}] (the vocabulary's largest "
                        "norm, a quarter of its smallest)")
    return None


def check_rows(table: torch.Tensor, tokenizer, rows: torch.Tensor, forms: list[str]) -> None:
    """row_fault's guarantees on rows a run keeps in memory (distill without an output directory, where
    check_matrices never reads them): a GuaranteeError naming the first row that breaks one."""
    ref = row_norms(table, sorted(i for i in set(tokenizer.get_vocab().values()) if i < table.shape[0]))
    lo, hi = float(ref.min()), float(ref.max())
    for form, row, norm in zip(forms, rows, torch.linalg.vector_norm(rows.float(), dim=1).tolist()):
        if fault := row_fault(row, norm, lo, hi, table.dtype):
            raise GuaranteeError(f"check {fault[0]} failed for token {form!r}: {fault[1]}")


def check_matrices(out: Path, tok, original, new: list[dict], find: Findings) -> dict:
    """Geometry, tie, bit-identical original rows, finite new rows with in-range norms."""
    embed, head, tied, config = read_matrices(out)
    rows = embed.shape[0]
    vocab_size = config.get_text_config().vocab_size
    used_ids = set(tok.get_vocab().values())
    max_id = max(used_ids)
    stats = {"rows": rows, "config_vocab_size": vocab_size, "tokenizer_max_id": max_id, "tied": tied,
             "padding_rows": rows - len(used_ids & set(range(rows)))}
    if vocab_size != rows or (head is not None and head.shape[0] != rows):
        find.fail("vocab_size", f"config.vocab_size {vocab_size}, input rows {rows}, output rows "
                  f"{None if head is None else head.shape[0]}")
    if max_id >= rows:
        find.fail("vocab_size", f"token id {max_id} has no embedding row ({rows} rows)")
    new_ids = torch.tensor([t["id"] for t in new], dtype=torch.long)
    if len(new_ids) and int(new_ids.max()) >= rows:
        return stats
    vecs = embed[new_ids].float()
    norms = vecs.norm(dim=1)
    if original is not None and original.embed is not None:
        if original.tied is not None and original.tied != tied:
            find.fail("tie", f"original tied={original.tied}, output tied={tied}")
        old_rows = original.embed.shape[0]
        orig_used = set(original.tokenizer.get_vocab().values())
        for t in new:
            if t["id"] in orig_used and t["kind"] != "target":  # a target tokenizer may reuse ids (--new-ids)
                find.fail("original_rows", f"new id {t['id']} was already used by the original tokenizer", t["form"])
        keep = torch.ones(old_rows, dtype=torch.bool)
        keep[new_ids[new_ids < old_rows]] = False
        for name, a, b in (("input", embed, original.embed), ("output", head, original.head)):
            if a is None or b is None:
                continue
            if a.shape[0] < old_rows:
                find.fail("original_rows", f"{name} matrix has {a.shape[0]} rows, the original's {old_rows}")
            elif not torch.equal(a[:old_rows], b):  # whole matrices first: no copies of a 262k-row table
                diff = (a[:old_rows] != b).any(dim=1) & keep
                if diff.any():
                    find.fail("original_rows", f"{name} row {int(diff.nonzero()[0])} differs from the original's")
        ref = row_norms(original.embed, [i for i in orig_used if i < old_rows])
    else:
        ref = row_norms(embed, sorted(used_ids - set(new_ids.tolist())))
    lo, hi = float(ref.min()), float(ref.max())
    stats.update(vocab_norm_min=lo, vocab_norm_max=hi, new_norm_min=float(norms.min()) if len(norms) else None,
                 new_norm_max=float(norms.max()) if len(norms) else None)
    out_vecs = head[new_ids].float() if head is not None else None
    for k, t in enumerate(new):
        fault = row_fault(vecs[k], float(norms[k]), lo, hi, embed.dtype, out_vecs[k] if out_vecs is not None else None)
        if fault:
            find.fail(*fault, t["form"])
        elif float(norms[k]) < lo:  # subtoken means of dissimilar rows: shorter, not broken
            find.warn("norm_low", f"input row norm {float(norms[k]):.4g} below the vocabulary's smallest "
                      f"{lo:.4g}", t["form"])
    return stats


@torch.no_grad()
def probability_mass(out: Path, tok, new: list[dict], paragraphs: list[str], model=None) -> dict:
    """Next-token probability mass on padding ids (rows no token uses) and on new ids, over up to
    FORWARD_TOKENS tokens of probe text without the new words."""
    from transformers import AutoModelForCausalLM

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    rows = model.get_input_embeddings().weight.shape[0]
    used = torch.zeros(rows, dtype=torch.bool)
    used[[i for i in tok.get_vocab().values() if i < rows]] = True
    new_mask = torch.zeros(rows, dtype=torch.bool)
    new_mask[[t["id"] for t in new]] = True
    pad_max = pad_sum = new_sum = 0.0
    n = 0
    device = next(model.parameters()).device
    for para in paragraphs:
        if n >= FORWARD_TOKENS:
            break
        ids = tok(para, return_tensors="pt")["input_ids"][:, :256].to(device)
        probs = model(ids).logits[0].float().softmax(-1).cpu()
        pad = probs[:, ~used].sum(-1)
        pad_max = max(pad_max, float(pad.max()))
        pad_sum += float(pad.sum())
        new_sum += float(probs[:, new_mask].sum())
        n += ids.shape[1]
    return {"positions": n, "padding_ids": int((~used).sum()), "padding_mass_mean": pad_sum / max(n, 1),
            "padding_mass_max": pad_max, "new_ids_mass_mean": new_sum / max(n, 1)}


# ------------------------------------------------------------------------------------------- driver

# Classes transformers 4.x knows: llama.cpp's converter (which pins transformers 4.57) and older stacks load only
# these; transformers 5 writes "TokenizersBackend" unless told otherwise (export.save_tokenizer).
CLASSES_4X = ("PreTrainedTokenizerFast", "LlamaTokenizerFast", "GPT2TokenizerFast", "Qwen2TokenizerFast",
              "GemmaTokenizerFast")


def check_runtimes(out: Path, tok, new: list[dict], find) -> dict:
    """Warn where a runtime other than transformers 5 would lose the new tokens, naming it and the fix."""
    vocab = [t["form"] for t in new if t["kind"] == "vocab"]
    if vocab:
        find.warn("runtime", f"llama.cpp (convert_hf_to_gguf.py, and Ollama / LM Studio built on it) never emits the "
                  f"{len(vocab)} vocab-mode token(s) such as {vocab[0]!r}: it splits text with its own hard-coded "
                  "pre-tokenizer and plain BPE merges. Rerun distill with --tokenizer-mode added (the default) for "
                  "an output every runtime tokenizes alike")
    forms = {t["form"] for t in new}
    flagged = [a.content for a in tok.added_tokens_decoder.values()
               if a.content in forms and (a.single_word or a.lstrip or a.rstrip)]
    if flagged:
        find.warn("runtime", f"llama.cpp's converter drops single_word/lstrip/rstrip, so {len(flagged)} added "
                  f"token(s) such as {flagged[0]!r} match differently there (inside longer words); rerun distill "
                  "(added tokens without flags are the default)")
    added = {a.content for a in tok.added_tokens_decoder.values()}
    overlaps = overlapping_forms([NewToken(t["word"], t["form"], []) for t in new if t["form"] in added],
                                 sorted(added - forms), keep_words=True)
    if overlaps:
        form, why = next(iter(overlaps.items()))
        find.warn("runtime", f"llama.cpp cuts added tokens out of text longest first, transformers and vLLM "
                  f"leftmost-longest: {len(overlaps)} new token(s) overlap an earlier one, such as {form!r} {why}; "
                  "leave out the later word of each pair where the runtimes must agree")
    if hashed := converter_text_forms(sorted(forms & added)):
        find.warn("runtime", f"llama.cpp's convert_hf_to_gguf.py will refuse this output: {len(hashed)} new token(s) "
                  f"such as {next(iter(hashed))!r} occur in the text whose ids it hashes to recognize the tokenizer "
                  "(\"BPE pre-tokenizer was not recognized\"); rerun distill, which leaves them out")
    config_file = out / "tokenizer_config.json"
    cls = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class") if config_file.is_file() else None
    if cls not in CLASSES_4X:
        find.warn("runtime", f"tokenizer_config.json names {cls!r}, which transformers 4.x (and llama.cpp's converter, "
                  "pinned to 4.57) cannot load; set \"tokenizer_class\": \"PreTrainedTokenizerFast\"")
    return {"vocab_mode_tokens": len(vocab), "flagged_added_tokens": len(flagged),
            "overlapping_added_tokens": len(overlaps), "converter_check_text_tokens": len(hashed),
            "tokenizer_class": cls}


def run_checks(out: str | Path, original: Original | None = None, probe_texts: list[str] | None = None,
               forward: bool | None = True, model=None) -> dict:
    """Every check on an output directory; returns the report's "check" section ("passed", "failures", ...).
    forward=None runs the probability-mass forward pass only when the output has padding rows."""
    out = model_dir(out, None)
    find = Findings()
    new = new_tokens_of(out)
    tok, reload_s = load_tokenizer(out)
    if original is not None:
        refuse_other_original(tok, original.tokenizer)
    paragraphs = probe_paragraphs([PROBE_TEXT] + list(probe_texts or []))
    section: dict = {"new_tokens": len(new), "kinds": dict(Counter(t["kind"] or "unknown" for t in new)),
                     "tokenizer": {"class": type(tok).__name__, "reload_seconds": reload_s,
                                   "original_reload_seconds": original.reload_seconds if original else None}}
    if original is not None and original.reload_seconds:
        section["tokenizer"]["reload_ratio"] = reload_s / original.reload_seconds
    section["tokenizer"]["slow_files"] = [n for n in ("tokenizer.model", "vocab.json", "merges.txt")
                                          if (out / n).is_file()]
    section["runtimes"] = check_runtimes(out, tok, new, find)  # first: listed before inside-word warnings
    if any(t["kind"] == "target" for t in new):  # a given tokenizer decides where its pieces go
        section["one_id"] = {"words": 0, "contexts_checked": 0, "skipped": "target tokenizer kept as given"}
    else:
        section["one_id"] = check_one_id(tok, original, new, find)
    section["probe"] = check_probe(tok, original, new, paragraphs, find)
    exceptions = ignore_merges_exceptions(tok, original)
    section["ignore_merges_exceptions"] = {"count": len(exceptions), "first": exceptions[:20]}
    section["matrices"] = check_matrices(out, tok, original, new, find)
    if forward is None:  # distill: only where padding rows exist, the ones that must never be sampled
        forward = section["matrices"]["padding_rows"] > 0
    if forward and any(f["check"] == "vocab_size" for f in find.failures):  # transformers would refuse to load it
        find.warn("probability_mass", "not measured: the embedding rows do not match the vocabulary (see vocab_size)")
    elif forward:
        without = [p for p in paragraphs if not any(t["word"] in p for t in new)]
        section["probability_mass"] = probability_mass(out, tok, new, without, model)
        if section["probability_mass"]["padding_mass_max"] > 1e-3:
            find.warn("padding_mass", f"up to {section['probability_mass']['padding_mass_max']:.2e} of the "
                      "next-token probability falls on padding ids")
    section["passed"] = not find.failures
    section["failure_counts"] = dict(Counter(f["check"] for f in find.failures))
    section["failures"] = find.failures[:MAX_LISTED]
    section["warning_counts"] = dict(Counter(w["check"] for w in find.warnings))
    section["warnings"] = find.warnings[:MAX_LISTED]
    return section


def summary_lines(section: dict) -> list[str]:
    """One line per failure (check, token, detail), for the console and for GuaranteeError."""
    return [f"check {f['check']} failed" + (f" for token {f['token']!r}" if f["token"] else "") + f": {f['detail']}"
            for f in section["failures"]]


def inside_word_line(section: dict, most: int = 3) -> str | None:
    """One log line where added tokens changed probe text without new words by matching inside longer words (they
    match on raw text: " Datei" in " Dateien"), naming the tokens that did most; None where none did."""
    probe = section.get("probe") or {}
    inside = probe.get("inside_word_matches") or {}
    if not inside:
        return None
    top = ", ".join(f"{form!r} {n}" for form, n in sorted(inside.items(), key=lambda kv: -kv[1])[:most])
    return (f"check: {probe['changed']} of {probe['compared']} probe paragraphs without new words tokenize "
            f"differently: added tokens match inside longer words (most: {top}); no training snippet shows a row "
            "there, and `--tokenizer-mode vocab` avoids it where llama.cpp is not needed "
            "(docs/vocabulary-extension.md)")


def write_reports(out: Path, section: dict) -> None:
    """Put the check section into report.json (keeping what the run wrote) and write a short report.md."""
    from .export import write_json

    report = read_report(out)
    report["check"] = section
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report), encoding="utf-8")


def markdown(report: dict) -> str:
    """A short human summary of report.json."""
    c = report["check"]
    lines = ["# tokdistill report", ""]
    if "counts" in report:
        k, st = report["counts"], report["settings"]
        ran, asked = st.get("resolved_method", st["method"]), st["method"]
        lines += [f"- tokens: {k['added']} added ({k.get('variants', 0)} variants), {k['skipped']} word(s) skipped"
                  + (f", {k['forms_left_out']} form(s) of added words left out" if k.get("forms_left_out") else ""),
                  f"- method: {ran}" + (f" (asked: {asked})" if ran != asked else "")
                  + f", tokenizer mode: {st['tokenizer_mode']}"]
        t = report.get("training")
        if t:
            lr = st.get("resolved_lr")
            lr = f"{lr:.3g}" if isinstance(lr, float) else lr
            lines.append(f"- training: layer {st.get('resolved_target_layer')}, lr {lr}, "
                         f"{t['steps']} steps, step loss {t['first_loss']:.3g} -> {t['last_loss']:.3g}; "
                         f"{len(report.get('outliers') or [])} outlier(s), "
                         f"{len(report.get('over_predicting') or [])} word(s) flagged for drawing the next-token mass")
        if "timings" in report:
            lines.append(f"- run: {report['timings']['total']:.1f} s (the output check after it not included)")
    m = c["matrices"]
    lines += [f"- token kinds: {', '.join(f'{v} {k}' for k, v in c['kinds'].items())}",
              f"- rows: {m['rows']} (config.vocab_size {m['config_vocab_size']}, {m['padding_rows']} padding), "
              f"tied: {m['tied']}",
              f"- tokenizer reload: {c['tokenizer']['reload_seconds']:.2f} s"
              + (f" ({c['tokenizer']['reload_ratio']:.2f}x the original)" if "reload_ratio" in c["tokenizer"] else ""),
              f"- probe: {c['probe']['paragraphs']} paragraphs, {c['probe']['compared']} compared with the original, "
              f"{c['probe']['changed']} changed; round-trip failures {c['probe']['round_trip_failures']}",
              f"- one id: {c['one_id']['contexts_checked']} contexts for {c['one_id']['words']} words"]
    if "probability_mass" in c:
        p = c["probability_mass"]
        lines.append(f"- next-token mass on {p['padding_ids']} padding ids: mean {p['padding_mass_mean']:.2e}, "
                     f"max {p['padding_mass_max']:.2e}; on new ids: mean {p['new_ids_mass_mean']:.2e}")
    lines += ["", f"## Check: {'passed' if c['passed'] else 'FAILED'}", ""]
    lines += [f"- {line}" for line in summary_lines(c)]
    lines += [f"- {line}" for line in warning_lines(c, 10)]
    return "\n".join(lines) + "\n"


def warning_lines(section: dict, most: int | None = None) -> list[str]:
    """One line per warning (check, token, detail), for report.md and the console."""
    return [f"warning ({w['check']}{', ' + repr(w['token']) if w['token'] else ''}): {w['detail']}"
            for w in section["warnings"][:most]]


def check_dir(out: str | Path, original: str | Path | None = None, probes: list[str] | None = None,
              forward: bool = True) -> dict:
    """`tokdistill check`: run the checks and return the section. The output is only read: its report.json keeps
    the check distill ran on it (with a sample of its corpus as probe text)."""
    texts = [read_probe(p) for p in probes or []]
    return run_checks(out, load_original(original) if original else None, texts, forward)


def refuse_other_original(tokenizer, original_tokenizer) -> None:
    """An --original whose vocabulary the output's does not keep, id for id, is another model: refused before any
    check (run_checks, once the output's tokenizer is loaded), rather than failing every check there."""
    vocab, ours = original_tokenizer.get_vocab(), tokenizer.get_vocab()
    differ = sum(1 for piece, i in vocab.items() if ours.get(piece) != i)
    if differ > len(vocab) // 100:
        raise UserInputError(f"--original: {differ} of its {len(vocab)} vocabulary entries are not the output's at "
                             "the same id; is it the model the output was made from?")


def read_probe(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--probe {path}: cannot read it as UTF-8 text: {e}") from None

"""Held-out bits per character of an adapted model against the original, with paragraphs grouped by how the new
tokenizer changes them: new words as words, or only new tokens matched inside longer words (added tokens match on
raw text: " Datei" inside " Dateien"), which no training snippet shows the rows.

    python -m bench.inside_words --original M --adapted OUT --mean MEAN_OUT --words words.txt --heldout held.txt
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

from transformers import AutoTokenizer

from bench.byot_example import bits_per_char
from tokdistill_fast.contexts import start_id
from tokdistill_fast.corpus import iter_documents
from tokdistill_fast.tokens import read_word_list, word_pattern


def groups(docs: list[str], original, adapted, words: list[str]) -> dict[str, list[str]]:
    """Paragraphs the adapted tokenizer changes, split into those with a new word at word boundaries and those
    changed only by matches inside longer words; unchanged ones are left out (both models read the same ids)."""
    hit = word_pattern(words)
    out: dict[str, list[str]] = {"with_words": [], "inside_only": []}
    for doc in docs:
        if original(doc, add_special_tokens=False)["input_ids"] != adapted(doc, add_special_tokens=False)["input_ids"]:
            out["with_words" if hit.search(doc) else "inside_only"].append(doc)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True)
    p.add_argument("--adapted", required=True, help="a `tokdistill distill` output")
    p.add_argument("--mean", required=True, help="the same job's `--method mean` output")
    p.add_argument("--words", required=True, help="the job's --new-tokens file")
    p.add_argument("--heldout", required=True)
    p.add_argument("--paragraphs", type=int, default=600, help="the held-out file's first N paragraphs")
    p.add_argument("--out", help="write the figures here (JSON)")
    args = p.parse_args(argv)
    original, adapted = AutoTokenizer.from_pretrained(args.original), AutoTokenizer.from_pretrained(args.adapted)
    words = read_word_list(args.words)
    docs = list(islice(iter_documents([args.heldout]), args.paragraphs))
    lead = start_id(original)  # the document start every snippet of the library begins with
    result = {}
    for name, group in groups(docs, original, adapted, words).items():
        row = {"paragraphs": len(group)}
        if group:
            for model, path, tok in (("original", args.original, original), ("mean", args.mean, adapted),
                                     ("token-distill", args.adapted, adapted)):
                row[model] = bits_per_char(Path(path), tok, group, lead)
            o, m, d = (row[k]["bpc"] for k in ("original", "mean", "token-distill"))
            row["gap_left"] = (d - o) / (m - o) if m != o else None
        result[name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

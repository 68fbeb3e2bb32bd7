"""What BPE merges appended after the original ones would cost, the mechanism llama.cpp's plain BPE would honour
(docs/vocabulary-extension.md weighs it against added tokens). Not a tokenizer mode: a measurement.

    python -m bench.merges_cost --words words.txt [--model DIR] [--corpus FILE] [--chars 200000]

For every form that is one pre-token and whose subtokens concatenate to it, merges chain the subtokens left to right
(a, b -> ab; ab, c -> abc), ranked after every original merge, so the original segmentation completes first. Counts,
on the check's probe (its built-in text plus the corpus's first --chars characters, as `distill` uses): forms
reached as one id in running text, forms that cannot be merges, and paragraphs without new words whose ids change,
split into those showing an intermediate piece (an id with no trained row) and those showing a new form inside a
longer word.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tokdistill_fast import corpus, tokens
from tokdistill_fast.check import PROBE_TEXT, probe_paragraphs
from tokdistill_fast.config import cache_dir


def merges_tokenizer(tok, planned: list[tokens.NewToken]) -> tuple[Tokenizer, set[int], set[int], int]:
    """The original tokenizer with chained merges appended; (tokenizer, final ids, intermediate ids, skipped)."""
    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    pairs = isinstance(merges[0], list)
    next_id = max([*vocab.values(), *(a["id"] for a in tj.get("added_tokens", []))]) + 1
    finals, middles, skipped = set(), set(), 0
    seen = {tuple(m) if pairs else tuple(m.split(" ")) for m in merges}
    for t in planned:
        piece = tokens.stored_piece(tok.backend_tokenizer, t.form)
        parts = tok.convert_ids_to_tokens(t.sub_ids)
        if piece is None or "".join(parts) != piece or piece in vocab:
            skipped += 1
            continue
        acc = parts[0]
        for k, p in enumerate(parts[1:], 2):
            if (acc, p) not in seen:
                seen.add((acc, p))
                merges.append([acc, p] if pairs else f"{acc} {p}")
            acc += p
            if acc not in vocab:
                vocab[acc] = next_id
                next_id += 1
            (finals if k == len(parts) else middles).add(vocab[acc])
    return Tokenizer.from_str(json.dumps(tj)), finals, middles - finals, skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--words", type=Path, required=True)
    p.add_argument("--model", type=Path, default=cache_dir() / "smollm2-135m-instruct")
    p.add_argument("--corpus", type=Path, default=cache_dir() / "corpora" / "gcide.txt")
    p.add_argument("--chars", type=int, default=200_000)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    planned, _ = tokens.plan_new_tokens(tok, tokens.read_word_list(args.words))
    new, finals, middles, skipped = merges_tokenizer(tok, planned)
    one = sum(len(e.ids) == 2 and e.ids[1] in finals for e in new.encode_batch(
        ["a" + t.form if t.form.startswith(" ") else "(" + t.form for t in planned], add_special_tokens=False))
    words = sorted({t.word for t in planned})
    hit = tokens.word_pattern(words)
    paras = [x for x in probe_paragraphs([PROBE_TEXT, *corpus.leading_documents([args.corpus], args.chars)])
             if not hit.search(x)]
    before = tok.backend_tokenizer.encode_batch(paras, add_special_tokens=False)
    after = new.encode_batch(paras, add_special_tokens=False)
    changed = [a.ids for a, b in zip(after, before) if a.ids != b.ids]
    print(json.dumps({"forms": len(planned), "not_mergeable": skipped, "one_id_in_running_text": one,
                      "intermediate_pieces": len(middles), "paragraphs_without_new_words": len(paras),
                      "changed": len(changed), "changed_with_intermediate": sum(any(i in middles for i in c)
                                                                                for c in changed)}, indent=1))


if __name__ == "__main__":
    main()

"""Extend a BPE tokenizer by continuing its merges on a corpus: what vocabulary-extension pipelines build before they
need embeddings (the input of `tokdistill distill --tokenizer`). New merges and pieces are appended after the
original vocabulary, so every original id keeps its piece.

    python -m tokdistill_fast.tools.extend_bpe --model DIR --corpus FILE --merges 200 --out T2_DIR
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

from ..config import UserInputError


def word_counts(tokenizer, texts) -> Counter:
    """Pre-tokens (as the BPE model sees them: normalized, pre-tokenized) and how often each occurs."""
    backend = tokenizer.backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        counts.update(p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def continue_merges(tokenizer, counts: Counter, n_merges: int) -> list[tuple[str, str]]:
    """The next `n_merges` merges BPE training would learn from `counts`, starting from the tokenizer's own
    segmentation of every pre-token: the most frequent adjacent pair whose piece is not in the vocabulary yet (ties
    to the smaller pair), pair counts updated incrementally and kept in a heap whose stale entries are skipped."""
    model = tokenizer.backend_tokenizer.model
    vocab = tokenizer.get_vocab()
    words = [[t.value for t in model.tokenize(w)] for w in counts]
    freq = list(counts.values())
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        c, best = heapq.heappop(heap)
        if -c != pairs[best] or best[0] + best[1] in vocab:
            continue  # stale (the count changed and was pushed again) or already a piece
        if -c < 2:
            break
        merges.append(best)
        vocab[best[0] + best[1]] = -1
        touched = set()
        for i in where.pop(best):
            w = words[i]
            for pair in zip(w, w[1:]):
                pairs[pair] -= freq[i]
                touched.add(pair)
            merged, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and (w[k], w[k + 1]) == best:
                    merged.append(w[k] + w[k + 1])
                    k += 2
                else:
                    merged.append(w[k])
                    k += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):
                pairs[pair] += freq[i]
                where[pair].add(i)
                touched.add(pair)
        for pair in touched:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
    return merges


def extended(tokenizer, merges: list[tuple[str, str]]):
    """A copy of the fast tokenizer with `merges` appended and their pieces given ids after every existing id; the
    rest of it as it was (chat template, special tokens, padding side: its tokenizer_config.json), since distill
    --tokenizer ships this tokenizer as it is."""
    import tempfile

    from transformers import AutoTokenizer

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    if tj["model"].get("type") != "BPE":
        raise UserInputError("extend_bpe: the tokenizer's model is not BPE")
    next_id = max(tokenizer.get_vocab().values()) + 1
    vocab = tj["model"]["vocab"]
    for added in tj["added_tokens"]:  # tokenizers gives an added token not in the model's vocabulary the id after
        vocab.setdefault(added["content"], added["id"])  # it, so Llama-3's would move behind the new pieces
    string_merges = bool(tj["model"]["merges"]) and isinstance(tj["model"]["merges"][0], str)
    for k, (a, b) in enumerate(merges):
        vocab[a + b] = next_id + k
        tj["model"]["merges"].append(f"{a} {b}" if string_merges else [a, b])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from ..corpus import iter_documents

    p = argparse.ArgumentParser(prog="python -m tokdistill_fast.tools.extend_bpe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model or tokenizer directory whose BPE tokenizer to extend")
    p.add_argument("--corpus", nargs="+", required=True)
    p.add_argument("--merges", type=int, required=True, help="new merges (and pieces) to learn")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    merges = continue_merges(tok, word_counts(tok, iter_documents(args.corpus)), args.merges)
    extended(tok, merges).save_pretrained(args.out)
    print(f"{len(merges)} new merges -> {args.out} (ids {len(tok)}..{len(tok) + len(merges) - 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizer cost of new tokens: reload time and encode throughput of the SmolLM2 tokenizer extended with 0, 2,500
and 50,000 generated word-like tokens, in vocab mode and in added mode.

    python bench/bench_tokenizer.py [--model DIR] [--corpus FILE] [--sizes 0 2500 50000] [--out FILE]

Reload is `AutoTokenizer.from_pretrained(dir)` (median of --repeats). Throughput is `encode_batch` over the first
--mb megabytes of the corpus cut into paragraphs ("plain": no new word occurs) and over the same text with every
tenth word replaced by a new word ("dense"). Results go to --out as JSON and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from tokdistill_fast import extend, tokens
from tokdistill_fast.check import probe_paragraphs
from tokdistill_fast.config import cache_dir

SYLLABLES = ("ka lo mi ner tha por vel quin dra sto bel fen gor hu ix zem rab tul vosk ple gri mun "
             "shal dor wex yat").split()


def word_like(tokenizer, n: int, seed: int = 0) -> list[str]:
    """n distinct lower-case pseudo-words of 2-4 syllables that the tokenizer splits into at least 2 tokens."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    out: dict[str, None] = {}
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        if w not in out and "\u0120" + w not in vocab:
            out[w] = None
    return list(out)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def throughput(tokenizer, paragraphs: list[str], repeats: int) -> float:
    """MB/s of encode_batch over the paragraphs (no special tokens)."""
    size = sum(len(p.encode()) for p in paragraphs) / 1e6
    seconds, _ = timed(lambda: tokenizer.backend_tokenizer.encode_batch(paragraphs, add_special_tokens=False),
                       repeats)
    return size / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(cache_dir() / "smollm2-135m-instruct"))
    p.add_argument("--corpus", default=str(cache_dir() / "corpora" / "wordnet.txt"))
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 2500, 50000])
    p.add_argument("--modes", nargs="+", default=["vocab", "added"])
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/tokenizer.json")
    args = p.parse_args(argv)

    original = AutoTokenizer.from_pretrained(args.model)
    config = AutoConfig.from_pretrained(args.model)
    text = Path(args.corpus).read_text(encoding="utf-8")[:int(args.mb * 1e6)]
    plain = probe_paragraphs([text])
    pool = word_like(original, max(args.sizes))
    results = []
    for n in args.sizes:
        for mode in args.modes if n else ["original"]:
            words = pool[:n]
            t0 = time.perf_counter()
            if n:
                planned, _ = tokens.plan_new_tokens(original, words, add_variants=False)
                extended = extend.extend_tokenizer(original, planned, mode, config)
            else:
                planned, extended = [], original
            build = time.perf_counter() - t0
            rng = random.Random(n)  # the same dense text for both modes
            dense = [" ".join(w if i % 10 else rng.choice(words) for i, w in enumerate(para.split(" ")))
                     for para in plain] if n else plain
            with tempfile.TemporaryDirectory() as tmp:
                extended.save_pretrained(tmp)
                config.to_json_file(Path(tmp, "config.json"))
                reload_s, loaded = timed(lambda tmp=tmp: AutoTokenizer.from_pretrained(tmp), args.repeats)
            row = {"new_tokens": len(planned), "mode": mode, "kinds": sorted({t.kind for t in planned}),
                   "build_s": build, "reload_s": reload_s,
                   "encode_plain_MBps": throughput(loaded, plain, args.repeats),
                   "encode_dense_MBps": throughput(loaded, dense, args.repeats)}
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "corpus": args.corpus, "mb": args.mb, "repeats": args.repeats,
            "paragraphs": len(plain), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")
    print("| new tokens | mode | build s | reload s | encode MB/s (no new words) | encode MB/s (every 10th word new) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['new_tokens']:,} | {r['mode']} | {r['build_s']:.1f} | {r['reload_s']:.2f} | "
              f"{r['encode_plain_MBps']:.2f} | {r['encode_dense_MBps']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

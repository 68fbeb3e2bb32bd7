"""Streaming retrieval throughput and memory: one Aho-Corasick pass with 50k patterns over generated text corpora
of two sizes. Each size runs twice: keeping 1 hit per token (the pass's own working memory, which should not grow
with the corpus) and 25 (the paper's budget: the kept windows are the output sample, bounded by patterns x 25
windows but growing until every token has its 25). The old whole-file reader runs on the small corpus for contrast.

    python bench/bench_retrieval.py                    # 256 MiB and 2 GiB corpora, 50k patterns
    python bench/bench_retrieval.py --size 512M        # smaller; the small corpus is 1/8 of --size

The text: words drawn from a 200k-word synthetic vocabulary with Zipf frequencies (5% with accented letters),
12 words per line, a blank line (document break) every ~150 words. Patterns are " word" forms of 50k vocabulary
words spread over the frequency ranks. Each size runs in a fresh process, so its peak RSS (ru_maxrss) is its own.
Writes bench/results/retrieval.json and retrieval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 200_000
SEED = 0
RESULTS = Path(__file__).parent / "results"


def rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def vocabulary() -> tuple[list[str], np.ndarray]:
    """Distinct synthetic words and their Zipf probabilities (rank 1 most frequent)."""
    rng = np.random.default_rng(SEED)
    letters = np.array(list("abcdefghijklmnoprstuvwyz"))
    words: dict[str, None] = {}
    while len(words) < VOCAB:
        for n in rng.integers(3, 13, VOCAB):
            w = "".join(rng.choice(letters, n))
            if rng.random() < 0.05:
                k = int(rng.integers(0, n))
                w = w[:k] + rng.choice(["é", "ü", "ñ", "ø"]) + w[k + 1:]
            words[w] = None
    p = 1.0 / np.arange(1, VOCAB + 1)
    return list(words)[:VOCAB], p / p.sum()


def generate(path: Path, size: int) -> None:
    """Write `size` characters of text to `path` (~2% more bytes: accented letters take two). An existing file is
    reused: it is written under another name and renamed when complete, and its name holds the size."""
    if path.exists():
        return
    words, p = vocabulary()
    arr = np.array(words, dtype=object)
    rng = np.random.default_rng(SEED + size)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial")
    written = 0
    with tmp.open("w", encoding="utf-8") as f:
        while written < size:
            idx = rng.choice(VOCAB, 1_000_000, p=p)
            seps = np.full(idx.size, " ", dtype=object)
            seps[11::12] = "\n"
            seps[rng.random(idx.size) < 1 / 150] = "\n\n"
            block = "".join(np.column_stack([arr[idx], seps]).ravel().tolist())
            written += f.write(block)  # characters; accented ones take 2 bytes, so the file ends a little larger
    tmp.rename(path)
    print(f"generated {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)


def patterns(n: int) -> list[str]:
    """n vocabulary words spread evenly over ranks 100..VOCAB (from a few per MB to a few per GB)."""
    words, _ = vocabulary()
    return [words[int(r)] for r in np.linspace(100, VOCAB - 1, n)]


def child(path: Path, n_patterns: int, keep: int, whole: bool) -> dict:
    """One measured pass in this process: automaton build, then the search over `path`."""
    from tokdistill_fast.contexts import CHARS_PER_TOKEN, find_hits
    from tokdistill_fast.corpus import DOC_SPLIT, Corpus, Piece
    from tokdistill_fast.tokens import NewToken

    toks = [NewToken(w, " " + w, [0, 1]) for w in patterns(n_patterns)]
    base = rss_mib()
    if whole:  # the reader before streaming: the whole file in memory, split into documents
        pieces = (Piece(d, True, True) for d in DOC_SPLIT.split(path.read_text(encoding="utf-8")))
        corpus = None
    else:
        pieces = corpus = Corpus([path])
    t0, c0 = time.perf_counter(), time.process_time()
    kept, stats = find_hits(pieces, toks, keep, CHARS_PER_TOKEN * 50, SEED)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = path.stat().st_size
    assert corpus is None or corpus.bytes_read == size
    return {"file": str(path), "bytes": size, "patterns": n_patterns, "keep": keep,
            "reader": "whole-file" if whole else "streaming",
            "seconds": round(seconds, 2), "MB_per_s": round(size / 1e6 / seconds, 1),
            "cpu_seconds": round(cpu, 2), "MB_per_cpu_s": round(size / 1e6 / cpu, 1),
            "rss_before_MiB": round(base, 1), "peak_rss_MiB": round(peak_mib(), 1),
            "hits": sum(stats.hits), "tokens_full": sum(len(k) == keep for k in kept),
            "kept_hits": sum(map(len, kept)),
            "kept_window_MiB": round(sum(len(h.text) for k in kept for h in k) / 2**20, 1),
            "tokens_without_hits": sum(h == 0 for h in stats.hits)}


def automaton_cost(n: int) -> dict:
    """Build time and memory of the automaton alone for n patterns."""
    import ahocorasick

    words = patterns(n)
    before, t0 = rss_mib(), time.perf_counter()
    a = ahocorasick.Automaton()
    for i, w in enumerate(words):
        a.add_word(" " + w, (i, len(w) + 1))
    a.make_automaton()
    return {"patterns": n, "build_seconds": round(time.perf_counter() - t0, 2),
            "MiB": round(rss_mib() - before, 1)}


def parse_size(value: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(value[:-1]) * units[value[-1].upper()]) if value[-1].upper() in units else int(value)


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=2 * 2**30, help="large corpus size (default 2G)")
    p.add_argument("--patterns", type=int, default=50_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/tokdistill-bench"), help="where the corpora are written")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--keep", type=int, default=25, help=argparse.SUPPRESS)
    p.add_argument("--automaton", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.patterns, args.keep, args.whole)))
        return
    if args.automaton:
        print(json.dumps(automaton_cost(args.automaton)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    small, large = args.dir / f"corpus-{args.size // 8}.txt", args.dir / f"corpus-{args.size}.txt"
    generate(small, args.size // 8)
    generate(large, args.size)
    runs = [run_child("--child", str(path), "--patterns", str(args.patterns), "--keep", str(keep), *extra)
            for keep, path, extra in [(1, small, ["--whole"]), (1, small, []), (1, large, []), (25, small, []),
                                      (25, large, [])]]
    automata = [run_child("--automaton", str(n)) for n in (50_000, 100_000)]
    for r in runs:
        print(f"{r['reader']:>10} keep {r['keep']:2d} {r['bytes'] / 2**20:7.0f} MiB  {r['MB_per_s']:6.1f} MB/s wall  "
              f"{r['MB_per_cpu_s']:6.1f} MB/s CPU  peak RSS "
              f"{r['peak_rss_MiB']:7.1f} MiB (before the pass {r['rss_before_MiB']:.1f})  {r['hits']} hits")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    import ahocorasick

    result = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(),
                          "python": platform.python_version(),
                          "pyahocorasick": getattr(ahocorasick, "__version__", "")},
              "command": " ".join(sys.argv), "runs": runs, "automaton": automata}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {r['reader']} | {r['keep']} | {r['bytes'] / 2**20:.0f} MiB | {r['seconds']:.0f} s | "
                     f"{r['MB_per_s']:.1f} | "
                     f"{r['cpu_seconds']:.0f} s | {r['MB_per_cpu_s']:.1f} | "
                     f"{r['rss_before_MiB']:.0f} MiB | {r['peak_rss_MiB']:.0f} MiB | {r['kept_hits']:,} "
                     f"({r['kept_window_MiB']:.0f} MiB) | {r['hits']:,} |" for r in runs)
    auto = ", ".join(f"{a['patterns'] // 1000}k patterns: {a['build_seconds']} s, {a['MiB']:.0f} MiB" for a in automata)
    (RESULTS / "retrieval.md").write_text(
        f"Retrieval, {args.patterns:,} patterns, 400-char windows "
        f"(`{result['command']}`; {cpu}, {os.cpu_count()} cores shared, load {os.getloadavg()[0]:.1f}).\n\n"
        "| reader | keep | corpus | wall | MB/s | CPU time | MB/CPU-s | RSS before pass | peak RSS | kept hits "
        "(window text) | hits |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\nAutomaton alone: {auto}. Kept hits are the output sample, bounded by patterns x keep windows of "
        "<= 800 chars whatever the corpus size; the rest of the pass holds one chunk (1 MiB) at a time.\n"
        "MB/CPU-s is the throughput of one core; wall-clock MB/s depends on how busy the shared machine was.\n")


if __name__ == "__main__":
    main()

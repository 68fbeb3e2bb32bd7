"""Alignment builder, C++ (csrc/align.cpp) vs the Python spec, on the same 64k synthetic snippets (CPU only).
The issue asks for the C++ builder to be at least 20x faster. Both go through align.align(), the call the pipeline
makes (lists in, so packing the lists is timed too). `make bench-align`; the table's ratio column is the speedup."""

from __future__ import annotations

import numpy as np
import pytest

from tokdistill_fast import align

# 2,560 new tokens x 25 snippets of ~50 ids: the workload (2,500 tokens x 25 x 50), rounded to 64k.
N_PHRASES, PER_PHRASE, VOCAB = 2_560, 25, 49_152  # VOCAB: SmolLM2's
N_SNIPPETS = N_PHRASES * PER_PHRASE


def synthetic_batch(seed: int = 0):
    """Snippets of 40-60 ids drawn Zipf-like as in text (the most frequent id ~10% of all, as ", " or " the" in BPE
    corpora), each holding its phrase once or, one time in eight, twice, and one time in four also a near miss
    (the phrase without its last subtoken). Phrases are 2-5 subtokens (mostly 2-3, as BPE splits rare words) from
    the rarer part of the vocabulary."""
    rng = np.random.default_rng(seed)
    lens = rng.choice([2, 3, 4, 5], size=N_PHRASES, p=[0.45, 0.35, 0.15, 0.05])
    phrases = [rng.integers(1_000, VOCAB, n).tolist() for n in lens]
    snippet_phrase = np.repeat(np.arange(N_PHRASES), PER_PHRASE)
    teacher = []
    for p in snippet_phrase.tolist():
        ph = phrases[p]
        seq = ((rng.zipf(1.1, int(rng.integers(40, 61)) - len(ph)) - 1) % VOCAB).tolist()
        plant = [ph] * (2 if rng.random() < 0.125 else 1) + ([ph[:-1]] if rng.random() < 0.25 else [])
        for part in plant:
            at = int(rng.integers(0, len(seq) + 1))
            seq[at:at] = part
        teacher.append(seq)
    return teacher, phrases, snippet_phrase.tolist(), list(range(VOCAB, VOCAB + N_PHRASES))


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch()


@pytest.fixture(scope="module")
def results() -> dict:
    """Each backend's output and benchmark, so the second test checks that both agree (a speedup counts only then)
    and says so in the C++ benchmark's extra_info, which bench.report shows."""
    return {}


def run(benchmark, batch, results, impl: str, rounds: int) -> None:
    benchmark.group = f"alignment {N_SNIPPETS} snippets"
    out = benchmark.pedantic(align.align, args=batch, kwargs=dict(impl=impl), rounds=rounds, warmup_rounds=1)
    n_tokens = sum(map(len, batch[0]))
    benchmark.extra_info.update(snippets=N_SNIPPETS, teacher_tokens=n_tokens, aligned_pairs=len(out.s_pos))
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["snippets_per_s"] = round(N_SNIPPETS / benchmark.stats.stats.mean)
    results[impl] = out, benchmark
    if len(results) == 2:
        (a, _), (b, _) = results.values()
        for f in ("student_ids", "cu_student", "s_pos", "t_pos", "cu_aligned"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        results["cpp"][1].extra_info["output_vs_reference"] = "identical"


@pytest.mark.skipif(align._align_ext is None, reason="C++ aligner not built")
def test_alignment_cpp(benchmark, batch, results):
    run(benchmark, batch, results, "cpp", rounds=50)


def test_alignment_python(benchmark, batch, results):
    run(benchmark, batch, results, "python", rounds=3)


def synthetic_cross_batch(seed: int = 0) -> list[np.ndarray]:
    """The same 64k snippets of ~50 teacher ids read by an extended tokenizer: each teacher token ends 1-8 chars
    after the previous one; the student merges the snippet's phrase (placed at a random offset) and, one time in
    three, a second pair of neighbours elsewhere into new ids, and one time in four shifts a boundary (a piece
    split differently), so pairs resume after each difference. A shared BOS (end 0) leads every snippet."""
    rng = np.random.default_rng(seed)
    t_ids, t_ends, s_ids, s_ends, cu_t, cu_s = [], [], [], [], [0], [0]
    for _ in range(N_SNIPPETS):
        n = int(rng.integers(40, 61))
        ids = [0] + ((rng.zipf(1.1, n) - 1) % VOCAB).tolist()
        ends = [0] + np.cumsum(rng.integers(1, 9, n)).tolist()
        sid, send = list(ids), list(ends)
        at = int(rng.integers(1, n - 3))
        width = int(rng.integers(2, 5))
        sid[at:at + width], send[at:at + width] = [VOCAB + at], [send[at + width - 1]]
        if rng.random() < 1 / 3 and len(sid) > 4:
            k = int(rng.integers(1, len(sid) - 1))
            sid[k:k + 2], send[k:k + 2] = [VOCAB + 1], [send[k + 1]]
        if rng.random() < 0.25 and len(sid) > 4:
            k = int(rng.integers(1, len(sid) - 2))
            if send[k + 1] - send[k - 1] > 1:
                send[k] = send[k - 1] + 1 if send[k] - send[k - 1] > 1 else send[k] + 1
        for out, vals in ((t_ids, ids), (t_ends, ends), (s_ids, sid), (s_ends, send)):
            out.extend(vals)
        cu_t.append(len(t_ids))
        cu_s.append(len(s_ids))
    return [np.asarray(a, dtype=np.int64) for a in (t_ids, cu_t, t_ends, s_ids, cu_s, s_ends)]


@pytest.fixture(scope="module")
def cross_batch():
    return synthetic_cross_batch()


def run_cross(benchmark, cross_batch, results, impl: str, rounds: int) -> None:
    benchmark.group = f"cross alignment {N_SNIPPETS} snippets"
    out = benchmark.pedantic(align.cross_align, args=cross_batch, kwargs=dict(impl=impl), rounds=rounds,
                             warmup_rounds=1)
    benchmark.extra_info.update(snippets=N_SNIPPETS, teacher_tokens=len(cross_batch[0]), aligned_pairs=len(out.s_pos))
    if benchmark.stats:
        benchmark.extra_info["snippets_per_s"] = round(N_SNIPPETS / benchmark.stats.stats.mean)
    results["cross-" + impl] = out, benchmark
    if "cross-cpp" in results and "cross-python" in results:
        for f in ("s_pos", "t_pos", "cu_aligned"):
            np.testing.assert_array_equal(getattr(results["cross-cpp"][0], f), getattr(results["cross-python"][0], f),
                                          err_msg=f)
        results["cross-cpp"][1].extra_info["output_vs_reference"] = "identical"


@pytest.mark.skipif(align._align_ext is None, reason="C++ aligner not built")
def test_cross_alignment_cpp(benchmark, cross_batch, results):
    run_cross(benchmark, cross_batch, results, "cpp", rounds=50)


def test_cross_alignment_python(benchmark, cross_batch, results):
    run_cross(benchmark, cross_batch, results, "python", rounds=3)

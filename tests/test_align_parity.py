"""The C++ aligner (csrc/align.cpp) against the Python spec align_py: random batches (hypothesis), hand-written
edge cases with known answers for both backends, and malformed input rejected with ValueError by both."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokdistill_fast import align

needs_ext = pytest.mark.skipif(align._align_ext is None, reason="C++ aligner not built (TOKDISTILL_NO_EXT=1?)")
IMPLS = ["python", pytest.param("cpp", marks=needs_ext)]
FIELDS = ["student_ids", "cu_student", "s_pos", "t_pos", "cu_aligned"]
DTYPES = {"student_ids": np.int64, "cu_student": np.int64, "s_pos": np.int32, "t_pos": np.int32,
          "cu_aligned": np.int64}


def test_extension_present_when_required():
    # `make test` and CI set TOKDISTILL_REQUIRE_EXT=1: there a missing extension is a build failure, not a skip.
    if os.environ.get("TOKDISTILL_REQUIRE_EXT") != "1":
        pytest.skip("TOKDISTILL_REQUIRE_EXT is not set")
    assert align._align_ext is not None
    assert align.resolved("auto") == "cpp"


def assert_same(a: align.Alignment, b: align.Alignment) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype == DTYPES[f], f
        np.testing.assert_array_equal(x, y, err_msg=f)


@st.composite
def batches(draw):
    """Snippets over a small alphabet (so phrases and near-misses occur by chance) with phrases planted at random
    offsets, back to back, overlapping themselves, at either end; phrases may be prefixes of each other, empty,
    or longer than their snippet; several snippets share a phrase. Ids are shifted to test the full int64 range."""
    k = draw(st.integers(1, 4))  # alphabet size
    base = draw(st.sampled_from([0, 50_000, -(2**63), 2**63 - 16]))  # new ids go up to base + 8
    ids = st.integers(0, k - 1)
    phrases: list[list[int]] = []
    for _ in range(draw(st.integers(0, 5))):
        if phrases and draw(st.booleans()):  # a prefix or an extension of an earlier phrase
            other = draw(st.sampled_from(phrases))
            phrase = other[:draw(st.integers(0, len(other)))] + draw(st.lists(ids, max_size=2))
        else:
            phrase = draw(st.lists(ids, min_size=1, max_size=5))
        phrases.append(phrase)
    teacher: list[list[int]] = []
    snippet_phrase: list[int] = []
    for _ in range(draw(st.integers(0, 8)) if phrases else 0):
        p = draw(st.integers(0, len(phrases) - 1))
        seq = draw(st.lists(ids, max_size=12))
        for _ in range(draw(st.integers(0, 3))):  # plant the snippet's phrase or another one
            q = p if draw(st.booleans()) else draw(st.integers(0, len(phrases) - 1))
            at = draw(st.integers(0, len(seq)))
            seq[at:at] = phrases[q]
        teacher.append(seq)
        snippet_phrase.append(p)
    shift = [[base + x for x in s] for s in teacher], [[base + x for x in s] for s in phrases]
    new_ids = [draw(st.sampled_from([base + k + i, 2**63 - 1 - i, -1 - i])) for i in range(len(phrases))]
    return *shift, snippet_phrase, new_ids


@needs_ext
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_cpp_matches_python_on_random_batches(case):
    assert_same(align.align(*case, impl="cpp"), align.align(*case, impl="python"))


@needs_ext
def test_cpp_matches_python_on_a_large_batch():
    # Many snippets and phrases at once (offsets across the whole packed array), ids from 3 values.
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 3, rng.integers(1, 5)).tolist() for _ in range(50)]
    sp = rng.integers(0, 50, 2000)
    teacher = []
    for p in sp:
        seq = rng.integers(0, 3, rng.integers(0, 60)).tolist()
        at = int(rng.integers(0, len(seq) + 1))
        teacher.append(seq[:at] + phrases[p] + seq[at:])
    case = teacher, phrases, sp.tolist(), list(range(100, 150))
    assert_same(align.align(*case, impl="cpp"), align.align(*case, impl="python"))


# (teacher, phrases, snippet_phrase, expected student_ids, cu_student, s_pos, t_pos, cu_aligned); new ids 90 + p.
CASES = {
    "empty batch": ([], [[7, 8]], [], [], [0], [], [], [0]),
    "no phrases, no snippets": ([], [], [], [], [0], [], [], [0]),
    "empty snippet": ([[]], [[7, 8]], [0], [], [0, 0], [], [], [0, 0]),
    "whole snippet is the phrase": ([[7, 8]], [[7, 8]], [0], [90], [0, 1], [0], [1], [0, 1]),
    "phrase at start": ([[7, 8, 3]], [[7, 8]], [0], [90, 3], [0, 2], [0, 1], [1, 2], [0, 2]),
    "phrase at end": ([[3, 7, 8]], [[7, 8]], [0], [3, 90], [0, 2], [1], [2], [0, 1]),
    "partial match at end": ([[3, 7]], [[7, 8]], [0], [3, 7], [0, 2], [], [], [0, 0]),
    "phrase longer than snippet": ([[7]], [[7, 8]], [0], [7], [0, 1], [], [], [0, 0]),
    "overlap merges greedily": ([[7, 7, 7]], [[7, 7]], [0], [90, 7], [0, 2], [0, 1], [1, 2], [0, 2]),
    "back to back": ([[7, 7, 7, 7]], [[7, 7]], [0], [90, 90], [0, 2], [0, 1], [1, 3], [0, 2]),
    "single-token phrase": ([[1, 7, 2, 7]], [[7]], [0], [1, 90, 2, 90], [0, 4], [1, 2, 3], [1, 2, 3], [0, 3]),
    "empty phrase merges nothing": ([[1, 2]], [[]], [0], [1, 2], [0, 2], [], [], [0, 0]),
    "prefix phrase vs longer phrase": ([[7, 8, 9], [7, 8, 9]], [[7, 8], [7, 8, 9]], [0, 1],
                                       [90, 9, 91], [0, 2, 3], [0, 1, 0], [1, 2, 2], [0, 2, 3]),
    "shared phrase and offsets": ([[1, 7, 8], [], [7, 8, 2, 2], [4]], [[5], [7, 8]], [1, 0, 1, 0],
                                  [1, 91, 91, 2, 2, 4], [0, 2, 2, 5, 6], [1, 0, 1, 2], [2, 1, 2, 3], [0, 1, 1, 4, 4]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_hand_written_cases(name, impl):
    teacher, phrases, sp, *expected = CASES[name]
    al = align.align(teacher, phrases, sp, [90 + p for p in range(len(phrases))], impl=impl)
    for f, want in zip(FIELDS, expected):
        assert getattr(al, f).dtype == DTYPES[f], f
        assert getattr(al, f).tolist() == want, f


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_int64_ids_survive(impl):
    lo, hi = -(2**63), 2**63 - 1
    al = align.align([[lo, hi, lo]], [[hi, lo]], [0], [hi], impl=impl)
    assert al.student_ids.tolist() == [lo, hi]


@needs_ext
def test_cpp_accepts_int32_and_strided_inputs():
    t = np.array([0, 3, 7, 8, 9, 9])[::2]  # a strided view: [0, 7, 9]
    args = [t, np.array([0, 3], dtype=np.int32), np.array([7, 9]), np.array([0, 2]), np.array([0]), np.array([99])]
    got = align.Alignment(*align._align_ext.align(*args))
    assert_same(got, align.align_py(*args))
    assert got.student_ids.tolist() == [0, 99]


def packed(**over):
    """A valid packed batch (two snippets, two phrases) with some arrays replaced."""
    args = dict(teacher_ids=np.array([1, 7, 8, 2]), cu_teacher=np.array([0, 3, 4]), phrase_ids=np.array([7, 8, 2]),
                cu_phrase=np.array([0, 2, 3]), snippet_phrase=np.array([0, 1]), phrase_new_id=np.array([90, 91]))
    args.update({k: np.asarray(v, dtype=np.int64) for k, v in over.items()})
    return args


BAD = {
    "cu_teacher not from 0": dict(cu_teacher=[1, 3, 4]),
    "cu_teacher decreasing": dict(cu_teacher=[0, 3, 2, 4], snippet_phrase=[0, 1, 0]),
    "cu_teacher short of the ids": dict(cu_teacher=[0, 3, 3]),
    "cu_teacher past the ids": dict(cu_teacher=[0, 3, 9]),
    "cu_teacher empty": dict(cu_teacher=[], snippet_phrase=[]),
    "cu_phrase past the ids": dict(cu_phrase=[0, 2, 4]),
    "cu_phrase decreasing": dict(cu_phrase=[0, 4, 3]),
    "snippet_phrase negative": dict(snippet_phrase=[0, -1]),
    "snippet_phrase too large": dict(snippet_phrase=[2, 0]),
    "snippet_phrase too short": dict(snippet_phrase=[0]),
    "phrase_new_id too short": dict(phrase_new_id=[90]),
    "2-D ids": dict(teacher_ids=[[1, 7], [8, 2]]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", BAD)
def test_malformed_input_raises_value_error(name, impl):
    fn = align.align_py if impl == "python" else lambda **kw: align._align_ext.align(**kw)
    with pytest.raises(ValueError, match="align: "):
        fn(**packed(**BAD[name]))


@needs_ext
def test_cpp_results_are_writable_numpy_views():
    # Results own their buffers through the capsule: usable by torch.from_numpy without a copy.
    out = align._align_ext.align(**packed())
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable for a in out)
    assert out[0].tolist() == [1, 90, 91]


@needs_ext
@pytest.mark.parametrize("seqs", [[], [[]], [[1, 2], [], [3]], [(5, -6), range(3)], [np.arange(4), [np.int64(7)]],
                                  [[-(2**63), 2**63 - 1]]])
def test_cpp_pack_matches_numpy_pack(seqs):
    for got, want in zip(align.pack(seqs, "cpp"), align.pack(seqs, "python")):
        assert got.dtype == want.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@needs_ext
@pytest.mark.parametrize("seqs,error", [([[2**63]], OverflowError), ([[1.5]], TypeError), ([3], TypeError),
                                        ([["7"]], TypeError)])
def test_cpp_pack_rejects_what_is_not_an_int64(seqs, error):
    with pytest.raises(error):
        align.pack(seqs, "cpp")


# Cross-tokenization alignment (align.cross_align_py and the C++ cross_align).
CROSS_FIELDS = ["s_pos", "t_pos", "cu_aligned"]


def cross(impl: str, *args):
    return align.cross_align(*args, impl=impl)


def tokenize(text: list[int], cuts: list[int], merges: dict) -> tuple[list[int], list[int]]:
    """Ids and end offsets of `text` (a list of char codes) cut after the positions in `cuts`; a piece that spans
    several chars gets an id from `merges`; one char in five of code 3 becomes two byte pieces with one end."""
    ids, ends, start = [], [], 0
    for end in sorted(set(cuts) | {len(text)}):
        if end <= start:
            continue
        piece = tuple(text[start:end])
        if len(piece) == 1 and piece[0] == 3:
            ids += [100, 101]
            ends += [end, end]
        else:
            ids.append(piece[0] if len(piece) == 1 else merges.setdefault(piece, 1_000 + len(merges)))
            ends.append(end)
        start = end
    return ids, ends


@st.composite
def cross_batches(draw):
    """Snippets of text over 4 chars cut into tokens twice: the student's cuts are the teacher's with some removed
    (merges) and some added (a different segmentation), so the two agree in places and differ in others; sometimes
    identical, empty, or differing at position 0. A shared BOS (id 7, end 0) leads one batch in two."""
    bos = draw(st.booleans())
    merges: dict = {}
    t_ids, t_ends, s_ids, s_ends, cu_t, cu_s = [], [], [], [], [0], [0]
    for _ in range(draw(st.integers(0, 6))):
        text = draw(st.lists(st.integers(0, 3), max_size=14))
        cuts = draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
        kept = [c for c in cuts if draw(st.integers(0, 3))]
        added = draw(st.lists(st.integers(0, len(text)), max_size=3))
        for ids, ends, cu, cut in ((t_ids, t_ends, cu_t, cuts), (s_ids, s_ends, cu_s, kept + added)):
            i, e = tokenize(text, cut, merges)
            ids += [7] * bos + i
            ends += [0] * bos + e
            cu.append(len(ids))
    return t_ids, cu_t, t_ends, s_ids, cu_s, s_ends


@needs_ext
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cross_batches())
def test_cross_cpp_matches_python_on_random_batches(case):
    a, b = cross("cpp", *case), cross("python", *case)
    for f in CROSS_FIELDS:
        assert getattr(a, f).dtype == getattr(b, f).dtype, f
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@given(cross_batches())
@settings(max_examples=200, deadline=None)
def test_cross_pairs_end_together_after_the_first_difference(case):
    """Properties of the spec itself: pairs end at the same offset, rise on both sides, avoid position 0 and the
    shared prefix, and each snippet that differs from the teacher has its last position paired."""
    t_ids, cu_t, t_ends, s_ids, cu_s, s_ends = (np.asarray(a, dtype=np.int64) for a in case)
    al = align.cross_align_py(t_ids, cu_t, t_ends, s_ids, cu_s, s_ends)
    for i in range(len(cu_t) - 1):
        sp = al.s_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]]
        tp = al.t_pos[al.cu_aligned[i]:al.cu_aligned[i + 1]]
        t, s = t_ids[cu_t[i]:cu_t[i + 1]], s_ids[cu_s[i]:cu_s[i + 1]]
        te, se = t_ends[cu_t[i]:cu_t[i + 1]], s_ends[cu_s[i]:cu_s[i + 1]]
        np.testing.assert_array_equal(te[tp], se[sp])
        assert (np.diff(sp) > 0).all() and (np.diff(tp) > 0).all()
        assert (sp > 0).all() and (tp > 0).all()
        same = t.tolist() == s.tolist() and te.tolist() == se.tolist()
        if len(sp):
            d = next(k for k in range(min(len(t), len(s)) + 1)
                     if k == min(len(t), len(s)) or t[k] != s[k] or te[k] != se[k])
            assert sp[0] >= d and tp[0] >= d
        elif not same and len(t) > 1 and len(s) > 1 and te[-1] == se[-1]:
            pytest.fail(f"snippet {i} differs but has no pair")
        if len(sp) and te[-1] == se[-1] and len(s) > 1:
            assert sp[-1] == len(s) - 1 and tp[-1] == len(t) - 1


# (teacher ids, teacher ends, student ids, student ends, expected s_pos, t_pos) for one snippet each.
CROSS_CASES = {
    "identical": ([7, 1, 2], [0, 2, 4], [7, 1, 2], [0, 2, 4], [], []),
    "one merge in the middle": ([7, 1, 2, 3, 4], [0, 2, 4, 6, 8], [7, 1, 90, 4], [0, 2, 6, 8], [2, 3], [3, 4]),
    "shifted boundary": ([7, 1, 2, 3], [0, 3, 5, 8], [7, 90, 91, 3], [0, 4, 5, 8], [2, 3], [2, 3]),
    "crossing pieces pair only at the end": ([7, 1, 2, 3], [0, 3, 5, 8], [7, 90, 91], [0, 4, 8], [2], [3]),
    "first token differs: position 0 never pairs": ([1, 2, 3], [2, 4, 6], [90, 3], [4, 6], [1], [2]),
    "byte pieces: the last of a character": ([7, 100, 101, 2], [0, 3, 3, 5], [7, 90, 2], [0, 3, 5], [1, 2], [2, 3]),
    "several new pieces": ([7, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [7, 90, 3, 91, 6], [0, 2, 3, 5, 6],
                           [1, 2, 3, 4], [2, 3, 5, 6]),
    "student is a prefix": ([7, 1, 2], [0, 1, 2], [7, 1], [0, 1], [], []),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CROSS_CASES)
def test_cross_hand_written_cases(name, impl):
    t, te, s, se, want_s, want_t = CROSS_CASES[name]
    al = cross(impl, t, [0, len(t)], te, s, [0, len(s)], se)
    assert al.s_pos.dtype == al.t_pos.dtype == np.int32
    assert al.s_pos.tolist() == want_s and al.t_pos.tolist() == want_t
    assert al.cu_aligned.tolist() == [0, len(want_s)] and al.student_ids.tolist() == s


def cross_packed(**over):
    """A valid cross batch (two snippets) with some arrays replaced."""
    args = dict(teacher_ids=[7, 1, 2, 7, 3], cu_teacher=[0, 3, 5], teacher_ends=[0, 2, 4, 0, 3],
                student_ids=[7, 90, 7, 3], cu_student=[0, 2, 4], student_ends=[0, 4, 0, 3])
    args.update(over)
    return {k: np.asarray(v, dtype=np.int64) for k, v in args.items()}


CROSS_BAD = {
    "cu_teacher not from 0": dict(cu_teacher=[1, 3, 5]),
    "cu_student past the ids": dict(cu_student=[0, 2, 9]),
    "cu_student decreasing": dict(cu_student=[0, 3, 2, 4], cu_teacher=[0, 3, 3, 5]),
    "cu_teacher empty": dict(cu_teacher=[]),
    "ends short of the ids": dict(teacher_ends=[0, 2, 4, 0]),
    "snippet counts differ": dict(cu_student=[0, 4]),
    "ends decreasing": dict(student_ends=[0, 4, 3, 2]),
    "2-D ends": dict(student_ends=[[0, 4], [0, 3]]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CROSS_BAD)
def test_cross_malformed_input_raises_value_error(name, impl):
    fn = align.cross_align_py if impl == "python" else align._align_ext.cross_align
    with pytest.raises(ValueError, match="cross_align: ") as py_err:
        fn(**cross_packed(**CROSS_BAD[name]))
    if impl == "cpp":  # the same message as the spec's
        with pytest.raises(ValueError) as spec_err:
            align.cross_align_py(**cross_packed(**CROSS_BAD[name]))
        assert str(py_err.value) == str(spec_err.value)


def test_cross_ends_may_fall_across_snippet_borders():
    # Each snippet's offsets restart at 0: only a decrease inside a snippet is malformed.
    al = align.cross_align_py(**cross_packed())
    assert al.s_pos.tolist() == [1] and al.t_pos.tolist() == [2]

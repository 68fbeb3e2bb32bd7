"""Stage 3: alignment maps between teacher (original subtokens) and student (one new token) sequences.

For each snippet, the student sequence is the teacher sequence with every occurrence of its assigned phrase
merged into the new token, scanning left to right and merging greedily (the reference implementation's rule).
Aligned pairs start at the first merged position: the new token pairs with the last subtoken of its phrase and
every later student position with its teacher counterpart. Earlier positions are identical in both sequences
under causal attention and carry no signal, so they are not aligned.

Everything is flat int arrays in the cu_seqlens convention (FlashAttention's varlen layout): sequence i of a
packed array `x` is x[cu[i]:cu[i + 1]]. The C++ extension (csrc/align.cpp) implements the same function; this
module's `align_py` is its specification and fallback.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np

from .config import UserInputError, compiled
from .control import observed

log = logging.getLogger(__name__)

_align_ext = compiled("_align_ext")[0]  # built from csrc/align.cpp; None: align_py below is used
_align_ext_missing = compiled("_align_ext")[1] or "not built"  # why, where _align_ext is None


@dataclass
class Alignment:
    """Packed student sequences and aligned position pairs for n snippets. Positions are within each sequence."""

    student_ids: np.ndarray  # int64 [Ns]
    cu_student: np.ndarray  # int64 [n + 1]
    s_pos: np.ndarray  # int32 [K] student position of each aligned pair
    t_pos: np.ndarray  # int32 [K] teacher position of each aligned pair
    cu_aligned: np.ndarray  # int64 [n + 1]

    @property
    def n(self) -> int:
        return len(self.cu_student) - 1

    def pair_snippet(self) -> np.ndarray:
        """[K] the snippet of each aligned pair."""
        return np.repeat(np.arange(self.n), np.diff(self.cu_aligned))

    def pair_has_next(self) -> np.ndarray:
        """[K] whether each aligned pair's student position has a next token in its snippet (an NTP target)."""
        return self.s_pos.astype(np.int64) + 1 < np.diff(self.cu_student)[self.pair_snippet()]

    def pair_next_ids(self) -> np.ndarray:
        """[K] the student id after each aligned pair's position, or its own id where its snippet ends there
        (pair_has_next says which)."""
        return self.student_ids[self.cu_student[self.pair_snippet()] + self.s_pos + self.pair_has_next()]

    def take(self, idx: np.ndarray) -> Alignment:
        """The alignment of snippets `idx` only, repacked in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        ids, cu_s = take_packed(self.student_ids, self.cu_student, idx)
        s_pos, cu_a = take_packed(self.s_pos, self.cu_aligned, idx)
        t_pos, _ = take_packed(self.t_pos, self.cu_aligned, idx)
        return Alignment(ids, cu_s, s_pos, t_pos, cu_a)

    def keep_pairs(self, keep: np.ndarray) -> Alignment:
        """The same snippets with only the aligned pairs where `keep` [K] is true."""
        return Alignment(self.student_ids, self.cu_student, self.s_pos[keep], self.t_pos[keep],
                         kept_offsets(self.cu_aligned, keep))


def cu_seqlens(lengths: np.ndarray) -> np.ndarray:
    """Cumulative lengths [0, l0, l0 + l1, ...] int64: the offsets of packed sequences (FlashAttention's cu_seqlens)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def kept_offsets(cu: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The offsets `cu` of packed sequences once only the elements where `keep` is true remain."""
    return np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))[cu]


def prefix_lengths(al: Alignment) -> np.ndarray:
    """[n] student positions before each snippet's first new token (its first aligned pair), whose tokens the
    teacher has at the same positions; 0 for a snippet without pairs."""
    has = np.diff(al.cu_aligned) > 0
    first = np.zeros(al.n, dtype=np.int64)
    first[has] = al.s_pos[al.cu_aligned[:-1][has]]
    return first


def trim_suffix(al: Alignment, teacher_ids: np.ndarray, cu_teacher: np.ndarray, keep: int | np.ndarray
                ) -> tuple[Alignment, np.ndarray, np.ndarray]:
    """Cut every snippet after its first `keep` aligned positions (student and teacher alike; an array: per
    snippet): --loss-positions and the search's proxies train on the positions right after the word, which carry
    most of the signal."""
    a_len = np.minimum(np.diff(al.cu_aligned), keep)
    cu_a = cu_seqlens(a_len)
    pick = np.repeat(al.cu_aligned[:-1], a_len) + np.arange(cu_a[-1]) - np.repeat(cu_a[:-1], a_len)
    s_pos, t_pos = al.s_pos[pick], al.t_pos[pick]
    s_len, t_len = np.diff(al.cu_student), np.diff(cu_teacher)
    if len(pick):
        has = a_len > 0
        last = np.clip(cu_a[1:] - 1, 0, None)  # each snippet's last kept pair (meaningful where has)
        s_len = np.where(has, s_pos[last] + 1, s_len)
        t_len = np.where(has, t_pos[last] + 1, t_len)
    student_ids, cu_s = _prefixes(al.student_ids, al.cu_student, s_len)
    t_ids, cu_t = _prefixes(teacher_ids, cu_teacher, t_len)
    return Alignment(student_ids, cu_s, s_pos, t_pos, cu_a), t_ids, cu_t


def pair_before_divergence(al: Alignment, teacher_ids: np.ndarray, cu_teacher: np.ndarray) -> Alignment:
    """`al` with one more pair per snippet, (d - 1, d - 1) before its first divergence d, where the sequences still
    agree (so its hidden states are the teacher's: no distillation loss) and whose next token is the first new
    piece: next-token prediction then also learns to predict it from its left context. Snippets with d < 2 (never
    position 0, the attention sink) or whose pairs already start there are left as they are."""
    n = al.n
    cu_s = al.cu_student
    m = np.minimum(np.diff(cu_s), np.diff(cu_teacher))
    seg = np.repeat(np.arange(n), m)
    pos = np.arange(int(m.sum())) - np.repeat(cu_seqlens(m)[:-1], m)
    differs = al.student_ids[cu_s[seg] + pos] != teacher_ids[cu_teacher[seg] + pos]
    d = m.copy()
    np.minimum.at(d, seg[differs], pos[differs])
    counts = np.diff(al.cu_aligned)
    first = np.zeros(n, dtype=np.int64)
    first[counts > 0] = al.s_pos[al.cu_aligned[:-1][counts > 0]]
    add = (d >= 2) & (counts > 0) & (first > d - 1)
    cu_a = cu_seqlens(counts + add)
    s_pos = np.empty(int(cu_a[-1]), dtype=al.s_pos.dtype)
    t_pos = np.empty(int(cu_a[-1]), dtype=al.t_pos.dtype)
    shift = np.repeat(np.cumsum(add), counts)  # each old pair moves by the pairs added up to its snippet
    s_pos[np.arange(len(al.s_pos)) + shift], t_pos[np.arange(len(al.t_pos)) + shift] = al.s_pos, al.t_pos
    s_pos[cu_a[:-1][add]] = t_pos[cu_a[:-1][add]] = d[add] - 1
    return Alignment(al.student_ids, cu_s, s_pos, t_pos, cu_a)


def _prefixes(flat: np.ndarray, cu: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first lens[i] values of each packed sequence, repacked."""
    new_cu = cu_seqlens(lens)
    gather = np.repeat(cu[:-1] - new_cu[:-1], lens) + np.arange(new_cu[-1])
    return flat[gather], new_cu


def take_packed(flat: np.ndarray, cu: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences `idx` of a packed array, repacked: (values, cu_seqlens)."""
    lens = cu[idx + 1] - cu[idx]
    new_cu = cu_seqlens(lens)
    gather = np.repeat(cu[idx] - new_cu[:-1], lens) + np.arange(new_cu[-1])
    return flat[gather], new_cu


def pack(seqs: list[list[int]], impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sequences of ints into (values int64, cu_seqlens int64); impl as in `align`."""
    if ran(impl) == "cpp":
        return _align_ext.pack(seqs)
    cu = cu_seqlens(np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs)))
    # fromiter over chain() converts in C: ~2x faster than a generator or np.concatenate of per-list arrays
    # (both pay per-list or per-element Python overhead) on 64k lists of ~50 ints.
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(cu[-1]))
    return flat, cu


def check_packed(teacher_ids: np.ndarray, cu_teacher: np.ndarray, phrase_ids: np.ndarray, cu_phrase: np.ndarray,
                 snippet_phrase: np.ndarray, phrase_new_id: np.ndarray) -> None:
    """Raise ValueError unless the arguments of align_py form a valid packed batch (the C++ builder checks the same:
    1-D arrays, cu arrays from 0 to the value count and non-decreasing, one phrase index in range per snippet)."""
    arrays = dict(teacher_ids=teacher_ids, cu_teacher=cu_teacher, phrase_ids=phrase_ids, cu_phrase=cu_phrase,
                  snippet_phrase=snippet_phrase, phrase_new_id=phrase_new_id)
    for name, a in arrays.items():
        if np.ndim(a) != 1:
            raise ValueError(f"align: {name} must be 1-D, got {np.ndim(a)} dimensions")
    for cu, values in (("cu_teacher", "teacher_ids"), ("cu_phrase", "phrase_ids")):
        c = arrays[cu]
        if len(c) == 0 or c[0] != 0 or c[-1] != len(arrays[values]) or (np.diff(c) < 0).any():
            raise ValueError(f"align: {cu} must run from 0 to len({values}) = {len(arrays[values])} without "
                             f"decreasing")
    n, m = len(cu_teacher) - 1, len(cu_phrase) - 1
    if len(snippet_phrase) != n or len(phrase_new_id) != m:
        raise ValueError(f"align: snippet_phrase needs {n} entries (one per snippet), got {len(snippet_phrase)}; "
                         f"phrase_new_id needs {m} (one per phrase), got {len(phrase_new_id)}")
    if n and (snippet_phrase.min() < 0 or snippet_phrase.max() >= m):
        raise ValueError(f"align: snippet_phrase holds indices outside [0, {m}) (the phrases)")


def align_py(teacher_ids: np.ndarray, cu_teacher: np.ndarray, phrase_ids: np.ndarray, cu_phrase: np.ndarray,
             snippet_phrase: np.ndarray, phrase_new_id: np.ndarray) -> Alignment:
    """The specification. Snippet i merges phrase p = snippet_phrase[i] (ids phrase_ids[cu_phrase[p]:cu_phrase[p+1]])
    into the id phrase_new_id[p]."""
    check_packed(teacher_ids, cu_teacher, phrase_ids, cu_phrase, snippet_phrase, phrase_new_id)
    student: list[int] = []
    cu_s, cu_a = [0], [0]
    s_pos: list[int] = []
    t_pos: list[int] = []
    for i in range(len(cu_teacher) - 1):
        t = teacher_ids[cu_teacher[i]:cu_teacher[i + 1]].tolist()
        p = int(snippet_phrase[i])
        phrase = phrase_ids[cu_phrase[p]:cu_phrase[p + 1]].tolist()
        m, new_id = len(phrase), int(phrase_new_id[p])
        out: list[int] = []
        src: list[int] = []  # teacher position paired with each student position
        first = -1
        j = 0
        while j < len(t):
            if m and t[j:j + m] == phrase:
                if first < 0:
                    first = len(out)
                out.append(new_id)
                src.append(j + m - 1)
                j += m
            else:
                out.append(t[j])
                src.append(j)
                j += 1
        student.extend(out)
        cu_s.append(len(student))
        if first >= 0:
            s_pos.extend(range(first, len(out)))
            t_pos.extend(src[first:])
        cu_a.append(len(s_pos))
    return Alignment(np.asarray(student, dtype=np.int64), np.asarray(cu_s, dtype=np.int64),
                     np.asarray(s_pos, dtype=np.int32), np.asarray(t_pos, dtype=np.int32),
                     np.asarray(cu_a, dtype=np.int64))


def resolved(impl: str = "auto") -> str:
    """Which implementation `impl` means on this install: auto -> cpp when the extension loaded, else python."""
    if impl == "auto":
        return "cpp" if _align_ext is not None else "python"
    if impl == "cpp" and _align_ext is None:
        raise UserInputError(f"--align-impl cpp: the C++ aligner is {_align_ext_missing} (pip install needs a "
                             "C++17 compiler); use --align-impl python")
    return impl


def ran(impl: str) -> str:
    """resolved(impl), noted as what ran (observed.py); "auto" without the extension warns once per run."""
    got = resolved(impl)
    observed.note("align", got, fallback=None if impl != "auto" or got == "cpp" else (
        f"C++ aligner {_align_ext_missing}: alignment runs in Python, 30-80x slower on 64k snippets "
        "(make bench-align); reinstall with a C++17 compiler and TOKDISTILL_REQUIRE_EXT=1"))
    return got


def align(teacher: list[list[int]] | tuple[np.ndarray, np.ndarray], phrases: list[list[int]],
          snippet_phrase: list[int], phrase_new_id: list[int], impl: str = "auto") -> Alignment:
    """Build the alignment for teacher sequences (lists, or already packed as (ids, cu_seqlens)) with the chosen
    implementation."""
    impl = ran(impl)
    teacher_ids, cu_teacher = teacher if isinstance(teacher, tuple) else pack(teacher, impl)
    phrase_ids, cu_phrase = pack(phrases, impl)
    args = (teacher_ids, cu_teacher, phrase_ids, cu_phrase, np.asarray(snippet_phrase, dtype=np.int64),
            np.asarray(phrase_new_id, dtype=np.int64))
    if impl == "cpp":
        return Alignment(*_align_ext.align(*args))
    return align_py(*args)


# Cross-tokenization alignment (bring your own tokenizer, target_tokenizer.py): the student reads the same text as
# the teacher, tokenized by another tokenizer that extends the original one, so the two sequences may differ in many
# places. Each token carries the character offset where it ends. A position is a boundary when the next token ends
# later (byte pieces of one character share their end offset: only the last of them closes the character).
# Aligned pairs are the boundaries at which both sequences end at the same offset, from the first position where
# the sequences differ (in id or end offset) on, never position 0 (the attention sink: its states are thousands of
# times larger than any other position's, NOTES.md). Before the first difference, the two are identical.


def check_cross(teacher_ids: np.ndarray, cu_teacher: np.ndarray, teacher_ends: np.ndarray, student_ids: np.ndarray,
                cu_student: np.ndarray, student_ends: np.ndarray) -> None:
    """Raise ValueError unless the arguments of cross_align_py form a valid batch (the C++ builder checks the same:
    1-D arrays, cu arrays from 0 to the id count without decreasing, one end offset per id, the same number of
    snippets on both sides, end offsets non-decreasing inside each snippet)."""
    arrays = dict(teacher_ids=teacher_ids, cu_teacher=cu_teacher, teacher_ends=teacher_ends, student_ids=student_ids,
                  cu_student=cu_student, student_ends=student_ends)
    for name, a in arrays.items():
        if np.ndim(a) != 1:
            raise ValueError(f"cross_align: {name} must be 1-D, got {np.ndim(a)} dimensions")
    for side in ("teacher", "student"):
        c, ids, ends = arrays[f"cu_{side}"], arrays[f"{side}_ids"], arrays[f"{side}_ends"]
        if len(c) == 0 or c[0] != 0 or c[-1] != len(ids) or (np.diff(c) < 0).any():
            raise ValueError(f"cross_align: cu_{side} must run from 0 to len({side}_ids) = {len(ids)} without "
                             f"decreasing")
        if len(ends) != len(ids):
            raise ValueError(f"cross_align: {side}_ends needs one offset per id ({len(ids)}), got {len(ends)}")
    if len(cu_teacher) != len(cu_student):
        raise ValueError(f"cross_align: {len(cu_teacher) - 1} teacher snippets but {len(cu_student) - 1} student "
                         f"snippets")
    for side in ("teacher", "student"):
        c, ends = arrays[f"cu_{side}"], arrays[f"{side}_ends"]
        step = np.diff(ends)
        inside = np.ones(len(step), dtype=bool)
        inside[c[1:-1][(c[1:-1] > 0) & (c[1:-1] < len(ends))] - 1] = False  # steps across snippet borders
        if (step[inside] < 0).any():
            raise ValueError(f"cross_align: {side}_ends must not decrease inside a snippet")


def cross_align_py(teacher_ids: np.ndarray, cu_teacher: np.ndarray, teacher_ends: np.ndarray,
                   student_ids: np.ndarray, cu_student: np.ndarray, student_ends: np.ndarray) -> Alignment:
    """The specification of the cross-tokenization alignment (see above); the student sequences pass through."""
    check_cross(teacher_ids, cu_teacher, teacher_ends, student_ids, cu_student, student_ends)
    s_pos: list[int] = []
    t_pos: list[int] = []
    cu_a = [0]
    for i in range(len(cu_teacher) - 1):
        t = teacher_ids[cu_teacher[i]:cu_teacher[i + 1]].tolist()
        te = teacher_ends[cu_teacher[i]:cu_teacher[i + 1]].tolist()
        s = student_ids[cu_student[i]:cu_student[i + 1]].tolist()
        se = student_ends[cu_student[i]:cu_student[i + 1]].tolist()
        d = 0
        while d < len(t) and d < len(s) and t[d] == s[d] and te[d] == se[d]:
            d += 1
        if d == len(t) == len(s):  # the same sequence: nothing to learn
            cu_a.append(len(s_pos))
            continue
        a = b = max(d, 1)
        while a < len(t) and b < len(s):
            if a + 1 < len(t) and te[a + 1] == te[a]:  # not a boundary: a later byte piece closes the character
                a += 1
            elif b + 1 < len(s) and se[b + 1] == se[b]:
                b += 1
            elif te[a] == se[b]:
                s_pos.append(b)
                t_pos.append(a)
                a += 1
                b += 1
            elif te[a] < se[b]:
                a += 1
            else:
                b += 1
        cu_a.append(len(s_pos))
    return Alignment(np.asarray(student_ids, dtype=np.int64), np.asarray(cu_student, dtype=np.int64),
                     np.asarray(s_pos, dtype=np.int32), np.asarray(t_pos, dtype=np.int32),
                     np.asarray(cu_a, dtype=np.int64))


def cross_align(teacher_ids: np.ndarray, cu_teacher: np.ndarray, teacher_ends: np.ndarray, student_ids: np.ndarray,
                cu_student: np.ndarray, student_ends: np.ndarray, impl: str = "auto") -> Alignment:
    """The cross-tokenization alignment of packed int64 arrays with the chosen implementation."""
    args = [np.asarray(a, dtype=np.int64) for a in (teacher_ids, cu_teacher, teacher_ends, student_ids, cu_student,
                                                    student_ends)]
    if resolved(impl) == "cpp":
        s_pos, t_pos, cu_a = _align_ext.cross_align(*args)
        return Alignment(args[3], args[4], s_pos, t_pos, cu_a)
    return cross_align_py(*args)

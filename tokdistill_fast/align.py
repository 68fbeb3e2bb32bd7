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

import logging
from dataclasses import dataclass

import numpy as np

from .config import UserInputError

log = logging.getLogger(__name__)

try:
    from tokdistill_fast import _align_ext  # built from csrc/align.cpp
except ImportError:  # not compiled: align_py below is used
    _align_ext = None


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


def pack(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sequences into (values int64, cu_seqlens int64)."""
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=cu[1:])
    flat = np.fromiter((x for s in seqs for x in s), dtype=np.int64, count=int(cu[-1]))
    return flat, cu


def align_py(teacher_ids: np.ndarray, cu_teacher: np.ndarray, phrase_ids: np.ndarray, cu_phrase: np.ndarray,
             snippet_phrase: np.ndarray, phrase_new_id: np.ndarray) -> Alignment:
    """The specification. Snippet i merges phrase p = snippet_phrase[i] (ids phrase_ids[cu_phrase[p]:cu_phrase[p+1]])
    into the id phrase_new_id[p]."""
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
        raise UserInputError("--align-impl cpp: the C++ aligner is not built (pip install needs a C++17 compiler); "
                             "use --align-impl python")
    return impl


def align(teacher: list[list[int]], phrases: list[list[int]], snippet_phrase: list[int], phrase_new_id: list[int],
          impl: str = "auto") -> Alignment:
    """Build the alignment for a list of teacher sequences with the chosen implementation."""
    teacher_ids, cu_teacher = pack(teacher)
    phrase_ids, cu_phrase = pack(phrases)
    args = (teacher_ids, cu_teacher, phrase_ids, cu_phrase, np.asarray(snippet_phrase, dtype=np.int64),
            np.asarray(phrase_new_id, dtype=np.int64))
    if resolved(impl) == "cpp":
        return Alignment(*_align_ext.align(*args))
    return align_py(*args)

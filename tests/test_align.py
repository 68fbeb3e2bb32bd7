"""Alignment maps on hand-checked cases (the Python spec; the C++ parity tests live in test_align_parity.py)."""

import numpy as np

from tokdistill_fast import align


def run(teacher, phrase, new_id=99, impl="python"):
    al = align.align([teacher], [phrase], [0], [new_id], impl)
    return al.student_ids.tolist(), al.s_pos.tolist(), al.t_pos.tolist()


def test_single_occurrence_mid_sequence():
    # BOS 5 6 [7 8] 9 -> BOS 5 6 NEW 9; aligned from NEW: (3 <-> 4), (4 <-> 5)
    assert run([1, 5, 6, 7, 8, 9], [7, 8]) == ([1, 5, 6, 99, 9], [3, 4], [4, 5])


def test_phrase_at_end_and_start():
    assert run([7, 8], [7, 8]) == ([99], [0], [1])
    assert run([3, 7, 8], [7, 8]) == ([3, 99], [1], [2])


def test_two_occurrences_and_partial_match():
    # 7 8 3 7 3 7 8 -> NEW 3 7 3 NEW
    ids, s, t = run([7, 8, 3, 7, 3, 7, 8], [7, 8])
    assert ids == [99, 3, 7, 3, 99]
    assert s == [0, 1, 2, 3, 4] and t == [1, 2, 3, 4, 6]


def test_overlapping_occurrences_merge_greedily():
    # phrase 7 7 in 7 7 7: greedy left to right merges the first pair only
    assert run([7, 7, 7], [7, 7]) == ([99, 7], [0, 1], [1, 2])


def test_no_occurrence_gives_no_pairs():
    ids, s, t = run([1, 2, 3], [7, 8])
    assert ids == [1, 2, 3] and s == [] and t == []


def test_batch_offsets():
    al = align.align([[1, 7, 8], [7, 8, 2, 2], [4]], [[7, 8]], [0, 0, 0], [99], "python")
    assert al.cu_student.tolist() == [0, 2, 5, 6]
    assert al.cu_aligned.tolist() == [0, 1, 4, 4]
    np.testing.assert_array_equal(al.t_pos, [2, 1, 2, 3])


def test_trim_suffix_keeps_the_first_pairs_and_cuts_both_sequences_after_them():
    # snippet 0: 1 [7 8] 3 4 5 -> 1 NEW 3 4 5 (pairs 1<->2, 2<->3, 3<->4, 4<->5); snippet 1: 3 [7 8] -> 3 NEW
    teacher = [[1, 7, 8, 3, 4, 5], [3, 7, 8]]
    al = align.align(teacher, [[7, 8]], [0, 0], [99], "python")
    t_ids, cu_t = align.pack(teacher, "python")
    cut, t_cut, cu_cut = align.trim_suffix(al, t_ids, cu_t, 2)
    assert cut.s_pos.tolist() == [1, 2, 1] and cut.t_pos.tolist() == [2, 3, 2]
    assert cut.cu_aligned.tolist() == [0, 2, 3]
    assert cut.student_ids.tolist() == [1, 99, 3, 3, 99] and cut.cu_student.tolist() == [0, 3, 5]
    assert t_cut.tolist() == [1, 7, 8, 3, 3, 7, 8] and cu_cut.tolist() == [0, 4, 7]


def test_align_impl_cpp_without_the_extension_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    """--align-impl cpp where the aligner did not build is refused before the model loads (a model path that does
    not exist is not reached), for distill and eval alike; before, after the corpus search."""
    import importlib

    from tokdistill_fast import align
    from tokdistill_fast.cli import main
    from tokdistill_fast.config import compiled

    monkeypatch.setattr(align, "_align_ext", None)
    text = tmp_path / "t.txt"
    text.write_text("a palatable soup\n")
    for run in (["distill", "--model", str(tmp_path / "nowhere"), "--new-tokens", str(text), "--corpus", str(text),
                 "--out", str(tmp_path / "o")],
                ["eval", "--original", str(tmp_path / "nowhere"), "--adapted", str(tmp_path / "nowhere"),
                 "--heldout", str(text), "--out", str(tmp_path / "e.json")]):
        assert main(["-q", *run, "--align-impl", "cpp"]) == 2
        assert "--align-impl cpp: the C++ aligner is not built" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # a file that is there but cannot load (another ABI, a cut file) says so, with the loader's reason
    def cut(name):
        raise ImportError(f"{name}.so: file too short")

    with monkeypatch.context() as m:  # what config.compiled says of a file that is there and cannot load
        m.setattr(importlib, "import_module", cut)
        compiled.cache_clear()
        monkeypatch.setattr(align, "_align_ext_missing", compiled("_align_ext")[1])
    compiled.cache_clear()
    assert main(["-q", "eval", "--original", "x", "--adapted", "x", "--heldout", str(text), "--out",
                 str(tmp_path / "e.json"), "--align-impl", "cpp"]) == 2
    assert "aligner is built but cannot be loaded (tokdistill_fast._align_ext.so: file too short)" in \
        capsys.readouterr().err

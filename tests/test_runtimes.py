"""The runtime comparison's bookkeeping (runtimes.py) on synthetic ids; the comparisons themselves need llama.cpp's
tools and run in `make test-downstream`."""

from tokdistill_fast.tools import runtimes


def test_agreement_counts_matches_and_sets_aside_original_differences(tokenizers_by_kind):
    tok = tokenizers_by_kind["bytelevel"]
    texts = [("with", "the cook"), ("with", "a cook"), ("without", "soup"), ("without", "green")]
    got, want = [[1, 2], [3], [4], [6]], [[1, 2], [5], [4], [7]]
    agree = runtimes.agreement(texts, got, want, tok, base_same=[True, True, True, False])
    assert agree.compared == {"with": 2, "without": 1} and agree.matched == {"with": 1, "without": 1}
    assert agree.original_differs == {"without": 1} and not agree.passed and len(agree.examples) == 1
    rows = runtimes.table({"out": agree}).splitlines()
    assert rows[2:] == ["| out | with | 1/2 | 0 |", "| out | without | 1/1 | 1 |"]
    assert runtimes.agreement(texts, want, want, tok).passed


def test_without_the_original_only_differences_without_new_ids_are_set_aside():
    """A text both runtimes read without a new id, yet apart, is the original vocabulary's own difference (set
    aside, as --original would show); a difference where either side reads a new id is compared and fails."""
    new = {100, 101}
    got, want = [[1, 2], [1, 2], [100, 2], [3, 4], [5]], [[1, 2], [3], [1, 2], [3, 100], [5]]
    assert runtimes.without_new_ids(got, want, new) == [True, False, True, True, True]


def test_sentence_set_puts_every_word_in_every_context():
    texts = runtimes.sentence_set(["palatable", "spill the beans"])
    cats = {c for c, _ in texts}
    assert {"after a space", "start of text", "after a newline", "after punctuation", "inside longer words",
            "without new words"} == cats
    assert sum("spill the beans" in t for _, t in texts) == 5
    assert [t for c, t in texts if c == "start of text"] == ["palatable comes first.", "spill the beans comes first."]

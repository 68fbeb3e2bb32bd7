"""Streaming retrieval against its spec: whole documents searched one at a time (the pre-streaming algorithm).
Chunks as small as a few bytes force documents, separators, hits and UTF-8 characters across chunk boundaries."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import shutil
import stat

import pytest
from conftest import respelling_suffix
from hypothesis import given, settings
from hypothesis import strategies as st

from tokdistill_fast.config import UserInputError
from tokdistill_fast.contexts import (
    WORD_CHAR,
    Extended,
    Hit,
    end_before_unmerged,
    end_before_word,
    find_hits,
    left_context,
    place_window,
    retrieve,
    split_inside_words,
    start_id,
)
from tokdistill_fast.corpus import DOC_SPLIT, Corpus, corpus_files, iter_documents
from tokdistill_fast.extend import extend_tokenizer
from tokdistill_fast.tokens import NewToken, plan_new_tokens, spaceless

FORMS = [" palatable", " spill the beans", " bivalve", " ün", "ab", "パッケージ"]


def toks(forms=FORMS) -> list[NewToken]:
    return [NewToken(f.strip(), f, [0, 1]) for f in forms]


def find_hits_ref(documents: list[str], tokens: list[NewToken], keep: int, window: int, seed: int):
    """The spec: each whole document searched on its own, hits in order, reservoir sample per token; also the
    matches inside longer words per token (a bare form after a space is the running-text form's; a form written
    without spaces stands wherever it occurs)."""
    draw = random.Random(seed).random
    kept: list[list[Hit]] = [[] for _ in tokens]
    counts, inside = [0] * len(tokens), [0] * len(tokens)
    for doc in documents:
        found = []
        for i, tok in enumerate(tokens):
            at = doc.find(tok.form)
            while at != -1:
                found.append((at + len(tok.form), -len(tok.form), i, at))
                at = doc.find(tok.form, at + 1)
        for end, _, i, start in sorted(found):  # Aho-Corasick order: by end, longer match first
            bare = None if spaceless(tokens[i].form) else tokens[i].form[0] != " "
            if bare and start > 0 and doc[start - 1] == " ":
                continue  # after a space, where " word" is the token
            if bare is not None and (end < len(doc) and WORD_CHAR.match(doc, end)
                                     or bare and start > 0 and WORD_CHAR.match(doc, start - 1)):
                inside[i] += 1
                continue
            counts[i] += 1
            slot = len(kept[i]) if len(kept[i]) < keep else int(draw() * counts[i])
            if slot < keep:
                lo, hi = max(0, start - window), min(len(doc), end + window)
                hit = Hit(doc[lo:hi], start - lo, end - lo, lo == 0, hi == len(doc))
                kept[i][slot:slot + 1] = [hit]
    return kept, counts, inside


def assert_same(corpus: Corpus, documents: list[str], keep: int = 3, window: int = 9, seed: int = 0):
    got, stats = find_hits(corpus, toks(), keep, window, seed)
    want, counts, inside = find_hits_ref(documents, toks(), keep, window, seed)
    assert (stats.hits, stats.inside) == (counts, inside)
    assert got == want
    return stats


def text_docs(raw: str) -> list[str]:
    return DOC_SPLIT.split(raw.replace("\r\n", "\n").replace("\r", "\n"))


TRICKY = ("x palatable\n\n palatable \n \t\n\n\n palatable palatableness spill the beans. ün ün のパッケージを\n"
          " bivalve" * 3 + "\r\n\r\nab ab-ab cab abc\n" + "long line palatable " * 40 + "\n\n\n"
          + " ün bivalve" * 30 + "\nend ab")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 13, 64, 1 << 20])
def test_text_streaming_equals_whole_file(tmp_path, chunk):
    path = tmp_path / "c.txt"
    path.write_bytes(TRICKY.encode("utf-8"))
    stats = assert_same(Corpus([path], chunk=chunk), text_docs(TRICKY))
    assert sum(stats.hits) > 100 and stats.inside[0] == 3 and stats.inside[4] > 40  # palatableness; "ab" in cab,
    # abc and every "palatable"
    assert stats.hits[5] == 3 and stats.inside[5] == 0  # between Japanese letters
    assert stats.chars == sum(map(len, text_docs(TRICKY)))
    assert list(iter_documents([path])) == text_docs(TRICKY)  # `select` sees the same documents


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(["palatable", " palatable", "spill the beans", "ün", " ", "\n", "\n\n",
                                       " \t", "ab", "x", "é", "\r\n", "bivalve", "パッケージ", "の"]), max_size=60),
       chunk=st.integers(1, 24), keep=st.integers(1, 4), window=st.integers(0, 12))
def test_streaming_equals_spec_on_random_text(tmp_path_factory, parts, chunk, keep, window):
    raw = "".join(parts)
    path = tmp_path_factory.mktemp("h") / "c.txt"
    path.write_bytes(raw.encode("utf-8"))
    got, stats = find_hits(Corpus([path], chunk=chunk), toks(), keep, window, seed=1)
    want, counts, inside = find_hits_ref(text_docs(raw), toks(), keep, window, seed=1)
    assert (got, stats.hits, stats.inside) == (want, counts, inside)


def test_jsonl_records_are_documents_even_with_blank_lines(tmp_path):
    docs = ["a palatable\n\nsoup", "", " spill the beans " * 30, "ün palatable"]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(docs)) + "\n",
                    encoding="utf-8")
    for chunk in (4, 1 << 20):
        assert_same(Corpus([path], chunk=chunk), docs)


@pytest.mark.parametrize("line, message", [("not json", ":2: not a JSON object"), ('{"txt": "a"}', ":2: not a"),
                                           ('{"text": 3}', "string 'text'"), ("[1]", ":2:")])
def test_bad_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=message):
        list(Corpus([path]))


def test_parquet_text_column_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"doc {k} palatable ün" + " bivalve" * (k % 7) for k in range(700)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(701)), "text": docs[:350] + [None] + docs[350:]}), path,
                   row_group_size=200)
    corpus = Corpus([path], chunk=16)
    assert_same(corpus, docs)
    assert 0 < corpus.bytes_read <= path.stat().st_size
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(UserInputError, match="no string column 'text'.*body"):
        list(Corpus([bad]))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match="junk.parquet"):
        list(Corpus([tmp_path / "junk.parquet"]))


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".dz", gzip.compress),
                                             (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_compressed_files_read_as_the_format_inside(tmp_path, suffix, compress):
    """gzip (and dictzip's .dz), bzip2 and xz files stream as the text or JSON lines they hold; directories list
    them; progress and --max-corpus-bytes count the bytes on disk; a cut-off file is a one-line error."""
    text = tmp_path / ("c.txt" + suffix)
    text.write_bytes(compress(TRICKY.encode("utf-8")))
    corpus = Corpus([text], chunk=5)
    assert_same(corpus, text_docs(TRICKY))
    assert corpus.bytes_read == text.stat().st_size
    docs = ["a palatable\n\nsoup", " spill the beans " * 30]
    lines = tmp_path / ("c.jsonl" + suffix)
    lines.write_bytes(compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8")))
    assert_same(Corpus([lines]), docs)
    (tmp_path / ("notes.bin" + suffix)).write_bytes(compress(b"x"))
    assert corpus_files([tmp_path]) == [lines, text]
    cut = tmp_path / ("cut.txt" + suffix)
    cut.write_bytes(text.read_bytes()[:len(text.read_bytes()) // 2])
    with pytest.raises(UserInputError, match="cut.txt.*cannot read it"):
        list(Corpus([cut]))
    bad = tmp_path / ("bad.txt" + suffix)  # a valid start, then bytes that are no stream (zlib's own error)
    head = compress(("palatable soup " * 400).encode())
    bad.write_bytes(head[:len(head) // 2] + bytes(range(256)) * 8)
    with pytest.raises(UserInputError, match="bad.txt.*cannot read it"):
        list(Corpus([bad]))


def test_directories_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b.txt", "sub/a.jsonl", "c.md", "notes.bin", ".hidden.txt", ".cache/x.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n', encoding="utf-8")
    assert corpus_files([tmp_path]) == [tmp_path / "b.txt", tmp_path / "c.md", tmp_path / "sub/a.jsonl"]
    assert corpus_files([tmp_path / "*.txt", tmp_path / "b.txt"]) == [tmp_path / "b.txt"]
    assert corpus_files([str(tmp_path / "**" / "*.jsonl")]) == [tmp_path / "sub/a.jsonl"]
    assert corpus_files([tmp_path / "notes.bin"]) == [tmp_path / "notes.bin"]  # named files: any suffix
    with pytest.raises(UserInputError, match="matches no file"):
        corpus_files([tmp_path / "*.parquet"])
    with pytest.raises(UserInputError, match="no such file"):
        corpus_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no"):
        corpus_files([tmp_path / "empty"])


def test_many_files_concatenate_documents(tmp_path):
    raws = ["a palatable\n\nb", "palatable ün", "\n\n bivalve"]
    for k, raw in enumerate(raws):
        (tmp_path / f"{k}.txt").write_text(raw, encoding="utf-8")
    assert_same(Corpus([tmp_path], chunk=3), [d for raw in raws for d in text_docs(raw)])


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with a BOM: not part of the first document (or of the first JSON line)."""
    text, lines = tmp_path / "bom.txt", tmp_path / "bom.jsonl"
    text.write_bytes(b"\xef\xbb\xbf" + TRICKY.encode("utf-8"))
    lines.write_bytes(b"\xef\xbb\xbf" + b'{"text": "palatable soup"}\n')
    for chunk in (1, 2, 5, 1 << 20):
        assert_same(Corpus([text], chunk=chunk), text_docs(TRICKY))
    assert_same(Corpus([lines]), ["palatable soup"])
    text.write_bytes(b"\xef\xbb\xbfab\xe9cd\n")  # the error names the file's own byte offset, BOM included
    for chunk in (1, 4, 1 << 20):
        with pytest.raises(UserInputError, match="at byte 5"):
            list(Corpus([text], chunk=chunk))


def test_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 palatable\n".encode("latin-1") * 10)
    with pytest.raises(UserInputError, match="latin1.txt: not UTF-8 text .* at byte 3"):
        list(Corpus([path], chunk=4))
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    jsonl = path.rename(tmp_path / "latin1.jsonl")
    with pytest.raises(UserInputError, match="latin1.jsonl:2: not UTF-8"):
        list(Corpus([jsonl]))


def test_stop_when_full_and_max_bytes_end_the_pass_early(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("x palatable y ün bivalve (ab spill the beans のパッケージを\n\n" * 500), encoding="utf-8")
    size = path.stat().st_size
    _, whole = find_hits(Corpus([path], chunk=256), toks(), 4, 20, 0)
    assert whole.stopped_early is None and whole.hits == [500] * 6
    kept, early = find_hits(Corpus([path], chunk=256), toks(), 4, 20, 0, stop_when_full=True)
    assert early.stopped_early == "full" and all(len(k) == 4 for k in kept)
    assert early.chars < size // 10
    corpus = Corpus([path], max_bytes=1000, chunk=256)
    _, capped = find_hits(corpus, toks(), 4, 20, 0)
    assert corpus.truncated and corpus.bytes_read == 1000
    assert 0 < capped.hits[0] < 30


@pytest.mark.parametrize("compress", [False, True])
def test_max_bytes_reads_up_to_the_limit(tmp_path, compress):
    """A limit under one chunk still reads the text before it: every document there, the one it cuts up to the cut
    (before, a read of a whole chunk passed the limit and the pass stopped after the first document). A compressed
    file stops at the first chunk that passes it; JSON lines at a whole line."""
    import gzip

    docs = [f"document {i} palatable {'y' * 40}" for i in range(400)]
    text = "\n\n".join(docs) + "\n"
    path = tmp_path / ("c.txt.gz" if compress else "c.txt")
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    limit = 5000 if not compress else 500
    corpus = Corpus([path], max_bytes=limit, chunk=1 << 20)
    got = [piece.text.strip() for piece in corpus]
    assert corpus.truncated == (not compress)  # the compressed file is under one chunk: read whole
    if compress:
        assert got == docs
    else:  # every document before the limit, then the one it cuts up to its last whole word before the limit
        cut = text[:limit].split("\n\n")[-1]
        assert corpus.bytes_read == limit and got[:-1] == docs[:len(got) - 1] and len(got) > 50
        assert got[-1] == cut[:cut.rfind(" ")] and docs[len(got) - 1].startswith(cut)
        whole = Corpus([path], max_bytes=len(text.encode()))  # a limit at the file's end ends it as the file does
        assert [p.last for p in whole][-1] and not whole.truncated
        path.with_name("d.txt").write_text("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu\n")
        two = Corpus([path, path.with_name("d.txt")], max_bytes=len(text.encode()) + 50)  # the cut in a later file
        assert [(p.text, p.last) for p in two][-1] == ("alpha beta gamma delta epsilon zeta eta theta", False)
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = Corpus([lines], max_bytes=limit)
    got = [piece.text for piece in corpus]
    assert corpus.truncated and got == docs[:len(got)] and 0 < corpus.bytes_read - limit < 100


def test_size_option():
    import argparse

    from tokdistill_fast.cli import _size

    assert (_size("2G"), _size("500m"), _size("1.5K"), _size("123")) == (2 * 2**30, 500 * 2**20, 1536, 123)
    with pytest.raises(argparse.ArgumentTypeError):
        _size("lots")


def test_cli_rejects_a_bad_corpus_before_loading_the_model(tmp_path, capsys):
    from tokdistill_fast.cli import main

    code = main(["distill", "--model", str(tmp_path / "no-model"), "--new-tokens", "w.txt", "--corpus",
                 str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "out")])
    assert code == 2 and "matches no file" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(left=st.integers(0, 60), word=st.integers(1, 6), right=st.integers(0, 60), budget=st.integers(4, 60),
       cap=st.one_of(st.none(), st.integers(0, 30)))
def test_place_window_keeps_the_budget_and_the_cap(left, word, right, budget, cap):
    before, after = place_window(left, word, right, budget, cap)
    limit = left if cap is None else min(left, cap)
    assert 0 <= before <= limit and 0 <= after <= right
    assert before + word + after <= max(budget, word)
    # nothing is left unused that the budget and the text allow
    assert before == limit or after == right or before + word + after >= budget
    if cap is not None:  # a cap only moves budget to after the word
        free_before, free_after = place_window(left, word, right, budget)
        assert before <= free_before and after >= free_after


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 3), min_size=1, max_size=30), sub=st.lists(st.integers(0, 3), min_size=1,
       max_size=4), end=st.integers(0, 30), after=st.integers(0, 30))
def test_end_before_word_never_cuts_an_occurrence(ids, sub, end, after):
    end, n = min(end, len(ids)), len(sub)
    after = min(after, len(ids) - end)

    def cuts(a: int) -> bool:  # the window ids[:end + a] ends inside an occurrence that the ids continue
        stop = end + a
        return any(ids[stop - k:stop] == sub[:k] and ids[stop:stop + n - k] == sub[k:k + len(ids) - stop]
                   for k in range(1, min(n - 1, a) + 1))

    got = end_before_word(ids, end, after, sub)
    assert 0 <= got <= after and not cuts(got)
    assert (got == after) == (not cuts(after))


def test_windows_end_before_a_word_they_would_cut(tokenizers_by_kind, tmp_path, monkeypatch):
    """A window whose end falls inside a later occurrence of its word ends before that occurrence: the extended
    tokenizer reads the whole word as the new token, so the positions of its first subtokens never occur (the
    held-out measure read up to 8 nats of KL a pair there). With the cut left in, some windows end inside it."""
    from tokdistill_fast import contexts

    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["palatable"], add_variants=False)
    sub = planned[0].sub_ids
    assert len(sub) > 1
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"{'so ' * k}{'palatable, ' * 6}said the cook." for k in range(6)),
                      encoding="utf-8")

    def cut(snippets):
        return sum(any(s.ids[-k:] == sub[:k] for k in range(1, len(sub))) for s in snippets)

    lengths = range(len(sub) + 2, 3 * len(sub))
    kept = [retrieve([corpus], tok, planned, 25, n, 0, start_id(tok))[0] for n in lengths]
    assert sum(map(len, kept)) > 50 and sum(map(cut, kept)) == 0
    monkeypatch.setattr(contexts, "end_before_word", lambda ids, end, after, sub: after)
    assert sum(cut(retrieve([corpus], tok, planned, 25, n, 0, start_id(tok))[0]) for n in lengths) > 0


def test_end_before_unmerged_stops_at_the_first_occurrence_the_subtokens_do_not_spell():
    ids = [5, 1, 2, 7, 1, 2, 8, 1, 3, 9]  # the word is [1, 2]; ids 7-9 end at characters 10, 20, ..., 100
    ends = [10 * (k + 1) for k in range(len(ids))]
    assert end_before_unmerged(ids, ends, 3, 7, [1, 2], [10, 40, 70]) == 4  # 70: inside id 7 ([1, 3]), not [1, 2]
    assert end_before_unmerged(ids, ends, 3, 7, [1, 2], [10, 40]) == 7  # 40 is the merge's own [1, 2]
    assert end_before_unmerged(ids, ends, 3, 3, [1, 2], [75]) == 3  # past the window's end
    assert end_before_unmerged(ids, ends, 3, 7, [1, 2], [35]) == 0  # inside id 3, which spells 7, 1: not the word


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_heldout_windows_end_before_an_occurrence_only_the_extended_tokenizer_reads(tokenizers_by_kind, tmp_path,
                                                                                    kind):
    """An added token matches inside longer words, where the original tokenizer can spell the text otherwise
    (" commit-graph" in " commit-graphs": " commit", "-", "graphs"), so the merge of held-out windows misses the
    occurrence. Given the extended tokenizer, a window ends before it; without it, windows run through it."""
    tok = tokenizers_by_kind[kind]
    planned, _ = plan_new_tokens(tok, ["palatable"], add_variants=False)
    suffix = respelling_suffix(tok, " palatable")
    extended = Extended(extend_tokenizer(tok, planned, "added"), [frozenset({planned[0].new_id})])
    assert planned[0].new_id in extended.tokenizer(" palatable" + suffix, add_special_tokens=False)["input_ids"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"{'so ' * k}the palatable dish and the palatable{suffix} one, said the cook."
                                   for k in range(8)), encoding="utf-8")

    def occurrences(snippets) -> list[int]:
        return [tok.decode(s.ids).count("palatable") for s in snippets]

    ended = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok), extended=extended)[0]
    through = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok))[0]
    assert len(ended) == len(through) == 8
    assert occurrences(ended) == [1] * 8 and occurrences(through) == [2] * 8


@pytest.mark.parametrize("listed", ["NFC", "NFD"])
def test_other_normalizations_are_counted_apart_and_not_kept(listed):
    """The same text composed or decomposed ("é" or "e" + U+0301) is other text to a tokenizer: its occurrences
    are counted apart (other_form), never kept as hits, and inside longer words not counted at all."""
    import unicodedata

    form, other = (unicodedata.normalize(f, " café") for f in (listed, "NFD" if listed == "NFC" else "NFC"))
    docs = [f"A{form} here,{other} there,{other}s inside and{other}.", f"And{form} again."]
    hits, stats = find_hits([(d, True, True) for d in docs], [NewToken("café", form, [0, 1])], 5, 10, 0)
    assert (stats.hits, stats.inside, stats.other_form) == ([2], [0], [2])
    assert [h.text[h.start:h.end] for h in hits[0]] == [form, form]
    for cut in range(1, len(docs[0])):  # a document read in two pieces counts what it counts whole
        pieces = [(docs[0][:cut], True, False), (docs[0][cut:], False, True), (docs[1], True, True)]
        assert find_hits(pieces, [NewToken("café", form, [0, 1])], 5, 10, 0)[1].other_form == [2]


def test_retrieve_warns_where_the_output_tokenizer_reads_another_normalization_apart(tokenizers_by_kind, tmp_path,
                                                                                      caplog):
    """retrieve() names the words the corpus also writes decomposed, with their counts, in the log and in its
    stats; not where the output tokenizer emits the word's id on that text too (one that normalizes first)."""
    import logging
    import unicodedata

    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["café"], add_variants=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"{'so ' * k}the café and the{unicodedata.normalize('NFD', ' café')} one."
                                   for k in range(4)), encoding="utf-8")
    extended = Extended(extend_tokenizer(tok, planned, "added"), [frozenset({planned[0].new_id})])
    with caplog.at_level(logging.WARNING, logger="tokdistill_fast.contexts"):
        snippets, stats, _ = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok), extended=extended)
    assert (len(snippets), stats.hits, stats.other_form) == (4, [4], [4])
    assert "1 word(s) also occur written in another Unicode normalization" in caplog.text and "'café' 4" in caplog.text

    def normalizing(texts, **kw):
        return extended.tokenizer([unicodedata.normalize("NFC", t) for t in texts] if isinstance(texts, list)
                                  else unicodedata.normalize("NFC", texts), **kw)

    caplog.clear()
    _, stats, _ = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok), extended=extended._replace(
        tokenizer=normalizing))
    assert stats.other_form == [0] and "Unicode normalization" not in caplog.text


def test_left_context_caps_the_tokens_before_the_word(tokenizers_by_kind, corpus_file):
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["palatable", "bivalve"], add_variants=False)
    start = start_id(tok)
    centred, _, _ = retrieve([corpus_file], tok, planned, 25, 30, 0, start)
    capped, _, _ = retrieve([corpus_file], tok, planned, 25, 30, 0, start, max_before=3)

    def before_word(s):
        sub = planned[s.token].sub_ids
        return next(k for k in range(len(s.ids)) if s.ids[k:k + len(sub)] == sub) - (start is not None)

    assert len(capped) == len(centred) > 10
    assert max(before_word(s) for s in capped) <= 3 < max(before_word(s) for s in centred)
    for c, w in zip(capped, centred):  # the same hits, in order: the budget moves to after the word
        assert c.token == w.token and len(c.ids) <= 30
        assert len(c.ids) - before_word(c) >= len(w.ids) - before_word(w)


class CharsPerToken:
    """A tokenizer stand-in that reads `n` characters a token."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[0] * -(-len(t) // self.n) for t in texts]}


@pytest.mark.parametrize("per_token, tokens", [(5, 8), (4, 8), (3, 9), (2, 13), (1, 24)])
def test_auto_left_context_holds_characters_not_tokens(per_token, tokens):
    """auto: 8 tokens where they hold LEFT_CONTEXT_CHARS characters (English), more where the tokenizer reads
    fewer characters a token, as many as hold that many, at most LEFT_CONTEXT_MAX; a number or centred as given."""
    hits = [[Hit("x" * 600, 0, 1, False, False)] * 1000] * 3
    assert left_context(CharsPerToken(per_token), hits, "auto") == (tokens, per_token)
    assert left_context(CharsPerToken(1), hits, 5) == (5, None)
    assert left_context(CharsPerToken(1), hits, None) == (None, None)
    assert left_context(CharsPerToken(1), [], "auto") == (8, None)


def test_auto_left_context_follows_the_corpus_script(tokenizers_by_kind, corpus_file, tmp_path):
    """A tokenizer that reads Devanagari byte by byte keeps 24 tokens before the word, where English text keeps 8;
    auto cuts the same snippets as its resolved count, and retrieve's stats say which it was."""
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["palatable"], add_variants=False)
    start = start_id(tok)
    marathi = tmp_path / "mr.txt"
    marathi.write_text("\n\n".join("फाइल उघडण्यासाठी मेनू वापरा " * 6 + "palatable " + "आणि जतन करा " * 6
                                    for _ in range(5)), encoding="utf-8")
    sub = planned[0].sub_ids
    for corpus, tokens in ((marathi, 24), (corpus_file, None)):
        auto, stats, _ = retrieve([corpus], tok, planned, 25, 40, 0, start, max_before="auto")
        assert stats.left_context == (tokens or stats.left_context) and stats.chars_per_token > 0
        fixed, again, _ = retrieve([corpus], tok, planned, 25, 40, 0, start, max_before=stats.left_context)
        assert [s.ids for s in auto] == [s.ids for s in fixed] and again.chars_per_token is None
        before = [next(k for k in range(len(s.ids)) if s.ids[k:k + len(sub)] == sub) - 1 for s in auto]
        assert max(before) <= stats.left_context and (tokens is None or max(before) > 8)


def test_left_context_is_checked():
    from tokdistill_fast.config import DistillConfig

    with pytest.raises(UserInputError, match="--left-context must be 0 or more"):
        DistillConfig(left_context=-1).validate()
    with pytest.raises(UserInputError, match="centred or auto, not 'wide'"):
        DistillConfig(left_context="wide").validate()
    DistillConfig(left_context=8, target_tokenizer="t").validate()  # swaps cap their windows alike
    DistillConfig(left_context="auto").validate()


def documents(corpus) -> list[str]:
    """The documents a demo corpus builder wrote (one per paragraph)."""
    return corpus.read_text(encoding="utf-8").strip().split("\n\n")


def test_fortunes_corpus_keeps_one_document_per_fortune(tmp_path, monkeypatch):
    """The untuned check corpus of `demo prepare --corpora`: fortunes split at '%' lines, whitespace folded, short
    entries and the ASCII-art files left out (the package's files stand in a temporary tree)."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "fortunes"
    root.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root)
    (root / "people").write_text("A man of\n   words and not of deeds\nis like a garden full of weeds.\n%\nShort.\n%\n"
                                 "Never put off till tomorrow what you can do the day after tomorrow.\n"
                                 "\t\t-- Mark Twain\n")
    (root / "art").write_text("  /\\_/\\  a cat drawn with characters, many of them, long enough\n%\n")
    (root / "people.dat").write_bytes(b"\0\1binary index")
    out = corpora.fortunes_corpus(tmp_path / "fortunes.txt", tmp_path)
    docs = documents(out)
    assert docs == ["A man of words and not of deeds is like a garden full of weeds.",
                    "Never put off till tomorrow what you can do the day after tomorrow. -- Mark Twain"]


@pytest.mark.parametrize("name, chapter, first", [
    ("debref", "Chapter", "Chapter 1."), ("debref-de", "Kapitel", "Kapitel 1."),
    ("debref-fr", "Chapitre", "Chapitre 1."), ("debref-ja", "第", "第1章"), ("debref-zh", "第", "第 1 章")])
def test_debian_reference_corpus_starts_at_chapter_one(tmp_path, monkeypatch, name, chapter, first):
    """The Debian Reference in English, German, French, Japanese and Chinese: the package's text from chapter 1's
    heading on, one document per paragraph; the table of contents before it (whose lines name chapters and tables
    too) is skipped, and a line break between Japanese letters joins its lines without a space."""
    import gzip

    from tokdistill_fast.tools import corpora

    language, heading = corpora.DEBIAN_REFERENCES[name]
    src = tmp_path / f"debian-reference.{language}.txt.gz"
    asked = []
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: asked.append(package) or src)
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(f"Debian Reference\n\n   1. {chapter} one, listed in the contents, long enough to be kept\n"
                f"Table 1.8. A table whose caption starts a line, long enough to be kept\n\n"
                f"{first} GNU/Linux tutorials\n\n    Learning a computer system is like learning a new "
                f"foreign language.\n\n    名前付きパイプは、パイプのように働くファイ\n\u00a0\u00a0\u00a0 ルです。"
                f"Debian\n    パッケージを使います。\n\n")
    out = corpora.debian_reference_corpus(tmp_path / f"{name}.txt", tmp_path, language, heading)
    assert asked == [f"debian-reference-{language}"]
    assert documents(out) == [
        "Learning a computer system is like learning a new foreign language.",
        "名前付きパイプは、パイプのように働くファイルです。Debian パッケージを使います。"]


@pytest.mark.parametrize("name", ["pydocs", "pgdocs", "gnucash", "gimp", "kicad"])
def test_html_manual_corpus_keeps_the_text_of_each_paragraph(tmp_path, monkeypatch, name):
    """The HTML manuals of `demo prepare --corpora` (the Python Library Reference, the PostgreSQL manual, GnuCash's
    guide and help, GIMP's manual): each <p> of the pages beside each of the package's index pages becomes one
    document, tags dropped, entities decoded, whitespace folded, short ones and the licence pages that a manual names
    left out."""
    from tokdistill_fast.tools import corpora

    lib = tmp_path / "library"
    lib.mkdir()
    asked = []
    monkeypatch.setattr(corpora, "debian_file",
                        lambda package, path, cache=None: asked.append(package) or lib / path.name)
    (lib / "index.html").write_text("<p>Index.</p>")
    (lib / "fdl-section1.html").write_text("<p>The licence, long enough to be kept were it not left out by name.</p>")
    (lib / "os.html").write_text('<p>Return a <a href="#x"><code>str</code></a> that names\n  the &quot;current&quot;'
                                 " working directory.</p><div><p>Short.</p></div>")
    out = corpora.html_manual_corpus(name, tmp_path / f"{name}.txt", tmp_path)
    package, indexes, skip = corpora.HTML_MANUALS[name]
    assert asked == [package] * len(indexes)
    licence = ["The licence, long enough to be kept were it not left out by name."] * (skip is None)
    assert documents(out) == (
        licence + ['Return a str that names the "current" working directory.']) * len(indexes)


def test_vietnamese_installation_guide_keeps_the_translated_paragraphs(tmp_path, monkeypatch):
    """Debian's installation guide in Vietnamese: the paragraphs the translation left in English (a translated
    cross-reference aside) are left out, and so are the appendix of the GPL's text."""
    from tokdistill_fast.tools import corpora

    guide = tmp_path / "vi"
    guide.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: guide / path.name)
    (guide / "index.html").write_text(
        "<p>Nếu bạn gặp lỗi trong khi cài đặt, xem Phần 5.4.7 để tìm thông tin về cách thông báo lỗi.</p>"
        "<p>If firmware is needed, the installer will prompt you to load firmware. See Phần 6.4, “Nạp phần vững bị "
        "thiếu” for detailed information.</p>", encoding="utf-8")
    (guide / "apf.html").write_text("<p>Phần mềm này được phân phối với hy vọng rằng nó sẽ hữu ích.</p>",
                                    encoding="utf-8")
    out = corpora.html_manual_corpus("install-vi", tmp_path / "install-vi.txt", tmp_path)
    assert documents(out) == ["Nếu bạn gặp lỗi trong khi cài đặt, xem Phần 5.4.7 để tìm thông tin về cách thông báo "
                              "lỗi."]


@pytest.mark.skipif(shutil.which("groff") is None, reason="renders man pages with groff")
def test_manpages_corpus_keeps_the_prose_of_each_page(tmp_path, monkeypatch):
    """The Linux man pages (sections 2 and 3): each prose paragraph of a rendered page is one document, however
    long its line; the synopsis, the pages that only point at another (`.so`) and the aliases linked to a page
    are left out, so no page is read twice."""
    from tokdistill_fast.tools import corpora

    man2, man3 = tmp_path / "man2", tmp_path / "man3"
    man2.mkdir(), man3.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: man2 / path.name)
    prose = "The open() system call opens the file specified by pathname, " * 4
    (man2 / "open.2.gz").write_bytes(gzip.compress(
        f'.TH open 2\n.SH NAME\nopen \\- open a file\n.SH SYNOPSIS\n.nf\nint open(const char *p);\n.fi\n'
        f'.SH DESCRIPTION\n{prose}that is.\n.PP\nA second paragraph, long enough to be kept as a document.\n'.encode()))
    (man3 / "creat.3.gz").write_bytes(gzip.compress(b".so man2/open.2\n"))
    (man2 / "openat.2.gz").symlink_to(man2 / "open.2.gz")
    out = corpora.manpages_corpus(tmp_path / "manpages.txt", tmp_path)
    assert documents(out) == [prose + "that is.", "A second paragraph, long enough to be kept as a document."]


@pytest.mark.parametrize("name, left_out", [("grass", ()), ("gnumed", ("AccountsRu.html", "LegacyAppAPW.html",
                                                                         "FaxIntegration.html"))])
def test_manuals_with_open_paragraphs_are_read_by_blocks(tmp_path, monkeypatch, name, left_out):
    """GRASS GIS's and GNUmed's manuals leave their <p> elements open: each text between block tags is a document,
    without scripts or <pre> code, the navigation and footer that every page repeats once, and GNUmed's pages in
    Russian and German left out."""
    from tokdistill_fast.tools import corpora

    lib = tmp_path / "html"
    lib.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: lib / path.name)
    footer = "<hr><p>Main index | Raster index | Topics index | Keywords index | Full index"
    for page, text in (("index.html", "r.slope.aspect computes the slope and the aspect of an elevation raster"),
                       ("v.net.html", "v.net builds a vector network from lines &amp; points, snapping nodes")):
        (lib / page).write_text(f"<html><head><title>{page}</title></head><body><script>let toc = '<ul>';</script>"
                                f"<h2>DESCRIPTION</h2><p>\n{text}\n<pre>v.net input=roads output=network</pre>"
                                f"<p>\n<b>Short.</b>{footer}")
    for page in left_out:
        (lib / page).write_text("<p>A page in another language, long enough to be kept otherwise.")
    out = corpora.html_manual_corpus(name, tmp_path / f"{name}.txt", tmp_path)
    assert documents(out) == [
        "r.slope.aspect computes the slope and the aspect of an elevation raster",
        "Main index | Raster index | Topics index | Keywords index | Full index",
        "v.net builds a vector network from lines & points, snapping nodes"]


@pytest.mark.parametrize("name, html, folders, left_out", [
    ("astropy", "/usr/share/doc/python-astropy-doc/html", ("", "coordinates/"),
     ("genindex.html", "py-modindex.html", "search.html", "license.html", "credits.html")),
    ("rdkit", "/usr/share/doc/rdkit/html", ("",), ("genindex.html", "search.html", "api-docs.html"))])
def test_sphinx_manual_corpora_read_the_guides_without_indexes(tmp_path, monkeypatch, name, html, folders, left_out):
    """Astropy's guides and RDKit's books (Sphinx HTML): the pages beside each index page the manual names, without
    the generated indexes, the search page and the pages that only list or license."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "html"
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.relative_to(html))
    text = "<p>SkyCoord objects and SMILES strings are read by the guides, one paragraph a document.</p>"
    for folder in folders:
        (root / folder).mkdir()
        (root / folder / "index.html").write_text(text)
    for page in left_out:
        (root / page).write_text("<p>A page of links or legal text, long enough to be kept.</p>")
    out = corpora.html_manual_corpus(name, tmp_path / f"{name}.txt", tmp_path)
    assert documents(out) == [text[3:-4]] * len(folders)


def test_django_corpus_reads_the_pages_below_each_part(tmp_path, monkeypatch):
    """Django's documentation keeps its pages in folders below each part's index page (ref/models/fields.html):
    those are read too, and the parts it does not name (the release notes) are not."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "html"
    html = "/usr/share/doc/python-django-doc/html"
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.relative_to(html))
    pages = {"ref/index.html": "The reference lists every model field, form widget and template tag.",
             "ref/models/fields.html": "A ForeignKey field needs the class to which the model is related.",
             "topics/db/queries/index.html": "A QuerySet is lazy: making one touches no database at all.",
             "releases/3.2.html": "Django 3.2 is a long-term support release, announced in April 2021."}
    for part in ("intro", "topics", "howto", "faq", "misc"):
        pages[f"{part}/index.html"] = f"The {part} part of the documentation, long enough to be a document."
    for page, text in pages.items():
        (root / page).parent.mkdir(parents=True, exist_ok=True)
        (root / page).write_text(f"<p>{text}</p>")
    out = corpora.html_manual_corpus("django", tmp_path / "django.txt", tmp_path)
    assert sorted(documents(out)) == sorted(text for page, text in pages.items() if not page.startswith("releases"))
    assert len(documents(out)) == 8


def test_handbook_corpus_keeps_what_a_translation_translated(tmp_path, monkeypatch):
    """The Debian Administrator's Handbook: its <div> paragraphs are read by blocks, the index page (title, legal
    notice, contents) is left out, and a translation keeps only the blocks the English book does not hold (in
    another script, only those mostly in it; in a partial translation, only those not in English)."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "html"
    html = "/usr/share/doc/debian-handbook/html"
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.relative_to(html))
    same = "The apt-get install command installs the package and every package it depends on."
    pages = {"en-US": "APT is the abbreviation for Advanced Packaging Tool, and it considers packages as a whole.",
             "es-ES": "APT es la abreviatura de «Advanced Packaging Tool» y considera los paquetes como un todo.",
             "ar-MA": "APT هو اختصار لعبارة Advanced Packaging Tool، وهو يعتبر الحزم ككل متكامل.",
             "pl-PL": "APT to skrót od Advanced Packaging Tool, a pakiety traktuje jako całość."}
    for locale, text in pages.items():
        (root / locale).mkdir(parents=True)
        (root / locale / "index.html").write_text("<div class=\"legalnotice\">Copyright 2003-2022 Raphaël Hertzog "
                                                  "and Roland Mas, under the GPL and CC BY-SA.</div>")
        stale = same.replace("depends on.", {"ar-MA": "depends on (قسم 6.2).", "pl-PL": "depends on (Sekcja 6.2)."}
                             .get(locale, "depends on."))
        (root / locale / "apt.html").write_text(f'<div class="para">\n\t\t{text}\n\t</div><div class="para">{stale}'
                                                "</div>", encoding="utf-8")
    english = corpora.handbook_corpus("en-US", tmp_path / "handbook.txt", tmp_path)
    assert documents(english) == [pages["en-US"], same]
    spanish = corpora.handbook_corpus("es-ES", tmp_path / "handbook-es.txt", tmp_path)
    assert documents(spanish) == [pages["es-ES"]]
    # In another script, an English paragraph that differs by a cross-reference is left out too.
    arabic = corpora.handbook_corpus("ar-MA", tmp_path / "handbook-ar.txt", tmp_path, corpora.not_latin)
    assert documents(arabic) == [pages["ar-MA"]]
    # In a partial translation into a Latin script, the same by its English words.
    polish = corpora.handbook_corpus("pl-PL", tmp_path / "handbook-pl.txt", tmp_path, corpora.not_english)
    assert documents(polish) == [pages["pl-PL"]]
    assert len(documents(corpora.handbook_corpus("pl-PL", tmp_path / "pl-all.txt", tmp_path))) == 2


def test_maxima_corpus_leaves_out_the_one_page_copy_and_the_contents(tmp_path, monkeypatch):
    """Maxima's manual has each section on its own page and all of them again on one page: the corpus reads each
    paragraph once, without the tables of contents."""
    from tokdistill_fast.tools import corpora

    lib = tmp_path / "html"
    lib.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: lib / path.name)
    text = "<p>Maxima can search the info pages with the describe command.</p>"
    for page in ("maxima.html", "maxima_toc.html", "maxima_ovr.html", "maxima_singlepage.html", "maxima_12.html"):
        (lib / page).write_text(text if page in ("maxima_singlepage.html", "maxima_12.html") else
                                "<p>A table of contents that is long enough to be kept.</p>")
    out = corpora.html_manual_corpus("maxima", tmp_path / "maxima.txt", tmp_path)
    assert documents(out) == [
        "A table of contents that is long enough to be kept.",  # maxima.html, the index page itself
        "Maxima can search the info pages with the describe command."]


def test_git_docs_corpus_keeps_prose_paragraphs(tmp_path, monkeypatch):
    """The untuned corpus added after the 4-position defaults: prose paragraphs of Git's AsciiDoc manuals become
    documents, inline markup removed (linkgit:x[1] -> x); attribute lines, indented and delimited blocks and
    paragraphs of 40 characters or less (most titles) are left out."""
    from tokdistill_fast.tools import corpora

    docs = tmp_path / "git-doc"
    docs.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: docs / "SubmittingPatches.txt")
    (docs / "SubmittingPatches.txt").write_text("Short.\n")
    (docs / "git-rebase.txt").write_text(
        "git-rebase(1)\n=============\n\n[verse]\n'git rebase' [-i]\n\n"
        "Reapply commits on top of another base tip, as `git cherry-pick` does;\nsee linkgit:git-am[1] for "
        "patches.\n\n    indented literal text that is long enough to count as prose\n\n"
        "------------\n$ git rebase --onto master next topic and more shell text here\n------------\n")
    out = corpora.git_docs_corpus(tmp_path / "gitdocs.txt", tmp_path)
    assert documents(out) == [
        "Reapply commits on top of another base tip, as git cherry-pick does; see git-am for patches."]


def test_gnu_standards_corpus_reads_both_manuals(tmp_path, monkeypatch):
    """The untuned corpus added with VERA: the <p> paragraphs of the Coding Standards and of the maintainers'
    manual beside it, by the same extraction as the Library Reference's."""
    from tokdistill_fast.tools import corpora

    docs = tmp_path / "gnu-standards"
    docs.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: docs / "standards.html")
    (docs / "standards.html").write_text("<p>Write <code>configure</code> scripts with Autoconf &amp; friends.</p>")
    (docs / "maintain.html").write_text("<p>Short.</p><p>Maintainers answer bug reports sent to the\n list.</p>")
    out = corpora.gnu_standards_corpus(tmp_path / "gnustd.txt", tmp_path)
    assert documents(out) == [
        "Write configure scripts with Autoconf & friends.", "Maintainers answer bug reports sent to the list."]


def test_kjv_corpus_makes_one_document_per_chapter(tmp_path, monkeypatch):
    """The untuned corpus of the thirteenth stop: the King James Bible as `bible-kjv`'s reader prints it (a heading
    line per chapter, then one indented, numbered verse per line) becomes one document per chapter, verse numbers
    dropped; a reader that cannot run is a clear error."""
    from tokdistill_fast.tools import corpora

    reader = tmp_path / "bible"
    reader.write_text("#!/bin/sh\nprintf '\\nGenesis 1\\n\\n  1 In the beginning God created the heaven and the "
                      "earth.\\n  2 And the earth was without form, and void.\\n\\n1 Kings 2\\n\\n  10 So David "
                      "slept with his fathers, and was buried in the city.\\n'\n")
    reader.chmod(reader.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: tmp_path / path.name)
    out = corpora.kjv_corpus(tmp_path / "kjv.txt", tmp_path)
    assert documents(out) == [
        "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
        "So David slept with his fathers, and was buried in the city."]
    reader.unlink()
    with pytest.raises(UserInputError, match="cannot print the King James Bible"):
        corpora.kjv_corpus(tmp_path / "kjv2.txt", tmp_path)


def test_nethack_corpus_joins_the_formatted_guidebooks_paragraphs(tmp_path, monkeypatch):
    """The untuned corpus of the forty-sixth stop: NetHack's Guidebook as formatted text becomes one document per
    paragraph, its page headers dropped and a word hyphenated across a line end joined."""
    import gzip

    from tokdistill_fast.tools import corpora

    text = ("          NetHack Guidebook                                               4\n\n\n"
            "               When  NetHack's  ancestor  rogue  first appeared, its screen\n"
            "          orientation was  almost  unique  among  computer  fantasy  games.\n\n"
            "               Unlike text  adventure games that accept commands in pseudo-English sen-\n"
            "          tences, NetHack commands are all one or two keystrokes.\n")
    (tmp_path / "Guidebook.txt.gz").write_bytes(gzip.compress(text.encode()))
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: tmp_path / path.name)
    out = corpora.nethack_corpus(tmp_path / "nethack.txt", tmp_path)
    assert documents(out) == [
        "When NetHack's ancestor rogue first appeared, its screen orientation was almost unique among computer "
        "fantasy games.",
        "Unlike text adventure games that accept commands in pseudo-English sentences, NetHack commands are all one "
        "or two keystrokes."]


def test_vim_help_corpus_keeps_the_prose_of_each_help_file(tmp_path, monkeypatch):
    """The untuned corpus of the sixty-fifth stop: Vim's help files become their prose paragraphs, without the
    file's tag line, headings, rules, example blocks or key tables, tags dropped and links kept as their text; the
    change logs are left out."""
    from tokdistill_fast.tools import corpora

    doc = tmp_path / "usr" / "share" / "vim" / "vim91" / "doc"  # another release's folder than the path asked for
    doc.mkdir(parents=True)
    (doc / "intro.txt").write_text(
        "*intro.txt*\tFor Vim version 9.0.  Last change: 2022\n\n"
        "INTRODUCTION\t\t\t\t\t*intro* ~\n"
        "Vim stands for Vi IMproved.  It used to be Vi IMitation, but there are so many\n"
        "improvements that a name change was appropriate. See |vimrc| for more. >\n"
        "\t:set nocompatible\n"
        "\t:set ruler\n"
        "<The cursor is then shown as a block in Normal mode, as the options say in detail.\n"
        "==============================================================================\n"
        "CTRL-P\t\tprevious match\n\n"
        " vim:tw=78:ts=8:noet:ft=help:norl:\n")
    (doc / "version9.txt").write_text("*version9.txt*\nChanges in Vim 9, a list of patches nobody reads as prose.\n")
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: tmp_path / path.relative_to("/"))
    out = corpora.vim_help_corpus(tmp_path / "vimdoc.txt", tmp_path)
    assert documents(out) == [
        "Vim stands for Vi IMproved. It used to be Vi IMitation, but there are so many improvements that a name "
        "change was appropriate. See vimrc for more. The cursor is then shown as a block in Normal mode, as the "
        "options say in detail."]


def test_gretl_guide_corpus_keeps_the_prose_of_its_latex(tmp_path, monkeypatch):
    """The untuned corpus of the sixty-sixth stop: gretl's User's Guide, LaTeX sources (plain and gzipped) to prose
    paragraphs: comments, code, display math, tables and references out; inline math keeps its letters, commands
    their text, titles and list items stand apart; paragraphs under six words are dropped."""
    import gzip

    from tokdistill_fast.tools import corpora

    tex = tmp_path / "usr" / "share" / "doc" / "gretl" / "doc" / "tex"
    tex.mkdir(parents=True)
    (tex / "gretl-guide.tex").write_text("\\chapter{Introduction}\n\\input{intro}\n")
    (tex / "intro.tex.gz").write_bytes(gzip.compress(
        b"\\section{Estimating a model}\\label{sec:est}\n"
        b"% a comment nobody reads\n"
        b"The \\textit{ordinary least squares} estimator of $\\beta$ in $y = X\\beta + u$ is\n"
        b"computed by \\cmd{ols}, e.g.\\ as in \\cite{greene} and section~\\ref{sec:est}.\n"
        b"\\begin{code}\nols y const x\n\\end{code}\n"
        b"\\[ \\hat\\beta = (X'X)^{-1}X'y \\]\n"
        b"\\begin{itemize}\n\\item The first item of the list is long enough.\n\\end{itemize}\n"))
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: tmp_path / path.relative_to("/"))
    out = corpora.gretl_guide_corpus(tmp_path / "gretl.txt", tmp_path)
    assert documents(out) == [
        "The ordinary least squares estimator of beta in y X beta u is computed by ols, e.g. as in and section .",
        "The first item of the list is long enough."]


def test_skycultures_corpus_reads_paragraphs_and_list_items(tmp_path, monkeypatch):
    """The second untuned corpus of the forty-sixth stop: the <p> and <li> elements of Stellarium's English
    descriptions of its sky cultures, headings and other languages left out, entities decoded."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "skycultures"
    xhosa = ("<h2>Xhosa</h2>\n<p>In Xhosa, a star is called &#8220;inkwenkwezi&#8221;.</p>\n"
             "<ul>\n<li><b>iQhawe &mdash; Sirius:</b><br/> Sirius is known as the champion.</li>")
    maya = "<p>The Maya tracked Venus as the morning star for centuries.</p>"
    for culture, body in (("xhosa", xhosa), ("maya", maya)):
        (root / culture).mkdir(parents=True)
        (root / culture / "description.en.utf8").write_text(body, encoding="utf-8")
        (root / culture / "description.fr.utf8").write_text("<p>Une autre langue que l'anglais.</p>", encoding="utf-8")
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / "western" / path.name)
    out = corpora.skycultures_corpus(tmp_path / "skycultures.txt", tmp_path)
    assert documents(out) == [
        "The Maya tracked Venus as the morning star for centuries.",
        "In Xhosa, a star is called \u201cinkwenkwezi\u201d.",
        "iQhawe \u2014 Sirius: Sirius is known as the champion."]


def test_freeciv_corpus_reads_each_nations_legend(tmp_path, monkeypatch):
    """The untuned corpus of the forty-seventh stop: each Freeciv nation ruleset's `legend`, its escaped line ends
    joined and escaped quotes decoded; the rest of the ruleset (names, comments) left out."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "nation"
    root.mkdir()
    (root / "acadian.ruleset").write_text(
        '[nation_acadian]\nname=_("Acadian")\nlegend=_("Acadia was first founded in 1604 as the first French\\\n'
        ' colony in North America, \\"New France\\".")\nleaders = { "name", "sex"\n "Evangeline", "Female" '
        ';legendary heroine\n}\n', encoding="utf-8")
    (root / "zulu.ruleset").write_text('legend=_("The Zulu kingdom rose under Shaka in the early\\\n'
                                       ' nineteenth century.")\n', encoding="utf-8")
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.name)
    out = corpora.freeciv_corpus(tmp_path / "freeciv.txt", tmp_path)
    assert documents(out) == [
        'Acadia was first founded in 1604 as the first French colony in North America, "New France".',
        "The Zulu kingdom rose under Shaka in the early nineteenth century."]


def test_crawl_corpus_reads_each_description_without_key_comments_or_markup(tmp_path, monkeypatch):
    """The untuned corpus of the forty-eighth stop: each `%%%%`-separated entry of Dungeon Crawl's English
    description files, its key line, comments, colour tags, Lua and placeholders dropped; the key bindings and the
    tutorial left out."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "descript"
    root.mkdir()
    (root / "monsters.txt").write_text(
        "%%%%\n# Uniques\nAgnes\n\nThis spriggan is aged and weathered from years of travel away from\nthe "
        "forests of her kin.\n%%%%\n__d_suffix\n\n<__c_suffix>\n%%%%\nogre\n\nA huge, <lightred>ugly</lightred> "
        "giant that @says@ little and eats much{{ return 1 }}.\n%%%%\n", encoding="utf-8")
    (root / "tutorial.txt").write_text("%%%%\nmove\n\nPress <w>h</w> to move left, and keep pressing it.\n",
                                      encoding="utf-8")
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.name)
    out = corpora.crawl_corpus(tmp_path / "crawl.txt", tmp_path)
    assert documents(out) == [
        "This spriggan is aged and weathered from years of travel away from the forests of her kin.",
        "A huge, ugly giant that little and eats much."]


def test_lilypond_corpus_reads_the_english_prose_manuals(tmp_path, monkeypatch):
    """The untuned corpus of the twentieth stop: <p> paragraphs of LilyPond's prose manuals, English pages only
    (translations are `name.xx.html`), the GNU FDL appendix and the other manuals (internals) left out."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "Documentation"
    for manual in ("learning", "notation", "internals"):
        (root / manual).mkdir(parents=True)
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.parent.name / path.name)
    (root / "learning" / "index.html").write_text("<p>Short.</p>")
    (root / "learning" / "gnu-free-documentation-license.html").write_text(
        "<p>Permission is granted to copy, distribute and/or modify this document.</p>")
    (root / "notation" / "slurs.html").write_text("<p>Slurs are entered using <code>(</code> and\n "
                                                  "<code>)</code> after the note.</p>")
    (root / "notation" / "slurs.de.html").write_text("<p>Bögen werden mit Klammern nach der Note notiert.</p>")
    (root / "internals" / "grob.html").write_text("<p>The grob interface holds the properties of every grob.</p>")
    out = corpora.html_manual_corpus("lilypond", tmp_path / "lilypond.txt", tmp_path)
    assert documents(out) == ["Slurs are entered using ( and ) after the note."]


def test_start_of_text_forms_seen_inside_longer_words_are_left_out(model_dirs, tmp_path):
    """A corpus where the bare "palatable" sits inside "unpalatable" more often than it stands alone: an added token
    for it would split those words, so the start-of-text form is left out with the counts (contexts.
    split_inside_words); where it stands alone more often, it stays; vocab mode isolates forms, so it stays too."""
    from tokdistill_fast import DistillConfig, distill

    corpus = tmp_path / "c.txt"
    corpus.write_text("the unpalatable soup\n\n" * 5 + "(palatable) food\n\n" * 2, encoding="utf-8")
    bare = [NewToken("palatable", "palatable", [0, 1])]
    assert split_inside_words([corpus], bare, None) == {
        "palatable": "which as an added token would split longer words: 5 time(s) in the corpus, against 2 as itself"}
    assert split_inside_words([corpus], bare, None) == split_inside_words([corpus], bare, 1 << 20)
    model = model_dirs[("llama", "bytelevel", True)]
    run = distill(model, ["palatable"], [corpus], None, DistillConfig(method="mean"))
    assert [t.form for t in run.tokens] == [" palatable"]
    assert "5 time(s) in the corpus, against 2 as itself" in run.report["skipped"][0]["reason"]
    corpus.write_text("the unpalatable soup\n\n" * 2 + "(palatable) food\n\n" * 5, encoding="utf-8")
    assert [t.form for t in distill(model, ["palatable"], [corpus], None, DistillConfig(method="mean")).tokens] == [
        " palatable", "palatable"]


def test_words_without_spaces_are_found_where_the_extended_tokenizer_emits_them(tokenizers_by_kind, tmp_path):
    """Japanese text has no spaces between words: a new Japanese word's hits lie between Japanese letters, and a
    Latin word's before them ("GNOMEの"); a new word inside a longer new word ("ファイル" in "ファイルシステム",
    which the extended tokenizer emits there) is no hit of it."""
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["ファイル", "ファイルシステム", "GNOME"], add_variants=False)
    extended = Extended.of(extend_tokenizer(tok, planned, "added"), planned, planned)
    corpus = tmp_path / "c.txt"
    docs = ["Debian GNOMEのファイルを開きます。", "ファイルシステムのファイルです。"]
    corpus.write_text("\n\n".join(docs * 5), encoding="utf-8")
    snippets, stats, dropped = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok), extended=extended)
    found = [sum(s.token == i for s in snippets) for i in range(3)]
    assert found == [10, 5, 5] and dropped == [5, 0, 0] and stats.inside == [0, 0, 0]
    assert retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok))[2] == [0, 0, 0]  # without it: 15 hits


def test_a_hit_inside_a_longer_new_word_is_no_hit(tokenizers_by_kind, tmp_path):
    """Where two new words nest (" bivalve" in " bivalve-like"), the extended tokenizer emits the longer one, so
    the shorter one's match there is no occurrence of it: given the extended tokenizer, retrieval drops it."""
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = plan_new_tokens(tok, ["bivalve", "bivalve-like"], add_variants=False)
    extended = Extended.of(extend_tokenizer(tok, planned, "added"), planned, planned)
    corpus = tmp_path / "c.txt"
    docs = ["the cook found a bivalve in the river.", "a bivalve-like shell, said the cook."]
    corpus.write_text("\n\n".join(docs * 5), encoding="utf-8")
    snippets, _, dropped = retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok), extended=extended)
    assert [sum(s.token == i for s in snippets) for i in range(2)] == [5, 5] and dropped == [5, 0]
    assert retrieve([corpus], tok, planned, 25, 40, 0, start_id(tok))[2] == [0, 0]  # without it: 10 hits


def test_a_word_whose_every_hit_is_dropped_is_named(model_dirs, tmp_path, caplog):
    """A word found in the corpus only where the extended tokenizer reads something else (here: inside a longer new
    word) keeps no corpus snippet and trains on the model's own text: the log names it."""
    from tokdistill_fast import DistillConfig, distill

    corpus = tmp_path / "c.txt"
    corpus.write_text("a bivalve-like shell, said the cook.\n\n" * 6, encoding="utf-8")
    cfg = DistillConfig(target_layer=2, epochs=1, more_epochs=0, snippets_per_token=4, batch_size=4, dtype="float32",
                        device="cpu", add_variants=False)
    with caplog.at_level("WARNING", logger="tokdistill_fast.workload"):
        run = distill(model_dirs[("llama", "bytelevel", True)], ["bivalve", "bivalve-like"], [corpus], None, cfg)
    assert run.report["retrieval"]["dropped_tokenized_differently"] == {"bivalve": 4}  # the hits sampled
    assert "1 word(s) found in the corpus without a snippet kept" in caplog.text and "'bivalve'" in caplog.text
    caplog.clear()  # a start-of-text variant found only inside the longer word keeps its moved row: no warning
    corpus.write_text("bivalve-like shell j, said the cook.\n\n" * 8 + "we ate a bivalve in the river.\n\n" * 8,
                      encoding="utf-8")
    with caplog.at_level("WARNING", logger="tokdistill_fast.workload"):
        run = distill(model_dirs[("llama", "bytelevel", True)], ["bivalve", "bivalve-like"], [corpus], None,
                      cfg.replace(add_variants=True, variant_epochs=1, dtype="bfloat16"))
    assert "without a snippet kept" not in caplog.text


def test_russian_manuals_corpus_reads_the_three_manuals(tmp_path, monkeypatch):
    """The untuned corpus of the fifty-second stop, the first in Cyrillic: the <p> paragraphs of the Developer's
    Reference (its one-page copy only) and of every page of the New Maintainers' Guide and the FAQ in Russian."""
    from tokdistill_fast.tools import corpora

    asked = []

    def debian_file(package, path, cache=None):
        asked.append(package)
        (tmp_path / package).mkdir(exist_ok=True)
        return tmp_path / package / path.name

    monkeypatch.setattr(corpora, "debian_file", debian_file)
    (tmp_path / "developers-reference-ru").mkdir()
    (tmp_path / "developers-reference-ru" / "developers-reference.html").write_text(
        "<p>Каждый пакет сопровождается одним или несколькими разработчиками.</p>", encoding="utf-8")
    (tmp_path / "developers-reference-ru" / "pkgs.html").write_text(
        "<p>Та же глава ещё раз, отдельной страницей, длинной достаточно.</p>", encoding="utf-8")
    for package, page in (("maint-guide-ru", "index.ru.html"), ("debian-faq-ru", "index.ru.html")):
        (tmp_path / package).mkdir()
        (tmp_path / package / page).write_text(f"<p>Руководство {package}: <code>dpkg</code> &amp; apt, длиннее "
                                               "сорока знаков.</p><p>Коротко.</p>", encoding="utf-8")
    out = corpora.russian_manuals_corpus(tmp_path / "debian-ru.txt", tmp_path)
    assert asked == [package for package, _ in corpora.RUSSIAN_MANUALS]
    assert documents(out) == ["Каждый пакет сопровождается одним или несколькими разработчиками.",
                              "Руководство maint-guide-ru: dpkg & apt, длиннее сорока знаков.",
                              "Руководство debian-faq-ru: dpkg & apt, длиннее сорока знаков."]


def test_gnome_help_corpus_keeps_the_translated_paragraphs(tmp_path, monkeypatch):
    """GNOME's help in Korean or Tamil: the <p> elements of its Mallard pages, attributes and all; paragraphs the
    translation left in English are left out, where the English originals keep every paragraph."""
    from tokdistill_fast.tools import corpora

    root = tmp_path / "gnome-help"
    root.mkdir()
    monkeypatch.setattr(corpora, "debian_file", lambda package, path, cache=None: root / path.name)
    (root / "index.page").write_text('<page><p xmlns:its="x">Press <key>Super</key> to open the Activities '
                                     "overview.</p>\n<p>활동 개요를 열려면 <key>Super</key> 키를 누릅니다. 그 다음 "
                                     "찾으려는 프로그램의 이름을 입력합니다.</p></page>", encoding="utf-8")
    out = corpora.gnome_help_corpus("ko", tmp_path / "gnome-ko.txt", tmp_path, corpora.not_latin)
    assert documents(out) == ["활동 개요를 열려면 Super 키를 누릅니다. 그 다음 찾으려는 프로그램의 이름을 입력합니다."]
    english = corpora.gnome_help_corpus("C", tmp_path / "gnome-en.txt", tmp_path)  # the originals: every paragraph
    assert documents(english) == ["Press Super to open the Activities overview.", documents(out)[0]]

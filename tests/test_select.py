"""`tokdistill select`: frequent words the tokenizer splits, ranked by tokens saved; no-words, digits, short
words, words already in the vocabulary and words whose added token would split a longer vocabulary word are left
out; quotes, brackets and format characters (a zero-width space) of any language are stripped, and a chunk glued to
a dash is no word."""

import random

from tokdistill_fast.tokens import MARK
from tokdistill_fast.tools.select import discover_words, select_tokens


def test_select_ranks_split_words_and_skips_non_words(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bytelevel"]
    docs = ["we ate a palatable dinner and a bivalve", "the palatable soup", " ──────── ──────── table rule",
            "model x86 has 3 parts", "a palatable x86 pie", "say „bivalve“ « bivalve » ‹bivalve›…",
            "open Bivalve…\u200b and \u200bBivalve",
            "ls -l shows -rw-rw-r-- and --verbose --Dryden."] * 12
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    got = select_tokens(tok, [corpus], min_count=10)
    words = [c.word for c in got]
    assert words[0] == "palatable" and "bivalve" in words  # 36 occurrences rank above 12
    assert {c.word: c.count for c in got}["bivalve"] == 48  # quoted in three languages: the same word
    assert {c.word: c.count for c in got}["Bivalve"] == 24  # beside a zero-width space, before or after
    assert not {"rw-rw-r", "-rw-rw-r", "verbose", "--verbose", "Dryden", "--Dryden"} & set(words)  # glued to a dash
    assert not any(w.startswith("─") or any(ch.isdigit() for ch in w) for w in words)
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) >= 2 for w in words)
    assert [c.saved for c in got] == sorted((c.saved for c in got), reverse=True)


def test_select_reads_a_word_in_running_text_even_where_its_bare_form_is_one_token(tokenizers_by_kind, tmp_path):
    """A word is a candidate by how running text splits it (" fetchall" as " fetch" + "all"), whether or not its
    bare form happens to be a vocabulary piece ("fetchall" after a newline): before, such words were left out."""
    tok = tokenizers_by_kind["bytelevel"]
    vocab = tok.get_vocab()
    bare = next(p for p in sorted(vocab) if p.isalpha() and p.islower() and len(p) >= 5
                and len(tok(" " + p, add_special_tokens=False)["input_ids"]) >= 2)
    corpus = tmp_path / "c.txt"
    corpus.write_text(f"we saw the {bare} there\n\n" * 12, encoding="utf-8")
    assert bare in [c.word for c in select_tokens(tok, [corpus], min_count=10)]


def test_select_leaves_out_words_that_would_split_longer_words(tokenizers_by_kind, tmp_path, caplog):
    """" hospit" as an added token would split every " hospital" (one vocabulary token here), and " bivalve" the
    corpus's " bivalves", which it holds more often than " bivalve" alone: neither is proposed, and the log says
    why; " palatable" is."""
    tok = tokenizers_by_kind["bytelevel"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("a hospit note on palatable soup and a bivalve\n\n" * 12 + "two bivalves\n\n" * 13,
                      encoding="utf-8")
    with caplog.at_level("INFO", logger="tokdistill_fast.tools.select"):
        words = [c.word for c in select_tokens(tok, [corpus], min_count=10)]
    assert "palatable" in words and not {"hospit", "bivalve"} & set(words)
    assert "left out 1 word(s)" in caplog.text and "' hospit' in ' hospital'" in caplog.text
    assert ("and 1 that the corpus shows inside longer words more often than alone, or a phrase a tenth as often "
            "(' bivalve')") in caplog.text


def test_select_leaves_out_words_llama_cpps_converter_hashes(tokenizers_by_kind, tmp_path, caplog):
    """" I've" occurs in the text llama.cpp's converter hashes to recognize the tokenizer: as a new token it would
    make the converter refuse the output, so it is not proposed (and the log says so), where " we've" is."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["so I've seen that we've won"] * 12), encoding="utf-8")
    with caplog.at_level("INFO", logger="tokdistill_fast.tools.select"):
        words = [c.word for c in select_tokens(tokenizers_by_kind["bytelevel"], [corpus], min_count=10)]
    assert "we've" in words and "I've" not in words
    assert "converter would find" in caplog.text and "\" I've\"" in caplog.text


def test_select_reads_words_of_scripts_without_spaces(tokenizers_by_kind, tmp_path, caplog):
    """Japanese has no spaces between words: a candidate is a run of one script (Katakana "パッケージ", Han "設定",
    Hiragana "します", two characters or more), a Latin word glued to Japanese letters is a word ("GNOMEの"), and a
    run the corpus shows inside longer runs of its script more often than alone is left out ("ポート" in "サポート",
    whose added token would split it)."""
    tok = tokenizers_by_kind["bytelevel"]
    corpus = tmp_path / "c.txt"
    docs = ["Debian GNOMEのパッケージを設定します。", "サポートのポートです。", "サポートされます。"]
    corpus.write_text("\n\n".join(docs * 12), encoding="utf-8")
    with caplog.at_level("INFO", logger="tokdistill_fast.tools.select"):
        words = [c.word for c in select_tokens(tok, [corpus], min_count=10)]
    assert {"GNOME", "パッケージ", "設定", "します", "サポート", "です", "されます"} <= set(words)
    assert "ポート" not in words and not any("の" in w or "。" in w for w in words)
    assert "'ポート'" in caplog.text
    assert "a word list from a segmenter" not in caplog.text  # Japanese kana break its runs of Han


def test_select_finds_words_inside_runs_that_are_phrases(tokenizers_by_kind, tmp_path, caplog):
    """Chinese runs of Han between punctuation are phrases: select finds the words inside them (parts that go
    together more often than chance, with many different neighbours) and never a piece across two words."""
    rng = random.Random(0)
    han = iter(chr(0x4E00 + 7 * i) for i in range(200))  # distinct Han characters
    words = ["".join(next(han) for _ in range(2 + i % 2)) for i in range(40)]
    runs = ["".join(rng.choices(words + ["的", "和"], weights=[1] * 40 + [8, 4], k=rng.randint(3, 7)))
            for _ in range(400)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("，".join(runs[i:i + 4]) + "。" for i in range(0, 400, 4)), encoding="utf-8")
    with caplog.at_level("WARNING", logger="tokdistill_fast.tools.select"):
        found = [c.word for c in select_tokens(tokenizers_by_kind["bytelevel"], [corpus], min_count=10)]
    assert set(found) == set(words), set(found) ^ set(words)
    assert "phrases more than words; found 40 words inside them" in caplog.text


def test_discovered_words_do_not_cut_a_character():
    """A Thai vowel or tone mark continues the letter before it: no discovered word starts with one or stops
    before one, and what is found are words (Thai's few letters make fewer of them stand out)."""
    rng = random.Random(0)
    words = ["ข้าว", "กิน", "ดี", "มาก", "น้ำ", "ร้อน", "เย็น", "บ้าน", "ไป", "มา", "สวย", "ใหญ่", "เล็ก", "ช้าง", "ม้า",
             "ปลา"]
    runs: dict[str, int] = {}
    for _ in range(400):
        run = "".join(rng.choices(words, k=rng.randint(3, 6)))
        runs[run] = runs.get(run, 0) + 1
    found = discover_words(runs, 10)
    assert found and set(found) <= set(words), found
    assert not any(MARK.match(w[0]) for w in discover_words(runs, 1))


def test_select_says_where_it_proposes_a_word_composed_and_decomposed(tokenizers_by_kind, tmp_path, caplog):
    """A corpus that writes a word both composed and decomposed ("é", "e" + U+0301; GNOME's Tamil help does so
    with "ோ") holds two texts the tokenizer reads apart: both are proposed, and the log names the pair."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "palatablé")
    corpus = tmp_path / "c.txt"
    corpus.write_text(f"a palatablé soup and a {decomposed} pie\n\n" * 12, encoding="utf-8")
    with caplog.at_level("WARNING", logger="tokdistill_fast.tools.select"):
        words = [c.word for c in select_tokens(tokenizers_by_kind["bytelevel"], [corpus], min_count=10)]
    assert {"palatablé", decomposed} <= set(words)
    assert "1 word(s) are proposed more than once" in caplog.text and ascii(decomposed) in caplog.text


def test_phrase_words_cut_runs_at_anything_but_one_space():
    """Phrases run over words one space apart, never from a document's first word or across a line break, a
    double space or a chunk glued to a dash; each chunk says whether punctuation sits before or after its word."""
    from tokdistill_fast.tools.select import phrase_words

    doc = "Start in order to go,  as well as --dry runs\nthen \"such as\" text"
    assert list(phrase_words(doc)) == [
        [("in", False, False), ("order", False, False), ("to", False, False), ("go", False, True)],
        [("as", False, False), ("well", False, False), ("as", False, False)],
        [("then", False, False), ("such", True, False), ("as", False, True), ("text", False, False)]]


def test_select_proposes_phrases_up_to_max_words(tokenizers_by_kind, tmp_path, caplog):
    """With max_words 3 frequent phrases compete with words by tokens saved; a phrase with punctuation inside it is
    none ("order, to"), and of two phrases that overlap (" in order" and " order to" outside " in order to") only
    the better-ranked one is proposed, with a log line; with max_words 1 no phrase is."""
    tok = tokenizers_by_kind["bytelevel"]
    corpus = tmp_path / "c.txt"
    fill = ["cat", "dog", "sun", "sea", "sky", "oak", "elm", "fox", "owl", "bee", "ant", "cow", "hen", "pig", "ram"]
    docs = [f"{fill[k]} {fill[k - 1]} in order to {fill[k - 2]} a palatable {fill[k - 3]}" for k in range(14)]
    docs += [f"{fill[k]} {fill[k - 4]} order to {fill[k - 5]}" for k in range(12)]
    docs += [f"{fill[k]} {fill[k - 6]} in order, to {fill[k - 7]}" for k in range(15)]
    docs += [f"{fill[k]} {fill[k - 8]} in order {fill[k - 9]}" for k in range(11)]
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    with caplog.at_level("INFO", logger="tokdistill_fast.tools.select"):
        got = {c.word: c.count for c in select_tokens(tok, [corpus], min_count=10, max_words=3)}
    assert got["in order to"] == 14 and "a palatable" in got and "palatable" not in got  # never alone
    assert ("in order" in got) != ("order to" in got) and "overlap a better-ranked one" in caplog.text
    assert not {"order, to", "order to be"} & set(got)
    assert not any(" " in w for w in (c.word for c in select_tokens(tok, [corpus], min_count=10)))


def test_a_word_that_starts_lines_is_counted_alike_with_phrases_or_without(tokenizers_by_kind, tmp_path):
    """A word found only at line starts ("\npalatable") or after a bracket counts the same whether or not phrases
    compete (--max-words 2): the phrases' second count reads the contexts the first one counted, where before it
    read only " palatable" and dropped the word as if a longer candidate took its text."""
    tok = tokenizers_by_kind["bytelevel"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("we ate\npalatable soup (palatable pie)\n\n" * 8, encoding="utf-8")
    for max_words in (1, 2):
        assert "palatable" in [c.word for c in select_tokens(tok, [corpus], min_count=10, max_words=max_words)]


def test_select_leaves_out_phrases_that_never_stand_alone(tokenizers_by_kind, tmp_path, caplog):
    """A phrase the corpus writes only inside a longer candidate, or where an overlapping one is read first, never
    reaches its own id ("access this" and "this command from" where every text says "access this command from
    the menu"): it is not proposed, and the log says so; the longer phrase is."""
    fill = ["cat", "dog", "sun", "sea", "sky", "oak", "elm", "fox", "owl", "bee", "ant", "cow", "hen", "pig", "ram"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"{fill[k]} {fill[k - 1]} can access this command from the menu {fill[k - 2]}"
                                  for k in range(15)), encoding="utf-8")
    with caplog.at_level("INFO", logger="tokdistill_fast.tools.select"):
        words = [c.word for c in select_tokens(tokenizers_by_kind["bytelevel"], [corpus], min_count=10,
                                               max_words=3)]
    assert not {"access this", "this command", "this command from", "command from the"} & set(words)
    assert any(w.count(" ") == 2 for w in words) and "read first" in caplog.text


def test_a_phrase_often_inside_longer_words_is_left_out(tokenizers_by_kind, tmp_path, monkeypatch):
    """A phrase whose matches fall inside longer words a tenth of the time or more (" in a" in " in any") is left
    out, where a word is left out only above as often as alone: the phrase saves one token, each match inside a
    word gives the model a split it never trained on."""
    from tokdistill_fast.tools import select

    fill = ["cat", "dog", "sun", "sea", "sky", "oak", "elm", "fox", "owl", "bee", "ant", "cow", "hen", "pig", "ram"]
    docs = [f"{fill[k % 15]} {fill[k % 7]} in a {fill[k % 11]} way" for k in range(20)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(docs + [f"{fill[k]} {fill[k - 3]} in any case" for k in range(3)]),
                      encoding="utf-8")

    def words() -> set[str]:
        return {c.word for c in select_tokens(tokenizers_by_kind["bytelevel"], [corpus], min_count=10, max_words=2)}

    assert "in a" not in words()
    monkeypatch.setattr(select, "PHRASE_INSIDE_SHARE", 1.0)
    assert "in a" in words()

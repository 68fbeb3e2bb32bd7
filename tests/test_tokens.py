"""Tokenizer extension on tiny tokenizers of three families (byte-level BPE, Gemma-style '▁' normalizer, Llama-2
style Metaspace with byte fallback) in both modes: one id per new word wherever running text puts it, text
without new words unchanged, round trips, prefix pairs, order, casing, skips, and save/reload cycles."""

import ast
import json
import random
import re

import pytest
from conftest import NEW_WORDS, tiny_config
from transformers import AutoTokenizer

from tokdistill_fast import check, extend, swap, tokens
from tokdistill_fast.config import UserInputError

KINDS = ("bytelevel", "metaspace", "llama2")
MODES = ("vocab", "added")
PLAIN = ("The patient said the soup was green. A doctor found a small house by the river, and the cook "
         "asked: was it old? \"It seemed new\", she told him.\nThe surgeon took the quick food to the hospital.")


def extend_words(tok, words, mode="auto", config=None, **plan):
    planned, skipped = tokens.plan_new_tokens(tok, words, **plan)
    return extend.extend_tokenizer(tok, planned, mode, config), planned, skipped


def span(tok, text: str, start: int, end: int) -> list[int]:
    return extend.span_ids(tok.backend_tokenizer.encode(text, add_special_tokens=False), start, end)


CONTEXTS = [("the ", " said"), ("the ", "."), ("the ", ", and"), ("the ", "\n"),  # after a space
            ("", " said"), ("the\n", " said"), ("the (", ")"), ('the "', '"'), ("<eos>", " said")]  # bare


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_one_id_wherever_running_text_puts_the_word(tokenizers_by_kind, kind, mode):
    tok = tokenizers_by_kind[kind]
    new, planned, skipped = extend_words(tok, NEW_WORDS, mode)
    assert not skipped and {t.kind for t in planned} == {mode}
    ids = {w: {t.new_id for t in planned if t.word == w} for w in NEW_WORDS}
    for word in NEW_WORDS:
        for left, right in CONTEXTS:
            text = left + word + right
            got = span(new, text, len(left), len(left) + len(word))
            assert len(got) == 1 and got[0] in ids[word], (text, new.tokenize(text))
            enc = new(text, add_special_tokens=False)["input_ids"]
            assert new.decode(enc, clean_up_tokenization_spaces=False) == text
            assert len(enc) < len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_text_without_new_words_unchanged_and_round_trip(tokenizers_by_kind, corpus_text, kind, mode):
    tok = tokenizers_by_kind[kind]
    new, planned, _ = extend_words(tok, NEW_WORDS, mode)
    paragraphs = check.probe_paragraphs([PLAIN, corpus_text, check.PROBE_TEXT])
    orig = check.Original(tok)
    new_list = [{"id": t.new_id, "form": t.form, "piece": t.piece, "kind": t.kind, "word": t.word} for t in planned]
    find = check.Findings()
    stats = check.check_probe(new, orig, new_list, paragraphs, find)
    assert not find.failures, find.failures[:3]
    assert stats["compared"] > 3 and stats["with_new_words"] > 100 and stats["changed"] == 0
    plain = "The patient said: the soup (green) was old.\nA doctor, a cook"
    assert new(plain)["input_ids"] == tok(plain)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_pairs(tokenizers_by_kind, kind):
    """'bival' new: 'bivalve' tokenizes as before (vocab mode); both new: each is one id, in either order."""
    tok = tokenizers_by_kind[kind]
    longer = ["the bivalve said", "bivalve said", "the (bivalve)"]
    new, planned, _ = extend_words(tok, ["bival"], "vocab")
    for text in longer:
        assert new(text)["input_ids"] == tok(text)["input_ids"], text
    assert len(span(new, "the bival said", 4, 9)) == 1
    for words in (["bival", "bivalve"], ["bivalve", "bival"]):
        new, planned, _ = extend_words(tok, words, "vocab")
        ids = {t.form: t.new_id for t in planned}
        assert span(new, "the bivalve said", 4, 11) == [ids[" bivalve"]]
        assert span(new, "the bival said", 4, 9) == [ids[" bival"]]
        assert span(new, "the (bivalve)", 5, 12) == [ids["bivalve"]]


@pytest.mark.parametrize("kind", KINDS)
def test_added_mode_prefix_limit_is_reported(tokenizers_by_kind, kind):
    """Added tokens match inside longer words (' bival' in ' bivalve', 'bival' in '(bivalve)'): they carry no
    single_word, which llama.cpp would drop; `check` reports the inside-word matches as warnings."""
    tok = tokenizers_by_kind[kind]
    new, planned, _ = extend_words(tok, ["bival"], "added")
    assert not any(t.single_word or t.lstrip or t.rstrip for t in new.added_tokens_decoder.values())
    assert new("the bivalve said")["input_ids"] != tok("the bivalve said")["input_ids"]
    assert new("the (bivalve)")["input_ids"] != tok("the (bivalve)")["input_ids"]
    find = check.Findings()
    new_list = [{"id": t.new_id, "form": t.form, "piece": t.piece, "kind": t.kind, "word": t.word} for t in planned]
    stats = check.check_probe(new, check.Original(tok), new_list, ["the bivalve said.", "a cook", "(bivalves)"], find)
    assert not find.failures and stats["inside_word_matches"] == {" bival": 1, "bival": 1}
    line = check.inside_word_line({"probe": stats})  # the line distill logs
    assert line.startswith("check: 2 of 3 probe paragraphs") and "' bival' 1" in line and "vocab" in line
    assert check.inside_word_line({"probe": {**stats, "inside_word_matches": {}}}) is None


@pytest.mark.parametrize("kind", KINDS)
def test_insertion_order_does_not_change_tokenization(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    words = NEW_WORDS + ["bival", "bivalve", "spill"]
    text = "Spill the beans, bivalve and bival: spill the beans\nbivalve (thyroidectomy) palatable."
    pieces = []
    for seed in range(3):
        shuffled = random.Random(seed).sample(words, len(words))
        for mode in MODES:
            new, _, _ = extend_words(tok, shuffled, mode)
            pieces.append((mode, new.tokenize(text)))
    for mode in MODES:
        got = [p for m, p in pieces if m == mode]
        assert all(p == got[0] for p in got), mode


@pytest.mark.parametrize("kind", KINDS)
def test_casing_variants(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    _, without, _ = extend_words(tok, ["palatable"])
    new, planned, skipped = extend_words(tok, ["palatable"], add_casing=True)
    casing = [t for t in planned if t.variant.startswith("casing")]
    assert len(planned) > len(without) and casing and all(t.variant_of == "palatable" for t in casing)
    ids = {t.form: t.new_id for t in planned}
    assert span(new, "the Palatable said", 4, 13) == [ids[" Palatable"]]
    assert tokens.casing_variants("palatable") == ["Palatable"]
    assert tokens.casing_variants("E-mail") == ["e-mail"]


def test_uncased_tokenizer_folds_casing_variants():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([PLAIN * 5], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    new, planned, skipped = extend_words(tok, ["Palatable"], add_casing=True)
    assert [s.word for s in skipped] == ["palatable"] and "same stored form" in skipped[0].reason
    assert len(span(new, "the PALATABLE said", 4, 13)) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_skip_reasons(tokenizers_by_kind, tmp_path, kind):
    from tokenizers import AddedToken

    tokenizers_by_kind[kind].save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.add_tokens([AddedToken("zygo", normalized=False)])
    stored = ("\u0120" if kind == "bytelevel" else "\u2581") + "palatable"
    planned, skipped = tokens.plan_new_tokens(tok, ["palatable", "palatable", "<eos>", "zygo", "the", "<0x41>",
                                                    stored])
    reasons = {s.word: s.reason for s in skipped}
    assert [t.word for t in planned if t.variant_of is None] == ["palatable"]
    assert reasons["palatable"] == "duplicate line"  # the repeat, and the stored form read as the word
    assert reasons["<eos>"] == "equal to a special token"
    assert reasons["zygo"] == "equal to an existing added token"
    assert reasons["the"].startswith("already a vocabulary entry")
    assert reasons["<0x41>"] == "a byte-fallback piece"
    assert sum(1 for s in skipped if s.word == "palatable") == 2


def test_byte_fallback_and_unknown_characters(tokenizers_by_kind):
    words = ["café", "naïve-ish"]
    for kind in ("bytelevel", "llama2"):  # byte pieces in the original tokenization: the new token works
        tok = tokenizers_by_kind[kind]
        new, planned, skipped = extend_words(tok, words)
        assert not skipped
        sub = tok.convert_ids_to_tokens(planned[0].sub_ids)
        assert kind != "llama2" or any(tokens.BYTE_PIECE.fullmatch(p) for p in sub)
        for text, start, end in (("the café said", 4, 8), ("the naïve-ish (café)", 4, 13)):
            assert len(span(new, text, start, end)) == 1
            assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text
    _, planned, skipped = extend_words(tokenizers_by_kind["metaspace"], words)  # no byte fallback: <unk>, skipped
    assert not planned and all("unknown token" in s.reason for s in skipped)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_word_and_hyphenated(tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    new, planned, _ = extend_words(tok, ["spill the beans", "soup-cook"], "vocab")
    assert {t.kind for t in planned} == {"vocab"}
    for text, start, end in (("the spill the beans said", 4, 19), ("the soup-cook said", 4, 13),
                             ("spill the beans, said", 0, 15), ("the (soup-cook)", 5, 14)):
        assert len(span(new, text, start, end)) == 1, new.tokenize(text)
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text
    assert new("the spill said")["input_ids"] == tok("the spill said")["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_save_reload_resave_same_ids(tokenizers_by_kind, corpus_text, tmp_path, kind, mode, family):
    tok = tokenizers_by_kind[kind]
    config = tiny_config(family, len(tok))
    new, planned, _ = extend_words(tok, NEW_WORDS, mode, config)
    texts = check.probe_paragraphs([corpus_text[:5000], PLAIN])
    expected = [new(t)["input_ids"] for t in texts]
    for cycle in ("a", "b"):
        new.save_pretrained(tmp_path / cycle)
        config.to_json_file(tmp_path / cycle / "config.json")
        new = AutoTokenizer.from_pretrained(tmp_path / cycle)
        assert [new(t)["input_ids"] for t in texts] == expected, cycle
    assert not any((tmp_path / "b" / n).exists() for n in ("vocab.json", "merges.txt", "tokenizer.model"))
    saved = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert mode == "added" or saved["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")


def test_model_class_that_rebuilds_its_pipeline_falls_back_to_added(tokenizers_by_kind):
    """transformers 5 loads Qwen2-family tokenizers as Qwen2Tokenizer, which rebuilds its pipeline and would drop
    the vocab extension: auto falls back to added tokens, vocab refuses."""
    tok = tokenizers_by_kind["bytelevel"]
    config = tiny_config("qwen2", len(tok))
    new, planned, _ = extend_words(tok, NEW_WORDS, "auto", config)
    assert {t.kind for t in planned} == {"added"}
    assert len(span(new, "the palatable said", 4, 13)) == 1
    with pytest.raises(UserInputError, match="tokenizer-mode vocab"):
        extend_words(tok, NEW_WORDS, "vocab", config)


def test_trie_pattern_matches_exactly_the_strings_longest_first():
    import regex

    words = ["bival", "bivalve", "bi", "spill the beans", "a.b", "x(y)"]
    pattern = regex.compile(tokens.trie_pattern(words))
    for w in words:
        assert pattern.fullmatch(w)
    assert pattern.match("bivalves").group() == "bivalve"
    for other in ("biv", "bivalv", "spill the", "axb", "b"):
        assert not pattern.fullmatch(other)
    iso = regex.compile(extend.isolation_pattern([" bival", "bival"]))
    assert [m.group() for m in iso.finditer("bival bivalve xbival (bival) bival.")] == ["bival", "bival",
                                                                                       " bival"]


@pytest.mark.parametrize("kind", ("bytelevel", "llama2"))  # metaspace's tiny vocabulary has no byte fallback
def test_forms_that_would_not_decode_back_are_skipped(tokenizers_by_kind, kind):
    """HF's byte-level decoder reads a bare added form made of its byte alphabet as bytes ("naïve" decodes as
    "na\\ufffdve"): that form is skipped with the reason, the running-text form stays, and text decodes back."""
    tok = tokenizers_by_kind[kind]
    planned, skipped = tokens.plan_new_tokens(tok, ["naïve", "Zürich"])
    assert not skipped and {t.form for t in planned} == {" naïve", "naïve", " Zürich", "Zürich"}
    new, kept, dropped = extend.extend_decodable(tok, planned, "added")
    bytelevel = kind == "bytelevel"
    assert {t.form for t in kept} == ({" naïve", " Zürich"} if bytelevel else {t.form for t in planned})
    assert [s.word for s in dropped] == (["naïve", "Zürich"] if bytelevel else [])
    assert all("would not decode back: '(" in s.reason and "' would decode as '(" in s.reason and "\ufffd" in s.reason
               for s in dropped)
    for t in kept:
        assert new.convert_tokens_to_ids(t.form) == t.new_id
    for text in ("naïve said", "the naïve said", "the (Zürich)", "Zürich\nZürich"):
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text


def test_byte_fallback_pieces_hold_no_form(tokenizers_by_kind):
    """"x41" is in "<0x41>", a byte-fallback piece and no text: it splits nothing (Gemma-3 had left out the
    start-of-text forms of `x64` and `x86` as splitting "d" and a byte)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tj = json.loads(tokenizers_by_kind["llama2"].backend_tokenizer.to_str())
    tj["pre_tokenizer"]["prepend_scheme"] = "never"  # Gemma-3's: a bare form is stored as it is written
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), unk_token="<unk>")
    assert "<0x41>" in tok.get_vocab() and tokens.stored_piece(tok.backend_tokenizer, "x41", alone_ok=True) == "x41"
    assert not extend.vocabulary_collisions(tok, ["x41", "0x4"])


@pytest.mark.parametrize("kind", KINDS)
def test_variants_that_would_split_vocabulary_words_are_left_out(tokenizers_by_kind, kind, caplog):
    """An added token matches inside longer words: "hospit" would split every " hospital", one vocabulary token
    here. Its start-of-text variant only saves tokens, so it is left out with the reason; the word itself stays,
    with a warning that names what it splits; a word that splits nothing keeps its variant."""
    tok = tokenizers_by_kind[kind]
    assert set(extend.vocabulary_collisions(tok, [" hospit", "hospit", " palatable", "palatable"])) == {
        " hospit", "hospit"}
    planned, _ = tokens.plan_new_tokens(tok, ["hospit", "palatable"])
    assert {(t.word, t.variant) for t in planned} == {(w, v) for w in ("hospit", "palatable") for v in ("", "start")}
    with caplog.at_level("WARNING", logger="tokdistill_fast.tokens"):
        new, kept, dropped = extend.extend_decodable(tok, planned, "added")
    assert [(t.word, t.variant) for t in kept] == [("hospit", ""), ("palatable", ""), ("palatable", "start")]
    assert [(s.word, s.reason, s.form_only) for s in dropped] == [
        ("hospit", "its start-of-text form 'hospit', which as an added token would also split "
                   f"{extend.vocabulary_collisions(tok, ['hospit'])['hospit']!r} wherever it occurs", True)]
    assert "1 word(s) will also split longer words" in caplog.text and "' hospit' in" in caplog.text
    assert new(" hospital", add_special_tokens=False)["input_ids"] != tok(" hospital", add_special_tokens=False)[
        "input_ids"]  # the word's own form still splits it: what the warning says
    new, kept, dropped = extend.extend_decodable(tok, planned, "added", keep_listed=False)  # from a tokenizer
    assert [(t.word, t.variant) for t in kept] == [("palatable", ""), ("palatable", "start")]
    assert [s.word for s in dropped] == ["hospit", "hospit"] and "would also split" in dropped[0].reason
    assert not any(s.form_only for s in dropped)  # the word is gone with its forms
    new, kept, dropped = extend.extend_decodable(tok, planned, "vocab")  # forms isolated at word boundaries
    assert not dropped and len(kept) == 4 and {t.kind for t in kept} == {"vocab"}
    assert new(" hospital", add_special_tokens=False)["input_ids"] == tok(" hospital", add_special_tokens=False)[
        "input_ids"]


def test_word_list_reads_windows_files(tmp_path):
    """A BOM, CRLF line ends and whitespace or zero-width characters around a word are not part of the words;
    blank lines are skipped."""
    path = tmp_path / "words.txt"
    path.write_bytes("\ufeffpalatable\r\n\r\n  spill the beans\t\r\nnaïve\u200b\r\n\ufeffHg".encode("utf-8"))
    assert tokens.read_word_list(path) == ["palatable", "spill the beans", "naïve", "Hg"]


def test_word_list_reads_the_reference_codes_json_files(tmp_path):
    """The reference code's token files read as its loaders read them: JSON lines of {"entity", "count"} (the leading
    space of its running-text forms is implied here), and a JSON object of word lists, flattened in the file's order;
    a word list may also be a JSON list, and JSON lines may be plain strings."""
    lines = tmp_path / "medical.jsonl"
    lines.write_text('{"entity": " Hg", "count": 539}\n\n{"entity": " follow-up", "count": 177}\n"naïve"\n'
                     + json.dumps("line\u2028separator", ensure_ascii=False) + "\r\n")  # lines end at "\n" only
    assert tokens.read_word_list(lines) == ["Hg", "follow-up", "naïve", "line\u2028separator"]
    lists = tmp_path / "concepts.json"
    lists.write_text(json.dumps({"entities": ["United Nations", "World Bank Group"], "phrases": ["Spill the beans"]}))
    assert tokens.read_word_list(lists) == ["United Nations", "World Bank Group", "Spill the beans"]
    flat = tmp_path / "words.json"
    flat.write_text(json.dumps(["palatable", {"word": "umbelliferous"}]))
    assert tokens.read_word_list(flat) == ["palatable", "umbelliferous"]


def test_words_given_as_a_list_are_read_as_a_file_is():
    """distill(new_tokens=[...]) cleans its words as a word-list file does: space around a word is not part of it
    (" palatable" would otherwise plan "  palatable"), blank words are left out, and a list of none is refused."""
    assert swap.requested_words([" palatable", "palatable\n", "", " ", "spill the beans"], None) == (
        ["palatable", "palatable", "spill the beans"], [])
    with pytest.raises(UserInputError, match="new_tokens: no tokens in it"):
        swap.requested_words(["", " "], None)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_inside_stored_forms_and_other_normalizations(tokenizers_by_kind, kind):
    """A word holding a special token is skipped: its added token would take the control token's place in chat
    text. A stored form is read as the plain word even where it is a vocabulary entry ("Ġthe" is then skipped as
    one, never added with a literal "Ġ"), and a word repeated in another Unicode normalization is a duplicate."""
    tok = tokenizers_by_kind[kind]
    marker = "\u0120" if kind == "bytelevel" else "\u2581"
    planned, skipped = tokens.plan_new_tokens(tok, ["pala<eos>table", marker + "the", "café", "cafe\u0301"])
    reasons = {s.word: s.reason for s in skipped}
    assert reasons["pala<eos>table"] == "contains the special token '<eos>'"
    assert reasons["the"].startswith("already a vocabulary entry")
    assert reasons["cafe\u0301"] == "the word 'café' written in another Unicode normalization"
    assert not any(marker in t.form for t in planned)


def test_casing_variants_are_spellings_of_the_same_length_and_never_a_listed_word(tokenizers_by_kind):
    """Casing variants are the lower-case word and a title-cased first letter ("ǅemal", not "Ǆemal"), none that
    changes the length ("İzmirli" lower-cases to "i" + a combining dot, "ß" title-cases to "Ss"); a word the list
    holds is planned as itself, not as an earlier word's casing variant and then refused as a duplicate."""
    assert tokens.casing_variants("Palatable") == ["palatable"]
    assert tokens.casing_variants("ǆemal") == ["ǅemal"]
    assert tokens.casing_variants("İzmirli") == [] and tokens.casing_variants("ßtraße") == []
    planned, skipped = tokens.plan_new_tokens(tokenizers_by_kind["bytelevel"], ["palatable", "Palatable"],
                                              add_casing=True)
    assert [t.word for t in planned if t.variant_of is None] == ["palatable", "Palatable"] and not skipped


@pytest.mark.parametrize(("name", "text", "message"), [
    ("words.txt", 'palatable\n{"entity": " Hg", "count": 539}\n', "line 2 is a JSON object; name the file .jsonl"),
    ("words.txt", '["palatable", "resplendent"]\n', "line 1 is a JSON list; name the file .jsonl"),
    ("words.txt", 'palatable\n"resplendent"\n', "line 2 is a quoted string"),
    ("words.txt", 'palatable\t8\n', "line 1 holds a tab (a second column?)"),
    ("words.txt", '# my words\npalatable\n', "line 1 is a comment ('# ')"),
    ("words.txt", 'palatable\n\ufeff# my words\n', "line 2 is a comment ('# ')"),  # a BOM of a list pasted on
    ("words.txt", '\u200b{"entity": " Hg"}\n', "line 1 is a JSON object"),
    ("words.jsonl", '{"entity": " Hg"}\n{"entity": " mmHg"\n', "line 2 is not JSON"),
    ("words.jsonl", '{"text": " Hg"}\n', "line 1 is not a word"),
    ("words.json", '{"entities": "United Nations"}', "key 'entities' holds no list of words"),
    ("words.json", '[" Hg", 539]', "the file, item 2 is not a word"),
    ("words.json", '[]', "words.json: no tokens in it"),
])
def test_word_list_in_a_shape_it_cannot_read_is_refused(tmp_path, name, text, message):
    """A word list is never read as something else: JSON, a count column or a comment in a plain list, broken JSON,
    an object without a word field or a value that is not a word fail in one line naming the place (never adding
    `{"entity": ...}`, `palatable\t8` or `# my words` as a word)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserInputError, match=re.escape(message)):
        tokens.read_word_list(path)


@pytest.mark.parametrize("kind", ("bytelevel", "llama2"))
def test_words_without_spaces_are_their_own_running_text_form(tokenizers_by_kind, kind):
    """Japanese puts no space before a word: a Japanese word's token is its bare form, with no start-of-text
    variant, an added token (no boundary in the text a pre-tokenizer could isolate it at), emitted between Japanese
    letters, after a Latin word and at the start of text; a Latin word keeps its spaced and bare forms."""
    tok = tokenizers_by_kind[kind]
    new, planned, skipped = extend_words(tok, ["パッケージ", "ファイルシステム", "palatable"], "auto")
    assert not skipped
    assert [t.form for t in planned] == ["パッケージ", "ファイルシステム", " palatable", "palatable"]
    assert [t.kind for t in planned[:2]] == ["added", "added"]
    assert planned[0].sub_ids == tok("\nパッケージ", add_special_tokens=False)["input_ids"][-len(planned[0].sub_ids):]
    for text in ("Debianのパッケージを", "パッケージ管理", "GNOME パッケージ", "ファイルシステムのパッケージです"):
        start = text.index("パッケージ")
        assert span(new, text, start, start + len("パッケージ")) == [planned[0].new_id], new.tokenize(text)
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text
    _, only, _ = extend_words(tok, ["パッケージ"], "vocab")  # nothing for vocab mode to isolate: an added token
    assert [(t.form, t.kind) for t in only] == [("パッケージ", "added")]


def test_word_pattern_reads_words_without_spaces_wherever_they_occur():
    """A word written without spaces stands wherever it occurs, as its added token matches; a Latin word needs no
    word character of a spaced script beside it, and Japanese letters are none ("GNOMEの")."""
    pattern = tokens.word_pattern(["パッケージ", "GNOME"])
    text = "GNOMEのパッケージ管理、xGNOME、GNOMEs、Xパッケージ"
    assert pattern.findall(text) == ["GNOME", "パッケージ", "パッケージ"]


def test_zero_width_joiners_continue_a_word(tmp_path):
    """Persian joins a word's parts with a zero-width non-joiner ("می‌کنید", "کلی‌تر"), where Unicode's word
    segmentation never breaks (UAX #29): a word is not found after or before one, and a start-of-text form there
    counts as inside a longer word, so it is left out where that is most of its occurrences."""
    from tokdistill_fast.contexts import find_hits, split_inside_words

    pattern = tokens.word_pattern(["کنید", "کلی"])
    text = "شما کنید و می\u200cکنید، کلی و کلی\u200cتر و خوش\u200dکنید."
    assert pattern.findall(text) == ["کنید", "کلی"]
    bare, spaced = tokens.NewToken("کنید", "کنید", [0, 1]), tokens.NewToken("کلی", " کلی", [0, 1])
    _, stats = find_hits([(text, True, True)], [bare, spaced], 5, 10, 0)
    assert (stats.hits, stats.inside) == ([0, 1], [2, 1])  # " کنید" after a space is the running form's
    corpus = tmp_path / "fa.txt"
    corpus.write_text("\n\n".join(["می\u200cکنید و شما نمی\u200cکنید"] * 3), encoding="utf-8")
    assert list(split_inside_words([corpus], [bare], None)) == ["کنید"]


def longest_first(text: str, forms: list[str], reverse_ties: bool) -> list[str]:
    """llama.cpp's tokenizer_st_partition: each added form in turn, longest in UTF-8 bytes first (ties in either
    order: its sort is not stable), cuts its occurrences out of the text not yet matched, left to right."""
    order = sorted(forms[::-1] if reverse_ties else forms, key=lambda f: len(f.encode()), reverse=True)  # stable
    pieces: list[tuple[str, bool]] = [(text, False)]
    for form in order:
        cut: list[tuple[str, bool]] = []
        for piece, matched in pieces:
            while not matched and (i := piece.find(form)) >= 0:
                cut += [(piece[:i], False)] * (i > 0) + [(form, True)]
                piece = piece[i + len(form):]
            if piece or matched:
                cut.append((piece, matched))
        pieces = cut
    return [p for p, matched in pieces if matched]


def matched_forms(tok, forms: list[str], text: str) -> list[str]:
    """The added forms HF tokenizers matches in `text` (leftmost-longest), in order."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    added = set(forms)
    return [t for t in (tok.convert_tokens_to_string([p]) for p in tok.convert_ids_to_tokens(ids)) if t in added]


def test_overlapping_forms_are_those_runtimes_read_apart():
    """Forms where one ends with what another begins with: the later one goes where llama.cpp would cut text
    holding both apart from transformers; not where the earlier one is longer, a kept form spans both, or an
    overlap of one or two characters starts or ends inside a word of a script with spaces. A longer one is a piece
    both share, which words of real text hold (" rebooting", "rebooted")."""
    def planned(*forms: str) -> list[tokens.NewToken]:
        return [tokens.NewToken(f.strip(), f, [], variant="start" * (f[0] != " " and not tokens.spaceless(f)))
                for f in forms]

    found = extend.overlapping_forms(planned("東京", "京都", " New York", " York City", " palatable", "electron"), [])
    assert set(found) == {"京都", " York City"}
    assert found["京都"] == ("which overlaps '東京' (text holding both, '東京都', tokenizes differently in llama.cpp "
                            "and in transformers)")
    assert not extend.overlapping_forms(planned("データベース", "スキーマ"), [])  # the first is longer
    assert not extend.overlapping_forms(planned(" inclose", " inclosed", "inclosed"), [])  # " inclosed" spans
    assert not extend.overlapping_forms(planned(" it's", "submodule", " Control-C", "Content-Type", " vùng",
                                                "người"), [])
    found = extend.overlapping_forms(planned(" reboot", "reboot", "booting", "booted", "bootloader"), [])
    assert set(found) == {"booting", "booted", "bootloader"}
    assert "'rebooted'" in found["booted"]
    assert "' rebooting'" in extend.overlapping_forms(planned(" reboot", "booting"), [])["booting"]
    assert set(extend.overlapping_forms(planned(" right-click", "click-and-drag"), [])) == {"click-and-drag"}
    assert set(extend.overlapping_forms(planned("click-and-drag", " right-click"), [])) == {"click-and-drag"}
    assert set(extend.overlapping_forms(planned("京都"), ["東京"])) == {"京都"}  # the tokenizer's own come first
    words = [tokens.NewToken(f.strip(), f, []) for f in (" gvim", "vimrc", " gvimrc")]  # as `check` reads them
    assert not extend.overlapping_forms(words, [], keep_words=True)  # the later " gvimrc" spans the pair
    assert set(extend.overlapping_forms(words, [])) == {"vimrc"}  # unless that word may go


def test_overlapping_words_stay_where_listed_and_variants_go(tokenizers_by_kind, caplog):
    """A listed word that overlaps an earlier one stays, with a warning that names the pair; a start-of-text
    variant that overlaps goes; of words taken from another tokenizer, the later of the two goes. In vocab mode
    only the forms it makes added tokens are checked (here the Japanese ones)."""
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = tokens.plan_new_tokens(tok, ["東京", "京都", "right-click", "click-and-drag"])
    with caplog.at_level("WARNING", logger="tokdistill_fast.tokens"):
        new, kept, dropped = extend.extend_decodable(tok, planned, "added")
    assert [t.form for t in kept] == ["東京", "京都", " right-click", "right-click", " click-and-drag"]
    assert [(s.word, s.form_only) for s in dropped] == [("click-and-drag", True)]
    assert dropped[0].reason.startswith("its start-of-text form 'click-and-drag', which overlaps ")
    assert "1 listed word(s) overlap an earlier word" in caplog.text and "'京都' which overlaps '東京'" in caplog.text
    for mode in ("added", "vocab"):
        new, kept, dropped = extend.extend_decodable(tok, planned, mode, keep_listed=False)
        assert "京都" not in [t.form for t in kept] and "京都" in [s.word for s in dropped]
        assert len(new("東京都", add_special_tokens=False)["input_ids"]) == 1 + len(tok("都", add_special_tokens=False)[
            "input_ids"])


def test_forms_left_after_overlaps_tokenize_alike_in_both_runtimes(tokenizers_by_kind):
    """Random forms and texts of three Katakana letters: HF tokenizers (leftmost-longest) and llama.cpp's
    longest-first partition, with ties either way, match the same forms wherever overlapping forms are left out,
    and part on some text where they are not."""
    rng = random.Random(0)
    letters = "アイウ"
    parted = 0
    for trial in range(30):
        forms = sorted({"".join(rng.choices(letters, k=rng.randint(2, 4))) for _ in range(6)})
        texts = ["".join(rng.choices(letters, k=14)) for _ in range(40)]
        dropped = extend.overlapping_forms([tokens.NewToken(f, f, []) for f in forms], [])
        kept = [f for f in forms if f not in dropped]
        for chosen in (kept, forms):
            new = extend.extend_tokenizer(tokenizers_by_kind["bytelevel"], [tokens.NewToken(f, f, []) for f in chosen],
                                          "added")
            for text in texts:
                hf = matched_forms(new, chosen, text)
                same = all(hf == longest_first(text, chosen, r) for r in (False, True))
                if chosen is kept:
                    assert same, (trial, kept, text, hf)
                else:
                    parted += not same
    assert parted  # the check has something to catch


def test_converter_check_text_is_the_one_llama_cpp_hashes():
    """CONVERTER_CHECK_TEXT is the text the cached llama.cpp's converter hashes (tools.runtimes builds that cache;
    skipped without it): a llama.cpp that changes the text needs the copy updated."""
    from tokdistill_fast.tools import runtimes

    base = runtimes.tools().src / "conversion" / "base.py"
    if not base.is_file():
        pytest.skip("no llama.cpp sources cached (tokdistill check --runtime llama.cpp builds them)")
    lines = (ln.strip() for ln in base.read_text(encoding="utf-8").splitlines())
    line = next(ln for ln in lines if ln.startswith("chktxt = "))
    assert ast.literal_eval(line.removeprefix("chktxt = ")) == extend.CONVERTER_CHECK_TEXT


def test_vocab_mode_that_a_reload_drops_says_why_once(tokenizers_by_kind, monkeypatch, caplog):
    """Where the tokenizer reloaded as users will drops the vocab extension, `auto` warns and uses added tokens;
    `--tokenizer-mode vocab` is refused with that reason, and no warning says it is using added tokens."""
    tok = tokenizers_by_kind["bytelevel"]
    monkeypatch.setattr(extend, "encodes_as_one", lambda new, served: [False] * len(served))
    planned, _ = tokens.plan_new_tokens(tok, ["palatable"], add_variants=False)
    with caplog.at_level("WARNING"):
        extend.extend_tokenizer(tok, planned, "auto")
    assert "using added tokens" in caplog.text and planned[0].kind == "added"
    caplog.clear()
    planned, _ = tokens.plan_new_tokens(tok, ["palatable"], add_variants=False)
    with caplog.at_level("WARNING"), pytest.raises(UserInputError, match="does not emit one id for 1 form"):
        extend.extend_tokenizer(tok, planned, "vocab")
    assert "using added tokens" not in caplog.text

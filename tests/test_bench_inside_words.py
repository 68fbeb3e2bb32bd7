"""bench/inside_words.py groups held-out paragraphs by how an added-token tokenizer changes them."""

from bench.inside_words import groups
from tokdistill_fast import extend, tokens


def test_groups_split_words_from_inside_word_matches(tokenizers_by_kind):
    tok = tokenizers_by_kind["bytelevel"]
    planned, _ = tokens.plan_new_tokens(tok, ["palatable"])
    new = extend.extend_tokenizer(tok, planned, "added", None)
    docs = ["a palatable dinner", "the unpalatable soup", "the soup was warm", "palatable, and unpalatable"]
    assert groups(docs, tok, new, ["palatable"]) == {"with_words": ["a palatable dinner", "palatable, and unpalatable"],
                                                    "inside_only": ["the unpalatable soup"]}

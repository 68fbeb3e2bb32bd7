"""Top-up through distill(): with --top-up continue (the default) a token with fewer corpus snippets than
--snippets-per-token gets the model's continuations of its own snippets up to the budget, and a token without any
gets snippets generated from the word; with --top-up word only tokens under a quarter of the budget are topped up,
from the word (the paper's prompt). The report says per token how many contexts it had and where they came from."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast import DistillConfig, distill, pipeline
from tokdistill_fast.contexts import Snippet, draw, from_corpus, generate, sample, start_id
from tokdistill_fast.tokens import NewToken

PER_TOKEN = 8  # a quarter is 2: one corpus snippet is too few for either top-up
CFG = dict(snippets_per_token=PER_TOKEN, snippet_length=24, batch_size=4, target_layer=2, lr=1e-2, epochs=1,
           dtype="float32", device="cpu", add_variants=False)
WORDS = ["palatable", "quokka", "zygomorphic"]  # in most documents, in one, in none
RARE = "We saw a quokka near the river."
LOSS_POSITIONS = DistillConfig().run_loss_positions()  # training reads no further, so top-ups sample no further


@pytest.fixture(scope="module", params=["continue", "word"])
def topped_up(request, model_dirs, corpus_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("topup")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text + "\n" + RARE + "\n", encoding="utf-8")
    seen = []
    build = pipeline.build_workload

    def spy(*args, **kwargs):  # the workload training reads: its snippets, each with its source
        seen.append(build(*args, **kwargs))
        return seen[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "build_workload", spy)
    try:
        result = distill(model_dirs[("llama", "bytelevel", True)], WORDS, [corpus],
                         config=DistillConfig(**CFG, top_up=request.param))
    finally:
        mp.undo()
    return request.param, result, seen[0]


def test_report_says_where_each_tokens_contexts_came_from(topped_up):
    mode, result, _ = topped_up
    got = {t["word"]: (t["source"], t["corpus_contexts"], t["contexts"]) for t in result.report["tokens"]}
    assert got == {"palatable": ("corpus", PER_TOKEN, PER_TOKEN),
                   "quokka": (f"corpus+{'continued' if mode == 'continue' else 'generated'}", 1, PER_TOKEN),
                   "zygomorphic": ("generated", 0, PER_TOKEN)}
    assert result.report["retrieval"]["hits"]["zygomorphic"] == 0
    examples = {t["word"]: t["example"] for t in result.report["tokens"]}  # its first snippet's text, as trained on
    assert all(word in examples[word] for word in WORDS), examples
    assert examples["zygomorphic"].startswith(" zygomorphic")  # generated from the word: the word comes first


def test_top_up_snippets_are_the_models_continuations(topped_up):
    """The snippets training reads: corpus ones for the frequent word; for the rare word its one corpus snippet and
    the model's continuations of it after the word (--top-up continue) or of the word alone (word); for the absent
    word, continuations of the word alone. Sampled: they differ, and hold at most --loss-positions - 1 new ids."""
    mode, result, work = topped_up
    tok = result.tokenizer
    index = {t.word: i for i, t in enumerate(result.tokens)}
    by_word = {w: [s for s in work.snippets if s.token == index[w]] for w in WORDS}
    assert [s.source for s in by_word["palatable"]] == ["corpus"] * PER_TOKEN
    extra = "continued" if mode == "continue" else "generated"
    assert Counter(s.source for s in by_word["quokka"]) == {"corpus": 1, extra: PER_TOKEN - 1}
    assert [s.source for s in by_word["zygomorphic"]] == ["generated"] * PER_TOKEN
    start = start_id(tok)
    (found,) = [s.ids for s in by_word["quokka"] if s.source == "corpus"]
    sub = result.tokens[index["quokka"]].sub_ids
    quokka = found[:next(k for k in range(len(found)) if found[k:k + len(sub)] == sub) + len(sub)]
    assert quokka[0] == start and tok.decode(quokka[1:]).endswith("We saw a quokka")  # the corpus's left context
    for w, prompt in (("quokka", quokka if mode == "continue" else [start, *result.tokens[index["quokka"]].sub_ids]),
                      ("zygomorphic", [start, *result.tokens[index["zygomorphic"]].sub_ids])):
        topped = [s.ids for s in by_word[w] if s.source == extra or w == "zygomorphic"]
        for ids in topped:
            assert ids[:len(prompt)] == prompt and len(prompt) < len(ids) <= len(prompt) + LOSS_POSITIONS - 1
        assert len({tuple(ids) for ids in topped}) > 1
    assert torch.isfinite(result.rows).all()


def test_continuation_prompts_end_after_the_word_and_cycle():
    """from_corpus cuts each corpus snippet right after the word's first occurrence past the start id and cycles
    through a token's snippets; generated snippets and tokens without a corpus snippet give no prompt."""
    toks = [NewToken("ab", " ab", [5, 6]), NewToken("cd", " cd", [7, 8])]
    snippets = [Snippet(0, [1, 2, 5, 6, 9, 5, 6], "corpus"), Snippet(0, [1, 5, 6, 3], "corpus"),
                Snippet(0, [1, 5, 6, 4], "generated"), Snippet(1, [1, 7, 8], "generated")]
    assert from_corpus(toks, snippets, {0: 3, 1: 2}) == [(0, [1, 2, 5, 6]), (0, [1, 5, 6]), (0, [1, 2, 5, 6])]


def test_generate_hands_the_lm_head_contiguous_states(model_dirs):
    """generate() passes the head a strided slice of the prompt's last states; on a CPU a strided bf16 input copies
    the head's weight once per row (and, past memory, turns oneDNN off for the process), so contexts.generate
    makes it contiguous while it samples, and leaves no hook behind."""
    path = model_dirs[("llama", "bytelevel", True)]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    head = model.get_output_embeddings()
    seen: list[bool] = []
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    sub = tok(" zygomorphic", add_special_tokens=False)["input_ids"]
    snippets = generate(model, tok, [NewToken("zygomorphic", " zygomorphic", sub)], {0: 3}, 12, 0, start_id(tok))
    probe.remove()
    assert len(snippets) == 3 and len(seen) > 1 and all(seen)
    assert not head._forward_pre_hooks


def test_a_word_longer_than_a_snippet_keeps_every_subtoken(model_dirs):
    """A word of more subtokens than --snippet-length holds keeps them all and one sampled id in a generated
    snippet, as a corpus window keeps a long word whole; cut at the length, its snippets would align no pair."""
    path = model_dirs[("llama", "bytelevel", True)]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompt = [start_id(tok), *tok(" zygomorphic" * 3, add_special_tokens=False)["input_ids"]]
    assert len(prompt) > 6
    (snippet,) = sample(model, tok, [(0, prompt)], 6, None, 0)
    assert snippet.ids[:len(prompt)] == prompt and len(snippet.ids) <= len(prompt) + 1


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draw_samples_the_tempered_softmax(temperature):
    """Inverse-CDF sampling draws each id with probability softmax(logits / T), and one seed gives one answer."""
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0])
    n = 40_000
    ids = draw(logits.expand(n, -1), temperature, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids.view(-1), minlength=5).double() / n
    want = torch.softmax(logits.double() / temperature, -1)
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max()  # within 4 standard errors
    assert torch.equal(ids, draw(logits.expand(n, -1), temperature, torch.Generator().manual_seed(0)))


def test_sampling_loop_continues_as_generate_does(model_dirs):
    """sample()'s loop over the key/value cache, with prompts of different lengths padded on the left in one chunk,
    continues each prompt as HF generate() does alone: at a temperature that makes every draw the most likely id,
    both give the greedy continuation. A repeated prompt is read once and continued as often as it is given."""
    path = model_dirs[("llama", "bytelevel", True)]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = [" the quokka", " we saw the quokka near a river", " a", " the quokka", " a"]
    prompts = [(k, [start_id(tok), *tok(t, add_special_tokens=False)["input_ids"]]) for k, t in enumerate(texts)]
    rows = []
    hook = model.model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    got = {s.token: s.ids for s in sample(model, tok, prompts, 64, 9, 0, temperature=1e-6)}
    hook.remove()
    assert rows[0][0] == 3 and all(r == (5, 1) for r in rows[1:])  # three distinct prompts read, five continued
    for k, p in prompts:
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=9, min_new_tokens=9, pad_token_id=0)
        assert got[k] == ref[0].tolist()


def test_generated_contexts_say_what_they_read(model_dirs, words_file, corpus_file, caplog, monkeypatch):
    """--contexts generate logs that it writes every token's contexts from the word (not 'too few corpus
    snippets'), warns that a --corpus given is read only for the output check's probe text, and shows no corpus bar
    where there is no corpus."""
    import logging

    from tokdistill_fast import corpus

    model, cfg = model_dirs[("llama", "bytelevel", True)], DistillConfig(**CFG, contexts="generate", more_epochs=0)
    with caplog.at_level(logging.INFO, logger="tokdistill_fast"):
        run = distill(model, words_file, [corpus_file], config=cfg)
    trained = sum(1 for t in run.report["tokens"] if t.get("source") == "generated")
    assert trained and f"generating contexts for {trained} token(s) from the words (--contexts generate)" in caplog.text
    assert "--corpus is read only for the output check's probe text" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokdistill_fast"):  # a method that trains nothing reads no contexts
        distill(model, words_file, [corpus_file], config=cfg.replace(method="mean"))
    assert "--corpus is read only" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(corpus, "progress", lambda *a, **k: pytest.fail("a corpus bar without a corpus"))
    with caplog.at_level(logging.INFO, logger="tokdistill_fast"):
        distill(model, words_file, [], config=cfg)
    assert "--corpus is read only" not in caplog.text and "too few corpus snippets" not in caplog.text

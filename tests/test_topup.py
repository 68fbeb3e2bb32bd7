"""Generated contexts top up through distill(): a token with fewer corpus snippets than a quarter of
--snippets-per-token gets snippets sampled from the model (prompted with the start id and its subtokens) up to the
budget, and the report says per token how many contexts it had and where they came from."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast import DistillConfig, distill, pipeline
from tokdistill_fast.contexts import generate, start_id
from tokdistill_fast.tokens import NewToken

PER_TOKEN = 8  # a quarter is 2: one corpus snippet is too few, and tops up
CFG = dict(snippets_per_token=PER_TOKEN, snippet_length=24, batch_size=4, target_layer=2, lr=1e-2, epochs=1,
           dtype="float32", device="cpu", add_variants=False)
WORDS = ["palatable", "quokka", "zygomorphic"]  # in most documents, in one, in none


@pytest.fixture(scope="module")
def topped_up(model_dirs, corpus_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("topup")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text + "\nWe saw a quokka near the river.\n", encoding="utf-8")
    seen = []
    build = pipeline.build_workload

    def spy(*args, **kwargs):  # the workload training reads: its snippets, each with its source
        seen.append(build(*args, **kwargs))
        return seen[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "build_workload", spy)
    try:
        result = distill(model_dirs[("llama", "bytelevel", True)], WORDS, [corpus], config=DistillConfig(**CFG))
    finally:
        mp.undo()
    return result, seen[0]


def test_report_says_where_each_tokens_contexts_came_from(topped_up):
    result, _ = topped_up
    got = {t["word"]: (t["source"], t["corpus_contexts"], t["contexts"]) for t in result.report["tokens"]}
    assert got == {"palatable": ("corpus", PER_TOKEN, PER_TOKEN),
                   "quokka": ("corpus+generated", 1, PER_TOKEN),
                   "zygomorphic": ("generated", 0, PER_TOKEN)}
    assert result.report["retrieval"]["hits"]["zygomorphic"] == 0


def test_generated_snippets_are_the_models_continuations_of_the_word(topped_up):
    """The snippets training reads: corpus ones for the frequent word, the found one plus generated ones for the rare
    word, generated ones only for the absent word, each starting with the start id and the word's subtokens."""
    result, work = topped_up
    tok = result.tokenizer
    index = {t.word: i for i, t in enumerate(result.tokens)}
    by_word = {w: [s for s in work.snippets if s.token == index[w]] for w in WORDS}
    assert [s.source for s in by_word["palatable"]] == ["corpus"] * PER_TOKEN
    assert sorted(s.source for s in by_word["quokka"]) == ["corpus"] + ["generated"] * (PER_TOKEN - 1)
    assert [s.source for s in by_word["zygomorphic"]] == ["generated"] * PER_TOKEN
    for w in ("quokka", "zygomorphic"):
        prompt = [start_id(tok), *result.tokens[index[w]].sub_ids]
        for s in (s for s in by_word[w] if s.source == "generated"):
            assert s.ids[:len(prompt)] == prompt and len(prompt) < len(s.ids) <= CFG["snippet_length"]
    # the generated snippets differ (sampled, not one greedy continuation repeated)
    assert len({tuple(s.ids) for s in by_word["zygomorphic"]}) > 1
    assert torch.isfinite(result.rows).all()


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
    snippets = generate(model, tok, [NewToken("zygomorphic", " zygomorphic", sub)], [0], 3, 12, 0, start_id(tok))
    probe.remove()
    assert len(snippets) == 3 and len(seen) > 1 and all(seen)
    assert not head._forward_pre_hooks

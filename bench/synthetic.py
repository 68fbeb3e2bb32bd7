"""A synthetic language for end-to-end benchmarks: a byte-level BPE tokenizer trained in-process, new words that
it splits into 2-5 subtokens (as domain words are in real tokenizers), and a corpus of documents in which every
new word occurs often enough for the full snippet budget. Seeded, so every run sees the same inputs.

Words are strings of consonant-vowel syllables. Common words (1-2 syllables, Zipf-distributed) make up the
running text and the tokenizer's training data; new words (2-4 syllables) never occur in that data, so BPE
splits them into pieces of about a syllable or a common word each. A second corpus of fresh documents holds
each new word `heldout_per_word` more times: text the run never trains on, for the held-out measure.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# Random weights with the statistics that decide whether distillation can learn (bench/results/learning.md).
# Decoder matrices and the output head: HF's init, std 0.02, at Llama-3.1-8B's hidden size 4096, scaled by
# sqrt(4096 / hidden) for other sizes, so that each projection's gain (fan_in x variance) and with it the growth of
# the residual stream layer by layer are those of the 8B config (for which this is HF's init itself).
REFERENCE_HIDDEN, REFERENCE_STD = 4096, 0.02
# Input embeddings as SmolLM2-135M-Instruct's trained table (measured: element std 0.136, row norms max/median 2.38,
# q99/median 1.56; a log-normal row scale with sigma 0.2 gives 1.59 and, over 128k rows, ~2.4). HF's init (0.02,
# max/median 1.15) makes the default learning rates (tuned on SmolLM2 and Gemma-3) move rows by 25% of an
# element per Adam step, and puts the largest norm, the untied clipping limit, just above the typical row.
EMBED_STD = 0.136
ROW_SPREAD = 0.2
CONSONANTS = "bcdfghklmnprstvz"
VOWELS = "aeiou"


@dataclass
class Language:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    new_words: list[str]
    subtokens: dict[int, int]  # subtoken count -> how many new words have it
    corpus: Path
    corpus_bytes: int
    heldout: Path | None = None  # documents of the same language the run never reads


@torch.no_grad()
def trained_like(model, seed: int = 0, table_std: float = EMBED_STD) -> None:
    """Redraw a causal LM's weights in place with the statistics above (norm weights stay at one), on the
    weights' own device. table_std=REFERENCE_STD with no row spread: the input table as HF's init draws it (the
    first H100 results' setting, which cannot learn)."""
    device = model.get_input_embeddings().weight.device
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(w: torch.Tensor) -> torch.Tensor:
        return torch.randn(w.shape, generator=g, device=device, dtype=torch.float32)

    std = REFERENCE_STD * math.sqrt(REFERENCE_HIDDEN / model.config.hidden_size)
    head = model.get_output_embeddings()
    table = model.get_input_embeddings().weight
    for w in [p for p in model.model.layers.parameters() if p.dim() == 2] + (
            [head.weight] if head is not None and head.weight is not table else []):
        w.copy_(randn(w).mul_(std))
    spread = ROW_SPREAD if table_std == EMBED_STD else 0.0
    scale = torch.exp(spread * torch.randn(table.shape[0], 1, generator=g, device=device))
    table.copy_(randn(table).mul_(table_std * scale))


def syllables() -> list[str]:
    """All CV and CVC syllables: 16 * 5 + 16 * 5 * 16 = 1360."""
    cv = [c + v for c in CONSONANTS for v in VOWELS]
    return cv + [s + c for s in cv for c in CONSONANTS]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 / Llama-3 style pre-tokenization) as a transformers fast tokenizer, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_language(out_dir: Path, n_new: int, per_word: int, vocab_size: int, seed: int = 0,
                  doc_words: int = 200, common: int = 3000, heldout_per_word: int = 0) -> Language:
    """Tokenizer, `n_new` new words and a corpus (written to out_dir/corpus.txt) where each new word occurs
    per_word + 2 times, about three new-word occurrences per document of ~doc_words words; with
    heldout_per_word > 0 also out_dir/heldout.txt, other documents with that many occurrences of each."""
    rng = random.Random(seed)
    syl = syllables()
    vocab: set[str] = set()
    while len(vocab) < common:
        vocab.add("".join(rng.choices(syl, k=rng.choice((1, 1, 2)))))
    words = sorted(vocab)
    rng.shuffle(words)
    cum = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))  # Zipf
    training = [" ".join(rng.choices(words, cum_weights=cum, k=doc_words)) for _ in range(1000)]
    tokenizer = train_tokenizer(training, vocab_size)
    new_words: list[str] = []
    subtokens: dict[int, int] = {}
    seen = set(vocab)
    while len(new_words) < n_new:
        word = "".join(rng.choices(syl, k=rng.randint(2, 4)))
        if word in seen:
            continue
        seen.add(word)
        n = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if 2 <= n <= 5:
            new_words.append(word)
            subtokens[n] = subtokens.get(n, 0) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    write_documents(corpus, rng, words, cum, [w for w in new_words for _ in range(per_word + 2)], doc_words)
    heldout = None
    if heldout_per_word > 0:
        heldout = out_dir / "heldout.txt"
        write_documents(heldout, rng, words, cum, [w for w in new_words for _ in range(heldout_per_word)], doc_words)
    return Language(tokenizer, new_words, dict(sorted(subtokens.items())), corpus, corpus.stat().st_size, heldout)


def write_documents(path: Path, rng: random.Random, words: list[str], cum: list[float], occurrences: list[str],
                    doc_words: int) -> None:
    """Documents of Zipf-drawn common words with three of `occurrences` (shuffled) inserted into each."""
    rng.shuffle(occurrences)
    docs = []
    for start in range(0, len(occurrences), 3):
        text = rng.choices(words, cum_weights=cum, k=doc_words)
        for w in occurrences[start:start + 3]:
            text.insert(rng.randint(1, len(text)), w)
        for i in range(12, len(text), 13):  # sentences, so snippets hold some punctuation
            text[i] += "."
        docs.append(" ".join(text))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")

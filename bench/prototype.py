"""The plain PyTorch prototype of Token Distillation: the yardstick for the library's CPU time (issue 18).

What a user would write in an afternoon from the paper: regex retrieval of up to 25 windows of at most 50 tokens
per word, batches of 16 snippets, the frozen model's full forward (`output_hidden_states`) for teacher and student
at every step (`model(..., output_hidden_states=True)`, as the transformers docs show it; `--body-only` calls the
decoder body without the LM head, the first thing an optimizing user would change), MSE at the aligned positions
of one fixed layer, AdamW on the new rows only, warm-up over the first
half of the steps. No caching, no truncation, no prefix sharing, no search. Same snippet start token as the
library (contexts.start_id) so both do the same work per snippet.

    python -m bench.prototype --model DIR --new-tokens words.txt --corpus train.txt [--layer 8]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import regex
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokdistill_fast.contexts import start_id


def find_snippets(tok, words: list[str], text: str, per_word: int, length: int) -> list[tuple[int, list, list, list]]:
    """(word index, left ids, the word's original ids, right ids) for up to `per_word` occurrences of each word
    (with the space before it when there is one), the word centred in a window of at most `length` tokens."""
    found = []
    for w, word in enumerate(words):
        hits = regex.finditer(r"(?<![\p{L}\p{N}]) ?" + regex.escape(word) + r"(?![\p{L}\p{N}])", text)
        for _, m in zip(range(per_word), hits):
            left = tok(text[max(0, m.start() - 400):m.start()], add_special_tokens=False)["input_ids"]
            mid = tok(m.group(), add_special_tokens=False)["input_ids"]
            right = tok(text[m.end():m.end() + 400], add_special_tokens=False)["input_ids"]
            half = (length - len(mid)) // 2
            found.append((w, left[-half:] if half else [], mid, right[:length - len(mid) - half]))
    return found


def right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of the sequences, right-padded to the longest."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--new-tokens", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--body-only", action="store_true", help="skip the LM head (model.model instead of model)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    forward = model.model if args.body_only else model
    words = [w.strip() for w in open(args.new_tokens, encoding="utf-8") if w.strip()]
    subs = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    table = model.get_input_embeddings().weight
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)  # Gemma scales looked-up rows; inputs_embeds not
    new_rows = torch.nn.Parameter(torch.stack([table[s].mean(0) for s in subs]))
    start = start_id(tok)
    snippets = find_snippets(tok, words, open(args.corpus, encoding="utf-8").read(), 25, 49)  # + start id
    random.shuffle(snippets)
    steps = (len(snippets) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW([new_rows], lr=args.lr, weight_decay=0.0)
    warm = max(1, steps // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses = []
    for i in range(steps):
        batch = snippets[i * args.batch_size:(i + 1) * args.batch_size]
        t_seqs = [[start, *l, *mid, *r] for w, l, mid, r in batch]
        s_seqs = [[start, *l, -1 - w, *r] for w, l, _, r in batch]  # -1 - w marks new row w

        t_ids, t_mask = right_padded(t_seqs, pad)
        s_ids, s_mask = right_padded(s_seqs, pad)
        with torch.no_grad():
            t_out = forward(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
        t_h = t_out.hidden_states[args.layer]
        is_new = s_ids < 0
        emb = table[s_ids.clamp(min=0)]
        emb = torch.where(is_new[..., None], new_rows[(-1 - s_ids).clamp(min=0)], emb) * scale
        s_h = forward(inputs_embeds=emb, attention_mask=s_mask, output_hidden_states=True).hidden_states[args.layer]
        diffs = []
        for b, (_, l, mid, r) in enumerate(batch):
            p, n = 1 + len(l), 1 + len(r)  # the new token's position, aligned positions from it on
            shift = len(mid) - 1
            diffs.append(s_h[b, p:p + n] - t_h[b, p + shift:p + shift + n])
        loss = torch.cat(diffs).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    print(json.dumps({"words": len(words), "snippets": len(snippets), "steps": steps, "layer": args.layer,
                      "body_only": args.body_only, "first_loss": losses[0], "last_loss": losses[-1],
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

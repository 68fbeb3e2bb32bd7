"""The bring-your-own-tokenizer example on real weights (docs/bring-your-own-tokenizer.md, `make example-byot`):
extend a model's BPE tokenizer by continuing its merges on a training corpus, learn rows for the new ids with
`--method mean` (subtoken-mean init) and with token distillation, and report held-out bits per character.

Bits per character is comparable across tokenizations (next-token KL is not): the sum of -log2 p(next token) over
a document read in its own tokenization, divided by the document's characters. Reported: each model's bpc on
held-out documents where T2 emits a new id, the share of the gap that mean init opens that distillation leaves
(gap_left = (distilled - original) / (mean - original): 0 = as good as the original model reading its own
tokenization, 1 = no better than mean init) and the tokens T2 saves per 1,000 characters.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokdistill_fast import distill
from tokdistill_fast.cli import _epochs, _positions
from tokdistill_fast.config import DistillConfig
from tokdistill_fast.contexts import start_id
from tokdistill_fast.corpus import iter_documents
from tokdistill_fast.target_tokenizer import load_tokenizer, new_ids_of
from tokdistill_fast.tools import extend_bpe

MAX_DOC_CHARS = 2000  # longer documents are cut at a space before this (most gcide entries are shorter)


def heldout_docs(paths: list[str], target, new: set[int], max_chars: int) -> list[str]:
    """The first held-out documents on which T2 emits a new id, up to max_chars characters in all."""
    docs, used = [], 0
    for doc in iter_documents(paths):
        doc = doc.strip()
        if len(doc) > MAX_DOC_CHARS:
            doc = doc[:doc.rfind(" ", 0, MAX_DOC_CHARS)]
        if doc and new.intersection(target(doc, add_special_tokens=False)["input_ids"]):
            docs.append(doc)
            used += len(doc)
            if used >= max_chars:
                break
    return docs


@torch.no_grad()
def bits_per_char(model_dir: Path, tokenizer, docs: list[str], lead: int) -> dict:
    """Held-out bits per character of the model reading `docs` in `tokenizer`'s tokenization, each document after
    the document-start id `lead`, the library's (contexts.start_id), so its first token is paid for too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bits = chars = tokens = 0.0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        x = torch.tensor([[lead] + ids])
        logp = model(x).logits[0, :-1].float().log_softmax(-1)
        bits += float(-logp.gather(1, x[0, 1:, None]).sum()) / float(torch.log(torch.tensor(2.0)))
        chars += len(doc)
        tokens += len(ids)
    return {"bpc": bits / chars, "chars": int(chars), "tokens": int(tokens)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", nargs="+", required=True, help="corpus the merges and the contexts come from")
    p.add_argument("--heldout", nargs="+", required=True)
    p.add_argument("--merges", type=int, default=200)
    p.add_argument("--heldout-chars", type=int, default=100_000)
    p.add_argument("--snippets-per-token", type=int, default=25)
    p.add_argument("--snippet-length", type=int, default=DistillConfig.snippet_length)
    p.add_argument("--epochs", type=_epochs, default=DistillConfig.epochs,
                   help="1, 2, ... (default: distill's) or auto (2 for token-distill, where no search runs)")
    p.add_argument("--loss-positions", type=_positions, default=DistillConfig.loss_positions,
                   help="pairs each snippet keeps from its own id on, all, or auto (distill's default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = {k: v for k, v in vars(args).items() if k != "out"}  # a rerun reuses the stages kept in out/: same args
    kept = json.loads((out / "args.json").read_text()) if (out / "args.json").is_file() else given
    if kept != given:
        changed = sorted(k for k in given if kept.get(k) != given[k])
        raise SystemExit(f"--out {out} holds a run with other arguments ({', '.join(changed)}): give another --out")
    (out / "args.json").write_text(json.dumps(given, indent=2))
    original, _ = load_tokenizer(args.model, "--model")
    t2_dir = out / "t2"
    t0 = time.perf_counter()
    if not (t2_dir / "tokenizer.json").is_file():
        merges = extend_bpe.continue_merges(original, extend_bpe.word_counts(original, iter_documents(args.train)),
                                            args.merges)
        extend_bpe.extended(original, merges).save_pretrained(t2_dir)
    seconds = {"extend": time.perf_counter() - t0}
    target, _ = load_tokenizer(t2_dir)
    for method in ("mean", "token-distill"):
        if not (out / method / "report.json").is_file():
            t0 = time.perf_counter()
            cfg = DistillConfig(method=method, snippets_per_token=args.snippets_per_token,
                                snippet_length=args.snippet_length, loss_positions=args.loss_positions,
                                overwrite=True, epochs=args.epochs)
            distill(args.model, None, args.train, out / method, cfg, target_tokenizer=t2_dir)
            seconds[method] = time.perf_counter() - t0
    new = set(new_ids_of(original, target, set()))
    docs = heldout_docs(args.heldout, target, new, args.heldout_chars)
    lead = start_id(original)
    rows = {}
    for name, model_dir, tok in (("original", Path(args.model), original), ("mean", out / "mean", target),
                                 ("token-distill", out / "token-distill", target)):
        saved = out / f"bpc-{name}-{args.heldout_chars}.json"  # each model's figure is kept: a rerun skips it
        if not saved.is_file():
            saved.write_text(json.dumps(bits_per_char(model_dir, tok, docs, lead)))
        rows[name] = json.loads(saved.read_text())
    o, m, d = rows["original"]["bpc"], rows["mean"]["bpc"], rows["token-distill"]["bpc"]
    report = json.loads((out / "token-distill" / "report.json").read_text())
    result = {"merges": args.merges, "new_ids": len(new), "heldout_docs": len(docs), "bpc": rows,
              "gap_left": (d - o) / (m - o) if m != o else None,
              "tokens_saved_per_1000_chars": 1000 * (rows["original"]["tokens"] - rows["mean"]["tokens"])
              / rows["original"]["chars"],
              "trained_ids": sum(t["contexts"] > 0 for t in report["tokens"]),
              "check_passed": report["check"]["passed"], "settings": {
                  k: report["settings"][k] for k in ("resolved_target_layer", "resolved_lr", "resolved_epochs",
                                                     "snippets_per_token", "snippet_length", "loss_positions",
                                                     "resolved_method")},
              "seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("| model reading | bpc | tokens per 1,000 chars |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bpc']:.4f} | {1000 * r['tokens'] / r['chars']:.1f} |")
    gap = "none (mean rows read as the original does)" if result["gap_left"] is None else f"{result['gap_left']:.3f}"
    print(f"gap left: {gap}; {result['trained_ids']} of {len(new)} new ids trained; "
          f"{len(docs)} held-out documents, {rows['original']['chars']} chars -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

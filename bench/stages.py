"""Teacher and student stage times of one model with each prefix-sharing mode, and how far the embeddings
of each mode are from the reference's (cosine similarity, final loss).

    python -m bench.stages --model DIR --corpus FILE --words 40 --layers 30,8 --modes off,on,fused

The new words are the corpus's top candidates (`tokdistill select`'s ranking). Every mode runs the same
snippets and seed, so differences between modes are floating-point only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from tokdistill_fast import DistillConfig, distill
    from tokdistill_fast.select import select_tokens

    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--words", type=int, default=40)
    p.add_argument("--layers", default="-1")
    p.add_argument("--modes", default="off,on,fused")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    words = [c.word for c in select_tokens(AutoTokenizer.from_pretrained(args.model), [args.corpus],
                                           top=args.words)]
    results = []
    print("| layer | mode | teacher s | student s | steps | student CPU s | cos vs first mode (min) | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in (int(x) for x in args.layers.split(",")):
        ref = None
        for mode in args.modes.split(","):
            cfg = DistillConfig(target_layer=layer, lr=1e-3 if layer == -1 else 5e-3, prefix_sharing=mode,
                                add_variants=False)
            cpu0 = time.process_time()
            run = distill(args.model, words, [args.corpus], None, cfg)
            cpu = time.process_time() - cpu0
            t, tr = run.report["timings"], run.report["training"]
            rows = run.rows.float()
            ref = rows if ref is None else ref
            cos = torch.nn.functional.cosine_similarity(rows, ref, dim=1).min().item()
            row = {"layer": layer, "mode": mode, "teacher_s": t.get("teacher", 0.0), "student_s": t["student"],
                   "steps": tr["steps"], "cpu_s": cpu, "cos_min": cos, "passes": run.report["implementations"],
                   "positions": tr["computed_positions"], "last_loss": tr["last_loss"]}
            results.append(row)
            print(f"| {layer} | {mode} | {row['teacher_s']:.1f} | {row['student_s']:.1f} | {row['steps']} | "
                  f"{cpu:.1f} | {cos:.5f} | {row['last_loss']:.5g} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

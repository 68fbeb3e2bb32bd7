"""Teacher and student stage times of one model under each prefix-sharing mode, on the same snippets, and how
far each mode's learned rows are from the first mode's (cosine similarity, losses).

    python -m bench.stages --model DIR --corpus FILE --words 40 --layers 30,8 --modes off,on

The new words are the corpus's top candidates (`tokdistill select`'s ranking) that get the full 25 snippets of
50 tokens from the corpus; retrieval and alignment run once,
then each (layer, mode) runs the teacher pass (unless fused) and training with the pipeline's defaults. Wall and
process CPU seconds are both reported: on a shared machine the CPU seconds are the steadier comparison. `fused`
(one epoch) runs the teacher inside each step and so keeps no sink guard: where the snippets hold sink pairs (the
`sink pairs` column of the other modes) it trains another job, whose rows differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch


def timed(fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds) of fn(*args, **kwargs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    from tokdistill_fast import align, contexts, rows, student, teacher, tokens
    from tokdistill_fast.config import pick_device, pick_dtype, silence_progress_bars
    from tokdistill_fast.control import autotune
    from tokdistill_fast.modeling import models
    from tokdistill_fast.tools.select import select_tokens

    p = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--words", type=int, default=40)
    p.add_argument("--min-count", type=int, default=40,
                   help="corpus occurrences a word needs: enough for its snippets without generated contexts")
    p.add_argument("--layers", default="-1")
    p.add_argument("--modes", default="off,on", help="off, on, fused (no sink guard: module docstring)")
    p.add_argument("--epochs", type=int, default=1, help="fused needs 1")
    p.add_argument("--groups", default="16", help="comma-separated student.Schedule.group values to run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; 1 makes CPU seconds a fair measure on a busy machine (no spinning)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    silence_progress_bars()  # the bars would bury the table's rows
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    model, tok = models.load_model(args.model, device, dtype)
    decoder = models.Decoder(model)
    candidates = [c.word for c in select_tokens(tok, [args.corpus], top=4 * args.words, min_count=args.min_count)]
    toks, _ = tokens.plan_new_tokens(tok, candidates, add_variants=False)
    snippets, _, _ = contexts.retrieve([args.corpus], tok, toks, 25, 50, 0, contexts.start_id(tok))
    full = [i for i in range(len(toks)) if sum(s.token == i for s in snippets) == 25][:args.words]
    row_of = {i: r for r, i in enumerate(full)}
    snippets = [s for s in snippets if s.token in row_of]
    table = decoder.embed_weight
    al = align.align([s.ids for s in snippets], [toks[i].sub_ids for i in full], [row_of[s.token] for s in snippets],
                     [table.shape[0] + r for r in range(len(full))])
    teacher_ids, cu_teacher = align.pack([s.ids for s in snippets])
    snippet_row = np.asarray([row_of[s.token] for s in snippets])
    init = rows.subtoken_mean(table, [toks[i] for i in full])
    print(f"{len(full)} tokens, {al.n} snippets, {int(cu_teacher[-1])} teacher tokens, "
          f"{int(al.cu_student[-1])} student tokens, {len(al.s_pos)} aligned pairs; {device}, {dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| layer | epochs | mode | group | teacher s (CPU s) | student s (CPU s) | steps (passes) | grad positions "
          "| sink pairs | cos vs first (min) | loss, first step -> mean of the last 10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for layer in (decoder.resolve_layer(int(x)) for x in args.layers.split(",")):
        first = None
        for mode, group in ((m, int(g)) for m in args.modes.split(",") for g in args.groups.split(",")):
            passes = student.resolve_passes(mode, "auto", args.epochs)
            cache, t_wall, t_cpu = None, 0.0, 0.0
            if not passes.fused:
                cache, t_wall, t_cpu = timed(teacher.compute, decoder, teacher_ids, cu_teacher, al,
                                             [layer], 8192, dtype, packed=passes.prefix)
            run, s_wall, s_cpu = timed(
                student.train, decoder, al, cache, snippet_row, init, None,
                student.Objective(distill="mse", layer=layer),
                student.Schedule(lr=autotune.default_lr(layer, decoder.num_layers), epochs=args.epochs, group=group),
                tied=True, passes=passes, teacher=(teacher_ids, cu_teacher))
            first = run.rows if first is None else first
            cos = torch.nn.functional.cosine_similarity(run.rows, first, dim=1).min().item()
            first_loss, last10 = float(run.step_loss[0]), float(np.mean(run.step_loss[-10:]))
            sinks = run.extra.get("sink_pairs", 0)
            results.append({"layer": layer, "epochs": args.epochs, "mode": mode, "group": group,
                            "passes": passes.describe(), "runs": run.extra["groups"],
                            "teacher_s": t_wall, "teacher_cpu_s": t_cpu, "student_s": s_wall,
                            "student_cpu_s": s_cpu, "steps": run.steps,
                            "positions": run.extra["positions"], "sink_pairs": sinks, "cos_min": cos,
                            "first_loss": first_loss, "last10_loss": last10})
            print(f"| {layer} | {args.epochs} | {mode} | {group} | {t_wall:.1f} ({t_cpu:.1f}) | {s_wall:.1f} "
                  f"({s_cpu:.1f}) | {run.steps} ({run.extra['groups']}) | {run.extra['positions']['with_grad']} | "
                  f"{sinks} | {cos:.5f} | {first_loss:.5g} -> {last10:.5g} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

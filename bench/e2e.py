"""End-to-end benchmark: what `tokdistill distill` runs with its defaults (tokenizer extension, Aho-Corasick
retrieval, alignment, the layer/lr search, teacher pass, training), on a model built from a published
configuration with random weights, on a synthetic language; with a held-out measure of whether it learned.

    python -m bench.e2e --config llama-3.1-8b --new-tokens 2500 --layers 8,32            # GPU, one process
    python -m bench.e2e --config llama-3.1-8b --new-tokens 250 --layers 8 --reference    # + plain PyTorch path
    python -m bench.e2e --config tiny --new-tokens 20 --target-layer 2 --reference        # CPU, seconds
    python -m bench.e2e --num-layers 9 --new-tokens 12 --snippets 10 --heldout-tokens 12 --layers 8 \
        --device cpu --dtype bfloat16                                                      # the 8B width, CPU minutes

On a machine without internet (the lent GPUs): install the package without dependencies first
(`pip install --no-deps --no-build-isolation -e .`) and carry a wheel of pyahocorasick if it is missing
(bench/gpu_check.sh does all of it).

The target layer is the search's choice (the lr the measured rule) unless --target-layer/--layers/--lr fix them;
the search's time is in the total. Writes bench/results/<device>-<config>-L<layer>.json per layer (-reference.json with
--reference): device, versions, what ran (report.json's `implementations`), seconds per phase and in total,
tokens/s, achieved TFLOP/s (2 FLOP x decoder parameters of the layers run, per computed position of the teacher
forward, the student forward and the student's input-gradient backward; attention's own FLOPs, padding and the
search are not counted) and its fraction of a bf16 matmul peak measured here; `heldout_loss_before/after`: the
objective (hidden-state MSE at the target layer) on held-out snippets of the new words at subtoken-mean init and
after training (evalrun.Baseline, what `tokdistill eval` measures; next-token KL beside it), `train_loss_*` the
same on snippets of the documents the run trained on (whether the optimization did its job where random weights
give held-out text little to learn from: bench/results/learning.md), and `norm_clipped`.
The random weights have trained-like statistics (synthetic.trained_like; bench/results/learning.md says why).
With --reference the plain PyTorch path (padded batches, no prefix sharing, reference kernels, Python aligner)
runs on the same inputs with the fast run's resolved settings, then again in the other dtype (bf16 <-> fp32):
the file holds the speedups, and the fast path's deviation from the plain one (embedding cosine, held-out loss)
beside that noise floor, and whether it sits within it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Published Llama-3.1-8B config.json values (meta-llama/Llama-3.1-8B); weights are random, so no download.
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   attention_bias=False, mlp_bias=False, tie_word_embeddings=False, initializer_range=0.02,
                   bos_token_id=128000, eos_token_id=128001)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
# CPU minutes: big enough for the learning behaviour to show (bench/results/learning.md), small enough to sweep.
SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
# model config, synthetic tokenizer vocab
CONFIGS = {"llama-3.1-8b": (LLAMA_31_8B, 8000), "small": (SMALL, 1200), "tiny": (TINY, 600)}


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul rate in FLOP/s: median of timed products of random square matrices (8192 on a GPU, after
    warm-up, timed with device events; 1024 on a CPU), the ceiling that achieved rates are compared with."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def check_varlen(device: torch.device) -> float:
    """Packed attention's kernel against its plain-PyTorch reference on random data (suffix queries over longer
    key sets, GQA): the relative error, which must be bf16-sized before any timing counts."""
    import numpy as np

    from tokdistill_fast.modeling import attention

    g = torch.Generator(device="cpu").manual_seed(0)
    q_len, k_len = np.array([5, 1, 17, 30]), np.array([12, 1, 17, 49])
    spec = attention.packed_spec(q_len, k_len - q_len).to(device)
    q = torch.randn(int(q_len.sum()), 32, 128, generator=g).to(device, torch.bfloat16)
    k, v = (torch.randn(int(k_len.sum()), 8, 128, generator=g).to(device, torch.bfloat16) for _ in range(2))
    ours = attention.varlen_causal(q, k, v, spec, 128**-0.5).double()
    gold = attention.varlen_causal_ref(q.double(), k.double(), v.double(), spec.cu_q, spec.cu_k, 128**-0.5)
    return ((ours - gold).norm() / gold.norm()).item()


def build_model(config: dict, device: torch.device, dtype: torch.dtype, weights: str = "trained-like", seed: int = 0):
    """Random-weight causal LM of the given config, created directly on the device in `dtype`, with the weight
    statistics of synthetic.trained_like. weights: "trained-like" (an input table like a trained one: the setting
    where distillation can learn) or "hf-init" (the input table as transformers draws it, std 0.02: for the 8B
    config exactly the first H100 results' model, whose rows the default learning rates overshoot)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.synthetic import EMBED_STD, REFERENCE_STD, trained_like

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    trained_like(model, seed, EMBED_STD if weights == "trained-like" else REFERENCE_STD)
    return model.eval().requires_grad_(False)


def layer_params(model) -> int:
    """Parameters of one decoder layer (all layers of these configs are alike)."""
    return sum(p.numel() for p in model.model.layers[0].parameters())


@dataclass
class Variant:
    """One distill() run of the benchmark: the fast defaults, the plain PyTorch path (reference), or the plain path
    in the other dtype (its noise floor). `fixed` (layer, lr, epochs, more epochs) pins the settings (the plain runs
    take the fast run's resolved ones, so they compare the computation, not two searches or dtypes' defaults)."""

    name: str
    plain: bool = False
    dtype: str | None = None  # None: the model's own
    fixed: tuple[int, float, int, int] | None = None


def run_pipeline(model, lang, args, variant: Variant) -> dict:
    """One distill() run with the library's defaults except where the flags or `variant` fix a setting; returns
    its timings, counts, FLOPs, resolved settings and the learned rows."""
    from tokdistill_fast import DistillConfig, contexts, distill

    layer, lr, epochs, more = variant.fixed or (args.target_layer or "auto", args.lr or "auto", DistillConfig.epochs,
                                                DistillConfig.more_epochs)
    cfg = DistillConfig(target_layer=layer, lr=lr, epochs=epochs, more_epochs=more, snippets_per_token=args.snippets,
                        snippet_length=args.snippet_length, seed=args.seed, log_every=args.log_every,
                        dtype=variant.dtype or str(next(model.parameters()).dtype).removeprefix("torch."),
                        **(dict(backend="torch", prefix_sharing="off", align_impl="python") if variant.plain else {}))
    t0 = time.perf_counter()
    result = distill(model, lang.new_words, [lang.corpus], None, cfg, tokenizer=lang.tokenizer)
    total = time.perf_counter() - t0
    r = result.report
    layers_run = r["settings"]["resolved_target_layer"]
    flop_per_pos = 2 * layer_params(model) * layers_run
    pos = r["training"]["computed_positions"]
    teacher = r["counts"]["teacher_tokens"]  # the teacher pass computes every snippet token once, fused or not
    student_fwd = pos["with_grad"] + pos.get("prefix", 0)
    flop = flop_per_pos * (teacher + student_fwd + pos["with_grad"])
    epochs, more = r["settings"]["resolved_epochs"], r["settings"]["resolved_more_epochs"]
    # whole sequences: one teacher pass, then 2 student passes an epoch (the more epochs ran whether kept or not)
    reference_flop = flop_per_pos * (teacher + 2 * (epochs + more) * r["counts"]["student_tokens"])
    timings = {k: round(v, 3) for k, v in r["timings"].items()}
    primaries = [i for i, t in enumerate(result.tokens) if t.variant_of is None]
    measured = [result.tokens[i] for i in primaries]
    return {"seconds": timings, "total_s": round(total, 3), "implementations": r["implementations"],
            "settings": {"target_layer": layers_run, "lr": r["settings"]["resolved_lr"], "epochs": epochs,
                         "more_epochs": more,
                         "searched": r["autotune"] is not None,
                         "dtype": cfg.dtype},
            "autotune": r["autotune"], "counts": r["counts"], "norm_clipped": r["counts"]["norm_clipped"],
            "positions": {"teacher_fwd": teacher, "student_fwd": student_fwd, "student_bwd": pos["with_grad"]},
            "tflop": flop / 1e12, "reference_work_tflop": reference_flop / 1e12,
            "achieved_tflops": flop / 1e12 / total, "effective_tflops": reference_flop / 1e12 / total,
            "new_tokens_per_s": r["counts"]["added"] / total, "snippet_tokens_per_s": teacher / total,
            "steps": r["training"]["steps"], "passes": r["training"]["passes"],
            "first_step_loss": r["training"]["first_loss"], "last_step_loss": r["training"]["last_loss"],
            "epoch_loss": r["training"]["epoch_loss"],
            "rows": result.rows[primaries], "tokens": measured,
            "extended": contexts.Extended.of(result.tokenizer, measured, result.tokens)}


class Heldout:
    """The held-out measure (evalrun.Baseline, what `tokdistill eval` runs) on snippets of the synthetic language's
    held-out documents (`split` "train": of the documents the run trained on), for an evenly spaced sample of
    `n_tokens` of the trained tokens: the objective's loss (hidden-state MSE at the target layer, mean per token)
    and next-token KL at the last layer, of any rows."""

    def __init__(self, model, lang, tokens: list, layer: int, n_tokens: int, snippets: int, length: int,
                 split: str = "heldout", extended=None):
        """`extended`: contexts.Extended of `tokens` (run_pipeline's), how the extended tokenizer reads the text."""
        from tokdistill_fast import contexts
        from tokdistill_fast.evaluation import evalrun
        from tokdistill_fast.modeling import models

        self.decoder = models.Decoder(model)
        self.layer, self.split = layer, split
        self.sample = np.linspace(0, len(tokens) - 1, num=min(n_tokens, len(tokens))).round().astype(int)
        V = self.decoder.embed_weight.shape[0]
        sampled = None if extended is None else contexts.Extended(extended.tokenizer,
                                                                  [extended.ids[i] for i in self.sample])
        self.baseline = evalrun.Baseline.build(self.decoder, lang.tokenizer, [tokens[i] for i in self.sample],
                                         [V + r for r in range(len(self.sample))],
                                         [lang.heldout if split == "heldout" else lang.corpus],
                                         evalrun.EvalOptions(snippets_per_token=snippets, layers=(layer,),
                                                             definitions=False, n_boot=200), length,
                                         extended=sampled)
        from tokdistill_fast.rows import subtoken_mean

        self.before = self.measure(subtoken_mean(self.decoder.embed_weight, [tokens[i] for i in self.sample]))

    def measure(self, rows: torch.Tensor) -> dict:
        """{"loss", "loss_ci95", "kl"} of new rows (all trained tokens, in token order)."""
        from tokdistill_fast.evaluation import heldout

        if rows.shape[0] != len(self.sample):
            rows = rows[torch.from_numpy(self.sample)]
        agg = self.baseline.measure(heldout.Scorer(self.decoder, rows=rows.float()), {}).aggregate
        mse = agg[f"mse@{self.layer}"]
        return {"loss": mse["mean"], "loss_ci95": mse["ci95"], "kl": agg["kl"]["mean"]}

    def record(self, run: dict) -> None:
        """Adds <split>_loss_before/after (and KL) for the run's rows to `run`."""
        t0 = time.perf_counter()
        after = self.measure(run["rows"])
        run.update({f"{self.split}_{k}": v for k, v in dict(
            loss_before=self.before["loss"], loss_after=after["loss"], loss_after_ci95=after["loss_ci95"],
            kl_before=self.before["kl"], kl_after=after["kl"], snippets=self.baseline.hs.n,
            tokens=len(self.sample), s=round(time.perf_counter() - t0, 3)).items()})


def summary(run: dict, peak: float) -> str:
    s = run["seconds"]
    teacher = "fused into student" if run["implementations"]["prefix_sharing"] == "fused" \
        else f"{s.get('teacher', 0):.1f} s"
    st = run["settings"]
    return (f"{run['total_s']:.1f} s total (contexts {s.get('contexts', 0):.1f} s, "
            f"search {s.get('autotune', 0):.1f} s, teacher {teacher}, student {s['student']:.1f} s), "
            f"{run['achieved_tflops']:.3g} TFLOP/s = "
            f"{run['achieved_tflops'] * 1e12 / peak:.0%} of the measured {peak / 1e12:.3g}, "
            f"{run['new_tokens_per_s']:.3g} new tokens/s; layer {st['target_layer']} lr {st['lr']:g}"
            f"{' (searched)' if st['searched'] else ''}; held-out loss {run['heldout_loss_before']:.5g} -> "
            f"{run['heldout_loss_after']:.5g}, KL {run['heldout_kl_before']:.4g} -> {run['heldout_kl_after']:.4g}; "
            f"on trained text {run['train_loss_before']:.5g} -> {run['train_loss_after']:.5g}; "
            + (f"training loss by epoch {run['epoch_loss'][0]:.5g} -> {run['epoch_loss'][-1]:.5g}; "
               if run["epoch_loss"] else "") +
            f"{run['norm_clipped']} clipped")


def cosine(a: dict, b: dict) -> dict:
    """Mean and min over rows of the cosine similarity of two runs' learned rows."""
    cos = torch.nn.functional.cosine_similarity(a["rows"].float(), b["rows"].float(), dim=1)
    return {"mean": cos.mean().item(), "min": cos.min().item()}


def agreement(fast: dict, plain: dict, floor: dict) -> dict:
    """The fast path against the plain one, beside the plain path's own noise floor (the same plain run in the
    other dtype). Within the floor when each deviation is at most twice the floor's (FlashAttention's rule)."""
    dev = {"embedding_cosine": cosine(fast, plain),
           "heldout_loss_diff": abs(fast["heldout_loss_after"] - plain["heldout_loss_after"])}
    noise = {"embedding_cosine": cosine(plain, floor),
             "heldout_loss_diff": abs(plain["heldout_loss_after"] - floor["heldout_loss_after"])}
    checks = {f"cosine_{k}": 1 - dev["embedding_cosine"][k] <= 2 * (1 - noise["embedding_cosine"][k])
              for k in ("mean", "min")}
    checks["heldout_loss"] = dev["heldout_loss_diff"] <= 2 * noise["heldout_loss_diff"]
    return {"fast_vs_plain": dev, "noise_floor": {"runs": f"plain {plain['settings']['dtype']} vs plain "
                                                          f"{floor['settings']['dtype']}", **noise},
            "checks": checks, "within_floor": all(checks.values())}


def speedups(fast: dict, ref: dict) -> dict:
    """Speedups per phase (reference seconds / fast seconds)."""
    def both(run: dict) -> float:
        return run["seconds"].get("teacher", 0.0) + run["seconds"]["student"]

    speedup = {k: ref["seconds"][k] / fast["seconds"][k] for k in ("contexts", "teacher", "student")
               if fast["seconds"].get(k, 0) > 0 and k in ref["seconds"]}
    speedup["teacher+student"] = both(ref) / both(fast)
    speedup["end_to_end"] = ref["total_s"] / fast["total_s"]
    return speedup


def versions() -> dict:
    import transformers

    from tokdistill_fast import env_report

    info = env_report()
    info["transformers"] = transformers.__version__
    return info


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would bury the results
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=CONFIGS, default="llama-3.1-8b")
    p.add_argument("--new-tokens", type=int, default=2500)
    p.add_argument("--target-layer", type=int, help="fix the target layer (1..L); default: the search's choice")
    p.add_argument("--layers", default=None, help="comma-separated fixed target layers, run in one process")
    p.add_argument("--lr", type=float, help="fix the learning rate; default: the search's choice")
    p.add_argument("--snippets", type=int, default=25, help="snippets per new token (the paper's 25)")
    p.add_argument("--snippet-length", type=int, default=50, help="tokens per snippet (the paper's 50)")
    p.add_argument("--heldout-tokens", type=int, default=256, help="trained tokens the held-out measure samples")
    p.add_argument("--heldout-snippets", type=int, default=4, help="held-out snippets per sampled token")
    p.add_argument("--num-layers", type=int,
                   help="keep the config's first N layers (the 8B config's width on a CPU: bench/results/learning.md)")
    p.add_argument("--weights", choices=("trained-like", "hf-init"), default="trained-like",
                   help="random weights' statistics (bench/results/learning.md)")
    p.add_argument("--reference", action="store_true",
                   help="also run the plain PyTorch path, and it again in the other dtype (its noise floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the model's dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--log-every", type=int, default=0,
                   help="log the mean step loss of every N steps, with the seconds since start (a run stopped at a "
                        "time limit still shows its pace and its loss)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_every else logging.WARNING,
                        format="%(relativeCreated)9.0f ms %(name)s: %(message)s")
    from bench.synthetic import make_language
    from tokdistill_fast.config import pick_device

    config, tok_vocab = CONFIGS[args.config]
    config_name = args.config if args.num_layers is None else f"{args.config}-{args.num_layers}-layers"
    if args.num_layers is not None:
        config = dict(config, num_hidden_layers=args.num_layers)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [args.target_layer]
    try:
        import ahocorasick  # noqa: F401  (retrieval's automaton; not on every GPU image)
    except ImportError:
        p.exit(2, "bench.e2e: pyahocorasick is not installed (pip install pyahocorasick, or carry its wheel)\n")
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        torch.bfloat16 if device.type == "cuda" else torch.float32
    other_dtype = "float32" if dtype == torch.bfloat16 else "bfloat16"
    from tokdistill_fast.modeling import attention

    varlen_error = check_varlen(device) if attention.implementation(device, dtype) == "flash varlen" else None
    if varlen_error is not None and not varlen_error < 1e-2:
        p.exit(1, f"bench.e2e: packed attention disagrees with its reference (relative error {varlen_error:.3g})\n")
    t0 = time.perf_counter()
    peak = matmul_peak(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        lang = make_language(Path(tmp), args.new_tokens, args.snippets, tok_vocab, args.seed,
                             heldout_per_word=args.heldout_snippets)
        t_lang = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = build_model(config, device, dtype, args.weights, args.seed)
        t_model = time.perf_counter() - t1
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for layer in layers:
            args.target_layer = layer
            fast = run_pipeline(model, lang, args, Variant("fast"))
            st = fast["settings"]
            measures = [Heldout(model, lang, fast["tokens"], st["target_layer"], args.heldout_tokens,
                                args.heldout_snippets, args.snippet_length, split, fast["extended"])
                        for split in ("heldout", "train")]
            for m in measures:
                m.record(fast)
            record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "config": config_name, "model_config": config, "weights": args.weights, "dtype": str(dtype),
                      "target_layer": layer or "auto", "new_tokens_requested": args.new_tokens,
                      "snippets_per_token": args.snippets, "snippet_length": args.snippet_length,
                      "subtoken_histogram": lang.subtokens, "corpus_bytes": lang.corpus_bytes,
                      "versions": versions(),
                      "setup_s": {"synthetic_language_and_peak": round(t_lang, 3), "model": round(t_model, 3)},
                      "matmul_peak_tflops": peak / 1e12, "varlen_check_rel_error": varlen_error}
            line = f"L{st['target_layer']} fast: {summary(fast, peak)}"
            runs = {"fast": fast}
            if args.reference:
                fixed = (st["target_layer"], st["lr"], st["epochs"], st["more_epochs"])
                for v in (Variant("reference", plain=True, fixed=fixed),
                          Variant("reference_other_dtype", plain=True, dtype=other_dtype, fixed=fixed)):
                    runs[v.name] = run_pipeline(model, lang, args, v)
                    for m in measures:
                        m.record(runs[v.name])
                    line += f"\nL{st['target_layer']} {v.name}: {summary(runs[v.name], peak)}"
                record["speedup"] = speedups(fast, runs["reference"])
                record["agreement"] = agreement(fast, runs["reference"], runs["reference_other_dtype"])
                a = record["agreement"]
                line += (f"\nL{st['target_layer']} speedup: "
                         + ", ".join(f"{k} {v:.2f}x" for k, v in record["speedup"].items())
                         + f"; embedding cosine fast vs plain {a['fast_vs_plain']['embedding_cosine']['mean']:.5f} "
                         f"(min {a['fast_vs_plain']['embedding_cosine']['min']:.5f}), plain's noise floor "
                         f"{a['noise_floor']['embedding_cosine']['mean']:.5f} (min "
                         f"{a['noise_floor']['embedding_cosine']['min']:.5f}): "
                         + ("within" if a["within_floor"] else "OUTSIDE") + " the floor")
            for name, run in runs.items():
                record[name] = {k: v for k, v in run.items() if k not in ("rows", "tokens", "extended")}
                record[name]["fraction_of_peak"] = run["achieved_tflops"] * 1e12 / peak
            suffix = "-reference" if args.reference else ""  # the side-by-side run keeps the timed run's file
            path = out_dir / f"{device_slug(device)}-{config_name}-L{layer or 'auto'}{suffix}.json"
            path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
            print(line, f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

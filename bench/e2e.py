"""End-to-end benchmark: the whole pipeline (tokenizer extension, Aho-Corasick retrieval, alignment, teacher pass,
training) on a model built from a published configuration with random weights, on a synthetic corpus.

    python -m bench.e2e --config llama-3.1-8b --new-tokens 2500 --layers 8,32            # GPU, one process
    python -m bench.e2e --config llama-3.1-8b --new-tokens 250 --layers 8 --reference    # + plain PyTorch path
    python -m bench.e2e --config tiny --new-tokens 20 --target-layer 2 --reference        # CPU, seconds

On a machine without internet (the lent GPUs): install the package without dependencies first
(`pip install --no-deps --no-build-isolation -e .`) and carry a wheel of pyahocorasick if it is missing.

Writes bench/results/<device>-<config>-L<layer>.json per layer (-reference.json with --reference): device,
versions, seconds per phase and in total, tokens/s, achieved TFLOP/s (2 FLOP x decoder parameters of the layers
run, per computed position of the teacher forward, the student forward and the student's input-gradient
backward; attention's own FLOPs and padding are not counted) and its fraction of a bf16 matmul peak measured
here. With --reference the plain PyTorch path (padded batches, no prefix sharing, reference kernels) runs on the
same inputs too, and the file holds its numbers, the speedups, and the cosine similarity between the two runs'
embeddings. Random weights change no FLOP count; the synthetic words split into 2-5 subtokens each (the
histogram is in the file).
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
from pathlib import Path

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
CONFIGS = {"llama-3.1-8b": (LLAMA_31_8B, 8000), "tiny": (TINY, 600)}  # model config, synthetic tokenizer vocab
# Learning rates of the pipeline's fixed defaults (pipeline.default_lr): last layer vs. earlier layers.
LR_LAST, LR_EARLIER = 1e-3, 5e-3


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

    from tokdistill_fast import attention

    g = torch.Generator(device="cpu").manual_seed(0)
    q_len, k_len = np.array([5, 1, 17, 30]), np.array([12, 1, 17, 49])
    spec = attention.packed_spec(q_len, k_len - q_len).to(device)
    q = torch.randn(int(q_len.sum()), 32, 128, generator=g).to(device, torch.bfloat16)
    k, v = (torch.randn(int(k_len.sum()), 8, 128, generator=g).to(device, torch.bfloat16) for _ in range(2))
    ours = attention.varlen_causal(q, k, v, spec, 128**-0.5).double()
    gold = attention.varlen_causal_ref(q.double(), k.double(), v.double(), spec.cu_q, spec.cu_k, 128**-0.5)
    return ((ours - gold).norm() / gold.norm()).item()


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight causal LM of the given config, created directly on the device in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval().requires_grad_(False)


def layer_params(model) -> int:
    """Parameters of one decoder layer (all layers of these configs are alike)."""
    return sum(p.numel() for p in model.model.layers[0].parameters())


def run_pipeline(model, lang, layer: int, args, reference: bool) -> dict:
    """One distill() run; returns its timings, counts, FLOPs and the learned rows."""
    from tokdistill_fast import DistillConfig, distill

    cfg = DistillConfig(target_layer=layer, lr=LR_LAST if layer in (-1, model.config.num_hidden_layers)
                        else LR_EARLIER, snippets_per_token=args.snippets, snippet_length=args.snippet_length,
                        seed=args.seed, epochs=1, log_every=0,  # the paper's recipe, as its timing
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                        **(dict(backend="torch", prefix_sharing="off", align_impl="python") if reference else {}))
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
    reference_flop = flop_per_pos * (teacher + 2 * r["counts"]["student_tokens"])  # whole sequences, 3 passes
    timings = {k: round(v, 3) for k, v in r["timings"].items()}
    return {"seconds": timings, "total_s": round(total, 3), "implementations": r["implementations"],
            "counts": r["counts"], "positions": {"teacher_fwd": teacher, "student_fwd": student_fwd,
                                                 "student_bwd": pos["with_grad"]},
            "tflop": flop / 1e12, "reference_work_tflop": reference_flop / 1e12,
            "achieved_tflops": flop / 1e12 / total, "effective_tflops": reference_flop / 1e12 / total,
            "new_tokens_per_s": r["counts"]["added"] / total, "snippet_tokens_per_s": teacher / total,
            "steps": r["training"]["steps"], "passes": r["training"]["passes"],
            "first_loss": r["training"]["first_loss"],
            "last_loss": r["training"]["last_loss"], "rows": result.rows}


def summary(run: dict, peak: float) -> str:
    s = run["seconds"]
    teacher = "fused into student" if run["implementations"]["prefix_sharing"] == "fused" \
        else f"{s.get('teacher', 0):.1f} s"
    return (f"{run['total_s']:.1f} s total (contexts {s.get('contexts', 0):.1f} s, teacher {teacher}, student "
            f"{s['student']:.1f} s), {run['achieved_tflops']:.3g} TFLOP/s = {run['achieved_tflops'] * 1e12 / peak:.0%}"
            f" of the measured {peak / 1e12:.3g}, {run['new_tokens_per_s']:.3g} new tokens/s")


def compare(fast: dict, ref: dict) -> dict:
    """Speedups per phase (reference seconds / fast seconds) and the cosine similarity of the learned rows."""
    def both(run: dict) -> float:
        return run["seconds"].get("teacher", 0.0) + run["seconds"]["student"]

    speedup = {k: ref["seconds"][k] / fast["seconds"][k] for k in ("contexts", "teacher", "student")
               if fast["seconds"].get(k, 0) > 0 and k in ref["seconds"]}
    speedup["teacher+student"] = both(ref) / both(fast)
    speedup["end_to_end"] = ref["total_s"] / fast["total_s"]
    cos = torch.nn.functional.cosine_similarity(fast["rows"].float(), ref["rows"].float(), dim=1)
    return {"speedup": speedup, "embedding_cosine": {"mean": cos.mean().item(), "min": cos.min().item()}}


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
    p.add_argument("--target-layer", type=int, help="one target layer (1..L); --layers runs several")
    p.add_argument("--layers", default=None, help="comma-separated target layers, run in one process")
    p.add_argument("--snippets", type=int, default=25, help="snippets per new token (the paper's 25)")
    p.add_argument("--snippet-length", type=int, default=50, help="tokens per snippet (the paper's 50)")
    p.add_argument("--reference", action="store_true", help="also run the plain PyTorch path and compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from bench.synthetic import make_language
    from tokdistill_fast.models import pick_device

    config, tok_vocab = CONFIGS[args.config]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [args.target_layer or
                                                                         config["num_hidden_layers"]]
    try:
        import ahocorasick  # noqa: F401  (retrieval's automaton; not on every GPU image)
    except ImportError:
        p.exit(2, "bench.e2e: pyahocorasick is not installed (pip install pyahocorasick, or carry its wheel)\n")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from tokdistill_fast import attention

    varlen_error = check_varlen(device) if attention.implementation(device, dtype) == "flash varlen" else None
    if varlen_error is not None and not varlen_error < 1e-2:
        p.exit(1, f"bench.e2e: packed attention disagrees with its reference (relative error {varlen_error:.3g})\n")
    t0 = time.perf_counter()
    peak = matmul_peak(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        lang = make_language(Path(tmp), args.new_tokens, args.snippets, tok_vocab, args.seed)
        t_lang = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = build_model(config, device, dtype)
        t_model = time.perf_counter() - t1
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for layer in layers:
            fast = run_pipeline(model, lang, layer, args, reference=False)
            ref = run_pipeline(model, lang, layer, args, reference=True) if args.reference else None
            record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "config": args.config, "model_config": config, "dtype": str(dtype), "target_layer": layer,
                      "new_tokens_requested": args.new_tokens, "snippets_per_token": args.snippets,
                      "snippet_length": args.snippet_length, "subtoken_histogram": lang.subtokens,
                      "corpus_bytes": lang.corpus_bytes, "versions": versions(),
                      "setup_s": {"synthetic_language_and_peak": round(t_lang, 3), "model": round(t_model, 3)},
                      "matmul_peak_tflops": peak / 1e12, "varlen_check_rel_error": varlen_error,
                      "fast": {k: v for k, v in fast.items() if k != "rows"}}
            record["fast"]["fraction_of_peak"] = fast["achieved_tflops"] * 1e12 / peak
            line = f"L{layer} fast: {summary(fast, peak)}"
            if ref is not None:
                record["reference"] = {k: v for k, v in ref.items() if k != "rows"}
                record["reference"]["fraction_of_peak"] = ref["achieved_tflops"] * 1e12 / peak
                record.update(compare(fast, ref))
                line += (f"\nL{layer} reference: {summary(ref, peak)}\nL{layer} speedup: "
                         + ", ".join(f"{k} {v:.2f}x" for k, v in record["speedup"].items())
                         + f"; embedding cosine min {record['embedding_cosine']['min']:.5f}")
            suffix = "-reference" if args.reference else ""  # the side-by-side run keeps the timed run's file
            path = out_dir / f"{device_slug(device)}-{args.config}-L{layer}{suffix}.json"
            path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
            print(line, f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

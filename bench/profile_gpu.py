"""Where a fused training step's time goes: the pipeline's wall time, GPU kernel time under the profiler, and
packed-pass throughput by batch size (eager and torch.compile'd layers); --count-ops: the operators and fused
kernels the training loop launches per pass, by where they run (each is a kernel launch on a GPU; any device,
seconds on a CPU), with the layers' fast path (fused.py) or, --plain-layers, the Hugging Face modules.

    python -m bench.profile_gpu --config llama-3.1-8b --new-tokens 160 --layer 8
    python -m bench.profile_gpu --config small --new-tokens 60 --layer 2 --count-ops --device cpu [--plain-layers]
        [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, reps: int = 5) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def passes(decoder, layer: int, device: torch.device, label: str) -> None:
    """Tokens/s of a no-grad packed pass (the teacher) and a packed forward + input-gradient backward (the
    student) to `layer`, by number of 50-token sequences."""
    from tokdistill_fast.modeling.attention import Attend
    from tokdistill_fast.modeling.layout import lay_out

    V = decoder.embed_weight.shape[0]
    for B in (16, 64, 256):
        lengths = np.full(B, 50)
        flat = np.random.default_rng(0).integers(0, V, int(lengths.sum()))
        lay = lay_out(flat, np.arange(B) * 50, lengths, np.zeros(B), True).to(device)

        def teacher(lay=lay):
            with torch.no_grad():
                decoder.hidden_states(decoder.embed(lay.ids), [layer], lay.positions, Attend(lay.spec))

        def student(lay=lay):
            h0 = decoder.embed(lay.ids).detach().requires_grad_(True)
            out = decoder.hidden_states(h0, [layer], lay.positions, Attend(lay.spec))[layer]
            out.float().square().mean().backward()

        t, s = timeit(teacher, device), timeit(student, device)
        n = B * 50
        print(f"{label} B={B}: teacher {t * 1e3:.1f} ms ({n / t:.0f} tok/s), student fwd+bwd {s * 1e3:.1f} ms "
              f"({n / s:.0f} tok/s)", flush=True)


# Operators that only make a view or a new handle: no kernel, not counted.
VIEWS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "transpose", "t", "permute", "expand", "slice",
         "select", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh", "as_strided", "split", "unbind", "empty"}


class OpCount:
    """Counts the non-view aten operators dispatched while active, by the innermost tagged call they run in."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.where, self.counts = ["rest of the loop"], collections.Counter()
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ not in VIEWS:
                    counter.counts[counter.where[-1]] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode

    def count_calls(self, owner, name: str, stack: contextlib.ExitStack) -> None:
        """Count each call of owner.name (a launcher of kernels the dispatcher does not see) as one operator."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.counts[self.where[-1]] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        stack.callback(setattr, owner, name, original)

    def tag(self, owner, name: str, label: str, stack: contextlib.ExitStack) -> None:
        """Count what owner.name runs under `label` until `stack` closes."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def tagged(*args, **kwargs):
            self.where.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.where.pop()

        setattr(owner, name, tagged)
        stack.callback(setattr, owner, name, original)


def count_ops(model, lang, args) -> None:
    """Prints the aten operators per pass of the main run's training loop, by component."""
    from bench.e2e import Variant, run_pipeline
    from tokdistill_fast import student
    from tokdistill_fast.modeling import fused, packed
    from tokdistill_fast.modeling.models import Decoder
    from tokdistill_fast.student import steps, whitened

    count, runs = OpCount(), []
    with contextlib.ExitStack() as stack:
        for kernels in (fused.CppKernels, fused.TritonKernels):
            for name in ("rms_norm_fwd", "rms_norm_bwd", "rotate", "gated_fwd", "gated_bwd"):
                count.count_calls(kernels, name, stack)
        count.count_calls(fused.AttentionFunction, "_run", stack)
        if args.plain_layers:
            for owner, name in ((fused, "layer_kernels"), (packed, "supported")):
                stack.callback(setattr, owner, name, getattr(owner, name))
                setattr(owner, name, lambda *a: None)
        for owner, name, label in ((Decoder, "hidden_states", "decoder forward"),
                                   (torch.Tensor, "backward", "backward"),
                                   (whitened.WhitenedAdam, "step", "optimizer step"),
                                   (whitened.WhitenedAdam, "sync", "optimizer sync"),
                                   (steps.Rewind, "ahead", "group rewind"),
                                   (steps.Rewind, "take_steps", "group steps")):
            count.tag(owner, name, label, stack)
        train = student.train

        def counted(*a, **k):
            if runs:  # the main run only (the hardest quarter's continuation trains again)
                return train(*a, **k)
            with count.mode():
                result = train(*a, **k)
            runs.append(result)
            return result

        student.train = counted
        stack.callback(setattr, student, "train", train)
        run_pipeline(model, lang, args, Variant("fast"))
    passes = runs[0].extra["groups"]
    print(f"main run ({'plain layers' if args.plain_layers else 'fast path'}): {runs[0].steps} steps as {passes} "
          f"passes, {sum(count.counts.values()) / passes:.0f} operators and fused kernels per pass (views not counted)")
    for label, n in count.counts.most_common():
        print(f"  {label:18s} {n / passes:8.1f}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from bench.e2e import CONFIGS, Variant, build_model, run_pipeline
    from bench.synthetic import make_language
    from tokdistill_fast.config import pick_device
    from tokdistill_fast.control.autotune import default_lr
    from tokdistill_fast.modeling.models import Decoder

    p = argparse.ArgumentParser(prog="python -m bench.profile_gpu")
    p.add_argument("--config", choices=CONFIGS, default="llama-3.1-8b")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--layer", type=int, default=8, help="target layer, 1..the config's layers")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd layers")
    p.add_argument("--count-ops", action="store_true", help="only count the operators per pass (any device)")
    p.add_argument("--plain-layers", action="store_true",
                   help="with --count-ops: the Hugging Face modules instead of the layers' fast path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on a CPU")
    args = p.parse_args(argv)
    args.snippets, args.snippet_length, args.seed, args.log_every = 25, 50, 0, 0
    args.target_layer = args.layer  # layer and lr fixed: the profile is of the main run, not of the search
    logging.basicConfig(level=logging.WARNING)
    device = pick_device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(
        torch, args.dtype)
    config, tok_vocab = CONFIGS[args.config]
    if not 1 <= args.layer <= config["num_hidden_layers"]:
        p.error(f"--layer {args.layer}: the {args.config} config has layers 1..{config['num_hidden_layers']}")
    model = build_model(config, device, dtype)
    decoder = Decoder(model)
    args.lr = default_lr(args.layer, decoder.num_layers)
    with tempfile.TemporaryDirectory() as tmp:
        lang = make_language(Path(tmp), args.new_tokens, args.snippets, tok_vocab, args.seed)
        if args.count_ops:
            count_ops(model, lang, args)
            return 0
        run = run_pipeline(model, lang, args, Variant("fast"))
        print(f"pipeline: {run['total_s']:.2f} s, {run['seconds']}, {run['steps']} steps, "
              f"{run['achieved_tflops']:.0f} TFLOP/s", flush=True)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                run = run_pipeline(model, lang, args, Variant("fast"))
                wall = time.perf_counter() - t0
            events = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in events) / 1e6
            print(f"profiled: wall {wall:.2f} s, student {run['seconds']['student']:.2f} s, GPU kernels {gpu:.2f} s",
                  flush=True)
            print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    passes(decoder, args.layer, device, "eager")
    if args.compile:
        t0 = time.perf_counter()
        for i, layer in enumerate(decoder.layers):
            decoder.layers[i] = torch.compile(layer, dynamic=True)
        passes(decoder, args.layer, device, "compiled")
        print(f"compiled pass incl. compile: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

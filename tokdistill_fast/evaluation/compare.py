"""`tokdistill compare`: several initialization methods on the same tokens, training snippets, teacher cache,
held-out snippets and seeds, written as a markdown table, a JSON file and PNG plots.

The run goes through the same path as `tokdistill distill` (pipeline.py): pipeline.prepare once (model, token
planning, training contexts and alignment, all from the base config, so every distillation flag counts as in
distill), one teacher pass truncated at the deepest layer any method reads (all swept layers cached from it),
the original model's held-out pass and its definitions. Each method then resolves its settings
(pipeline.settle: "auto" values run the same search a distill run would), trains its rows (pipeline.learn_rows)
and is scored (evalrun.Baseline.measure).

A method is a spec string METHOD[@key=value,...], e.g. `token-distill@layer=8,lr=5e-3`, with keys layer, lr,
epochs, loss, batch and seeds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import contexts, export, pipeline, student
from ..config import METHODS, TRAINED_METHODS, DistillConfig, UserInputError
from ..corpus import corpus_files
from . import heldout, stats
from .evalrun import Baseline, EvalOptions, Measured

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("random", "mean", "ntp", "ntp-all", "token-distill", "token-distill+ntp",
                   "token-distill+alpha-ntp", "token-distill@loss=kl", "token-distill@loss=logits-mse")
RANDOMIZED = ("random",)  # methods whose result depends on the seed beyond batch order: several seeds by default
SPEC_KEYS = {"layer": "target_layer", "lr": "lr", "epochs": "epochs", "loss": "loss", "batch": "batch_size"}


@dataclass
class MethodSpec:
    """One method setting to compare."""

    label: str
    method: str
    changes: dict = field(default_factory=dict)  # DistillConfig fields
    seeds: int = 1
    group: str = "methods"  # methods | layers | lrs


def _value(key: str, raw: str):
    if raw == "auto" and key in ("layer", "lr", "epochs"):
        return "auto"
    try:
        return {"layer": int, "lr": float, "epochs": int, "batch": int, "seeds": int}.get(key, str)(raw)
    except ValueError:
        raise UserInputError(f"method spec: {key}={raw!r} is not a valid value") from None


def parse_spec(text: str, seeds: int = 1, group: str = "methods") -> MethodSpec:
    """`METHOD[@key=value,...]` -> MethodSpec. Randomized methods get `seeds` seeds unless the spec says seeds=N."""
    method, _, rest = text.strip().partition("@")
    if seeds < 1:
        raise UserInputError(f"--seeds must be 1 or more, not {seeds}")
    if method not in METHODS:
        raise UserInputError(f"method spec {text!r}: unknown method {method!r} (one of {', '.join(METHODS)})")
    spec = MethodSpec(text.strip(), method, seeds=seeds if method in RANDOMIZED else 1, group=group)
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or (key not in SPEC_KEYS and key != "seeds"):
            raise UserInputError(f"method spec {text!r}: expected key=value with keys "
                                 f"{', '.join([*SPEC_KEYS, 'seeds'])}, got {item!r}")
        if key == "seeds":
            spec.seeds = _value(key, raw)
            if spec.seeds < 1:
                raise UserInputError(f"method spec {text!r}: seeds must be 1 or more, not {spec.seeds}")
        else:
            spec.changes[SPEC_KEYS[key]] = _value(key, raw)
    return spec


def sweep_specs(layers: list[int], lrs: list[float], base_layer: int | str) -> list[MethodSpec]:
    """token-distill at each target layer (the paper's Figure 2), and at each learning rate at the base layer."""
    specs = [parse_spec(f"token-distill@layer={l}", group="layers") for l in layers]
    specs += [parse_spec(f"token-distill@layer={base_layer},lr={lr:g}", group="lrs") for lr in lrs]
    return specs


@dataclass
class Outcome:
    """A spec's runs: resolved settings (`loss`: the distillation loss it trained, None for methods without one),
    one Measured per seed, seconds of training per seed."""

    spec: MethodSpec
    loss: str | None
    layer: int
    lr: float
    epochs: int
    runs: list[Measured]
    train_seconds: list[float]
    eval_seconds: list[float]

    def values(self, name: str) -> np.ndarray:
        """Per-snippet values averaged over seeds (paired comparisons use these)."""
        return np.mean([m.values[name] for m in self.runs], axis=0)

    def stat(self, name: str) -> dict:
        """mean with a 95% interval (one seed) or mean and std over seeds."""
        means = [m.aggregate[name]["mean"] for m in self.runs]
        if len(means) == 1:
            return {"mean": means[0], "ci95": self.runs[0].aggregate[name]["ci95"]}
        return {"mean": float(np.mean(means)), "std": float(np.std(means, ddof=1)), "seeds": len(means)}

    def definition_stat(self, name: str) -> dict | None:
        summaries = [m.definition_summary for m in self.runs if m.definition_summary]
        if not summaries:
            return None
        means = [s[name]["mean"] for s in summaries]
        if len(means) == 1:
            return dict(summaries[0][name])
        return {"mean": float(np.mean(means)), "std": float(np.std(means, ddof=1)), "seeds": len(means)}


def compare(model: str | Path, new_tokens, corpus: list, heldout_paths: list, out: str | Path,
            base: DistillConfig, specs: list[MethodSpec], opts: EvalOptions, overwrite: bool = False,
            reference: str | None = None) -> dict:
    """Run every spec on shared stages, score it against the held-out baseline, write results.json, table.md, plots.
    Paired differences are taken against the spec labelled `reference` (None: "mean", where it is compared)."""
    labels = [s.label for s in specs]
    if twice := sorted({label for label in labels if labels.count(label) > 1}):
        raise UserInputError(f"--methods, --layers and --lrs give {', '.join(twice)} more than once: each setting "
                             "is compared once")
    if reference is not None and reference not in labels:
        raise UserInputError(f"--reference {reference!r}: not one of the compared settings ({', '.join(labels)})")
    reference = reference or "mean"
    corpus_files(heldout_paths, "--heldout")  # a missing held-out file fails here, not after the shared stages
    out = export.check_out_dir(out, overwrite, [model, new_tokens, *corpus, *heldout_paths], replaces=False)
    base = base.validate()
    opts = opts.validate()
    # a --loss for all applies to the methods that distill; the others have none
    cfgs = [base.replace(method=s.method, **{**({} if s.method.startswith("token-distill") else {"loss": "mse"}),
                                             **s.changes}).validate() for s in specs]
    prep = pipeline.prepare(model, new_tokens, corpus, base, trains=any(c.method in TRAINED_METHODS for c in cfgs))
    for c in cfgs:
        c.check_tied(prep.tied)
    toks, decoder, timer = prep.toks, prep.decoder, prep.timer
    V = decoder.embed_weight.shape[0]
    primaries = [i for i, t in enumerate(toks) if t.variant_of is None]
    # "auto" settings run the same search a distill run would, once per distinct setting (batch size included:
    # the search trains as the run would)
    settled: dict[str, tuple[tuple[int, float, int], float]] = {}
    keys = [json.dumps(c.as_dict(), sort_keys=True, default=str) for c in cfgs]
    for c, key in zip(cfgs, keys):
        if key not in settled:
            t0 = time.perf_counter()
            settled[key] = (pipeline.settle(prep, c)[0], time.perf_counter() - t0)
    found = [settled[key] for key in keys]
    cache = None
    layers = pipeline.teacher_layers(prep, [(c, layer) for c, ((layer, _, _), _) in zip(cfgs, found)])
    if layers and prep.work is not None:
        # packed as a standalone run's, where every method's student passes share prefixes: in bf16 the padded
        # pass rounds otherwise, and the rows then differ from those `distill` writes
        packed = all(student.Passes.for_config(c.replace(epochs=epochs)).prefix
                     for c, ((_, _, epochs), _) in zip(cfgs, found) if c.method in TRAINED_METHODS)
        with timer("teacher"):
            cache = pipeline.teacher_cache(prep, prep.work, layers, packed=packed)
        log.info("teacher cache: layers %s, %.1f MB", layers, cache.nbytes() / 2**20)
    with timer("heldout"):
        measured = [toks[i] for i in primaries]
        baseline = Baseline.build(decoder, prep.tokenizer, measured, [V + i for i in primaries], heldout_paths, opts,
                                  base.snippet_length,
                                  extended=contexts.Extended.of(prep.new_tokenizer, measured, toks))
    forms = {V + i: t.form for i, t in enumerate(toks)}
    results = {
        "model": str(model), "corpus": [str(c) for c in corpus], "heldout": [str(h) for h in heldout_paths],
        "settings": {**base.as_dict(), "eval": {**opts.__dict__, "layers": list(opts.layers)},
                     "device": str(prep.device), "dtype": str(prep.dtype)},
        "counts": {"tokens": len(primaries), "skipped": len(prep.skipped),
                   "casing_variants": sum(1 for t in toks if t.variant.startswith("casing")),
                   "train_snippets": len(prep.work.snippets) if prep.work else 0, "heldout_snippets": baseline.hs.n,
                   "tokens_with_heldout": int((baseline.hs.per_token() > 0).sum())},
        "found_not_measured": baseline.hs.unmeasured(),
        "shared_seconds": dict(timer.seconds),
        "tokens_saved": heldout.tokens_saved(heldout_paths, prep.tokenizer, prep.new_tokenizer, opts.max_chars),
        "reference": reference, "complete": False, "methods": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for spec, cfg, ((layer, lr, epochs), search_s) in zip(specs, cfgs, found):
        runs, train_s, eval_s = [], [], []
        repeats = RepeatedWarnings()
        for k in range(spec.seeds):
            t0 = time.perf_counter()
            with repeats.dropped_from(pipeline.log):
                learned = pipeline.learn_rows(prep, cfg.replace(seed=cfg.seed + k, epochs=epochs),
                                              (layer, lr, epochs), cache=cache)
            t1 = time.perf_counter()
            runs.append(baseline.measure(heldout.Scorer(decoder, rows=learned.rows, out_rows=learned.out_rows,
                                                        backend=prep.backend), forms))
            train_s.append(t1 - t0 + search_s)  # an automatic setting pays for its search
            eval_s.append(time.perf_counter() - t1)
        o = Outcome(spec, cfg.distill_loss, layer, lr, epochs, runs, train_s, eval_s)
        log.info("%-40s KL %.4f  (%.1f s train)", spec.label, o.stat("kl")["mean"], np.mean(train_s))
        outcomes.append(o)
        # Written after every method, so a long run that stops early still leaves its finished rows.
        results["methods"] = [outcome_json(o, baseline, outcomes, reference) for o in outcomes]
        results["complete"] = len(outcomes) == len(specs)
        export.write_json(out / "results.json", results)
        (out / "table.md").write_text(markdown_table(results), encoding="utf-8")
    plot(results, out)
    return results


class RepeatedWarnings(logging.Filter):
    """Drops a warning given before word for word: a method's seeds would repeat those its settings draw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new

    @contextmanager
    def dropped_from(self, logger: logging.Logger) -> Iterator[None]:
        logger.addFilter(self)
        try:
            yield
        finally:
            logger.removeFilter(self)


def outcome_json(o: Outcome, baseline: Baseline, outcomes: list[Outcome], reference: str) -> dict:
    """A spec's aggregates, paired differences against the reference method, timings and per-token rows."""
    ref = next((r for r in outcomes if r.spec.label == reference), None)
    names = list(o.runs[0].values)
    out = {"label": o.spec.label, "method": o.spec.method, "group": o.spec.group, "changes": o.spec.changes,
           "loss": o.loss, "layer": o.layer, "lr": o.lr,
           "epochs": o.epochs, "seeds": o.spec.seeds, "train_seconds": float(np.mean(o.train_seconds)),
           "eval_seconds": float(np.mean(o.eval_seconds)),
           "aggregate": {n: o.stat(n) for n in names},
           "definitions": {n: o.definition_stat(n) for n in ("similarity", "share_above")}}
    if ref is not None and ref is not o:
        group = baseline.hs.snippet_token
        out["vs_reference"] = {n: stats.paired_difference(o.values(n), ref.values(n), group, baseline.opts.n_boot,
                                                            baseline.opts.seed) for n in ("kl", "kl_at_new", "top1")}
    out["tokens"] = baseline.token_rows(o.runs[0])
    return out


def _fmt(stat: dict | None, spec: str = ".3g") -> str:
    """`mean [lo, hi]` or `mean ± std`."""
    if not stat:
        return "–"
    if "std" in stat:
        return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def markdown_table(results: dict) -> str:
    """One table per group (methods, target-layer sweep, learning-rate sweep) plus the shared stage timings."""
    titles = {"methods": "Methods", "layers": "Target-layer sweep (token-distill)", "lrs": "Learning-rate sweep"}
    ref = results["reference"]
    lines = [f"Model `{results['model']}`; {results['counts']['tokens']} new tokens; "
             f"{results['counts']['train_snippets']} training snippets; {results['counts']['heldout_snippets']} "
             f"held-out snippets ({results['counts']['tokens_with_heldout']} tokens with held-out text). "
             "Held-out metrics: macro means over tokens with 95% bootstrap intervals (tokens, then snippets), or "
             "mean ± std over seeds. KL = KL(original || adapted) over the original vocabulary, lower is better; "
             "ΔNLL = adapted minus original NLL of each snippet's continuation (nats).", ""]
    if results.get("found_not_measured"):
        lines += ["Found in the held-out text but not measured (every occurrence sampled is read otherwise there): "
                  + ", ".join(map(repr, results["found_not_measured"])), ""]
    if not results.get("complete", True):
        lines += ["**Partial results: the run is still going or stopped early.**", ""]
    for group, title in titles.items():
        rows = [m for m in results["methods"] if m["group"] == group]
        if not rows:
            continue
        lines += [f"### {title}", "",
                  "| method | layer | lr | KL | KL at new token | top-1 | top-1 at new token | ΔNLL | P(new) | "
                  f"ΔKL vs {ref} | def. similarity | def. > thr | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in rows:
            a, d = m["aggregate"], m["definitions"]
            trained = m["method"] in TRAINED_METHODS
            lines.append(" | ".join([
                f"| {m['label']}", str(m["layer"]) if trained else "–", f"{m['lr']:g}" if trained else "–",
                _fmt(a["kl"]), _fmt(a["kl_at_new"]), _fmt(a["top1"], ".3f"), _fmt(a["top1_at_new"], ".3f"),
                _fmt(a["nll_diff"], ".2f"), _fmt(a["new_mass"], ".2g"), _fmt(m.get("vs_reference", {}).get("kl")),
                _fmt(d["similarity"], ".3f"), _fmt(d["share_above"], ".2f"), f"{m['train_seconds']:.1f} |"]))
        lines.append("")
    shared = ", ".join(f"{k} {v:.1f} s" for k, v in results["shared_seconds"].items())
    ts = results["tokens_saved"]
    lines += [f"Shared stages (run once for all methods): {shared}.",
              f"Tokens saved on the held-out text: {100 * ts['saved_fraction']:.2f}% "
              f"({ts['original_tokens']} -> {ts['adapted_tokens']} tokens).", ""]
    return "\n".join(lines)


def in_sweep(m: dict, group: str) -> bool:
    """Rows a sweep plot shows: its own group, and for the layer sweep also plain token-distill runs that only
    set the layer (e.g. `token-distill@layer=8` given in --methods)."""
    return m["group"] == group or (group == "layers" and m["method"] == "token-distill"
                                   and set(m["changes"]) <= {"target_layer"})


def plot(results: dict, out: Path) -> list[Path]:
    """methods.png (KL and definition similarity per method), layers.png and lrs.png for the sweeps. Needs
    matplotlib (extra `eval`); without it the table and JSON are still written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install 'tokdistill-fast[eval]')")
        return []

    def err(stat: dict) -> tuple[float, float]:
        if "std" in stat:
            return stat["std"], stat["std"]
        return stat["mean"] - stat["ci95"][0], stat["ci95"][1] - stat["mean"]

    written = []
    methods = [m for m in results["methods"] if m["group"] == "methods"]
    if methods:
        panels = [("kl", "KL(original || adapted), held-out", lambda m: m["aggregate"]["kl"])]
        if any(m["definitions"]["similarity"] for m in methods):
            panels.append(("sim", "definition similarity", lambda m: m["definitions"]["similarity"]))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.45 * len(methods) + 1.5))
        for ax, (_, title, get) in zip(np.atleast_1d(axes), panels):
            stats = [get(m) for m in methods]
            y = np.arange(len(methods))
            ax.barh(y, [s["mean"] if s else 0 for s in stats], xerr=np.array([err(s) if s else (0, 0)
                                                                               for s in stats]).T, color="tab:blue")
            ax.set_yticks(y, [m["label"] for m in methods])
            ax.invert_yaxis()
            ax.set_title(title)
        fig.tight_layout()
        written.append(out / "methods.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for group, key, xlabel, log_x in (("layers", "layer", "target layer", False), ("lrs", "lr", "learning rate", True)):
        rows = sorted({m[key]: m for m in reversed(results["methods"]) if in_sweep(m, group)}.values(),
                      key=lambda m: m[key])
        if len(rows) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x = [m[key] for m in rows]
        for ax, (name, title) in zip(axes, (("kl", "KL, all aligned positions"), ("kl_at_new", "KL at the new token"))):
            mean = np.array([m["aggregate"][name]["mean"] for m in rows])
            lo, hi = np.array([err(m["aggregate"][name]) for m in rows]).T
            ax.plot(x, mean, marker="o", label="token-distill")
            ax.fill_between(x, mean - lo, mean + hi, alpha=0.25)
            for m in results["methods"]:
                if m["group"] == "methods" and m["method"] in ("mean", "random"):
                    ax.axhline(m["aggregate"][name]["mean"], ls="--", lw=1, label=m["label"],
                               color="gray" if m["method"] == "mean" else "tab:red")
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            if log_x:
                ax.set_xscale("log")
            else:
                ax.set_xticks(x)
            ax.legend()
        fig.tight_layout()
        written.append(out / f"{group}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written

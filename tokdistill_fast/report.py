"""report.json of a run, assembled in one place: what was asked and resolved, what ran (observed at run time),
counts, training, per-token results and stage timings. `RunReport.build` makes it from a run's prepared stages
and learned rows; sections a run adds (autotune, retrieval, chunks, the output's geometry) go through `add`, and
`finish` stamps the timings (export writes the report as its last file, so it also passes the stages under way)."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import HARDEST_FRACTION, OUTLIER_FACTOR, OVER_PREDICTION_FLAG, DistillConfig
from .control import observed, process
from .control.observed import StageTimer

if TYPE_CHECKING:
    from .results import Learned, Prepared

log = logging.getLogger(__name__)


class RunReport:
    """The report of one run (module docstring); `data` is the dict written as report.json."""

    def __init__(self, data: dict, timer: StageTimer, before_resume: float = 0.0):
        self.data, self.timer, self.before_resume = data, timer, before_resume

    @classmethod
    def build(cls, prep: Prepared, cfg: DistillConfig, settings: tuple[int, float, int], learned: Learned,
              methods: bool = False, method: str | None = None) -> RunReport:
        """The report of `learned` (the rows of `method`, default cfg.method) on `prep`. methods: also record how
        each row was made (record_methods)."""
        import transformers

        from . import __version__

        method = method or cfg.method

        layer, lr, epochs = settings
        toks, work, decoder, result = prep.toks, prep.work, prep.decoder, learned.train_result
        row_of = {i: r for r, i in enumerate(work.primaries)} if work else {}
        per_row = work.snippets_per_row() if work else None
        first = {}  # each trained token's first snippet, its text shown in the report (what its contexts look like)
        for snippet in work.snippets if work else ():
            first.setdefault(snippet.token, snippet)
        per_token = []
        for i, t in enumerate(toks):
            r = row_of.get(i)
            alone = learned.variants.get(i, {})  # a variant trained on its own snippets (retrain.train_variants)
            per_token.append({
                "word": t.word, "form": t.form, "token": t.piece, "id": t.new_id, "kind": t.kind,
                "variant_of": t.variant_of, "subtokens": prep.tokenizer.convert_ids_to_tokens(t.sub_ids),
                "sub_ids": t.sub_ids,
                "contexts": int(per_row[r]) if work and r is not None else alone.get("snippets", 0),
                "corpus_contexts": work.found.get(i, 0) if work and r is not None else alone.get("snippets", 0),
                "source": (work.sources.get(i, "none") if work else method) if t.variant_of is None else "variant",
                "example": prep.tokenizer.decode(first[i].ids, skip_special_tokens=True) if i in first else None,
                "final_loss": float(result.token_loss[r]) if result is not None and r is not None else None,
                "word_loss": float(result.word_loss[r]) if result is not None and r is not None
                else alone.get("word_loss"),
                "norm": float(learned.rows[i].norm()),
            })
        skipped = prep.skipped
        words_skipped = sum(1 for s in skipped if not s.form_only)
        data = {
            "tokdistill_fast": __version__,
            # what the run read, as absolute paths (settings.extra.command holds them as typed, from the CLI only)
            "inputs": {"model": str(Path(prep.source).absolute()) if isinstance(prep.source, (str, Path))
                       else f"in memory ({type(prep.source).__name__})", "words": prep.words_from,
                       "corpus": [str(Path(c).absolute()) for c in prep.corpus], "cwd": os.getcwd()},
            "settings": {**cfg.as_dict(), "resolved_target_layer": layer, "resolved_lr": lr,
                         "resolved_epochs": epochs, "resolved_method": method,
                         "resolved_optimizer": cfg.replace(method=method).run_optimizer(),
                         "resolved_loss_positions": cfg.run_loss_positions(),
                         # the extra stages' epochs as run (0 where a stage does not run: pipeline.extra_epochs)
                         **{f"resolved_{name}": learned.extra.get(name, 0)
                            for name in ("more_epochs", "hardest_epochs", "variant_epochs")}},
            "model": {"type": type(decoder.model).__name__, "layers": decoder.num_layers,
                      "hidden": decoder.hidden_size, "rows_before": int(decoder.embed_weight.shape[0]),
                      "tied": prep.tied},
            # What ran, observed at run time (observed.py; None: the site never ran in this process).
            "implementations": {"align": observed.ran("align"), "device": str(prep.device), "dtype": str(prep.dtype),
                                "backend": observed.ran("kernels"),
                                "prefix_sharing": result.extra["passes"] if result is not None else None,
                                "packed_attention": observed.ran("attention"),
                                "layers": observed.ran("layers"),
                                "teacher_cache": observed.ran("teacher_cache"),
                                "mkl_dispatch": process.mkl_dispatch() if torch.backends.mkl.is_available() else None},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            # words asked for and skipped; forms of added words left out (a start-of-text form that would not
            # decode back, ...) are listed under "skipped" with form_only, and counted apart
            "counts": {"requested": sum(1 for t in toks if t.variant_of is None) + words_skipped, "added": len(toks),
                       "skipped": words_skipped, "forms_left_out": len(skipped) - words_skipped,
                       "variants": sum(1 for t in toks if t.variant_of),
                       "casing_variants": sum(1 for t in toks if t.variant.startswith("casing")),
                       # target: ids of a --tokenizer run, which its tokenizer already holds
                       "by_kind": {k: sum(1 for t in toks if t.kind == k) for k in ("vocab", "added", "target")},
                       "norm_clipped": learned.clipped,
                       "snippets": len(work.snippets) if work else 0,
                       "aligned_positions": int(len(work.alignment.s_pos)) if work else 0,
                       "teacher_tokens": int(work.cu_teacher[-1]) if work else 0,
                       "student_tokens": int(work.alignment.cu_student[-1]) if work else 0},
            "training": None if result is None else {
                "steps": result.steps, "passes": result.extra.get("groups"),
                "seconds": result.seconds, "computed_positions": result.extra["positions"],
                "chunk_teacher_seconds": result.extra.get("teacher_seconds"),  # chunked runs only
                # steps per step of a row, and the rate it gave the rows (student.steps.rate_scale)
                "step_spacing": result.extra.get("step_spacing"), "lr": result.extra.get("lr"),
                "spikes_dropped": result.extra.get("spikes_dropped"),
                "sink_pairs": result.extra.get("sink_pairs"),  # aligned pairs left out (teacher.sink_pairs)
                "output_rows_trained": result.out_rows is not None,  # untied: ntp-all, --output-embeddings ntp
                "first_loss": float(result.step_loss[0]), "last_loss": float(result.step_loss[-1]),
                # the mean step loss of each epoch over the same snippets (more epochs included; one process;
                # chunks: each epoch's mean over them, weighted by their steps)
                "epoch_loss": result.extra.get("epoch_loss")},
            "tokens": per_token,
            "skipped": [{"word": s.word, "reason": s.reason, "form_only": s.form_only} for s in skipped],
        }
        report = cls(data, prep.timer, prep.work_dir.earlier_s)
        if methods:
            kept = {i for i, v in learned.variants.items() if v["kept"]}
            report.record_methods(method, set(work.primaries) | kept if work and result is not None else set(),
                                  learned.init_used, set(learned.derived))
        return report

    def record_methods(self, method: str, trained: set[int], init_used: set[int], derived: set[int]) -> None:
        """How each token's row was made ("method": the training method, "mean" or "init-from" for untrained
        rows, "random", or "offset" for variants: their primary's row moved by the subtoken-mean offset) and where
        it started ("init"), with counts per method. `trained`: indices of the tokens that were trained; `derived`:
        of the variants moved from their primary (Learned.derived)."""
        toks = self.data["tokens"]
        for i, entry in enumerate(toks):
            init = "random" if method == "random" else "init-from" if i in init_used else "mean"
            entry["init"] = init
            entry["method"] = "offset" if i in derived else method if i in trained else init
        self.data["counts"]["methods"] = dict(Counter(e["method"] for e in toks))

    def record_new_token_mass(self, mass: np.ndarray, rows: list[int], cols: list[int]) -> None:
        """Per trained token (`rows`: token index of each row of `mass`; `cols`: of each column), the next-token
        probability the model puts on new tokens right after it ("mass_after", hubs.new_token_mass) and the new
        token that takes most of it; the words over OVER_PREDICTION_FLAG ("over_predicting", warned about)."""
        toks = self.data["tokens"]
        for r, i in enumerate(rows):
            if np.isfinite(mass[r]).all():
                top = int(np.argmax(mass[r]))
                toks[i]["mass_after"] = float(mass[r].sum())
                toks[i]["mass_after_top"] = {"token": toks[cols[top]]["form"], "mass": float(mass[r, top])}
        self.data["over_predicting"] = over_predicting(toks, "mass_after")
        warn_over_predicting(self.data["over_predicting"], "mass_after", "their training snippets",
                             self.data.get("settings", {}).get("resolved_method"))

    def add(self, **sections) -> RunReport:
        """Top-level sections, in the order given."""
        self.data.update(sections)
        return self

    def finish(self, **running: float) -> dict:
        """Timings so far, this process's (`before_resume`: what the processes a --resume continues spent up to
        their last checkpoint); `running` adds stages still under way. Returns the report's dict."""
        self.data["timings"] = {**self.timer.seconds, **running, "total": time.perf_counter() - self.timer.started,
                                **({"before_resume": self.before_resume} if self.before_resume else {})}
        return self.data


def outlier_rows(word_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """(median, indices) of the finite word losses over OUTLIER_FACTOR x their median (none with fewer than 3)."""
    loss = np.asarray(word_loss, dtype=np.float64)
    ok = np.isfinite(loss)
    if ok.sum() < 3:
        return float("nan"), np.zeros(0, dtype=np.int64)
    median = float(np.median(loss[ok]))
    return median, np.flatnonzero(ok & (loss > OUTLIER_FACTOR * median))


def flag_outliers(per_token: list[dict], retried: dict[int, dict] | None = None) -> list[dict]:
    """Trained tokens whose final loss at the word's own position ended over OUTLIER_FACTOR x the median, with what
    the run did about them (`retried`, by token index: retrain.retry_outliers trained them again alone and kept
    the lower loss), logged. That position, not the mean over a snippet, because the positions after the word
    are easier and their number varies (a word that ends its paragraphs has none)."""
    retried = retried or {}
    loss = [t["word_loss"] if t["word_loss"] is not None else np.nan for t in per_token]
    median, over = outlier_rows(np.array(loss))
    still = set(over.tolist())
    flagged = []
    for i in sorted(set(retried) | still):
        t, again = per_token[i], retried.get(i)
        first = again["first"] if again else t["word_loss"]
        f = {"word": t["word"], "word_loss": first, "final_loss": t["final_loss"], "times_median": first / median,
             "contexts": t["contexts"], "source": t["source"], "retried": again, "still_outlier": i in still}
        done = ("its row is kept as trained" if again is None else f"trained again alone: {again['alone']:.3g}, "
                + ("kept" if again["kept"] == "alone" else "not lower, the first row kept"))
        log.warning("outlier: %r ended at loss %.3g at its own position, %.0fx the median %.3g (%d contexts from %s); "
                    "%s%s", f["word"], first, f["times_median"], median, f["contexts"], f["source"], done,
                    "; still an outlier: check its contexts and its held-out KL (tokdistill eval)"
                    if f["still_outlier"] else "")
        flagged.append(f)
    return flagged


def hardest_words(per_token: list[dict], hardest: dict[int, dict], epochs: int) -> dict | None:
    """What retrain.continue_hardest did, by word: its word loss before and after the extra epochs, whether the
    new row was kept (the lower loss), and the next-token mass that sent it back where the model then predicted it."""
    if not hardest:
        return None
    return {"epochs": epochs, "fraction": HARDEST_FRACTION,
            "tokens": [{"word": per_token[i]["word"], "word_loss_before": v["first"], "word_loss_after": v["alone"],
                        "kept": v["kept"] == "alone", "over_predicted": v.get("over_predicted")}
                       for i, v in sorted(hardest.items())]}


def variant_summary(per_token: list[dict], variants: dict[int, dict]) -> dict | None:
    """What retrain.train_variants did: how many variants trained on how many snippets of their own, over how many
    epochs, and which went back to their moved rows because the model then put too much of its probability on them."""
    if not variants:
        return None
    return {"epochs": next(iter(variants.values()))["epochs"], "trained": len(variants),
            "snippets": sum(v["snippets"] for v in variants.values()),
            "kept": sum(v["kept"] for v in variants.values()),
            "sent_back": {per_token[i]["form"]: v["over_predicted"] for i, v in variants.items() if not v["kept"]}}


def over_predicting(per_token: list[dict], key: str) -> list[dict]:
    """Words whose next-token mass on new tokens right after them (`key`: distill's "mass_after" on the training
    snippets, eval's "new_mass_at_new" on held-out text) exceeds OVER_PREDICTION_FLAG, worst first."""
    over = [{"word": t["word"], key: t[key], **({"most_to": t["mass_after_top"]} if "mass_after_top" in t else {})}
            for t in per_token if t.get(key) is not None and t[key] > OVER_PREDICTION_FLAG]
    return sorted(over, key=lambda t: -t[key])


def describe_over_predicting(flagged: list[dict], key: str) -> str:
    """The flagged words, their mass, the new token taking most of it and (eval) the original model's probability
    of that token's first piece there: "al-Sufi (0.30, most to ' al-Sufi' 0.26; its first piece ' al' 0.49 in the
    original)"."""
    def most_to(t: dict) -> str:
        top = t["most_to"]
        piece = top.get("original_piece")
        return f", most to {top['token']!r} {top['mass']:.2f}" + (
            f"; its first piece {piece['token']!r} {piece['prob']:.2f} in the original" if piece else "")

    return ", ".join(f"{t['word']} ({t[key]:.2f}" + (most_to(t) if "most_to" in t else "") + ")" for t in flagged)


def warn_over_predicting(flagged: list[dict], key: str, where: str, method: str | None) -> None:
    """One warning naming the flagged words and their mass, and alpha-mass as the remedy unless `method` (the one
    the rows were trained with, None when unknown) already trained the output side."""
    if flagged:
        remedy = "" if method and "alpha" in method else \
            "; --method token-distill+alpha-mass trains the output side against it"
        log.warning("%d word(s) make the model put over %.0f%% of its next-token probability on new tokens right "
                    "after them (%s; sampling emits new tokens there%s): %s", len(flagged),
                    100 * OVER_PREDICTION_FLAG, where, remedy, describe_over_predicting(flagged, key))

"""`--target-layer auto` (and `--epochs auto`): choose the setting on held-out snippets, the way a careful user would.

A sample of tokens is drawn and part of each one's snippets is held out. One distillation per candidate layer (half
and three quarters of the depth) trains on the rest of the sample with the main run's batch size and epochs;
`--epochs auto` ranks layers on one epoch and adds the chosen layer with a second. Each candidate is scored per
token by the measure of `tokdistill eval` (next-token KL of the model reading the new token to the original model
reading the subtokens, from the word on, relative to subtoken-mean initialization). The decision is paired over
tokens and prefers the cheaper setting: a deeper layer (or a second epoch) is chosen only if it beats the current
choice by more than NOISE_Z standard errors of the per-token differences of log ratios and by at least MIN_GAIN, so
neither a noise-sized gain nor one too small to pay for a run that costs about 1.5x buys a costlier run. A gain of
MIN_GAIN or more that is within noise is not decided on one sample: both settings train again on a second sample of
other tokens, and the decision reads both (on Gemma-3 / fortunes the first sample alone read layer 14 -0.244 +-
0.126 against 9 and kept 9, which left the run 21% worse per word than layer 14).
Nothing in the decision reads the clock: the sample size comes from a cost model in forward-pass units, so the
same inputs give the same choice on an idle or a loaded machine. `--lr auto` is the measured rule `default_lr`
(learning rates from 3e-3 to 1e-2 were within noise of each other on both reference models, docs/defaults.md).
Teacher states for every candidate layer come from one truncated pass to the deepest one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import student, teacher
from ..align import Alignment, prefix_lengths, take_packed, trim_suffix
from ..evaluation import heldout, stats
from ..modeling.models import Decoder

log = logging.getLogger(__name__)

TRAIN_COST = 3.0  # forward + input-gradient backward, in forward-pass units per token and layer (measured on CPU)
NOISE_Z = 2.0  # a costlier candidate must win by 2 standard errors of the paired log-ratio difference (~97.5%)
MIN_GAIN = 0.1  # ... and lower the per-token KL ratios by 10% or more (geometric mean)
MIN_TOKENS = 20  # tokens in a sample, at least (search's docstring)
# Candidates train at most this many epochs: the layer ranking and the guard's reading were measured at 4 on every
# corpus row, and a main run of 8 gains in its words' later passes, which the sample's words (6 snippets) never
# reach; twice the epochs doubled the search for the same choice (docs/defaults.md, "Eight passes for every word").
SEARCH_EPOCHS = 4
# Held-out next-token mass on the sampled new tokens right after one, above which the chosen rows over-predict
# themselves (tied models; settings.guarded_method). The search read 0.004-0.09 on SmolLM2 (three corpora) and
# Gemma-3 (four), and 0.23 / 0.29 on Gemma-3 / FOLDOC and the Debian Reference (`tokdistill eval`: 0.26 / 0.68; text
# sampled from the latter looped on the word, "apt-get apt-get ..."); subtoken-mean rows 0.001-0.03.
OVER_PREDICTION = 0.2


@dataclass(frozen=True)
class Candidate:
    layer: int
    lr: float
    epochs: int = 1

    def label(self) -> str:
        return f"layer {self.layer} lr {self.lr:g}" + (f" x{self.epochs} epochs" if self.epochs > 1 else "")


def pool(parts: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, float]:
    """Several samples' per-token values concatenated, and their next-token masses averaged with each sample
    weighed by its tokens that have a value (a sample's mass is a mean over those tokens)."""
    values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0)
    weights = [int(np.isfinite(v).sum()) for v, _ in parts]
    return values, float(np.average([m for _, m in parts], weights=weights)) if sum(weights) else 0.0


@dataclass
class Trial:
    candidate: Candidate
    ratio: float  # held-out KL relative to subtoken-mean init, mean over the sampled tokens (lower is better)
    seconds: float
    per_token: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # [tokens] the same, per token
    self_mass: float = 0.0  # held-out next-token mass on the sampled new tokens right after one, mean over tokens
    vs_choice: tuple[float, float] | None = None  # paired log-ratio difference to the choice compared with: mean, SE
    parts: list[tuple[np.ndarray, float]] = field(repr=False, default_factory=list)  # per sample: ratios, mass

    def add(self, parts: list[tuple[np.ndarray, float]], seconds: float) -> None:
        """Append the per-token ratios and mass of further samples (search's stages) and their time."""
        self.parts += parts
        self.per_token, self.self_mass = pool(self.parts)
        self.ratio = float(np.nanmean(self.per_token))
        self.seconds += seconds


@dataclass
class SearchResult:
    best: Candidate
    trials: list[Trial]
    seconds: float
    sample: dict = field(default_factory=dict)

    @property
    def self_mass(self) -> float:
        """The chosen candidate's held-out mass on new tokens right after the word (Trial.self_mass)."""
        return [t for t in self.trials if t.candidate == self.best][-1].self_mass

    def as_dict(self) -> dict:
        return {"best": asdict(self.best), "seconds": self.seconds, "sample": self.sample, "noise_z": NOISE_Z,
                "min_gain": MIN_GAIN, "over_prediction": OVER_PREDICTION,
                "trials": [{**asdict(t.candidate), "ratio": t.ratio, "seconds": t.seconds, "self_mass": t.self_mass,
                            "per_token": [round(float(r), 4) for r in t.per_token],
                            "vs_choice": None if t.vs_choice is None else dict(zip(("mean_log", "se"), t.vs_choice))}
                           for t in self.trials]}


def candidate_layers(num_layers: int) -> list[int]:
    """About half and three quarters of the depth. A quarter and the last layer never won on SmolLM2 or Gemma-3
    (sweeps, fixed-layer comparisons and every search in docs/defaults.md); `--target-layer -1` still asks for
    the last."""
    return sorted({max(1, round(num_layers * f)) for f in (0.5, 0.75)})


def default_lr(layer: int, num_layers: int, decay: bool = False, optimizer: str = "whitened") -> float:
    """`--lr auto`. Plain AdamW, constant schedule (the paper's): 5e-3 for inner layers, 3e-3 for the last (after
    the final norm), best or within 4% of the best of {1e-3, 3e-3, 5e-3, 1e-2} on SmolLM2 and Gemma-3. Whitened
    Adam: 0.06 of the table's spread (best of 0.03-0.15 on Gemma-3), 0.6x that at the last layer as for AdamW (not
    measured there). Decay schedule: 1.4x that peak, about the constant schedule's mean step over a run (decay's
    mean is 0.5x its peak, constant's 0.75x) with smaller last steps (docs/defaults.md)."""
    lr = (0.06 if optimizer == "whitened" else 5e-3) * (0.6 if layer == num_layers else 1.0)
    return round(1.4 * lr, 6) if decay else round(lr, 6)


@dataclass
class Sample:
    """The search's data: training and held-out snippets of a sample of tokens, rows renumbered 0..n-1."""

    train: Alignment
    train_ids: np.ndarray
    train_cu: np.ndarray
    train_row: np.ndarray
    held: Alignment
    held_ids: np.ndarray
    held_cu: np.ndarray
    held_row: np.ndarray  # sample row of each held-out snippet
    rows: np.ndarray  # original row index of each sampled token


def eligible_rows(snippet_row: np.ndarray, n_rows: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The rows (tokens) the search can sample: those with at least three snippets (one to hold out, two to train
    on), none of `exclude`."""
    rows = np.flatnonzero(np.bincount(snippet_row, minlength=n_rows) >= 3)
    return rows if exclude is None else np.setdiff1d(rows, exclude)


def draw_sample(al: Alignment, teacher_ids: np.ndarray, cu_teacher: np.ndarray, snippet_row: np.ndarray, V: int,
                n_rows: int, n_tokens: int, heldout_share: float, keep: int, seed: int,
                per_token: int | None = None, exclude: np.ndarray | None = None) -> Sample:
    """Sample tokens with at least three snippets (none of `exclude`), take at most `per_token` snippets of each,
    hold out `heldout_share` of them, and cut every snippet after `keep` aligned positions (the positions right
    after the word carry most of the signal)."""
    rng = np.random.default_rng(seed)
    eligible = eligible_rows(snippet_row, n_rows, exclude)
    rows = np.sort(rng.choice(eligible, size=min(n_tokens, len(eligible)), replace=False))
    train, held = [], []
    for r in rows:
        idx = rng.permutation(np.flatnonzero(snippet_row == r))[:per_token]
        k = max(1, round(heldout_share * len(idx)))
        held.extend(idx[:k])
        train.extend(idx[k:])
    remap = np.full(n_rows, -1, dtype=np.int64)
    remap[rows] = np.arange(len(rows))
    parts = []
    for idx in (np.sort(train), np.sort(held)):
        sub = al.take(idx)
        sub.student_ids = np.where(sub.student_ids >= V, V + remap[np.clip(sub.student_ids - V, 0, None)],
                                   sub.student_ids)
        parts.append((*trim_suffix(sub, *take_packed(teacher_ids, cu_teacher, idx), keep), idx))
    (t_al, t_ids, t_cu, t_idx), (h_al, h_ids, h_cu, h_idx) = parts
    return Sample(t_al, t_ids, t_cu, remap[snippet_row[t_idx]], h_al, h_ids, h_cu, remap[snippet_row[h_idx]], rows)


class HeldoutRatios:
    """Held-out KL per sampled token relative to subtoken-mean init, by the measure of `tokdistill eval`
    (heldout.py); the original model's pass over the held-out snippets runs once, and each scored row set then
    runs only from the new token on, on that pass's prefix keys/values."""

    def __init__(self, decoder: Decoder, sample: Sample, init_rows: torch.Tensor, backend: str = "auto"):
        self.decoder, self.backend = decoder, backend
        V, n = decoder.embed_weight.shape[0], len(sample.rows)
        self.held = heldout.HeldoutSet([], [V + r for r in range(n)], sample.held_row, sample.held_ids,
                                       sample.held_cu, sample.held, np.bincount(sample.held_row, minlength=n).tolist())
        self.ref = heldout.reference(decoder, self.held, share_prefix=True)
        self.base, self.base_self_mass = self.measure(init_rows)

    def measure(self, rows: torch.Tensor) -> tuple[np.ndarray, float]:
        """([tokens] held-out KL of each sampled token (per snippet, then per token, as in `eval`), the mean over
        tokens of the next-token mass on new tokens right after the word)."""
        scores = heldout.score(heldout.Scorer(self.decoder, rows=rows, backend=self.backend), self.held, self.ref)
        values = heldout.snippet_metrics(scores, self.held, self.ref)
        per = stats.per_token(values, self.held.snippet_token, len(self.held.new_ids))
        mass = [t["new_mass_at_new"] for t in per if t["new_mass_at_new"] is not None]
        return (np.array([t["kl"] for t in per], dtype=float),  # None (no held-out pair) -> nan
                float(np.mean(mass)) if mass else 0.0)

    def ratios(self, rows: torch.Tensor) -> tuple[np.ndarray, float]:
        """([tokens] held-out KL relative to subtoken-mean init (every token weighs the same, as in `eval`), the
        mass on new tokens right after the word)."""
        kl, mass = self.measure(rows)
        return kl / np.maximum(self.base, 1e-12), mass


@dataclass
class Stage:
    """One sample of the search with what its trials share: initial rows, held-out scorer, teacher cache."""

    sample: Sample
    rows0: torch.Tensor
    scorer: HeldoutRatios
    cache: teacher.TeacherCache | None


def wins(mean_log: float, se: float) -> bool:
    """The decision on a paired mean log-ratio difference and its standard error: lower beyond noise, and by at
    least MIN_GAIN. On SmolLM2 the search read layer 22 between 3% worse and 9% better than 15 (beyond noise once,
    FOLDOC: -0.089 +- 0.033), on Gemma-3 layer 14 17-46% better than 9 (docs/defaults.md)."""
    return mean_log < -NOISE_Z * se and mean_log < np.log1p(-MIN_GAIN)


def paired_better(new: np.ndarray, old: np.ndarray) -> tuple[bool, float, float]:
    """Whether per-token ratios `new` beat `old` (`wins` on the paired difference of their logs); also that mean
    log difference and its standard error. Logs, because a token's ratios scale together: on Gemma-3/FOLDOC layer
    14 took one token from 1.64x to 0.38x and six of the other eight lower too; plain differences read -0.25 +-
    0.13 and kept layer 9 (0.302 on held-out text), logs read -0.38 +- 0.17 and chose 14. Tokens without a held-out
    pair are left out."""
    ok = np.isfinite(new) & np.isfinite(old)
    d = np.log(np.maximum(new[ok], 1e-6)) - np.log(np.maximum(old[ok], 1e-6))
    if len(d) < 2:
        return False, float(d.mean()) if len(d) else 0.0, float("inf")
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    return wins(float(d.mean()), se), float(d.mean()), se


def train_cost(epochs: int, grad_share: float, prefix_pass: bool) -> float:
    """Training cost per snippet token and layer, in forward-pass units: forward + input-gradient backward on the
    `grad_share` of positions from the first new token on (1.0 without prefix sharing), plus a no-grad pass over
    the rest when prefix steps run their own prefix pass."""
    return epochs * (TRAIN_COST * grad_share + (1.0 - grad_share) * prefix_pass)


def sample_share(layers: list[int], num_layers: int, main_train: float, search_train: float, budget: float,
                 trim_ratio: float, epochs_trial: bool, heldout_share: float = 0.4) -> float:
    """Share of the tokens the search can afford. Costs in forward-pass units per token and layer (`main_train`,
    `search_train`: train_cost of a main run and of a candidate's run): the main run pays teacher + training at a
    median candidate layer; the search pays one teacher pass to the deepest candidate and a training run per stage-1
    candidate (and the 2-epoch trial) on the training part of the sample, plus a full-depth scoring pass of the
    `heldout_share` per trial, all on snippets shortened by `trim_ratio`."""
    mid = float(np.median(layers))
    main = mid * (1 + main_train)
    trained = search_train * (sum(layers) + 2 * mid * epochs_trial)
    search = trim_ratio * ((1 - heldout_share) * (max(layers) + trained)
                           + heldout_share * num_layers * (len(layers) + 1 + epochs_trial))
    return float(np.clip(budget * main / search, 0.0, 1.0))


def grad_share(al: Alignment, keep: int | None = None) -> float:
    """Share of student positions from each snippet's first new token on (cut after `keep` aligned positions)."""
    has = np.diff(al.cu_aligned) > 0
    if not has.any():
        return 1.0
    first = prefix_lengths(al)[has]
    lengths = np.diff(al.cu_student)[has]
    suffix = lengths - first if keep is None else np.minimum(lengths - first, keep)
    return float(suffix.sum() / max((first + suffix).sum(), 1))


def search(decoder: Decoder, al: Alignment, teacher_ids: np.ndarray, cu_teacher: np.ndarray, snippet_row: np.ndarray,
           init_rows: torch.Tensor, budget: float, schedule: student.Schedule,
           objective: Callable[[int], student.Objective], lr: Callable[[int], float], tied: bool,
           layers: list[int] | None = None, search_epochs: bool = False, keep: int = 12,
           prefix: bool = False, fused: bool = False, per_token: int = 10,
           heldout_share: float = 0.4) -> SearchResult:
    """Pick the cheapest Candidate that no costlier one beats (`wins`), within about `budget` x the main run's cost.
    `objective(layer)` and `lr(layer)` are the run's own objective and learning rate at a layer; `layers` fixes the
    candidates (a user-given layer is always respected). Candidates train with `schedule` (the main run's batch
    size, epochs up to SEARCH_EPOCHS and learning-rate schedule: with batch 4 and one epoch, Gemma-3's choice on
    the fortunes corpus changed with the seed, docs/defaults.md); `search_epochs`: schedule.epochs is 1 and the
    chosen layer is also tried with 2. The sample has at least MIN_TOKENS tokens (or every eligible one) with
    `per_token` snippets each, of which `heldout_share` are held out (many tokens with few snippets rank settings
    more steadily than few tokens with many; with 8 or 16 tokens Gemma-3's layer choice on the Devil's Dictionary
    changed with the seed, with 20 it did not, docs/defaults.md). `prefix`: candidates train with prefix sharing
    (student.Passes) on one teacher cache; `fused`: the main run fuses its teacher into its steps."""
    t_start = time.perf_counter()
    L, V = decoder.num_layers, decoder.embed_weight.shape[0]
    n_rows = init_rows.shape[0]
    layers = sorted(set(layers or candidate_layers(L)))
    lengths = np.diff(cu_teacher)
    trim_ratio = min(1.0, (float(np.mean(prefix_lengths(al)[np.diff(al.cu_aligned) > 0])) + keep)
                     / max(float(lengths.mean()), 1.0)) if len(al.s_pos) else 1.0
    main_epochs = 2 if search_epochs else schedule.epochs  # the likely choice (docs/defaults.md)
    epochs = min(schedule.epochs, SEARCH_EPOCHS)
    # prefix steps read the teacher pass's prefix keys/values when they fit (any candidate's, on any sample)
    cached = prefix and teacher.prefix_kv_fits(decoder, al, max(layers))
    main_train = train_cost(main_epochs, grad_share(al) if prefix else 1.0, prefix and not fused and not cached)
    search_train = train_cost(epochs, grad_share(al, keep) if prefix else 1.0, prefix and not cached)
    share = sample_share(layers, L, main_train, search_train, budget, trim_ratio, search_epochs, heldout_share)
    n_tokens = max(MIN_TOKENS, round(share * al.n / per_token))
    # candidates train the distillation alone: learned output rows and alpha-mass's output term follow the choice
    objectives = {layer: dataclasses.replace(objective(layer), train_output=False, mass=False) for layer in layers}
    cache_layers = sorted({o.compared_layer(L) for o in objectives.values() if o.distill is not None})

    def stage(exclude: np.ndarray | None) -> Stage:
        sample = draw_sample(al, teacher_ids, cu_teacher, snippet_row, V, n_rows, n_tokens, heldout_share, keep,
                             schedule.seed, per_token, exclude)
        rows0 = init_rows[torch.from_numpy(sample.rows).to(init_rows.device)]
        cache = teacher.compute(decoder, sample.train_ids, sample.train_cu, sample.train, cache_layers,
                                teacher.batch_tokens(decoder.embed_weight.device), decoder.embed_weight.dtype,
                                packed=prefix, capture=prefix_lengths(sample.train) if cached else None
                                ) if cache_layers else None
        return Stage(sample, rows0, HeldoutRatios(decoder, sample, rows0, schedule.backend), cache)

    stages = [stage(None)]
    trials: list[Trial] = []

    def train_on(c: Candidate, st: Stage) -> tuple[np.ndarray, float]:
        """Per-token ratios and mass of candidate `c` trained on stage `st`'s sample."""
        sched = dataclasses.replace(schedule, lr=c.lr, epochs=c.epochs)
        result = student.train(decoder, st.sample.train, st.cache, st.sample.train_row, st.rows0, None,
                               objectives[c.layer], sched, tied, desc=f"search {c.label()}",
                               passes=student.Passes(prefix=prefix))
        return st.scorer.ratios(result.rows)

    def run(c: Candidate) -> Trial:
        t0 = time.perf_counter()
        parts = [train_on(c, st) for st in stages]
        trials.append(Trial(c, 0.0, 0.0))
        trials[-1].add(parts, time.perf_counter() - t0)
        return trials[-1]

    def consider(c: Candidate, choice: Trial) -> Trial:
        """Try a costlier candidate; it replaces the choice only if it wins beyond noise. A gain of MIN_GAIN or
        more that is within noise draws a second sample of other tokens, on which both are trained again, and
        the decision is taken on both samples (once per search)."""
        trial = run(c)
        better, diff, se = paired_better(trial.per_token, choice.per_token)
        if not better and diff < np.log1p(-MIN_GAIN) and len(stages) == 1:
            rest = eligible_rows(snippet_row, n_rows, stages[0].sample.rows)
            log.info("autotune: %s reads %+.3f +- %.3f vs %s, within noise; %s", c.label(), diff, se,
                     choice.candidate.label(), f"a second sample of {min(n_tokens, len(rest))} other tokens"
                     if len(rest) >= 2 else "no other tokens to sample")
            if len(rest) >= 2:
                stages.append(stage(stages[0].sample.rows))
                for t in (choice, trial):
                    t0 = time.perf_counter()
                    t.add([train_on(t.candidate, stages[-1])], time.perf_counter() - t0)
                better, diff, se = paired_better(trial.per_token, choice.per_token)
        trial.vs_choice = (diff, se)
        log.info("autotune: %-22s held-out KL %.3f x mean init, log ratio %+.3f +- %.3f vs %s (%.1f s)%s", c.label(),
                 trial.ratio, diff, se, choice.candidate.label(), trial.seconds, " -> chosen" if better else "")
        return trial if better else choice

    choice = run(Candidate(layers[0], lr(layers[0]), epochs))
    log.info("autotune: %-22s held-out KL %.3f x mean init (%.1f s)", choice.candidate.label(), choice.ratio,
             choice.seconds)
    for layer in layers[1:]:  # cheapest first: deeper layers cost proportionally more in the main run
        choice = consider(Candidate(layer, lr(layer), epochs), choice)
    if search_epochs:  # a second epoch doubles the main run's training
        choice = consider(dataclasses.replace(choice.candidate, epochs=2), choice)
    seconds = time.perf_counter() - t_start
    n_sampled = sum(len(st.sample.rows) for st in stages)
    base_kl, base_mass = pool([(st.scorer.base, st.scorer.base_self_mass) for st in stages])
    log.info("autotune: chose %s (%.3f x mean init; next-token mass on new tokens after the word %.3f, mean init "
             "%.3f) from %d trials on %d tokens in %.1f s", choice.candidate.label(), choice.ratio, choice.self_mass,
             base_mass, len(trials), n_sampled, seconds)
    return SearchResult(choice.candidate, trials, seconds,
                        {"tokens": n_sampled, "samples": len(stages),
                         "train_snippets": sum(st.sample.train.n for st in stages),
                         "heldout_snippets": sum(st.sample.held.n for st in stages),
                         "base_kl": float(np.nanmean(base_kl)),
                         "base_self_mass": base_mass})

"""The settings a run resolves before it trains: target layer, learning rate and epochs. Values given are
used as given; "auto" ones come from the layer/epochs search (autotune.py) when it runs, else from the measured
defaults (docs/defaults.md). distill and compare resolve through these same functions."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import rows, student
from ..config import HUB_AFTER_RUN, TRAINED_METHODS, DistillConfig
from ..modeling import models
from ..tokens import NewToken
from ..workload import Workload
from . import autotune

log = logging.getLogger(__name__)

# What the guard trains instead of plain token-distill: alpha-NTP's output side at the teacher's states, which gave
# lower held-out KL than alpha-NTP where the guard fired, for the training time of plain distillation
# (docs/defaults.md, "The output side without the last layers: alpha-mass").
GUARD_METHOD = "token-distill+alpha-mass"
# Jobs of at least this many trained words on a tied model train GUARD_METHOD from the start: the more rows, the
# likelier one of them becomes a hub, and where the run's own rows show one the guard trains everything twice
# (250-word jobs: docs/defaults.md, "Large jobs on tied models: alpha-mass from the start"). So do runs that train
# more epochs (bf16), whose extra passes drew mass onto new rows ("Alpha-mass from the start wherever the more
# epochs run").
GUARD_FROM_START_WORDS = 100
DEFAULT_DEPTH = 0.75  # target layer when no search runs: best or near-best on SmolLM2 and Gemma-3 (docs/defaults.md)


def resolve_settings(cfg: DistillConfig, decoder: models.Decoder,
                     search: autotune.SearchResult | None = None) -> tuple[int, float, int]:
    """Target layer (1..L), learning rate and epochs of a run: fixed values as given; "auto" from the search when
    one ran, else from the measured defaults (docs/defaults.md)."""
    L = decoder.num_layers
    if uses_last_layer(cfg):
        if cfg.target_layer != "auto" and decoder.resolve_layer(int(cfg.target_layer)) != L:
            log.warning("--target-layer %s does not apply to --method %s%s, which reads the logits: layer %d",
                        cfg.target_layer, cfg.method, f" --loss {cfg.loss}" if cfg.loss != "mse" else "", L)
        layer = L
    elif cfg.target_layer != "auto":
        layer = decoder.resolve_layer(int(cfg.target_layer))
    elif search is not None:
        layer = search.best.layer
    else:
        layer = max(1, round(DEFAULT_DEPTH * L))
    lr = search.best.lr if search is not None else lr_rule(cfg, decoder)(layer)
    if cfg.epochs != "auto":
        epochs = int(cfg.epochs)
    elif search is not None:
        epochs = search.best.epochs
    else:  # a second epoch helps distillation, not next-token prediction (the paper; docs/defaults.md)
        epochs = 2 if cfg.method.startswith("token-distill") and cfg.prefix_sharing != "fused" else 1
    return layer, lr, epochs


def lr_rule(cfg: DistillConfig, decoder: models.Decoder) -> Callable[[int], float]:
    """The run's learning rate as a function of the target layer: --lr as given, or autotune.default_lr for the
    run's schedule."""
    if cfg.lr != "auto":
        return lambda layer: float(cfg.lr)
    return lambda layer: autotune.default_lr(layer, decoder.num_layers, cfg.lr_schedule == "decay",
                                             cfg.run_optimizer())


def guards(cfg: DistillConfig, tied: bool) -> bool:
    """Whether the NTP guard watches this run: plain token-distill on a tied model, unless --no-ntp-guard."""
    return cfg.ntp_guard and tied and cfg.method == "token-distill"


def guarded_method(cfg: DistillConfig, tied: bool, search: autotune.SearchResult | None, words: int = 0) -> str:
    """cfg.method, or GUARD_METHOD where the guard watches a tied model's run (`guards`) and either the search saw
    the chosen token-distill rows make it predict new tokens right after reading one (autotune.OVER_PREDICTION), or
    the job is one that trains it from the start (`from_start`). A tied row is also an output row, which plain
    distillation never constrains, and sampling then loops on the word ("apt-get apt-get ..."); alpha-mass
    regularizes that side at the teacher's final states, without running the student's last layers
    (docs/defaults.md)."""
    if not guards(cfg, tied):
        return cfg.method
    if search is not None and search.self_mass > autotune.OVER_PREDICTION:
        log.warning("the distilled rows make the model put %.0f%% of its next-token mass on new tokens right after "
                    "one (held-out sample; subtoken-mean rows: %.1f%%): training with %s instead (--no-ntp-guard "
                    "keeps plain token-distill)", 100 * search.self_mass,
                    100 * search.sample.get("base_self_mass", 0.0), GUARD_METHOD)
        return GUARD_METHOD
    if from_start(cfg, words):
        log.info("a tied model, %d words, %d more epochs: training with %s from the start, the more rows or passes "
                 "the likelier a hub (--no-ntp-guard keeps plain token-distill)", words, cfg.run_more_epochs(),
                 GUARD_METHOD)
        return GUARD_METHOD
    return cfg.method


def method_reason(cfg: DistillConfig, method: str, words: int, after_run: bool) -> str | None:
    """Why a run trained `method` instead of cfg.method (report.json's settings.method_reason); None where it did
    not. `after_run`: the guard read the run's own rows (pipeline.distill_words)."""
    if method == cfg.method:
        return None
    if after_run:
        return f"the run's own rows put over {HUB_AFTER_RUN} of the next-token mass on new tokens after some word"
    if from_start(cfg, words):
        return (f"a tied model's job of {GUARD_FROM_START_WORDS}+ words or with more epochs trains it from the start "
                "(--no-ntp-guard keeps plain token-distill)")
    return f"the search's sample: the rows put over {autotune.OVER_PREDICTION} of the mass on new tokens after a word"


def from_start(cfg: DistillConfig, words: int) -> bool:
    """Whether a guarded tied model trains GUARD_METHOD from the start: a job of GUARD_FROM_START_WORDS or more
    trained `words`, or one that trains more epochs (where the model runs in bf16)."""
    return words >= GUARD_FROM_START_WORDS or cfg.run_more_epochs() > 0


def uses_last_layer(cfg: DistillConfig) -> bool:
    """Methods whose objective reads the final layer whatever --target-layer says (logit losses, NTP)."""
    return not cfg.method.startswith("token-distill") or cfg.loss != "mse"


def search_settings(cfg: DistillConfig, decoder: models.Decoder, toks: list[NewToken], work: Workload, tied: bool,
                    backend: str, guard: bool = False) -> autotune.SearchResult | None:
    """Run the layer/epochs search when the config leaves either to "auto" and there is a choice to make (logit
    losses and NTP read the last layer); None otherwise or when too few tokens have enough snippets to hold some
    out (then the defaults apply). `--lr auto` needs no search: it is the measured rule autotune.default_lr.
    `guard`: where the NTP guard watches the run (`guards`) and nothing is left to choose, the given setting
    alone runs on the search's sample, so that the guard has its measurement (one trial)."""
    layer_search = cfg.target_layer == "auto" and not uses_last_layer(cfg)
    if not (layer_search or cfg.epochs == "auto" or (guard and guards(cfg, tied))) or cfg.method not in TRAINED_METHODS:
        return None
    L = decoder.num_layers
    if len(autotune.eligible_rows(work.snippet_row, len(work.primaries))) < 4:
        log.info("autotune: fewer than 4 tokens with 3+ snippets; using the default layer and learning rate")
        return None
    if layer_search:
        layers = None
    else:
        layers = [L if cfg.target_layer == "auto" else decoder.resolve_layer(int(cfg.target_layer))]
    init = rows.subtoken_mean(decoder.embed_weight, [toks[i] for i in work.primaries]).to(decoder.embed_weight.device)
    search_epochs = cfg.epochs == "auto" and cfg.prefix_sharing != "fused"  # fused steps see each snippet once
    schedule = student.Schedule.for_config(cfg, 0.0, 1 if cfg.epochs == "auto" else int(cfg.epochs), backend)
    # the likely main run
    main_passes = student.Passes.for_config(cfg.replace(epochs=2 if search_epochs else schedule.epochs))
    return autotune.search(decoder, work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row, init,
                           cfg.autotune_budget, schedule, lambda layer: student.Objective.for_config(cfg, layer, tied),
                           lr_rule(cfg, decoder), tied, layers=layers, search_epochs=search_epochs,
                           prefix=main_passes.prefix, fused=main_passes.fused)

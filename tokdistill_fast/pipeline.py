"""distill(): tokens -> contexts -> alignment -> teacher -> student -> output, timed stage by stage.

Orchestration only; each stage lives in its own module and takes and returns plain data.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import (
    align,
    autotune,
    check,
    checkpoint,
    chunks,
    contexts,
    distributed,
    export,
    models,
    observed,
    student,
    swap,
    teacher,
    tokens,
)
from .config import OUTLIER_FACTOR, TRAINED_METHODS, DistillConfig, UserInputError
from .kernels import backend as kernels
from .tokens import NewToken, Skipped

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 0.75  # target layer when no search runs: best or near-best on SmolLM2 and Gemma-3 (docs/defaults.md)


class StageTimer:
    """Wall-clock seconds per stage (synchronizing CUDA so asynchronous work is charged to its stage)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class DistillResult:
    """What a run produced. `rows`/`out_rows` are aligned with `tokens` (table space, fp32)."""

    tokenizer: object
    tokens: list[NewToken]
    rows: torch.Tensor
    out_rows: torch.Tensor | None
    report: dict
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class Workload:
    """Snippets and alignment for the trainable (primary) tokens."""

    primaries: list[int]  # indices into tokens of the trainable rows, in row order
    snippets: list[contexts.Snippet]
    snippet_row: np.ndarray  # row of each snippet
    teacher_ids: np.ndarray
    cu_teacher: np.ndarray
    alignment: align.Alignment
    sources: dict[int, str]  # token index -> "corpus" | "generated" | "corpus+generated" | "none"
    found: dict[int, int]  # token index -> corpus snippets used
    retrieval: dict = field(default_factory=dict)  # corpus statistics (contexts.RetrievalStats.summary and hits)

    def snippets_per_row(self) -> np.ndarray:
        """[rows] snippets of each trainable row."""
        return np.bincount(self.snippet_row, minlength=len(self.primaries))


def subtoken_mean(table: torch.Tensor, toks: list[NewToken]) -> torch.Tensor:
    """Mean of each token's original subtoken rows, in fp32 (the paper's start point, a.k.a. FVT)."""
    return torch.stack([table[t.sub_ids].float().mean(0) for t in toks])


def random_rows(table: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Rows drawn per channel from N(mean, std) of the original table (the paper's random baseline)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = table.float().cpu()
    return t.mean(0) + t.std(0) * torch.randn(n, t.shape[1], generator=g)


def trained_tokens(cfg: DistillConfig, toks: list[NewToken]) -> list[int]:
    """Indices of the tokens to train: the primaries, less words shorter than --distill-min-chars (those keep their
    start rows)."""
    short = swap.short_tokens(toks, cfg.distill_min_chars)
    return [i for i, t in enumerate(toks) if t.variant_of is None and i not in short]


def gather_contexts(cfg: DistillConfig, model, tokenizer, toks: list[NewToken], corpus: list,
                    start: int | None) -> tuple[list[contexts.Snippet], dict, dict, dict]:
    """Retrieve snippets for the tokens to train; top up tokens with too few from the model's own generations."""
    primaries = trained_tokens(cfg, toks)
    found = dict.fromkeys(primaries, 0)
    stats: dict = {}
    snippets: list[contexts.Snippet] = []
    if cfg.contexts == "retrieve":
        sub = [toks[i] for i in primaries]
        got, rstats, dropped = contexts.retrieve(corpus, tokenizer, sub, cfg.snippets_per_token,
                                                 cfg.snippet_length, cfg.seed, start, cfg.stop_when_full,
                                                 cfg.max_corpus_bytes)
        for s in got:
            s.token = primaries[s.token]
            found[s.token] += 1
        snippets.extend(got)
        stats = {**rstats.summary(),
                 "hits": {toks[i].word: h for i, h in zip(primaries, rstats.hits)},
                 "dropped_tokenized_differently": {toks[i].word: d for i, d in zip(primaries, dropped) if d}}
    # Too few corpus snippets (fewer than a quarter of the budget): fill up with generated contexts.
    short = [i for i in primaries if found[i] < max(1, cfg.snippets_per_token // 4)]
    if short:
        log.info("generating contexts for %d token(s) with too few corpus snippets", len(short))
        extra = contexts.generate(model, tokenizer, toks, short, cfg.snippets_per_token, cfg.snippet_length,
                                  cfg.seed, start, cfg.generate_temperature)
        per = {i: 0 for i in short}
        for s in extra:
            if found[s.token] + per[s.token] < cfg.snippets_per_token:
                per[s.token] += 1
                snippets.append(s)
    sources = {i: ("corpus" if found[i] else "") + ("+generated" if i in short and found[i] else
                                                    "generated" if i in short else "") for i in primaries}
    return snippets, found, sources, stats


def build_workload(cfg, model, tokenizer, toks, corpus, start, V: int) -> Workload:
    snippets, found, sources, retrieval = gather_contexts(cfg, model, tokenizer, toks, corpus, start)
    primaries = trained_tokens(cfg, toks)
    row_of = {tok_i: r for r, tok_i in enumerate(primaries)}
    teacher_ids, cu_teacher = align.pack([s.ids for s in snippets], cfg.align_impl)
    al = align.align((teacher_ids, cu_teacher), [toks[i].sub_ids for i in primaries],
                     [row_of[s.token] for s in snippets], [V + r for r in range(len(primaries))], cfg.align_impl)
    return Workload(primaries, snippets, np.asarray([row_of[s.token] for s in snippets], dtype=np.int64),
                    teacher_ids, cu_teacher, al, sources, found, retrieval)


def objective_for(cfg: DistillConfig, layer: int, tied: bool) -> student.Objective:
    method = cfg.method
    distill = cfg.loss if method.startswith("token-distill") else None
    ntp = {"token-distill+ntp": "plain", "token-distill+alpha-ntp": "alpha", "ntp": "plain",
           "ntp-all": "plain"}.get(method)
    train_output = not tied and (cfg.output_embeddings == "ntp" or method == "ntp-all")
    return student.Objective(distill=distill, ntp=ntp, layer=layer, train_output=train_output)


def clip_norms(rows: torch.Tensor, table: torch.Tensor, quantile: float) -> tuple[torch.Tensor, int]:
    """Scale rows whose norm exceeds the given quantile of the original rows' norms down to it. With tied
    embeddings a large input row is also a large output row, which makes the model over-predict the token."""
    limit = torch.quantile(table.float().norm(dim=1).cpu(), quantile)
    norms = rows.norm(dim=1, keepdim=True).cpu()
    factor = torch.clamp(limit / norms.clamp_min(1e-12), max=1.0)
    return rows.cpu() * factor, int((factor < 1).sum())


def distill(model, new_tokens=None, corpus=(), out: str | Path | None = None, config: DistillConfig | None = None,
            tokenizer=None, target_tokenizer=None) -> DistillResult:
    """Add `new_tokens` to the model's tokenizer and learn their input embeddings.

    model: a model directory, or an in-memory causal LM (then pass `tokenizer`). new_tokens: a file with one
    token per line, or a list of strings (or None with config.new_tokens_from_tokenizer). corpus: text, JSONL or
    Parquet files, directories or globs. out: if given, the extended model is written there (save_pretrained
    layout plus new_embeddings.safetensors and report.json), and the run keeps checkpoints to resume from
    (checkpoint.py; SIGINT/SIGTERM then stop at a step boundary). Under torchrun, the processes share the training
    (distributed.py) and rank 0 writes `out`. target_tokenizer (or config.target_tokenizer): learn rows for the new
    ids of this given tokenizer instead of adding tokens (target_tokenizer.py; new_tokens is then unused).
    """
    cfg = (config or DistillConfig()).validate()
    if target_tokenizer is not None or cfg.target_tokenizer is not None:
        from .target_tokenizer import distill_target

        with observed.recording():
            return distill_target(model, target_tokenizer or cfg.target_tokenizer, corpus, out, cfg, tokenizer)
    with distributed.setup(cfg.device) as ranks, observed.recording():
        with checkpoint.stop_on_signals(active=out is not None and ranks.world == 1):
            return _distill(model, new_tokens, corpus, out, cfg, tokenizer, ranks)


def _distill(model, new_tokens, corpus, out: str | Path | None, cfg: DistillConfig, tokenizer,
             ranks: distributed.Ranks) -> DistillResult:
    """distill() in this process, one of `ranks` (rank 0 checks and writes `out`)."""
    if ranks.world > 1 and (cfg.resume or cfg.chunk_tokens or cfg.memory_budget):
        raise UserInputError("--resume, --chunk-tokens and --memory-budget run in one process, not under torchrun")
    timer = StageTimer()
    t_start = time.perf_counter()
    if out is not None and ranks.writer:
        export.check_out_dir(out, cfg.overwrite)
    corpus_files = contexts.corpus_files(corpus)  # a missing file or empty glob fails here, before the model loads
    device = models.pick_device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    backend = kernels.resolve(cfg.backend, device)  # fails here, not after the teacher pass, if triton cannot run
    with timer("load"):
        source = None
        if isinstance(model, (str, Path)):
            model_path = Path(model)
            model, tokenizer = models.load_model(model_path, device, dtype)
        else:
            if tokenizer is None:
                raise UserInputError("an in-memory model needs its tokenizer: distill(model, ..., tokenizer=tok)")
            model_path, source = None, model
            model = models.compute_copy(model, device, dtype)
        decoder = models.Decoder(model)
    tied = export.is_tied(model)
    with timer("tokens"):
        words, skipped = swap.requested_words(new_tokens, cfg.new_tokens_from_tokenizer)
        toks, unplanned = tokens.plan_new_tokens(tokenizer, words, cfg.add_variants, cfg.casing_variants)
        skipped += unplanned
        swap.log_skipped(skipped)
        if not toks:
            raise UserInputError("none of the new tokens can be added (see the skipped reasons above)")
        new_tokenizer = tokens.extend_tokenizer(tokenizer, toks, cfg.tokenizer_mode, model.config)
    single = out if ranks.world == 1 else None  # checkpoints: one-process runs only
    work_dir = checkpoint.WorkDir.open(single, cfg, checkpoint.fingerprint(cfg, model_path or source, words,
                                                                           corpus_files)
                                       if single is not None and cfg.checkpoint_every else None)
    V = decoder.embed_weight.shape[0]
    primaries = trained_tokens(cfg, toks)
    work = cache = search = plan = None
    if cfg.method in TRAINED_METHODS and primaries:
        with timer("contexts"):
            work = work_dir.stage("workload", lambda: build_workload(cfg, model, tokenizer, toks, list(corpus),
                                                                     contexts.start_id(tokenizer), V))
        for i, n in zip(work.primaries, work.snippets_per_row()):
            log.info("%-24r %3d snippet(s) [%s]", toks[i].word, n, work.sources[i])
        with timer("autotune"):
            search = work_dir.stage("autotune", lambda: search_settings(cfg, decoder, toks, work, tied, backend))
    # every rank takes rank 0's settings (the search's second stage depends on measured time)
    layer, lr, epochs = ranks.agree(work, resolve_settings(cfg, decoder, search))
    run_cfg = cfg.replace(epochs=epochs)  # the report keeps the requested settings beside the resolved ones
    mine, shard = distributed.split(ranks, work, cfg.batch_size, epochs, cfg.seed, device)
    trainer = functools.partial(student.train, hook=work_dir.student_hook("student"), shard=shard)
    if work is not None:
        objective = objective_for(cfg, layer, tied)
        layers = cache_layers(objective, decoder.num_layers)
        plan = chunks.plan(run_cfg, work.alignment, work.snippet_row, len(work.primaries),
                           decoder.hidden_size * dtype.itemsize * len(layers))
        if not plan.single:
            trainer = chunks.ChunkedTrainer(plan, work_dir, lambda al, ids, cu: teacher.compute(
                decoder, ids, cu, al, layers, **teacher_options(decoder, dtype, passes_for(run_cfg).prefix)))
        elif objective.distill is not None and not passes_for(run_cfg).fused:  # fused: the teacher runs in each step
            with timer("teacher"):
                cache = teacher_cache(decoder, mine, layers, dtype, packed=passes_for(run_cfg).prefix)
    learned = learn_rows(run_cfg, decoder, toks, mine, cache, layer, lr, tied, timer, backend, trainer)
    rows, out_rows, train_result, clipped = learned.rows, learned.out_rows, learned.train_result, learned.clipped
    report = build_report(cfg, toks, skipped, rows, work, train_result, tokenizer, decoder, layer, lr, epochs, tied,
                          clipped, timer, device, dtype)
    report["autotune"] = search.as_dict() if search is not None else None
    swap.annotate_methods(report, toks, cfg.method, set(primaries) if train_result is not None else set(),
                          learned.init_used)
    report["retrieval"] = work.retrieval if work is not None else None
    report["outliers"] = flag_outliers(report["tokens"])
    report["chunks"] = plan.bounds if plan is not None else None
    def finish_report(**running: float) -> dict:
        """Timings so far; `running` adds stages still under way (export writes the report as its last file)."""
        report["timings"] = {**timer.seconds, **running, "total": time.perf_counter() - t_start}
        return report

    if out is not None and ranks.writer:
        with timer("export"):
            try:
                write_output(Path(out), cfg, model_path or source, tokenizer, new_tokenizer, toks, rows, out_rows,
                             tied, finish_report, list(corpus))
            except check.GuaranteeError:
                work_dir.finish()  # resuming would reproduce the same rows: nothing is left to resume
                raise
        work_dir.finish()
    finish_report()
    return DistillResult(new_tokenizer, toks, rows, out_rows, report, skipped)


def resolve_settings(cfg: DistillConfig, decoder: models.Decoder,
                     search: autotune.SearchResult | None = None) -> tuple[int, float, int]:
    """Target layer (1..L), learning rate and epochs of a run: fixed values as given; "auto" from the search when
    one ran, else from the measured defaults (docs/defaults.md)."""
    L = decoder.num_layers
    if cfg.target_layer != "auto":
        layer = decoder.resolve_layer(int(cfg.target_layer))
    elif search is not None:
        layer = search.best.layer
    else:
        layer = L if uses_last_layer(cfg) else max(1, round(DEFAULT_DEPTH * L))
    if cfg.lr != "auto":
        lr = float(cfg.lr)
    else:
        lr = search.best.lr if search is not None else autotune.default_lr(layer, L)
    if cfg.epochs != "auto":
        epochs = int(cfg.epochs)
    elif search is not None:
        epochs = search.best.epochs
    else:  # a second epoch helps distillation, not next-token prediction (the paper; docs/defaults.md)
        epochs = 2 if cfg.method.startswith("token-distill") and cfg.prefix_sharing != "fused" else 1
    return layer, lr, epochs


def uses_last_layer(cfg: DistillConfig) -> bool:
    """Methods whose objective reads the final layer whatever --target-layer says (logit losses, NTP)."""
    return not cfg.method.startswith("token-distill") or cfg.loss != "mse"


def search_settings(cfg: DistillConfig, decoder: models.Decoder, toks: list[NewToken], work: Workload, tied: bool,
                    backend: str) -> autotune.SearchResult | None:
    """Run the layer/epochs search when the config leaves either to "auto" and there is a choice to make (logit
    losses and NTP read the last layer); None otherwise or when too few tokens have enough snippets to hold some
    out (then the defaults apply). `--lr auto` needs no search: it is the measured rule autotune.default_lr."""
    layer_search = cfg.target_layer == "auto" and not uses_last_layer(cfg)
    if not (layer_search or cfg.epochs == "auto") or cfg.method not in TRAINED_METHODS:
        return None
    L = decoder.num_layers
    enough = np.bincount(work.snippet_row, minlength=len(work.primaries)) >= 3
    if enough.sum() < 4:
        log.info("autotune: fewer than 4 tokens with 3+ snippets; using the default layer and learning rate")
        return None
    if layer_search:
        layers = None
    else:
        layers = [L if cfg.target_layer == "auto" else decoder.resolve_layer(int(cfg.target_layer))]
    init = subtoken_mean(decoder.embed_weight, [toks[i] for i in work.primaries]).to(decoder.embed_weight.device)
    search_epochs = cfg.epochs == "auto" and cfg.prefix_sharing != "fused"  # fused steps see each snippet once
    schedule = student.Schedule(lr=0.0, epochs=1 if cfg.epochs == "auto" else int(cfg.epochs),
                                batch_size=cfg.batch_size, warmup_fraction=cfg.warmup_fraction, seed=cfg.seed,
                                backend=backend)
    main_passes = passes_for(cfg.replace(epochs=2 if search_epochs else schedule.epochs))  # the likely main run
    return autotune.search(decoder, work.alignment, work.teacher_ids, work.cu_teacher, work.snippet_row, init,
                           cfg.autotune_budget, schedule, lambda layer: objective_for(cfg, layer, tied), tied,
                           layers=layers, lr=None if cfg.lr == "auto" else float(cfg.lr), search_epochs=search_epochs,
                           prefix=main_passes.prefix, fused=main_passes.fused)


def cache_layers(objective: student.Objective, num_layers: int) -> list[int]:
    """Teacher layers an objective reads: the target layer for mse, the last layer for logit losses."""
    return [objective.layer] if objective.distill == "mse" else [num_layers]


def passes_for(cfg: DistillConfig) -> student.Passes:
    """How the student's steps run (prefix sharing, see student.Passes) for this config."""
    return student.resolve_passes(cfg.prefix_sharing, cfg.backend, cfg.epochs)


def teacher_cache(decoder: models.Decoder, work: Workload, layers: list[int], dtype: torch.dtype,
                  packed: bool = False) -> teacher.TeacherCache:
    """Teacher states of the workload's aligned positions at `layers`, in one pass truncated at the deepest
    (packed rows without padding, or the length-sorted padded reference batches)."""
    return teacher.compute(decoder, work.teacher_ids, work.cu_teacher, work.alignment, layers,
                           **teacher_options(decoder, dtype, packed))


def teacher_options(decoder: models.Decoder, dtype: torch.dtype, packed: bool) -> dict:
    """teacher.compute's batch size, cache dtype and placement for this run's device."""
    cuda = decoder.embed_weight.device.type == "cuda"
    return {"max_tokens": teacher.batch_tokens(decoder.embed_weight.device), "cache_dtype": dtype, "packed": packed,
            "device_budget": torch.cuda.mem_get_info()[0] // 2 if cuda else None}


@dataclass
class Learned:
    """New rows of one method (aligned with the token list, fp32 on the CPU) and how they were obtained."""

    rows: torch.Tensor
    out_rows: torch.Tensor | None  # untied models only
    train_result: student.TrainResult | None
    clipped: int
    init_used: set[int] = field(default_factory=set)  # tokens that started from --init-from rows


def learn_rows(cfg: DistillConfig, decoder: models.Decoder, toks: list[NewToken], work: Workload | None,
               cache: teacher.TeacherCache | None, layer: int, lr: float, tied: bool,
               timer: StageTimer | None = None, backend: str = "auto", trainer=student.train) -> Learned:
    """Rows for cfg.method: subtoken-mean or random start, training on `work` for trained methods (`cache` holds
    at least the teacher layers the objective reads, so one cache can serve several runs), variants copied
    from their primaries, norm clipping for tied models and the output-row policy for untied ones. `trainer`:
    student.train or a stand-in with its signature (checkpointing, chunks.ChunkedTrainer)."""
    timer = timer or StageTimer()
    device = decoder.embed_weight.device
    table = decoder.embed_weight
    rows = subtoken_mean(table, toks).to(device)
    out_init = None if tied else subtoken_mean(decoder.model.get_output_embeddings().weight, toks).to(device)
    init_used = swap.apply_init(cfg.init_from, toks, rows, out_init, table.shape[1]) if cfg.init_from else set()
    primaries = trained_tokens(cfg, toks)
    passes = passes_for(cfg)
    if passes.fused and cache is not None:  # a cache shared by several runs (compare) already holds the targets
        passes = student.Passes(prefix=True)
    train_result = None
    if cfg.method == "random":
        rows = random_rows(table, len(toks), cfg.seed).to(device)
    elif cfg.method != "mean" and primaries:
        with timer("student"):
            train_result = trainer(
                decoder, work.alignment, cache, work.snippet_row, rows[primaries],
                out_init[primaries] if out_init is not None else None, objective_for(cfg, layer, tied),
                student.Schedule(lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 warmup_fraction=cfg.warmup_fraction, seed=cfg.seed, log_every=cfg.log_every,
                                 backend=backend),
                tied, passes=passes, teacher=(work.teacher_ids, work.cu_teacher))
        rows[primaries] = train_result.rows
        if train_result.out_rows is not None:
            out_init[primaries] = train_result.out_rows
    # Variants (start-of-text forms) take their primary's rows.
    index_of = {t.word: i for i, t in enumerate(toks) if t.variant_of is None}
    for i, t in enumerate(toks):
        if t.variant_of is not None:
            rows[i] = rows[index_of[t.variant_of]]
            if out_init is not None:
                out_init[i] = out_init[index_of[t.variant_of]]
    rows = rows.float().cpu()
    clipped = 0
    if cfg.method != "mean":
        # Tied: clip to a quantile (a large input row is also a large output row). Untied: to the largest norm,
        # so new rows stay inside the vocabulary's norm range, which `tokdistill check` verifies.
        rows, clipped = clip_norms(rows, table, cfg.max_norm_quantile if tied else 1.0)
    out_rows = None
    if not tied:
        policy = "mean" if cfg.output_embeddings == "auto" else cfg.output_embeddings
        out_rows = torch.zeros_like(rows) if policy == "zeros" else out_init.float().cpu()
    return Learned(rows, out_rows, train_result, clipped, init_used)


def build_report(cfg, toks, skipped, rows, work, train_result, tokenizer, decoder, layer, lr, epochs, tied,
                 clipped, timer, device, dtype) -> dict:
    import transformers

    from . import __version__

    per_token = []
    row_of = {i: r for r, i in enumerate(work.primaries)} if work else {}
    per_row = work.snippets_per_row() if work else None
    for i, t in enumerate(toks):
        r = row_of.get(i)
        per_token.append({
            "word": t.word, "form": t.form, "token": t.piece, "id": t.new_id, "kind": t.kind,
            "variant_of": t.variant_of, "subtokens": tokenizer.convert_ids_to_tokens(t.sub_ids), "sub_ids": t.sub_ids,
            "contexts": int(per_row[r]) if work and r is not None else 0,
            "corpus_contexts": work.found.get(i, 0) if work else 0,
            "source": (work.sources.get(i, "none") if work else cfg.method) if t.variant_of is None else "variant",
            "final_loss": float(train_result.token_loss[r]) if train_result is not None and r is not None else None,
            "norm": float(rows[i].norm()),
        })
    return {
        "tokdistill_fast": __version__,
        "settings": {**cfg.as_dict(), "resolved_target_layer": layer, "resolved_lr": lr,
                     "resolved_epochs": epochs},
        "model": {"type": type(decoder.model).__name__, "layers": decoder.num_layers, "hidden": decoder.hidden_size,
                  "rows_before": int(decoder.embed_weight.shape[0]), "tied": tied},
        # What ran, observed at run time (observed.py; None: the site never ran in this process).
        "implementations": {"align": observed.ran("align"), "device": str(device), "dtype": str(dtype),
                            "backend": observed.ran("kernels"),
                            "prefix_sharing": train_result.extra["passes"] if train_result is not None else None,
                            "packed_attention": observed.ran("attention"),
                            "teacher_cache": observed.ran("teacher_cache")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "counts": {"requested": len(toks) + len(skipped), "added": len(toks), "skipped": len(skipped),
                   "variants": sum(1 for t in toks if t.variant_of),
                   "casing_variants": sum(1 for t in toks if t.variant.startswith("casing")),
                   "by_kind": {k: sum(1 for t in toks if t.kind == k) for k in ("vocab", "added")},
                   "norm_clipped": clipped,
                   "snippets": len(work.snippets) if work else 0,
                   "aligned_positions": int(len(work.alignment.s_pos)) if work else 0,
                   "teacher_tokens": int(work.cu_teacher[-1]) if work else 0,
                   "student_tokens": int(work.alignment.cu_student[-1]) if work else 0},
        "training": None if train_result is None else {
            "steps": train_result.steps, "passes": train_result.extra.get("groups"),
            "seconds": train_result.seconds, "computed_positions": train_result.extra["positions"],
            "chunk_teacher_seconds": train_result.extra.get("teacher_seconds"),  # chunked runs only
            "output_rows_trained": train_result.out_rows is not None,  # untied: ntp-all, --output-embeddings ntp
            "first_loss": float(train_result.step_loss[0]), "last_loss": float(train_result.step_loss[-1])},
        "tokens": per_token,
        "skipped": [{"word": s.word, "reason": s.reason} for s in skipped],
    }


def flag_outliers(per_token: list[dict]) -> list[dict]:
    """Trained tokens whose final loss exceeds OUTLIER_FACTOR x the median, logged with what to look at. Their rows
    are kept as trained (the held-out measure of `tokdistill eval` tells whether they beat the subtoken mean)."""
    losses = [t["final_loss"] for t in per_token if t["final_loss"] is not None and np.isfinite(t["final_loss"])]
    if len(losses) < 3:
        return []
    median = float(np.median(losses))
    flagged = [{"word": t["word"], "final_loss": t["final_loss"], "times_median": t["final_loss"] / median,
                "contexts": t["contexts"], "source": t["source"]}
               for t in per_token if t["final_loss"] is not None and t["final_loss"] > OUTLIER_FACTOR * median]
    for f in flagged:
        log.warning("outlier: %r ended at loss %.3g, %.0fx the median %.3g (%d contexts from %s); its row is kept "
                    "as trained: check its contexts and its held-out KL (tokdistill eval)", f["word"],
                    f["final_loss"], f["times_median"], median, f["contexts"], f["source"])
    return flagged


def write_output(out: Path, cfg, original, tokenizer, new_tokenizer, toks, rows, out_rows, tied, finish_report,
                 corpus: list) -> None:
    """Build the output model from the original weights in their own dtype (a model directory is reloaded on the
    CPU; an in-memory model is copied, never modified), save it with the tokenizer, new rows and report, and
    run `tokdistill check` on it before it is moved into place: a broken guarantee fails the run."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if isinstance(original, Path):
        target = AutoModelForCausalLM.from_pretrained(original, dtype="auto")
    else:
        target = copy.deepcopy(original).cpu()
    head = target.get_output_embeddings()
    before = check.Original(tokenizer, target.get_input_embeddings().weight.detach().clone(),
                            None if tied or head is None else head.weight.detach().clone(), tied,
                            check.load_tokenizer(original)[1] if isinstance(original, Path) else None)
    geometry = export.grow_embeddings(target, max(new_tokenizer.get_vocab().values()) + 1, cfg.pad_to_multiple_of)
    export.write_rows(target, toks, rows, out_rows, tied)
    probes = probe_sample(corpus)

    def fill(tmp: Path) -> None:
        target.save_pretrained(tmp, safe_serialization=True)
        export.save_tokenizer(new_tokenizer, tmp)
        slow = export.slow_tokenizer_files(original if isinstance(original, Path) else None, tmp, toks)
        export.new_rows_file(tmp / "new_embeddings.safetensors", toks, rows, out_rows)
        report = finish_report(export=time.perf_counter() - t0)
        report["model"].update(geometry, slow_tokenizer_files=slow)
        export.write_json(tmp / "report.json", report)
        section = check.run_checks(tmp, before, probes, forward=None, model=target)
        check.write_reports(tmp, section)
        if not section["passed"]:
            raise check.GuaranteeError("the output breaks a guarantee; nothing was written:\n  "
                                       + "\n  ".join(check.summary_lines(section)))

    export.atomic_write(out, cfg.overwrite, fill)


def probe_sample(corpus: list, max_chars: int = 200_000) -> list[str]:
    """The first documents of the corpus, up to max_chars, as probe text for the output check."""
    return contexts.leading_documents(corpus, max_chars)

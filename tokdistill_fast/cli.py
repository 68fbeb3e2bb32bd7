"""`tokdistill` command line: parsing only. Each distill flag maps to one DistillConfig field."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DistillConfig, UserInputError


def _layer(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _lr(value: str) -> float | str:
    return value if value == "auto" else float(value)


def _size(value: str) -> int:
    """A byte count with an optional K/M/G/T suffix (powers of 1024): 500M, 2G."""
    scale = 1024 ** (" KMGT".index(value[-1].upper())) if value[-1:].upper() in ("K", "M", "G", "T") else 1
    try:
        return int(float(value[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 500M, 2G)") from None


def add_distill_args(d: argparse.ArgumentParser) -> None:
    """Model/corpus/method flags shared by commands that run distillation."""
    c = DistillConfig()
    d.add_argument("--model", required=True, help="Hugging Face model directory")
    words = d.add_mutually_exclusive_group(required=True)
    words.add_argument("--new-tokens", help="text file, one new token per line as it appears in text")
    words.add_argument("--new-tokens-from-tokenizer", metavar="DIR",
                       help="add every word of this tokenizer's vocabulary that the model's tokenizer lacks")
    d.add_argument("--corpus", nargs="+", default=[],
                   help="files, directories or globs to mine contexts from: text (blank-line separated documents), "
                   "JSON lines (.jsonl, a 'text' field), Parquet (.parquet, a 'text' column; needs pyarrow)")
    d.add_argument("--stop-when-full", action="store_true",
                   help="stop reading the corpus once every token has --snippets-per-token hits (faster; samples "
                   "come from the first part of the corpus only)")
    d.add_argument("--max-corpus-bytes", type=_size, default=c.max_corpus_bytes,
                   help="read at most this much of the corpus, e.g. 2G")
    d.add_argument("--init-from", metavar="FILE",
                   help="start rows from another method: safetensors with 'input_embeddings' [n, D] and metadata "
                   "'forms' (our new_embeddings.safetensors works); other tokens start from the subtoken mean")
    d.add_argument("--distill-min-chars", type=int, default=c.distill_min_chars, metavar="N",
                   help="words shorter than N characters keep their start row (subtoken mean or --init-from) "
                   "instead of being trained")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokdistill", description="Input embeddings for new tokens by distillation.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="add new tokens to a model and learn their embeddings")
    add_distill_args(d)
    d.add_argument("--out", required=True, help="output directory (save_pretrained layout)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.set_defaults(func=cmd_distill)
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
    except KeyboardInterrupt:
        print("tokdistill: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

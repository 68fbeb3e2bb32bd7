"""Stage 6: write the extended model: a save_pretrained directory (safetensors), new_embeddings.safetensors with
only the new rows, and report.json. Everything is written to a temporary sibling directory and renamed into
place when complete, so a failed run never leaves a half-written output and never touches an existing one
unless asked to replace it.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save

from .config import UserInputError
from .corpus import corpus_files, is_pattern
from .extend import GENERIC_CLASS

log = logging.getLogger(__name__)


def refuse_existing(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing output (file or directory), given as `flag`, unless --overwrite."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserInputError(f"{flag} {out} already exists; pass --overwrite to replace it")
    return out


def check_out_dir(out: str | Path, overwrite: bool, inputs: Iterable[object] = (), replaces: bool = True) -> Path:
    """Refuse an existing output unless --overwrite, a symbolic link (the rename at the end would replace the link,
    not its target), an output that holds one of the run's `inputs` (paths or globs; other values are skipped),
    which --overwrite would delete (an --init-from file is not one: the run has read it before it writes), a
    directory the run `replaces` (False for a command that writes into it) that is neither empty nor an earlier
    output (earlier_output), and paths we could not create (missing parents are fine: atomic_write creates them,
    as save_pretrained does). Called before any work."""
    out = refuse_existing(out, overwrite)
    if out.is_symlink():
        raise UserInputError(f"--out {out} is a symbolic link; give the directory it should be ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a directory")
    if out.exists():
        real = out.resolve()
        paths = [p for v in inputs if isinstance(v, (str, Path))  # as corpus_files reads them: a path, else a glob
                 for p in ([v] if Path(v).exists() or not is_pattern(v)
                           else glob.glob(str(v), recursive=True))]
        for value in paths:
            if Path(value).resolve().is_relative_to(real):
                raise UserInputError(f"--out {out} holds {value}, which this run reads: --overwrite would delete it; "
                                     "give another --out")
        held = sorted(p.name for p in out.iterdir())
        if replaces and held and not earlier_output(out):
            raise UserInputError(f"--out {out} is not an output of this tool (it holds {', '.join(held[:3])}"
                                 f"{' ...' if len(held) > 3 else ''}, and no report.json this tool wrote): "
                                 "--overwrite would delete it; give another --out (--overwrite replaces an earlier "
                                 "run's output or an empty directory)")
    return _creatable(out, "--out")


def earlier_output(directory: Path) -> bool:
    """Whether `directory` is an output of this tool: its report.json is one that write_output wrote."""
    try:
        report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and "tokdistill_fast" in report


# The files of a model directory that loading it, or reading a run's output, reads: an output file must not be one.
MODEL_FILES = ("config.json", "generation_config.json", "report.json", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "chat_template*", "vocab.*", "merges.txt", "*.model", "*.safetensors*", "*.bin",
               "*.index.json", "*.pt", "*.pth", "*.gguf")


def check_out_file(out: str | Path, overwrite: bool, flag: str = "--out", models: Iterable[object] = (),
                   texts: Iterable[str | Path] = (), text_flag: str = "--corpus") -> Path:
    """check_out_dir for an output file (select's word list, eval's JSON, check's --json), which write_text_atomic
    then writes: where it exists, a file the command reads is refused even with --overwrite: one of the `texts`
    (corpus or held-out values, read as `text_flag` reads them) or a MODEL_FILES file of one of the `models`
    directories (an eval.json written beside a run's output is replaced as any other)."""
    out = refuse_existing(out, overwrite, flag)
    if out.is_dir():
        raise UserInputError(f"{flag} {out} is a directory; give a file name")
    if out.exists():
        real = out.resolve()
        read = [(f, f.resolve()) for f in corpus_files(texts, text_flag)] if texts else []
        if any(fnmatch.fnmatch(out.name, pattern) for pattern in MODEL_FILES):  # a name a model directory reads
            read += [(Path(m) / out.name, Path(m).resolve() / out.name) for m in models if isinstance(m, (str, Path))]
        for name, path in read:
            if real == path:
                raise UserInputError(f"{flag} {out} is {name}, which this command reads: --overwrite would replace it; "
                                     f"give another {flag}")
    return _creatable(out, flag)


def _creatable(out: Path, flag: str) -> Path:
    """`out`, where its nearest existing parent is a directory we can create entries in."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserInputError(f"{flag} {out}: cannot create it in {parent}")
    try:  # a real try: os.access says yes to root on read-only filesystems and /proc
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise UserInputError(f"{flag} {out}: cannot create it in {parent} ({e.strerror})") from None
    return out


PADDING_BIAS = -1e4  # output bias of grown padding rows: exp(-1e4) underflows to 0 in every float dtype
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _grown(weight: torch.Tensor, rows: int, fill: float = 0.0) -> torch.nn.Parameter:
    """`weight` with rows of `fill` appended up to `rows` (HF's resize draws a random matrix of the new size
    for each of the two matrices first: seconds of a Gemma-3 run's export, every row of it overwritten)."""
    grown = torch.full((rows, *weight.shape[1:]), fill, dtype=weight.dtype, device=weight.device)
    grown[: weight.shape[0]] = weight
    return torch.nn.Parameter(grown, requires_grad=weight.requires_grad)


@torch.no_grad()
def grow_embeddings(model, rows_needed: int, pad_to_multiple_of: int | None = None) -> dict:
    """Make the input (and untied output) matrices hold at least `rows_needed` rows, rounded up to a multiple
    of `pad_to_multiple_of`; never shrink, keep ties, keep original rows bit-identical. Grown rows start at
    zero: a zero output row gives a padding id logit 0 (and a bias, if any, of PADDING_BIAS), far below a
    trained model's log-normalizer. config.vocab_size then equals the row count. Returns the geometry."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    current = emb.weight.shape[0]
    target = max(current, rows_needed)
    if pad_to_multiple_of and target % pad_to_multiple_of:
        target += pad_to_multiple_of - target % pad_to_multiple_of
    if target > current:
        tied = head is not None and head.weight is emb.weight
        emb.weight = _grown(emb.weight, target)
        emb.num_embeddings = target
        if head is not None:
            head.weight = emb.weight if tied else _grown(head.weight, target)
            head.out_features = target
            if getattr(head, "bias", None) is not None:
                head.bias = _grown(head.bias, target, PADDING_BIAS)
    model.config.vocab_size = target
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.vocab_size = target
    if hasattr(model, "vocab_size"):
        model.vocab_size = target
    return {"rows_before": current, "rows_after": target, "rows_needed": rows_needed,
            "pad_to_multiple_of": pad_to_multiple_of, "grown": target - current}


@torch.no_grad()
def write_rows(model, toks: list, rows: torch.Tensor, out_rows: torch.Tensor | None, tied: bool) -> None:
    """Write new input rows (and output rows for untied models) at their token ids. An output bias, if any,
    takes the mean of the subtoken biases when output rows are given, else 0."""
    index = torch.tensor([t.new_id for t in toks], dtype=torch.long)
    emb = model.get_input_embeddings().weight
    emb.index_copy_(0, index.to(emb.device), rows.to(emb.device, emb.dtype))
    head = model.get_output_embeddings()
    if not tied and out_rows is not None:
        head.weight.index_copy_(0, index.to(head.weight.device), out_rows.to(head.weight.device, head.weight.dtype))
    if head is not None and getattr(head, "bias", None) is not None:
        bias = head.bias
        values = [bias[t.sub_ids].float().mean() if out_rows is not None else 0.0 for t in toks]
        bias[index.to(bias.device)] = torch.tensor(values, dtype=bias.dtype, device=bias.device)


def save_tokenizer(tokenizer, path: Path) -> None:
    """save_pretrained, with a tokenizer_config.json that older readers understand: it names the generic fast
    class (transformers 5 writes "TokenizersBackend", which transformers 4.x and so llama.cpp's converter, pinned
    to 4.57, cannot load; model classes may rebuild the pipeline from defaults) and lists the added tokens, as
    transformers 4.x did: llama.cpp's SentencePiece path (Gemma, Llama-2) reads them only from there or from
    added_tokens.json, never from tokenizer.json."""
    tokenizer.save_pretrained(path)
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = GENERIC_CLASS
    config["added_tokens_decoder"] = {
        str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                 "single_word": a.single_word, "special": a.special}
        for i, a in sorted(tokenizer.added_tokens_decoder.items())}
    write_json(config_file, config)


def slow_tokenizer_files(source: Path | None, tmp: Path, toks: list) -> dict:
    """Slow-tokenizer files (tokenizer.model, vocab.json, merges.txt) know nothing of vocab-mode entries, so
    a slow tokenizer built from them would split new words: they are dropped then. With added tokens only,
    they are copied (the slow classes and llama.cpp's SentencePiece path read added tokens from
    tokenizer_config.json). Returns what was kept and dropped, for the report."""
    present = [n for n in SLOW_TOKENIZER_FILES if source is not None and (source / n).is_file()]
    all_added = all(t.kind == "added" for t in toks)
    keep = [n for n in present if n != "added_tokens.json"] if all_added else []
    for name in keep:
        shutil.copy2(source / name, tmp / name)
    dropped = [n for n in present if n not in keep]
    why = None if not dropped else (
        "added_tokens.json repeats tokenizer.json's added tokens and can disagree with it" if all_added else
        "vocab-mode entries live only in tokenizer.json; a slow tokenizer built from these files would split "
        "the new words")
    return {"kept": keep, "dropped": dropped, "why": why}


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def atomic_write(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> None:
    """Call fill(tmp) on a fresh sibling temp dir, then rename it to `out` (replacing it only if overwrite)."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise UserInputError(f"cannot write {out}: {e.strerror} ({e.filename})") from None
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp made it private: as mkdir would, for save_pretrained's readers
        if out.exists():
            if not overwrite:
                raise UserInputError(f"--out {out} appeared while the run was going; not replacing it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise UserInputError(f"cannot write {out}: no space left on its filesystem "
                                 f"({shutil.disk_usage(out.parent).free / 2**30:.1f} GiB free after removing the "
                                 "partial output); nothing was written") from None
        raise


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for lack of space (safetensors reports it as its own error type)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and f"os error {errno.ENOSPC}" in str(e)


def new_rows_file(path: Path, tokens: list, rows: torch.Tensor, out_rows: torch.Tensor | None) -> None:
    """new_embeddings.safetensors: the new rows keyed by position, with ids and token strings as metadata, so
    tools such as PEFT's trainable-token setups can pick them up without loading the model."""
    tensors = {"input_embeddings": rows.detach().float().cpu().contiguous(),
               "token_ids": torch.tensor([t.new_id for t in tokens], dtype=torch.int64)}
    if out_rows is not None:
        tensors["output_embeddings"] = out_rows.detach().float().cpu().contiguous()
    meta = {"tokens": json.dumps([t.piece for t in tokens], ensure_ascii=False),
            "forms": json.dumps([t.form for t in tokens], ensure_ascii=False)}
    path.write_bytes(sorted_metadata(save(tensors, metadata=meta)))


def sorted_metadata(data: bytes) -> bytes:
    """A safetensors file with its metadata keys in sorted order: safetensors writes them from a hash map whose
    order changes from process to process, so equal rows gave unequal bytes. The header keeps its length (same
    content, padded as before), so no data offset moves."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # another JSON spelling than serde's: keep the file as written
        return data
    return data[:8] + text.ljust(n) + data[8 + n:]


def json_safe(obj):
    """Replace NaN/inf (not valid JSON) with None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, creating missing parents: no reader, and no run
    stopped halfway, leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

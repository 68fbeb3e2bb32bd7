"""The corpus as contexts.py reads it: the files --corpus names (files, directories, globs) and a stream of
document pieces from them (text, JSON lines, Parquet; text and JSON lines also gzip-, bzip2- or xz-compressed)
with bounded memory."""

from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import io
import json
import logging
import lzma
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .config import UserInputError, not_a_file, progress

log = logging.getLogger(__name__)

DOC_SPLIT = re.compile(r"\n[ \t]*\n")  # plain-text documents are separated by blank lines
CHUNK = 1 << 20  # bytes read (and characters searched) at a time; larger chunks gain little (bench/)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# Files a directory contributes; a file named explicitly is read whatever its suffix (as text unless JSONL/Parquet).
CORPUS_SUFFIXES = (".txt", ".text", ".md") + JSONL_SUFFIXES + PARQUET_SUFFIXES
# Compressed text and JSON lines are recognised by their first bytes and read as they stream; a suffix below names
# the format inside (`wiki.jsonl.gz`; `.dz`, dictzip, is gzip: Debian's dict-* packages ship `*.dict.dz`).
COMPRESSED = {b"\x1f\x8b": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"), b"BZh": bz2.BZ2File,
              b"\xfd7zXZ\x00": lzma.LZMAFile}
COMPRESSED_SUFFIXES = (".gz", ".dz", ".bz2", ".xz")


def inner_suffix(path: Path) -> str:
    """The suffix of the format inside a compressed file's name (`a.jsonl.gz` -> `.jsonl`), else path's own."""
    name = path.name.lower()
    for s in COMPRESSED_SUFFIXES:
        if name.endswith(s):
            return Path(name[:-len(s)]).suffix
    return path.suffix.lower()


@contextlib.contextmanager
def open_bytes(path: Path) -> Iterator[tuple[BinaryIO, Callable[[int], int], bool]]:
    """(the file's bytes, decompressed where it starts with a gzip, bzip2 or xz header; `advance`: given the bytes
    just read from it, the bytes read from the disk so far, which progress and --max-corpus-bytes count; whether it
    is compressed). A plain file counts what it was given (no seek per JSONL line); a compressed one asks the file's
    position, which runs ahead of the text by the decompressor's buffer."""
    with path.open("rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        opener = next((cls for magic, cls in COMPRESSED.items() if head.startswith(magic)), None)
        if opener is None:
            total = 0

            def advance(n: int) -> int:
                nonlocal total
                total += n
                return total

            yield raw, advance, False
            return
        with opener(raw) as f:
            yield f, lambda n: raw.tell(), True


class Piece(NamedTuple):
    """A slice of one document: short documents come whole, long ones in consecutive pieces."""

    text: str
    first: bool  # the slice starts its document
    last: bool  # the slice ends its document


def is_pattern(value: str | Path) -> bool:
    """Whether a --corpus value that names no existing file or directory is read as a glob."""
    return any(c in str(value) for c in "*?[")


def corpus_files(values: Iterable[str | Path], option: str = "--corpus") -> list[Path]:
    """The files named by --corpus values: files, directories (their corpus files, recursively, hidden ones
    skipped) and globs (`data/*.jsonl`, `shards/**/*.parquet`), in sorted order without repeats. `option` names the
    values in error messages (`tokdistill eval` reads --heldout)."""
    files: dict[Path, None] = {}
    for value in values:
        path = Path(value)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _files_under(path)
            if not found:
                raise UserInputError(f"{option} {path}: the directory holds no {'/'.join(CORPUS_SUFFIXES)} files")
        elif is_pattern(value):
            matches = sorted(Path(p) for p in glob.glob(str(value), recursive=True))
            found = [f for m in matches for f in ([m] if m.is_file() else _files_under(m))]
            if not found:
                raise UserInputError(f"{option} {value}: the pattern matches no file")
        elif path.exists():
            raise UserInputError(f"{option} {path}: {not_a_file(path)}")
        else:
            raise UserInputError(f"{option} {path}: no such file or directory")
        files.update(dict.fromkeys(found))
    return list(files)


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and inner_suffix(p) in CORPUS_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


class Corpus:
    """Streams Pieces from corpus files with bounded memory: text files in chunks (documents separated by blank
    lines), JSON lines one record at a time (a "text" field), Parquet in record batches (a "text" column).
    Stops after `max_bytes` bytes when given: exactly in a plain text file (its last document cut at the last
    whitespace before the limit, so no word is cut), at a chunk of a compressed one, a line of JSON lines, a batch
    of Parquet; shows progress with an ETA."""

    def __init__(self, values: Iterable[str | Path], max_bytes: int | None = None, chunk: int = CHUNK,
                 option: str = "--corpus"):
        self.files = corpus_files(values, option)
        self.option = option  # the command-line option that named the files, for error messages
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.bytes_read = 0
        self.truncated = False  # stopped at max_bytes before the end of the corpus

    def __iter__(self) -> Iterator[Piece]:
        if not self.files:  # nothing to read, and no bar to show for it
            return
        total = sum(p.stat().st_size for p in self.files)
        bar = progress(total=min(total, self.max_bytes or total), desc="corpus", unit="B", unit_scale=True,
                   unit_divisor=1024, leave=False)
        try:
            for path in self.files:
                suffix = inner_suffix(path)
                reader = (self._jsonl if suffix in JSONL_SUFFIXES else
                          self._parquet if suffix in PARQUET_SUFFIXES else self._text)
                try:
                    for piece in reader(path):
                        yield piece
                        if self.bytes_read != bar.n:
                            bar.update(self.bytes_read - bar.n)
                    if self._left() == 0:  # the reader stopped at the limit
                        self.truncated = self.bytes_read < total
                        return
                except UnicodeDecodeError as e:  # Parquet strings that Arrow did not validate
                    raise UserInputError(f"{self.option} {path}: not UTF-8 text ({e.reason})") from None
                except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # also a truncated or corrupt stream
                    raise UserInputError(f"{self.option} {path}: cannot read it: {e}") from None
        finally:
            bar.close()

    def _left(self) -> int | None:
        """Bytes still to read under max_bytes (None: no limit)."""
        return None if self.max_bytes is None else max(self.max_bytes - self.bytes_read, 0)

    def _text(self, path: Path) -> Iterator[Piece]:
        """Blank-line separated documents. `carry` holds the unfinished document; splitting carry + the new chunk
        finds the same separators as splitting the whole file, because a separator is complete once its second
        newline has been read and only the carry's last line can start one."""
        decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
        carry, first, offset, before, opening = "", True, 0, self.bytes_read, True
        size = path.stat().st_size
        with open_bytes(path) as (f, advance, compressed):
            while True:
                left = self._left()
                data = f.read(self.chunk if left is None or compressed else min(self.chunk, left))
                self.bytes_read = before + advance(len(data))
                pending = len(decoder.getstate()[0])  # bytes of a character split by the previous read
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise UserInputError(f"{self.option} {path}: not UTF-8 text ({e.reason} at byte "
                                         f"{offset - pending + e.start})") from None
                offset += len(data)
                # A leading byte order mark (Windows editors) is not text. Stripped here: a utf-8-sig decoder would
                # shift the error offsets above by its 3 bytes.
                if opening and text:
                    text, opening = text.removeprefix("\ufeff"), False
                docs = DOC_SPLIT.split(carry + text)
                carry = docs.pop()
                for doc in docs:
                    yield Piece(doc, first, True)
                    first = True
                if not data:
                    yield Piece(carry, first, True)
                    return
                if self._left() == 0 and (compressed or self.bytes_read - before < size):  # the limit, not the end
                    spaces = [m.start() for m in re.finditer(r"\s", carry)][-1:]  # so far, to its last whole word
                    if kept := carry[:spaces[0]] if spaces and spaces[0] > 0 else carry:  # no space: no word to cut
                        yield Piece(kept, first, False)
                    return
                if len(carry) > self.chunk:  # a long document: pass it on up to its last line
                    cut = carry.rfind("\n")
                    if cut == -1 or (cut == 0 and carry.strip(" \t\n")):
                        cut = len(carry)  # one long line: no separator can start inside it
                    if cut > 0:
                        yield Piece(carry[:cut], first, False)
                        carry, first = carry[cut:], False

    def _jsonl(self, path: Path) -> Iterator[Piece]:
        before = self.bytes_read
        with open_bytes(path) as (f, advance, _):
            for n, line in enumerate(f, 1):
                self.bytes_read = before + advance(len(line))
                if not line.strip():
                    continue
                try:
                    text = json.loads(line.decode("utf-8-sig"))["text"]
                except UnicodeDecodeError as e:
                    raise UserInputError(f"{self.option} {path}:{n}: not UTF-8 text ({e.reason})") from None
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserInputError(f"{self.option} {path}:{n}: not a JSON object with a string 'text' field")
                yield from self._split(text)
                if self._left() == 0:
                    return

    def _parquet(self, path: Path) -> Iterator[Piece]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserInputError(f"{self.option} {path}: reading Parquet needs pyarrow "
                                 "(pip install 'tokdistill-fast[parquet]')") from None
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            if "text" not in schema.names or not (pa.types.is_string(schema.field("text").type) or
                                                  pa.types.is_large_string(schema.field("text").type)):
                raise UserInputError(f"{self.option} {path}: no string column 'text' (columns: "
                                     f"{', '.join(schema.names)})")
            meta, column = pf.metadata, schema.names.index("text")
            # Bytes are counted as the text column's share of the file, spread evenly over its rows.
            size = sum(meta.row_group(g).column(column).total_compressed_size for g in range(meta.num_row_groups))
            per_row = size / max(meta.num_rows, 1)
            for batch in pf.iter_batches(batch_size=256, columns=["text"]):
                self.bytes_read += round(batch.num_rows * per_row)
                for text in batch.column(0).to_pylist():
                    if text is not None:
                        yield from self._split(text)
                if self._left() == 0:
                    return
        except pa.ArrowException as e:
            raise UserInputError(f"{self.option} {path}: not a readable Parquet file: {e}") from None

    def _split(self, text: str) -> Iterator[Piece]:
        """One document as Pieces of at most `chunk` characters."""
        for lo in range(0, max(len(text), 1), self.chunk):
            yield Piece(text[lo:lo + self.chunk], lo == 0, lo + self.chunk >= len(text))


def iter_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents of the corpus files (see Corpus); a document longer than a chunk arrives in several parts."""
    for piece in Corpus(paths):
        yield piece.text


def leading_documents(paths: Iterable[str | Path], max_chars: int) -> list[str]:
    """The corpus's first documents, cut so that together they hold at most max_chars characters."""
    docs, used = [], 0
    for doc in iter_documents(paths):
        if used >= max_chars:
            break
        docs.append(doc[:max_chars - used])
        used += len(docs[-1])
    return docs

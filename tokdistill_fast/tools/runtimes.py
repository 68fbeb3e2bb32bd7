"""llama.cpp's converter and tokenizer, built once from the llama-cpp-python sdist, to tokenize like a deployed model.

Users put tokenizer-extended models into llama.cpp (and Ollama, LM Studio) through `convert_hf_to_gguf.py`, which
rebuilds the tokenizer from tokenizer.json / tokenizer.model with llama.cpp's own rules. The only faithful check is
to run those two tools: no internet is needed, the PyPI sdist of llama-cpp-python vendors llama.cpp's sources.
Everything lives under cache_dir()/llama.cpp: the sdist, its sources, a CPU build of libllama with a small tool over
its llama_tokenize (llama_ids.cpp) and a venv with the converter's own pins (transformers 4.x), so the check runs
what a user runs. `python -m tokdistill_fast.tools.runtimes build` (or `make test-downstream`) makes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..check import PROBE_TEXT, new_tokens_of, probe_paragraphs, read_probe
from ..config import UserInputError, cache_dir
from ..extend import converter_text_forms

# The release checked in docs/vocabulary-extension.md; pinned so a cached build means the same llama.cpp everywhere.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# A static CPU libllama and nothing else: no network, no server, no examples. Its llama_tokenize is what
# llama-tokenize, llama-server and every llama.cpp front end call; llama_ids.cpp (beside this file) links it
# directly, so `common` (52 more files) is not built and one process tokenizes every text.
CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=OFF"]
# The converter's requirements (vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt) pin
# transformers 4.57.6 and torch 2.11; torch is taken as the CPU wheel the project already installs (the converter
# only uses it for tensors, and --vocab-only reads none), everything that parses tokenizers is as pinned.
CONVERTER_PINS = ["transformers==4.57.6", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "protobuf>=4.21.0,<5.0.0"]
CONVERTER_TORCH = "torch==2.13.0"


@dataclass
class LlamaTools:
    """Paths of a usable llama.cpp: the vendored source tree, the tokenizer tool and the converter's python."""

    src: Path
    tokenize: Path
    python: Path

    def missing(self) -> list[str]:
        return [str(p) for p in (self.src / "convert_hf_to_gguf.py", self.tokenize, self.python) if not p.exists()]


def tools(root: Path | None = None) -> LlamaTools:
    root = root or cache_dir() / "llama.cpp"
    return LlamaTools(src=root / "src" / "vendor" / "llama.cpp", tokenize=root / "build" / "llama_ids",
                      python=root / "venv" / "bin" / "python")


def require_tools(root: Path | None = None) -> LlamaTools:
    """The cached tools, or a UserInputError saying how to build them."""
    t = tools(root)
    if t.missing():
        raise UserInputError("llama.cpp tools are not built (missing " + ", ".join(t.missing()) + "); run "
                             "`make test-downstream` or `python -m tokdistill_fast.tools.runtimes build` once "
                             "(5-15 min on 2 cores)")
    return t


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build(root: Path | None = None) -> LlamaTools:
    """Download, build and install whatever of the tools is missing (each step skipped when its result exists)."""
    root = root or cache_dir() / "llama.cpp"
    t = tools(root)
    if not (t.src / "CMakeLists.txt").exists():
        sdists = sorted((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                  LLAMA_CPP_PYTHON, "-d", str(root / "sdist")])
            sdists = sorted((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
        tmp = root / "src.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(tmp, filter="data")
        (top,) = tmp.iterdir()
        shutil.rmtree(root / "src", ignore_errors=True)
        top.rename(root / "src")
        tmp.rmdir()
    if not t.tokenize.exists():
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                raise UserInputError(f"{tool} is not installed (apt-get install -y cmake ninja-build)")
        nice = ["nice", "-n", "10"]  # a long compile: stay out of the way of interactive work
        build_dir = root / "build"
        _run(nice + ["cmake", "-S", str(t.src), "-B", str(build_dir), *CMAKE_FLAGS])
        _run(nice + ["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(os.cpu_count() or 1)])
        libs = [build_dir / "src" / "libllama.a", *sorted((build_dir / "ggml" / "src").glob("libggml*.a"))]
        _run(nice + ["g++", "-O2", "-std=c++17", str(Path(__file__).with_name("llama_ids.cpp")),
                     "-I", str(t.src / "include"), "-I", str(t.src / "ggml" / "include"), "-o", str(t.tokenize),
                     "-Wl,--start-group", *map(str, libs), "-Wl,--end-group", "-lpthread", "-ldl", "-lm"])
    if not t.python.exists():
        converter_venv(root / "venv")
    return t


def converter_venv(venv: Path) -> None:
    """A venv with the converter's pins, built under a temporary name and renamed when complete (it is only
    ever run as `venv/bin/python`, whose paths survive the rename)."""
    tmp = venv.with_name(venv.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(tmp)])
    _run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", CONVERTER_TORCH, *CONVERTER_PINS])
    os.rename(tmp, venv)


# ------------------------------------------------------------------------------------------- comparison

def sentence_set(words: list[str]) -> list[tuple[str, str]]:
    """(category, text): each word after a space, at the start of text, after a newline, after punctuation and
    inside longer words, plus check.py's probe text (no new words), cut in paragraphs."""
    out = []
    for w in words:
        out += [("after a space", f"The {w} was named twice: {w}."), ("start of text", f"{w} comes first."),
                ("after a newline", f"Line one.\n{w} starts line two."),
                ("after punctuation", f'("{w}", {w}; {w}!) and -{w}-'),
                ("inside longer words", f"The un{w}ness of pre{w}s, {w}ish and {w}{w}.")]
    return out + [("without new words", p) for p in probe_paragraphs([PROBE_TEXT])]


def corpus_sample(path: Path, words: list[str], with_new: int = 300, without: int = 300) -> list[tuple[str, str]]:
    """Up to `with_new` corpus paragraphs that contain a new word at word boundaries and `without` that do not,
    in file order (a fixed sample: the same file gives the same texts)."""
    from ..tokens import word_pattern

    hit = word_pattern(words)
    picked: dict[str, list[str]] = {"corpus, with new words": [], "corpus, without new words": []}
    wanted = {"corpus, with new words": with_new, "corpus, without new words": without}
    for para in probe_paragraphs([path.read_text(encoding="utf-8", errors="replace")]):
        key = "corpus, with new words" if hit.search(para) else "corpus, without new words"
        if len(picked[key]) < wanted[key]:
            picked[key].append(para)
        if all(len(v) >= wanted[k] for k, v in picked.items()):
            break
    return [(k, t) for k, texts in picked.items() for t in texts]


def to_gguf(model_dir: Path, gguf: Path, t: LlamaTools) -> None:
    """convert_hf_to_gguf.py --vocab-only with the converter's own pins; UserInputError with its last lines."""
    env = {**os.environ, "PYTHONPATH": str(t.src / "gguf-py")}
    r = subprocess.run([str(t.python), str(t.src / "convert_hf_to_gguf.py"), str(model_dir), "--vocab-only",
                        "--outfile", str(gguf)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        unknown = "pre-tokenizer was not recognized" in tail and (model_dir / "new_embeddings.safetensors").is_file()
        hashed = converter_text_forms([t["form"] for t in new_tokens_of(model_dir)]) if unknown else {}
        hint = (f"\nits new token(s) {', '.join(map(repr, hashed))} occur in the text whose ids the converter hashes "
                "to recognize the tokenizer; tokdistill distill now leaves such words out") if hashed else ""
        raise UserInputError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}:\n{tail}{hint}")


def loadable_copy(model_dir: Path, tmp: Path) -> Path:
    """`model_dir` as links in `tmp`, with tokenizer_config.json naming the generic class: an original saved by
    transformers 5 ("TokenizersBackend") is otherwise unreadable for the converter's transformers 4.57."""
    from ..extend import GENERIC_CLASS

    tmp.mkdir()
    for f in model_dir.iterdir():
        (tmp / f.name).symlink_to(f.absolute())
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        (tmp / config_file.name).unlink()
        (tmp / config_file.name).write_text(json.dumps({**config, "tokenizer_class": GENERIC_CLASS}), encoding="utf-8")
    return tmp


def llama_ids(gguf: Path, texts: list[str], t: LlamaTools) -> tuple[list[list[int]], list[str]]:
    """llama.cpp's token ids for each text (no BOS, special tokens parsed: llama-tokenize's defaults) and its
    detokenization of them, from one llama_ids process."""
    if any("\0" in x for x in texts):
        raise UserInputError("texts with NUL characters cannot be passed to llama_ids")
    r = subprocess.run([str(t.tokenize), str(gguf)], input="\0".join(texts).encode("utf-8"),
                       capture_output=True, check=True)
    ids, back = [], []
    for line in r.stdout.decode("ascii").splitlines():
        a, b = line.split("\t")
        ids.append([int(x) for x in a.split()])
        back.append(bytes.fromhex(b).decode("utf-8", errors="replace"))
    return ids, back


@dataclass
class Agreement:
    """Per category: texts compared, texts whose ids match transformers', and texts skipped because the original
    model already tokenizes them differently in the two runtimes (not ours to fix); a few mismatches to show."""

    compared: dict[str, int] = field(default_factory=dict)
    matched: dict[str, int] = field(default_factory=dict)
    original_differs: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.compared == self.matched


def agreement(texts: list[tuple[str, str]], got: list[list[int]], want: list[list[int]], tok,
              base_same: list[bool] | None = None) -> Agreement:
    """Count, per category, the texts whose ids `got` equal `want` (transformers'); texts with base_same False
    (the original already differs between the two runtimes) are counted apart."""
    agree = Agreement()
    for k, ((cat, text), ids, ref) in enumerate(zip(texts, got, want)):
        if base_same is not None and not base_same[k]:
            agree.original_differs[cat] = agree.original_differs.get(cat, 0) + 1
            continue
        agree.compared[cat] = agree.compared.get(cat, 0) + 1
        agree.matched.setdefault(cat, 0)
        if ids == ref:
            agree.matched[cat] += 1
        elif len(agree.examples) < 5:
            first = next(i for i, (a, b) in enumerate(zip(ids + [-1], ref + [-1])) if a != b)
            agree.examples.append(f"{cat}: {text[:60]!r}: {tok.convert_ids_to_tokens(ids[first:first + 3])} vs "
                                  f"transformers {tok.convert_ids_to_tokens(ref[first:first + 3])}")
    return agree


def without_new_ids(got: list[list[int]], want: list[list[int]], new_ids: set[int]) -> list[bool]:
    """For each text, whether it may be compared without the original model: False where the two runtimes differ
    and neither reads a new id there: a text that neither reads with a new token is read with the original
    vocabulary in both, so such a difference is its own (SmolLM2's " ½"), which only --original could show; any
    other is compared."""
    return [g == w or bool(new_ids & {*g, *w}) for g, w in zip(got, want)]


def hf_ids(model_dir: Path, texts: list[str]) -> tuple[object, list[list[int]]]:
    """transformers' AutoTokenizer for `model_dir` and its ids for each text (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, [tok(x, add_special_tokens=False)["input_ids"] for x in texts]


def compare_llama(out: Path, texts: list[tuple[str, str]], original: Path | None = None,
                  root: Path | None = None) -> Agreement:
    """Convert `out` (and `original`, if given) with llama.cpp's converter and compare llama.cpp's token ids with
    transformers' AutoTokenizer ids on every text. Texts the original already tokenizes differently in the
    two runtimes are counted apart, not compared (without `original`: those where neither reads a new id)."""
    t = require_tools(root)
    plain = [x for _, x in texts]
    base_same = None
    with tempfile.TemporaryDirectory() as tmp:
        to_gguf(out, Path(tmp) / "out.gguf", t)
        got = llama_ids(Path(tmp) / "out.gguf", plain, t)[0]
        if original is not None:
            to_gguf(loadable_copy(original, Path(tmp) / "original"), Path(tmp) / "original.gguf", t)
            base = llama_ids(Path(tmp) / "original.gguf", plain, t)[0]
            base_same = [b == ref for b, ref in zip(base, hf_ids(original, plain)[1])]
    tok, want = hf_ids(out, plain)
    if base_same is None:
        base_same = without_new_ids(got, want, {t["id"] for t in new_tokens_of(out)})
    return agreement(texts, got, want, tok, base_same)


def check_llama_cpp(out: str | Path, original: str | Path | None = None,
                    probes: list[str] | None = None) -> Agreement:
    """`tokdistill check --runtime llama.cpp`: llama.cpp's token ids against transformers' on sentences with each
    new word (after a space, at the start of text, after a newline or punctuation, inside longer words) and on the
    probe text; needs the tools `make test-downstream` builds (a UserInputError says so when they are missing)."""
    out = Path(out)
    texts = sentence_set(sorted({t["word"] for t in new_tokens_of(out)}))
    texts += [("probe files", p) for p in probe_paragraphs([read_probe(f) for f in probes or []])]
    return compare_llama(out, texts, Path(original) if original else None)


def table(rows: dict[str, Agreement]) -> str:
    """Markdown: one row per (output, category): matched / compared, and texts where the original differs."""
    lines = ["| output | texts | match transformers | original differs (skipped) |", "|---|---|---|---|"]
    for name, a in rows.items():
        for cat in dict.fromkeys([*a.compared, *a.original_differs]):
            lines.append(f"| {name} | {cat} | {a.matched.get(cat, 0)}/{a.compared.get(cat, 0)} | "
                         f"{a.original_differs.get(cat, 0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m tokdistill_fast.tools.runtimes build")
    print(build())

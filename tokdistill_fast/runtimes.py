"""llama.cpp's converter and tokenizer, built once from the llama-cpp-python sdist, to tokenize like a deployed model.

Users put tokenizer-extended models into llama.cpp (and Ollama, LM Studio) through `convert_hf_to_gguf.py`, which
rebuilds the tokenizer from tokenizer.json / tokenizer.model with llama.cpp's own rules. The only faithful check is
to run those two tools: no internet is needed, the PyPI sdist of llama-cpp-python vendors llama.cpp's sources.
Everything lives under cache_dir()/llama.cpp: the sdist, its sources, a CPU build of `llama-tokenize` and a venv with
the converter's own pins (transformers 4.x), so the check runs what a user runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .config import UserInputError, cache_dir

# The release checked in docs/vocabulary-extension.md; pinned so a cached build means the same llama.cpp everywhere.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# A static CPU tokenizer tool and nothing else: no network, no server, no examples (~11 min on one core).
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
    """Paths of a usable llama.cpp: the vendored source tree, the tokenizer binary and the converter's python."""

    src: Path
    tokenize: Path
    python: Path

    def missing(self) -> list[str]:
        return [str(p) for p in (self.src / "convert_hf_to_gguf.py", self.tokenize, self.python) if not p.exists()]


def tools(root: Path | None = None) -> LlamaTools:
    root = root or cache_dir() / "llama.cpp"
    return LlamaTools(src=root / "src" / "vendor" / "llama.cpp", tokenize=root / "build" / "bin" / "llama-tokenize",
                      python=root / "venv" / "bin" / "python")


def require_tools(root: Path | None = None) -> LlamaTools:
    """The cached tools, or a UserInputError saying how to build them."""
    t = tools(root)
    if t.missing():
        raise UserInputError("llama.cpp tools are not built (missing " + ", ".join(t.missing()) + "); run "
                             "`make test-downstream` or `python -m tokdistill_fast.runtimes build` once (~15 min)")
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
        nice = ["nice", "-n", "10"]  # a long single-core compile: stay out of the way of interactive work
        _run(nice + ["cmake", "-S", str(t.src), "-B", str(root / "build"), *CMAKE_FLAGS])
        _run(nice + ["cmake", "--build", str(root / "build"), "--target", "llama-tokenize", "-j", "1"])
    if not t.python.exists():
        venv = root / "venv"
        _run([sys.executable, "-m", "venv", str(venv) + ".partial"])
        py = venv.with_name("venv.partial") / "bin" / "python"
        _run([str(py), "-m", "pip", "install", "-q", CONVERTER_TORCH, *CONVERTER_PINS])
        os.rename(venv.with_name("venv.partial"), venv)  # venv scripts carry absolute paths: only python -m below
    return t


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m tokdistill_fast.runtimes build")
    print(build())

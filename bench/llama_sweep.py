"""Every word list in docs/words/ through llama.cpp: for each list whose corpus `demo prepare --corpora` cached, the
subtoken-mean output (`tokdistill distill --method mean`: the tokenizer side is what is tested) and `tokdistill check
--runtime llama.cpp` with the first 300,000 bytes of the corpus's held-out split as probe. One markdown row a list:
the texts where llama.cpp gives transformers' ids, or the converter's error. Needs the llama.cpp tools
(tokdistill_fast.tools.runtimes builds them once); about 15 s a SmolLM2 list and 40 s a Gemma-3 one on 2 cores.

    python -m bench.llama_sweep [--only PATTERN] > sweep.md
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tokdistill_fast.config import cache_dir

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m"}
LIST_SUFFIX = re.compile(r"-(40|41-80|sampled-40|phrases-40|100|words-40)$")  # docs/words/<model>-<corpus><suffix>
PROBE_BYTES = 300_000


def corpus_of(words: Path) -> tuple[str, str] | None:
    """(model key, corpus name) of a docs/words list named <model>-<corpus>-<which>.txt, or None."""
    model, _, rest = words.stem.partition("-")
    return (model, LIST_SUFFIX.sub("", rest)) if model in MODELS else None


def check_list(words: Path, model: Path, corpora: Path, tmp: Path) -> str:
    """The last line `tokdistill check --runtime llama.cpp` prints on the list's mean-row output, or its error."""
    name = corpus_of(words)[1]
    out, probe = tmp / words.stem, tmp / f"{words.stem}.probe.txt"
    probe.write_bytes((corpora / f"{name}.heldout.txt").read_bytes()[:PROBE_BYTES].decode("utf-8", "ignore").encode())
    tool = [sys.executable, "-m", "tokdistill_fast.cli"]
    made = subprocess.run([*tool, "distill", "--method", "mean", "--model", str(model), "--new-tokens", str(words),
                           "--corpus", str(corpora / f"{name}.train.txt"), "--out", str(out)],
                          capture_output=True, text=True)
    if made.returncode:
        return "distill failed: " + made.stderr.strip().splitlines()[-1]
    checked = subprocess.run([*tool, "check", str(out), "--runtime", "llama.cpp", "--original", str(model),
                              "--probe", str(probe)], capture_output=True, text=True)
    shutil.rmtree(out)  # a Gemma-3 output holds a 1 GB table
    lines = [ln for ln in (checked.stdout + checked.stderr).splitlines() if ln.startswith(("llama.cpp ", "NotImpl"))]
    return lines[-1] if lines else f"rc {checked.returncode}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", default="docs/words", help="folder of word lists")
    ap.add_argument("--only", default="", help="only lists whose name holds this")
    args = ap.parse_args(argv)
    corpora = cache_dir() / "corpora"
    print("| word list | llama.cpp against transformers |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for words in sorted(Path(args.words).glob("*.txt")):
            found = corpus_of(words)
            if found is None or args.only not in words.name or not (corpora / f"{found[1]}.heldout.txt").is_file():
                continue
            print(f"| {words.stem} | {check_list(words, cache_dir() / MODELS[found[0]], corpora, Path(tmp))} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

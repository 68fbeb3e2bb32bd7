"""`tokdistill select` through the command line: the words file it writes (one word a line, best first, --top and
--min-count applied, the filters' skips absent), and its refusals (an existing --out without --overwrite, a corpus
with no candidate, a --model that is not a directory) as one line and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokdistill_fast.cli import main

# palatable 36x, bivalve 24x, thyroidectomy 12x, quokka 9x (under --min-count 10); skipped whatever their count:
# x86 (digit), e@mail (forbidden character), ──── (no letter), zq (shorter than 3 characters), the (one subtoken).
DOCS = ["the patient found a palatable dinner and a bivalve", "the palatable food of the thyroidectomy hospital",
        "a palatable x86 e@mail zq ──── dinner with bivalve"] * 12 + ["the quokka"] * 9


@pytest.fixture(scope="module")
def model(model_dirs) -> Path:
    return model_dirs[("llama", "bytelevel", True)]  # only its tokenizer is read


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def select(model: Path, corpus: Path, out: Path, *flags: str) -> int:
    return main(["-q", "select", "--model", str(model), "--corpus", str(corpus), "--out", str(out), *flags])


def test_select_writes_the_ranked_words_file(model, corpus, tmp_path, capsys):
    out = tmp_path / "words.txt"
    assert select(model, corpus, out) == 0
    assert out.read_text(encoding="utf-8") == "palatable\nbivalve\nthyroidectomy\n"
    assert "3 candidate token(s)" in capsys.readouterr().out
    top = tmp_path / "top.txt"
    assert select(model, corpus, top, "--top", "2") == 0
    assert top.read_text(encoding="utf-8") == "palatable\nbivalve\n"
    assert "lower --min-count" not in capsys.readouterr().out
    low = tmp_path / "low.txt"
    assert select(model, corpus, low, "--min-count", "9") == 0
    assert low.read_text(encoding="utf-8").splitlines() == ["palatable", "bivalve", "thyroidectomy", "quokka"]
    assert select(model, corpus, tmp_path / "few.txt", "--top", "5") == 0  # 3 words pass --min-count 10
    assert "3 candidate token(s)" in (said := capsys.readouterr().out) and "lower --min-count 10 for more" in said


def test_select_refusals(model, corpus, tmp_path, capsys):
    out = tmp_path / "words.txt"
    out.write_text("mine\n", encoding="utf-8")
    assert select(model, corpus, out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "mine\n"
    assert select(model, corpus, out, "--overwrite") == 0
    assert out.read_text(encoding="utf-8").startswith("palatable\n")

    none = tmp_path / "none.txt"
    assert select(model, corpus, none, "--min-count", "1000") == 2
    assert "lower --min-count" in capsys.readouterr().err and not none.exists()
    assert select(tmp_path / "missing", corpus, none) == 2
    assert "not a directory" in capsys.readouterr().err
    assert select(tmp_path, corpus, none) == 2  # a directory without a tokenizer: one line, no traceback
    assert "no tokenizer.json or tokenizer_config.json" in capsys.readouterr().err
    # an --out that cannot be written, or a bad number, fails before the corpus is read
    for bad, flags, message in ((tmp_path, ["--overwrite"], "is a directory"), (none, ["--top", "0"], "--top must be"),
                                (none, ["--min-count", "-1"], "--min-count must be"),
                                (out / "below", [], "cannot create it")):
        assert select(model, tmp_path / "missing.txt", bad, *flags) == 2
        assert message in capsys.readouterr().err
    assert select(model, corpus, tmp_path / "new" / "dir" / "words.txt") == 0  # missing parents are made


def test_the_demo_runs_again_over_its_own_outputs(model, corpus, tmp_path, monkeypatch, capsys):
    """`make demo` twice: the second run replaces the demo's word list and model instead of refusing them; a
    directory of the user's at its --out is refused, not deleted (before, the demo removed whatever was there)."""
    from tokdistill_fast.tools import demo

    monkeypatch.setattr(demo, "prepare", lambda: {"model": model, "gcide": corpus})
    out = tmp_path / "demo"
    for _ in range(2):
        assert demo.main(["--out", str(out), "--words", "2"]) == 0
        assert (out / "model.safetensors").exists()
    assert Path(str(out) + ".words.txt").read_text(encoding="utf-8") == "palatable\nbivalve\n"
    (mine := tmp_path / "mine").mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert demo.main(["--out", str(mine), "--words", "2"]) == 2
    assert "is not an output of this tool" in capsys.readouterr().err and (mine / "notes.txt").is_file()

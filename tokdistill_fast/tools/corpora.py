"""Real corpora from Debian packages, extracted without root via `apt-get download`: GCIDE's 1913 Webster + WordNet
definitions and wordnet-base glosses for the demo, and the corpora of the README's quality table (`python -m
tokdistill_fast.tools.demo prepare --corpora`): dictionaries, manuals, books and help in other languages and scripts,
each written as blank-line separated documents and split 3:1 into training and held-out text."""

from __future__ import annotations

import gzip
import html
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import regex

from ..config import UserInputError, cache_dir
from ..tokens import SPACELESS_LETTER

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET = Path("/usr/share/wordnet")


def debian_file(package: str, path: Path, cache: Path | None = None) -> Path:
    """A file of a Debian package: the installed one, or extracted from `apt-get download` (no root needed)."""
    if path.exists():
        return path
    root = (cache or cache_dir()) / "debian" / package
    local = root / path.relative_to("/")
    if local.exists():
        return local
    root.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", package], cwd=root, check=True, capture_output=True)
        deb = next(root.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        raise UserInputError(f"cannot get Debian package {package} (apt-get download failed: {e})") from None
    return local


def gcide_corpus(out: Path, cache: Path | None = None) -> Path:
    """Running text from the GCIDE dictionary: one paragraph per definition, markup and headwords removed."""
    if out.exists():
        return out
    src = debian_file("dict-gcide", GCIDE, cache)
    text = gzip.open(src, "rt", encoding="utf-8", errors="replace").read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        if not lines or not block.startswith(" ") and "\\" in lines[0]:
            lines = lines[1:]  # headword line with pronunciation
        body = " ".join(ln for ln in lines if ln and not ln.startswith(("[", "Syn:", "Note:")))
        body = re.sub(r"^\d+\.\s*", "", body)
        body = re.sub(r"\s+", " ", re.sub(r"\\[^\\]*\\|\{|\}|\[[^\]]*\]", "", body)).strip()
        if len(body) > 40:
            paragraphs.append(body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(paragraphs[40:]) + "\n", encoding="utf-8")  # skip the license preamble
    return out


DICTD = (("dict-foldoc", "foldoc"), ("dict-jargon", "jargon"),  # technical dictionaries, a domain GCIDE lacks
         ("dict-devil", "devil"),  # satire (Bierce, 1911): a check of the defaults; it chose the search's sample size
         ("dict-vera", "vera"))  # computing acronyms and their expansions: added 2026-12-01 as an untuned corpus


def dictd_corpus(package: str, name: str, out: Path, cache: Path | None = None) -> Path:
    """Running text from a dictd dictionary (FOLDOC, the Jargon File): one document per paragraph of an entry's
    body, headword lines, cross-reference braces, <category> tags, [source] notes and (date) stamps removed."""
    if out.exists():
        return out
    src = debian_file(package, Path(f"/usr/share/dictd/{name}.dict.dz"), cache)
    text = gzip.open(src, "rt", encoding="utf-8", errors="replace").read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        body = " ".join(ln.strip() for ln in block.splitlines() if ln[:1].isspace() or paragraphs and ln.strip())
        body = re.sub(r"<[^<>]{1,80}>|\[[^\]]*\]|^\(\d{4}-\d\d-\d\d\)$|[{}]", "", body.strip())
        body = re.sub(r"\s+", " ", body).strip()
        if len(body) > 40:
            paragraphs.append(body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(paragraphs[20:]) + "\n", encoding="utf-8")  # skip the package's preamble
    return out


FORTUNE_SKIP = {"art", "ascii-art"}  # pictures drawn in characters, not text


def write_documents(out: Path, texts: Iterable[str]) -> Path:
    """Write `texts` as a corpus: whitespace folded, those over 40 characters kept, one document per paragraph."""
    docs = [d for d in (re.sub(r"\s+", " ", t).strip() for t in texts) if len(d) > 40]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return out


def fortunes_corpus(out: Path, cache: Path | None = None) -> Path:
    """Running text from the `fortunes` package (quotations, jokes and definitions on every subject; never used to
    tune a setting): one document per fortune, whitespace folded, the files with ASCII art left out."""
    if out.exists():
        return out
    src = debian_file("fortunes", Path("/usr/share/games/fortunes"), cache)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.suffix and p.name not in FORTUNE_SKIP)
    return write_documents(out, (entry for f in files for entry in re.split(
        r"^%$", f.read_text(encoding="utf-8", errors="replace"), flags=re.M)))


# The Debian Reference in five languages: corpus name -> (language, chapter 1's heading). The English one was added
# after every default was set; German and French (2026-12-05, thirty-seventh stop) are the first corpora in languages
# other than English, Japanese and Chinese (2026-12-06, fiftieth stop) the first in scripts written without spaces.
DEBIAN_REFERENCES = {"debref": ("en", r"Chapter\s1\."), "debref-de": ("de", r"Kapitel\s1\."),
                     "debref-fr": ("fr", r"Chapitre\s1\."), "debref-ja": ("ja", "第1章"),
                     "debref-zh": ("zh-cn", r"第\s1\s章")}
# a line break between two letters of a script written without spaces (tokens.SPACELESS): no space in the text
SPACELESS_BREAK = regex.compile(rf"(?<={SPACELESS_LETTER.pattern})[^\S\n]*\n[^\S\n]*(?={SPACELESS_LETTER.pattern})",
                                flags=regex.V1)  # [^\S\n]: indents of spaces and no-break spaces


def debian_reference_corpus(out: Path, cache: Path | None = None, language: str = "en",
                            heading: str = r"Chapter\s1\.") -> Path:
    """Running text from the Debian Reference (a system administrator's manual) in `language`: one document per
    paragraph, whitespace folded (a line break inside Japanese or Chinese text joins its lines without a space), the
    table of contents (everything before chapter 1's `heading`, a regex) skipped."""
    if out.exists():
        return out
    src = debian_file(f"debian-reference-{language}",
                      Path(f"/usr/share/debian-reference/debian-reference.{language}.txt.gz"), cache)
    text = gzip.open(src, "rt", encoding="utf-8", errors="replace").read()
    text = text[re.search(rf"^{heading}", text, flags=re.M).start():]
    return write_documents(out, (SPACELESS_BREAK.sub("", para) for para in re.split(r"\n\s*\n", text)))


def html_paragraphs(pages: Iterable[Path], tags: tuple[str, ...] = ("p",), attributes: bool = False
                    ) -> Iterator[str]:
    """The text of each <p> element (or each element of `tags`, written without attributes unless `attributes`)
    of `pages`, tags dropped and entities decoded."""
    attrs = r"(?:\s[^>]*)?" if attributes else ""
    for page in pages:
        text = page.read_text(encoding="utf-8", errors="replace")
        for _, para in re.findall(rf"<({'|'.join(tags)}){attrs}>(.*?)</\1>", text, flags=re.S):
            yield html.unescape(re.sub(r"<[^>]+>", "", para))


BLOCK_TAG = r"</?(?:p|li|dd|dt|h[1-6]|div|br|tr|td|th|table|ul|ol|dl|hr|blockquote)\b[^>]*>"


def html_blocks(pages: Iterable[Path]) -> Iterator[str]:
    """The text between block-level tags of `pages`, for manuals that leave their <p> elements open (html_paragraphs
    would read a whole page as one): scripts, styles and <pre> code left out, and each text once, so that the
    navigation and footer every page repeats count once."""
    seen = set()
    for page in pages:
        text = re.sub(r"<(script|style|pre|head)\b.*?</\1>", "", page.read_text(encoding="utf-8", errors="replace"),
                      flags=re.S | re.I)
        for block in re.split(BLOCK_TAG, text, flags=re.I):
            block = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", block))).strip()
            if block not in seen:
                seen.add(block)
                yield block


# HTML manuals whose <p> paragraphs make a corpus: name -> (Debian package, an index page of each manual, beside its
# other pages; pages left out, by name: the GNU FDL, the legal notice and translations, the same licence text in each
# manual or another language). All were added after every default was set, as corpora no setting has seen: the Python
# Library Reference (2026-12-01), the PostgreSQL manual (2026-12-02), LilyPond's Learning Manual, Notation Reference,
# Music Glossary, essay on engraving and usage manual (2026-12-03: music notation; English prose, not the internals),
# GnuCash's guide and help (2026-12-04: accounting and personal finance), GIMP's user manual (2026-12-05: image
# editing; the appendix on writing the manual itself left out), R's seven manuals (2026-12-05: statistical computing;
# An Introduction to R, the language definition, data import/export, installation, extensions, internals, the FAQ),
# Maxima's manual (2026-12-05: computer algebra; its one-page copy and tables of contents left out), KiCad's
# manuals (2026-12-05: electronics design; 330 KB of text, a small corpus), Wireshark's user's and developer's
# guides (2026-12-05, forty-first stop: network protocol analysis; the GPL appendix left out), GNU Octave's manual
# (the same stop: numerical computing; the GPL's text left out), Exim's specification (forty-second stop: a mail
# server; its three index chapters and table of contents left out), the Apache HTTP Server's manual in English
# (forty-fourth stop: web servers; its directive and site maps, the license and six pages that Debian's package
# ships in Portuguese under en/ left out), Debian's installation guide in English and in Vietnamese (2026-12-06,
# fifty-third stop: installing an operating system; Vietnamese, a Latin script whose words are syllables written
# apart, with stacked diacritics; the GPL's appendix left out), the Biopython Tutorial and Cookbook (2026-12-07,
# fifty-eighth stop: bioinformatics, one page) and Astropy's narrative documentation (the same stop: astronomy;
# the guides of its subpackages, not the API reference; its indexes, search page, credits and licence left out) and
# RDKit's books (the same stop: cheminformatics; Getting Started in Python and C++, the RDKit Book, the cartridge,
# installation; its index, search and API pages left out), GRASS GIS's reference manual (2026-12-07, fifty-ninth stop:
# geographic information systems, its 717 module and topic pages) and GNUmed's user manual (the same stop: a medical
# practice's records, encounters, episodes of care, vaccinations, lab results; its Russian and German pages left out).
LILYPOND_MANUALS = ("learning", "notation", "music-glossary", "essay", "usage")
HTML_MANUALS = {"pydocs": ("python3.11-doc", ("/usr/share/doc/python3.11/html/library/index.html",), None),
                "pgdocs": ("postgresql-doc-15", ("/usr/share/doc/postgresql-doc-15/html/index.html",), None),
                "lilypond": ("lilypond-doc-html",
                             tuple(f"/usr/share/doc/lilypond/html/Documentation/{manual}/index.html"
                                   for manual in LILYPOND_MANUALS),
                             r".*\.[a-z]{2}\.html|gnu-free-documentation-license\.html"),
                "gnucash": ("gnucash-docs", ("/usr/share/doc/gnucash-docs/gnucash-guide-en/index.html",
                                             "/usr/share/doc/gnucash-docs/gnucash-help-en/index.html"),
                            r"fdl.*|titlepage\.html"),
                "gimp": ("gimp-help-en", ("/usr/share/gimp/2.0/help/en/index.html",),
                         r".*fdl.*|legal\.html|bibliography\.html|apcs.*\.html"),
                "rdocs": ("r-doc-html", ("/usr/share/R/doc/manual/R-intro.html",), None),
                "maxima": ("maxima-doc", ("/usr/share/doc/maxima-doc/html/maxima.html",),
                           r"maxima_(singlepage|toc|ovr)\.html"),
                "kicad": ("kicad-doc-en", ("/usr/share/doc/kicad/help/en/kicad.html",), None),
                "wireshark": ("wireshark-doc", ("/usr/share/doc/wireshark/wsug_html_chunked/index.html",
                                                "/usr/share/doc/wireshark/wsdg_html_chunked/index.html"),
                              r"AppGPL\.html"),
                "octave": ("octave-doc", ("/usr/share/doc/octave/octave.html/index.html",), r"Copying\.html"),
                "exim": ("exim4-doc-html", ("/usr/share/doc/exim4-doc-html/spec_html/index.html",),
                         r"index\.html|ch-.*_index\.html"),
                "apache": ("apache2-doc", tuple(f"/usr/share/doc/apache2-doc/manual/en/{part}index.html" for part in (
                    "", "mod/", "howto/", "rewrite/", "ssl/", "vhosts/", "programs/", "misc/", "faq/", "platform/",
                    "developer/")), r"license\.html|sitemap\.html|quickreference\.html|directives\.html"
                           r"|(bind|filter|install|invoking|upgrading|new_features_2_4)\.html"),  # Portuguese
                **{f"install-{language}": ("installation-guide-amd64",
                                           (f"/usr/share/doc/installation-guide-amd64/{language}/index.html",),
                                           r"apf.*\.html") for language in ("en", "vi")},
                "biopython": ("python-biopython-doc", ("/usr/share/doc/python-biopython-doc/Doc/Tutorial.html",), None),
                "astropy": ("python-astropy-doc", tuple(
                    f"/usr/share/doc/python-astropy-doc/html/{part}index.html" for part in (
                        "", "coordinates/", "units/", "time/", "table/", "cosmology/", "wcs/", "modeling/",
                        "convolution/", "nddata/", "stats/", "timeseries/", "visualization/", "io/fits/",
                        "io/ascii/", "uncertainty/", "constants/", "samp/", "utils/", "config/")),
                            r"genindex\.html|py-modindex\.html|search\.html|license\.html|credits\.html"),
                "rdkit": ("rdkit-doc", ("/usr/share/doc/rdkit/html/index.html",),
                          r"genindex\.html|search\.html|api-docs\.html"),
                "grass": ("grass-doc", ("/usr/share/doc/grass-doc/html/index.html",), None),
                "gnumed": ("gnumed-doc", ("/usr/share/doc/gnumed/user-manual/Gnumed/index.html",),
                           r".*Ru\.html|LegacyApp.*\.html|FaxIntegration\.html|GmManualGermanKVKInterface\.html"),
                "bashref": ("bash-doc", ("/usr/share/doc/bash/bashref.html",), r"bash\.html"),  # the man page again
                "django": ("python-django-doc", tuple(f"/usr/share/doc/python-django-doc/html/{part}/index.html"
                                                      for part in ("intro", "topics", "howto", "ref", "faq", "misc")),
                           None)}
# HTML manuals that leave their <p> elements open, read by blocks (html_blocks).
OPEN_PARAGRAPHS = {"grass", "gnumed"}
# HTML manuals whose pages sit in folders below their index pages too: Django's documentation (2026-12-07,
# sixty-second stop: a web framework; its tutorials, topic guides, how-tos, reference, FAQ and design notes,
# not the release notes, its contributors' guide or the highlighted source of its modules).
NESTED = {"django"}


def mostly_vietnamese(paragraph: str) -> bool:
    """Whether a third or more of its words carry a letter outside ASCII: Vietnamese marks most syllables, and the
    paragraphs Debian's Vietnamese installation guide left untranslated (English, a few cross-references aside) have
    at most 0.28 such words."""
    words = regex.findall(r"\p{L}+", paragraph)
    return 3 * sum(1 for w in words if not w.isascii()) >= len(words) > 0


# HTML manuals in another language -> which of their paragraphs are in it.
TRANSLATED = {"install-vi": mostly_vietnamese}


def html_manual_corpus(name: str, out: Path, cache: Path | None = None) -> Path:
    """Running text from one of HTML_MANUALS: the text of each HTML paragraph of its pages (for a translation,
    those the translation wrote)."""
    if out.exists():
        return out
    package, indexes, skip = HTML_MANUALS[name]
    folders = [debian_file(package, Path(index), cache).parent for index in indexes]
    pages = [page for folder in folders for page in sorted(folder.rglob("*.html") if name in NESTED
                                                           else folder.glob("*.html"))
             if not (skip and re.fullmatch(skip, page.name))]
    paragraphs = html_blocks(pages) if name in OPEN_PARAGRAPHS else html_paragraphs(pages)
    return write_documents(out, filter(TRANSLATED.get(name), paragraphs))


def gnu_standards_corpus(out: Path, cache: Path | None = None) -> Path:
    """Running text from the GNU Coding Standards and Information for Maintainers of GNU Software (`gnu-standards`;
    added 2026-12-01, sixth session, after every default was set): the text of each HTML paragraph."""
    if out.exists():
        return out
    first = debian_file("gnu-standards", Path("/usr/share/doc/gnu-standards/standards.html"), cache)
    return write_documents(out, html_paragraphs([first, first.with_name("maintain.html")]))


def git_docs_corpus(out: Path, cache: Path | None = None) -> Path:
    """Running text from Git's manuals (`git-doc`'s AsciiDoc sources; added 2026-12-01 after every default was set,
    as a corpus no setting has seen): one document per prose paragraph over 40 characters, delimited and indented
    blocks, attribute lines and list markers dropped, inline markup removed."""
    if out.exists():
        return out
    first = debian_file("git-doc", Path("/usr/share/doc/git-doc/SubmittingPatches.txt"), cache)

    def paragraphs(page: Path) -> Iterator[str]:
        text = re.sub(r"^(-{4,}|\.{4,}|={4,}|\+{4,}|_{4,}|\*{4,})$.*?^\1$", "",
                      page.read_text(encoding="utf-8", errors="replace"), flags=re.M | re.S)  # delimited blocks
        for block in re.split(r"\n\s*\n", text):
            lines = block.splitlines()
            if not lines or lines[0][:1].isspace() or re.match(r"[=\[:/]|include::|ifdef::|endif::", lines[0]):
                continue
            body = " ".join(ln.strip() for ln in lines if not re.fullmatch(r"[-=~^+]{3,}", ln.strip()))
            body = re.sub(r"linkgit:([\w.-]+)\[\d\]", r"\1", body)
            yield re.sub(r"^[*.-]+\s+|::\s*$|[`*]|\+$", "", body)

    return write_documents(out, (p for page in sorted(first.parent.glob("*.txt")) for p in paragraphs(page)))


MAN_SKIP = {"SYNOPSIS", "LIBRARY", "EXAMPLES", "SEE ALSO", "COLOPHON", "ATTRIBUTES", "VERSIONS", "STANDARDS"}


def manpages_corpus(out: Path, cache: Path | None = None) -> Path:
    """The prose of the Linux man-pages project's sections 2 and 3 (`manpages-dev`: system calls and the C library;
    added 2026-12-07 as an untuned corpus), rendered by groff without line breaks or hyphens, one document per
    paragraph; synopses, examples, attribute tables and the pages' shared boilerplate left out."""
    if out.exists():
        return out
    if shutil.which("groff") is None:
        raise UserInputError("the man pages corpus renders pages with groff: install groff-base")
    installed = Path("/usr/share/man/man2/open.2.gz")
    first = debian_file("manpages-dev", installed, cache)
    listing = Path("/var/lib/dpkg/info/manpages-dev.list")  # installed: other packages' pages share the folders
    own = set(listing.read_text().splitlines()) if first == installed and listing.exists() else None

    def paragraphs(page: Path) -> Iterator[str]:
        source = gzip.decompress(page.read_bytes())
        if source.startswith(b".so "):  # a page that only points at another
            return
        text = subprocess.run(["groff", "-man", "-Tutf8", "-rLL=5000n", "-rHY=0", "-dAD=l", "-P-cbou"],
                              input=source, capture_output=True, check=True).stdout.decode("utf-8", "replace")
        section = ""
        for block in re.split(r"\n\s*\n", text):
            head = block.lstrip("\n")
            if head[:1].isupper():  # a section heading at the margin, perhaps with its first paragraph
                section, _, block = head.partition("\n")
            if section.strip() not in MAN_SKIP:
                yield from (line for line in block.splitlines() if line.rstrip().endswith((".", ":")))

    pages = [page for part in ("man2", "man3") for page in sorted((first.parent.parent / part).glob("*.gz"))
             if not page.is_symlink() and (own is None or str(page) in own)]
    return write_documents(out, (p for page in pages for p in paragraphs(page)))


def kjv_corpus(out: Path, cache: Path | None = None) -> Path:
    """The King James Bible (`bible-kjv-text`, printed by `bible-kjv`'s reader; added 2026-12-02, thirteenth stop,
    after every default was set: archaic English and many names, a domain no other corpus has): one document per
    chapter, verse numbers dropped."""
    if out.exists():
        return out
    data = debian_file("bible-kjv-text", Path("/usr/lib/bible.data"), cache)
    reader = debian_file("bible-kjv", Path("/usr/bin/bible"), cache)
    try:  # -l9999: one verse per line; chapter headings ("Genesis 1") are the lines that do not start with a space
        text = subprocess.run([str(reader), "-l9999", "-p", str(data.parent), "Gen1:1-Rev22:21"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserInputError(f"cannot print the King James Bible with {reader}: {e}") from None
    chapters = re.split(r"^\S.*$", text, flags=re.M)
    return write_documents(out, (re.sub(r"^\s+\d+ ", "", c, flags=re.M) for c in chapters))


def nethack_corpus(out: Path, cache: Path | None = None) -> Path:
    """NetHack's Guidebook (nethack-common; 2026-12-06, forty-sixth stop: a game's manual, 256 KB): the formatted
    text's paragraphs, its page headers dropped and words hyphenated across a line end joined."""
    if out.exists():
        return out
    src = debian_file("nethack-common", Path("/usr/share/doc/nethack-common/Guidebook.txt.gz"), cache)
    text = gzip.decompress(src.read_bytes()).decode("utf-8", errors="replace")
    text = re.sub(r"^\s*NetHack Guidebook\s+\d+\s*$", "", text, flags=re.M)
    return write_documents(out, re.split(r"\n\s*\n", re.sub(r"(\w)-\n\s*(\w)", r"\1\2", text)))


def skycultures_corpus(out: Path, cache: Path | None = None) -> Path:
    """Stellarium's descriptions of 49 sky cultures (stellarium-data; 2026-12-06, forty-sixth stop: the stars and
    constellations of peoples from the Xhosa to the Maya, in English): the text of each <p> and <li> element."""
    if out.exists():
        return out
    root = debian_file("stellarium-data", Path("/usr/share/stellarium/skycultures/western/description.en.utf8"),
                       cache).parents[1]
    return write_documents(out, html_paragraphs(sorted(root.glob("*/description.en.utf8")), ("p", "li")))


FREECIV_LEGEND = re.compile(r'legend\s*=\s*_\("((?:[^"\\]|\\.)*)"\)', re.S)


def freeciv_corpus(out: Path, cache: Path | None = None) -> Path:
    """The legends of Freeciv's 559 nations (freeciv-data; 2026-12-06, forty-seventh stop: the history and
    geography of peoples and states, 196 KB): each nation ruleset's `legend`, its escaped line ends joined."""
    if out.exists():
        return out
    root = debian_file("freeciv-data", Path("/usr/share/games/freeciv/nation/english.ruleset"), cache).parent
    legends = (m.group(1) for f in sorted(root.glob("*.ruleset"))
               for m in FREECIV_LEGEND.finditer(f.read_text(encoding="utf-8")))
    return write_documents(out, (re.sub(r'\\(.)', r"\1", legend.replace("\\\n", "")) for legend in legends))


CRAWL_HELP = {"commands.txt", "hints.txt", "tutorial.txt"}  # key bindings and tutorial screens, not prose
CRAWL_MARKUP = re.compile(r"<[^<>\n]*>|\{\{.*?\}\}|@\w+@", re.S)  # colour and key tags, Lua, placeholders


def crawl_corpus(out: Path, cache: Path | None = None) -> Path:
    """Dungeon Crawl Stone Soup's descriptions (crawl-common; 2026-12-06, forty-eighth stop: the lore of its
    monsters, gods, places, items and spells, and the literary quotations beside them): each `%%%%`-separated
    entry of the English files without its key line, comments and markup."""
    if out.exists():
        return out
    root = debian_file("crawl-common", Path("/usr/share/crawl/dat/descript/monsters.txt"), cache).parent
    entries = ([line for line in entry.splitlines() if not line.startswith("#")]
               for f in sorted(root.glob("*.txt")) if f.name not in CRAWL_HELP
               for entry in f.read_text(encoding="utf-8").split("%%%%\n"))
    return write_documents(out, (CRAWL_MARKUP.sub("", "\n".join(lines[1:])) for lines in entries))


VIM_SKIPPED = re.compile(r"(version\d+|todo|index|quickref|digraph|help|tags)\.txt")  # lists and change logs
VIM_BREAK = re.compile(r"\s*([=-]{10,}|vim:.*)\s*|.* ~\s*")  # rules, modelines and headings end a paragraph
VIM_MARKUP = re.compile(r"\*[^*\s]+\*|\|([^|\s]+)\|")  # *tags* (dropped) and |links| (their text kept)


def vim_help_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one Vim help file: its first line (the file's tag) and example blocks (from a line
    ending in ">" to one starting with "<" or at the left margin) left out, tags dropped, links kept as text."""
    paragraphs, lines, example = [], [], False
    for line in text.split("\n")[1:] + [""]:
        if example:
            if line.startswith("<"):
                line = line[1:]
            elif not line or line[0].isspace():
                continue
            example = False
        if line.rstrip().endswith(">") and (line.rstrip() == ">" or line.rstrip().endswith(" >")):
            line, example = line.rstrip()[:-1], True
        if VIM_BREAK.fullmatch(line) or not line.strip():
            if lines:
                paragraphs.append(" ".join(lines))
            lines = []
            continue
        lines.append(VIM_MARKUP.sub(lambda m: m.group(1) or "", line).strip())
    return paragraphs


def vim_help_corpus(out: Path, cache: Path | None = None) -> Path:
    """Vim's help files (vim-runtime; 2026-12-07, sixty-fifth stop: a text editor's manual, found by a review
    helper as a corpus no setting had seen): the prose paragraphs of each file, those of ten or more words that are
    mostly letters (a key table is not prose)."""
    if out.exists():
        return out
    vim = debian_file("vim-runtime", Path("/usr/share/vim/vim90/doc/intro.txt"), cache).parents[2]
    # the newest release's help (bookworm's vim90)
    releases = sorted(vim.glob("vim[0-9]*/doc"), key=lambda d: int("0" + re.sub(r"\D", "", d.parent.name)))
    if not releases:
        raise UserInputError(f"vim-runtime: no help files under {vim}/vim<release>/doc")
    files = sorted(f for f in releases[-1].glob("*.txt") if not VIM_SKIPPED.fullmatch(f.name))
    paragraphs = (p for f in files for p in vim_help_paragraphs(f.read_text(encoding="utf-8", errors="replace")))
    return write_documents(out, (p for p in paragraphs
                                 if len(p.split()) >= 10 and sum(c.isalpha() for c in p) > 0.6 * len(p)))


# gretl's User's Guide in LaTeX (gretl-doc; 2026-12-07, sixty-sixth stop: econometrics, a review helper's pick of a
# domain no corpus had): environments that hold code, formulas, tables and figures, and commands whose argument is
# a reference, are left out; inline math keeps its letters (Greek by name); other commands keep their text.
LATEX_SKIPPED = ("verbatim", "code", "scode", "lstlisting", "equation", "align", "eqnarray", "displaymath", "tabular",
                 "tabularx", "longtable", "figure", "script", "scriptoutput", "gather", "multline", "array", "table",
                 "outcode", "Verbatim", "cmdref")
LATEX_DROPPED = ("cite", "citet", "citep", "citealt", "citeauthor", "citeyear", "ref", "label", "index", "pageref",
                 "includegraphics", "input", "include", "bibliography", "bibliographystyle", "cmdref", "fncref",
                 "hyperlink", "vspace", "hspace", "setlength", "newcommand", "renewcommand", "url", "href")
GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|pi|rho|sigma|tau|phi|"
         "varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Sigma|Phi|Psi|Omega")


def latex_paragraphs(tex: str) -> list[str]:
    """The prose of a LaTeX file, one paragraph each (sectioning titles and list items apart)."""
    def math(m: re.Match) -> str:
        letters = re.sub(rf"\\({GREEK})\b", r" \1 ", m.group(1))
        return " ".join(re.sub(r"[^A-Za-z0-9 ]", " ", re.sub(r"\\[A-Za-z]+", " ", letters)).split())

    tex = re.sub(r"(?<!\\)%.*", "", tex)  # comments
    tex = re.sub(r"\\[\s,;:!/@]", " ", tex)  # control spaces ("e.g.\ ")
    skipped = "|".join(re.escape(e) for e in LATEX_SKIPPED)
    tex = re.sub(rf"\\begin\{{({skipped})\*?\}}.*?\\end\{{\1\*?\}}", "\n\n", tex, flags=re.S)
    tex = re.sub(r"\\\[.*?\\\]|\$\$.*?\$\$", "\n\n", tex, flags=re.S)  # display math
    tex = re.sub(r"\\verb(.)(.*?)\1", r"\2", tex)
    tex = re.sub(r"(?<!\\)\$(.*?)(?<!\\)\$", math, tex, flags=re.S)
    tex = re.sub(r"\\(?:(?:sub)*section|chapter|paragraph|caption)\*?(?:\[[^\]]*\])?\{([^{}]*)\}", r"\n\n\1\n\n", tex)
    tex = re.sub(rf"\\(?:{'|'.join(LATEX_DROPPED)})\*?(?:\[[^\]]*\])*\{{[^{{}}]*\}}", "", tex)
    tex = re.sub(r"\\(?:begin|end)\{[^{}]*\}(?:\[[^\]]*\])?", "\n\n", tex)  # other environments keep their text
    tex = re.sub(r"\\item(?:\[([^\]]*)\])?", r"\n\n\1 ", tex)
    for _ in range(3):  # \cmd{text} -> text, nested
        tex = re.sub(r"\\[A-Za-z]+\*?(?:\[[^\]]*\])?\{([^{}]*)\}", r"\1", tex)
    for old, new in (("\\\\", " "), ("~", " "), ("``", '"'), ("''", '"'), ("---", "\u2014"), ("--", "\u2013")):
        tex = tex.replace(old, new)
    tex = re.sub(r"\\([%$&_#{}])", r"\1", tex)
    tex = re.sub(r"\\[A-Za-z]+\*?|[{}]", "", tex)
    return re.split(r"\n\s*\n", tex)


def gretl_guide_corpus(out: Path, cache: Path | None = None) -> Path:
    """The prose of gretl's User's Guide (gretl-doc's English LaTeX sources), paragraphs of six or more words."""
    if out.exists():
        return out
    tex = debian_file("gretl-doc", Path("/usr/share/doc/gretl/doc/tex/gretl-guide.tex"), cache).parent
    files = sorted(f for f in tex.iterdir() if re.search(r"\.tex(\.gz)?$", f.name))
    if not files:
        raise UserInputError(f"gretl-doc: no LaTeX sources in {tex}")
    texts = (gzip.decompress(f.read_bytes()).decode("utf-8", "replace") if f.suffix == ".gz"
             else f.read_text(encoding="utf-8", errors="replace") for f in files)
    return write_documents(out, (p for t in texts for p in latex_paragraphs(t) if len(p.split()) >= 6))


# Debian's manuals in Russian (2026-12-06, fifty-second stop: the first corpus in Cyrillic): the Developer's Reference,
# the New Maintainers' Guide and the FAQ, each a package of HTML pages (the parts left untranslated are English).
RUSSIAN_MANUALS = (("developers-reference-ru", "/usr/share/developers-reference/ru/developers-reference.html"),
                   ("maint-guide-ru", "/usr/share/doc/maint-guide-ru/html/index.ru.html"),
                   ("debian-faq-ru", "/usr/share/doc/debian/FAQ/ru/index.ru.html"))


def russian_manuals_corpus(out: Path, cache: Path | None = None) -> Path:
    """Running text from Debian's manuals in Russian (RUSSIAN_MANUALS): the text of each HTML paragraph; the
    Developer's Reference is one page (its other pages repeat it in parts), the others every page of the manual."""
    if out.exists():
        return out
    pages = []
    for package, index in RUSSIAN_MANUALS:
        first = debian_file(package, Path(index), cache)
        pages += [first] if package == "developers-reference-ru" else sorted(first.parent.glob("*.html"))
    return write_documents(out, html_paragraphs(pages))


def not_latin(paragraph: str) -> bool:
    """Whether under half of its letters are Latin: a paragraph a translation into another script translated."""
    return len(regex.findall(r"[A-Za-z]", paragraph)) < 0.5 * len(regex.findall(r"\p{L}", paragraph))


# GNOME's desktop help in other scripts (gnome-user-docs; 2026-12-06, fifty-second stop): Korean (Hangul), Tamil and
# Marathi (abugidas: vowel signs are combining marks; Devanagari also writes zero-width joiners inside words),
# Persian (Arabic script, right to left, a word's parts joined by zero-width non-joiners) and Greek (accents, a final
# sigma). Each translation leaves some pages in English; only the paragraphs translated are kept (under half of
# their letters Latin). The English originals ("C"; 2026-12-07, sixty-second stop): help for everyday desktop tasks,
# written for people who are not programmers, a register no other English corpus has.
GNOME_HELP = {"gnome-en": ("C", None), **{f"gnome-{language}": (language, not_latin)
                                          for language in ("ko", "ta", "mr", "fa", "el")}}


def gnome_help_corpus(language: str, out: Path, cache: Path | None = None,
                      keep: Callable[[str], bool] | None = None) -> Path:
    """The paragraphs of GNOME's desktop help (`<p>` elements of its Mallard pages) in `language` (those `keep`
    keeps: for a translation, those it translated)."""
    if out.exists():
        return out
    first = debian_file("gnome-user-docs", Path(f"/usr/share/help/{language}/gnome-help/index.page"), cache)
    return write_documents(out, filter(keep, html_paragraphs(sorted(first.parent.glob("*.page")), attributes=True)))


# English words that are no words of the handbook's Latin-script translations: at 8% or more of a block's words,
# the block is English, or a cross-reference translated in an English paragraph ("Rozdział 4, Instalacja presented
# these technologies ...").
ENGLISH_WORDS = frozenset("the of and is are that with for this be by from which it you".split())


def not_english(block: str) -> bool:
    """Whether under 8% of its words (or under five words in all) are ENGLISH_WORDS: a block a translation into
    another Latin-script language translated."""
    words = regex.findall(r"\p{L}+", block.lower())
    return len(words) < 5 or sum(1 for w in words if w in ENGLISH_WORDS) < 0.08 * len(words)


# The Debian Administrator's Handbook (`debian-handbook`; 2026-12-07, sixty-second stop): one book in English and in
# 25 translations, the same chapters in each. Its paragraphs are <div>s, so its pages are read by blocks; a
# translation keeps the blocks it translated, those not in the English book word for word (code, commands and
# untranslated paragraphs) and, in another script, those mostly in it (Arabic's untranslated paragraphs often differ
# from the English ones by a cross-reference: a tenth of its text). English, Spanish (a Latin script with accents),
# Arabic (right to left; about half of the book translated), Brazilian Portuguese and Indonesian (an Austronesian
# language in plain Latin letters, which builds words with affixes), none of which a setting has seen. Then
# (sixty-third stop) Italian and Norwegian Bokmål, which translate most of the book, and Polish and Turkish, which
# translate a part and keep the rest in English: there only the blocks not in English (not_english).
HANDBOOK = {"handbook": ("en-US", None), "handbook-es": ("es-ES", None), "handbook-ar": ("ar-MA", not_latin),
            "handbook-pt": ("pt-BR", None), "handbook-id": ("id-ID", None), "handbook-it": ("it-IT", None),
            "handbook-nb": ("nb-NO", None), "handbook-pl": ("pl-PL", not_english),
            "handbook-tr": ("tr-TR", not_english)}


def handbook_corpus(language: str, out: Path, cache: Path | None = None,
                    keep: Callable[[str], bool] | None = None) -> Path:
    """The text blocks of the Debian Administrator's Handbook in `language` (a locale such as "es-ES"): for a
    translation, those the English book does not hold (and `keep` keeps); the index page (title, legal notice,
    contents) left out."""
    if out.exists():
        return out

    def blocks(locale: str) -> Iterator[str]:
        index = debian_file("debian-handbook", Path(f"/usr/share/doc/debian-handbook/html/{locale}/index.html"), cache)
        return html_blocks(sorted(page for page in index.parent.glob("*.html") if page.name != "index.html"))

    english = set() if language == "en-US" else set(blocks("en-US"))
    return write_documents(out, filter(keep, (block for block in blocks(language) if block not in english)))


def wordnet_corpus(out: Path, cache: Path | None = None) -> Path:
    """WordNet glosses with their example sentences, one per paragraph."""
    if out.exists():
        return out
    paragraphs = []
    for pos in ("noun", "verb", "adj", "adv"):
        src = debian_file("wordnet-base", WORDNET / f"data.{pos}", cache)
        for line in src.read_text(encoding="utf-8", errors="replace").splitlines():
            if "|" in line and not line.startswith("  "):
                paragraphs.append(line.split("|", 1)[1].strip().replace('"', ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return out


def split_corpus(src: Path, every: int = 4) -> tuple[Path, Path]:
    """Deterministic train / held-out split by paragraph: every `every`-th paragraph is held out."""
    train, held = src.with_suffix(".train.txt"), src.with_suffix(".heldout.txt")
    if not (train.exists() and held.exists()):
        paragraphs = src.read_text(encoding="utf-8").split("\n\n")
        train.write_text("\n\n".join(p for i, p in enumerate(paragraphs) if i % every), encoding="utf-8")
        held.write_text("\n\n".join(p for i, p in enumerate(paragraphs) if not i % every), encoding="utf-8")
    return train, held


def build_all(cache: Path | None = None) -> dict[str, Path]:
    """Every corpus of `demo prepare --corpora` (the README's quality table beyond GCIDE), each with its held-out
    split: {name: corpus, name_heldout: held-out text}."""
    folder = (cache or cache_dir()) / "corpora"
    built = {name: dictd_corpus(package, name, folder / f"{name}.txt", cache)
             for package, name in DICTD}
    built["fortunes"] = fortunes_corpus(folder / "fortunes.txt", cache)
    built.update({name: debian_reference_corpus(folder / f"{name}.txt", cache, *how)
                  for name, how in DEBIAN_REFERENCES.items()})
    built.update({name: html_manual_corpus(name, folder / f"{name}.txt", cache)
                  for name in HTML_MANUALS})
    built["gitdocs"] = git_docs_corpus(folder / "gitdocs.txt", cache)
    built["gnustd"] = gnu_standards_corpus(folder / "gnustd.txt", cache)
    built["kjv"] = kjv_corpus(folder / "kjv.txt", cache)
    built["manpages"] = manpages_corpus(folder / "manpages.txt", cache)
    built["nethack"] = nethack_corpus(folder / "nethack.txt", cache)
    built["skycultures"] = skycultures_corpus(folder / "skycultures.txt", cache)
    built["freeciv"] = freeciv_corpus(folder / "freeciv.txt", cache)
    built["crawl"] = crawl_corpus(folder / "crawl.txt", cache)
    built["vimdoc"] = vim_help_corpus(folder / "vimdoc.txt", cache)
    built["gretl"] = gretl_guide_corpus(folder / "gretl.txt", cache)
    built["debian-ru"] = russian_manuals_corpus(folder / "debian-ru.txt", cache)
    built.update({name: gnome_help_corpus(language, folder / f"{name}.txt", cache, keep)
                  for name, (language, keep) in GNOME_HELP.items()})
    built.update({name: handbook_corpus(language, folder / f"{name}.txt", cache, keep)
                  for name, (language, keep) in HANDBOOK.items()})
    paths: dict[str, Path] = {}
    for name, corpus in built.items():
        paths[name], paths[f"{name}_heldout"] = corpus, split_corpus(corpus)[1]
    return paths

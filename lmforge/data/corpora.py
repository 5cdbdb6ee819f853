"""Built-in corpora: English text that needs no internet account, fetched at run time from Debian packages.

Each corpus is a stream of `Document(text, source)`. Debian packages are fetched once with `apt-get download`
(no root needed) and unpacked with `dpkg-deb -x` into a cache dir ($LMFORGE_CACHE, else ~/.cache/lmforge);
third-party text never enters the repository. `stdlib-docstrings` needs no download at all.

Formats (as shipped in Debian bookworm):
- wordnet (wordnet-base): WordNet 3.0 `data.{noun,verb,adj,adv}`, one synset a line:
  `offset lex_filenum ss_type w_cnt word lex_id ... p_cnt [pointers] [frames] | gloss`.
- kjv (bible-kjv-text): `usr/lib/bible.data`, the Bible Retrieval System format: an 84-byte header, a big-endian
  window size and window count, a table of window offsets, then 64 KiB windows each compressed separately with
  Unix `compress` (LZW, 16 bits, block mode). The text is one verse a line: `Ge1:1 In the beginning ...`.
- gcide (dict-gcide): dictd `gcide.dict.dz` (dictzip, readable as gzip) + `gcide.index` lines
  `headword<TAB>base64 offset<TAB>base64 length`; entries use Webster markup (`\\Pro*nun"ci*a`tion\\`, `{xref}`,
  `[e^]`-style accented letters, `[1913 Webster]` source tags).
- pydocs (python3.11-doc): reStructuredText sources `usr/share/doc/python3.11/html/_sources/**/*.rst.txt`.
"""

from __future__ import annotations

import ast
import gzip
import os
import re
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.errors import DataError
from lmforge.io import atomic_path

CORPORA: dict[str, str] = {
    "wordnet": "WordNet 3.0 (Debian wordnet-base): one document per synset, 'lemmas (pos): gloss; \"examples\"'",
    "kjv": "King James Bible (Debian bible-kjv-text): one document per chapter",
    "gcide": "GNU Collaborative International Dictionary of English (Debian dict-gcide): one document per entry",
    "pydocs": "Python 3.11 documentation sources (Debian python3.11-doc): one document per .rst file",
    "stdlib-docstrings": "docstrings of the running Python's standard library (no download): one per module/class/def",
}
DEBIAN_PACKAGES: dict[str, str] = {
    "wordnet": "wordnet-base", "kjv": "bible-kjv-text", "gcide": "dict-gcide", "pydocs": "python3.11-doc",
}


@dataclass(frozen=True)
class Document:
    """One document of a corpus; `source` names where it came from (corpus, file, entry)."""

    text: str
    source: str


def default_cache_dir() -> Path:
    """$LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise DataError(f"{what}: `{' '.join(cmd)}` failed: {lines[-1] if lines else f'exit {result.returncode}'}")


def fetch_debian_package(name: str, cache_dir: str | os.PathLike | None = None, corpus: str | None = None) -> Path:
    """Download Debian package `name` and unpack it once under `cache_dir`/debian/`name`; return that root.

    The unpacked tree appears atomically (extracted to a temp dir, then renamed), so an interrupted fetch
    leaves nothing half-written and the next call starts over.
    """
    root = Path(cache_dir or default_cache_dir()) / "debian" / name
    if root.is_dir():
        return root
    what = f"built-in corpus {corpus}" if corpus else f"Debian package {name}"
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"{tool} not found: {what} needs Debian's {tool}; use stdlib-docstrings or your own files")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".download-{name}-", dir=root.parent) as download:
        _run(["apt-get", "download", name], Path(download), what)
        debs = sorted(Path(download).glob("*.deb"))
        if not debs:
            raise DataError(f"{what}: `apt-get download {name}` produced no .deb file")
        with atomic_path(root) as tmp:
            _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], Path(download), what)
    return root


def iter_corpus(name: str, cache_dir: str | os.PathLike | None = None) -> Iterator[Document]:
    """Stream the documents of built-in corpus `name` (see CORPORA), fetching its package on first use.

    The name is checked and the package fetched now; documents are then read lazily.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus '{name}' (known corpora: {', '.join(CORPORA)})")
    if name == "stdlib-docstrings":
        return iter_stdlib_docstrings()
    root = fetch_debian_package(DEBIAN_PACKAGES[name], cache_dir, corpus=name)
    if name == "wordnet":
        return iter_wordnet(root / "usr/share/wordnet")
    if name == "kjv":
        return iter_kjv((root / "usr/lib/bible.data").read_bytes())
    if name == "gcide":
        return iter_dictd(root / "usr/share/dictd/gcide.dict.dz", root / "usr/share/dictd/gcide.index")
    return iter_rst(root / "usr/share/doc/python3.11/html/_sources")


# ---- WordNet -------------------------------------------------------------------------------------------------

_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_wordnet_line(line: str) -> str | None:
    """One WordNet data line -> 'lemma, lemma (pos): gloss', or None for license/header lines."""
    if not line[:1].isdigit() or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    pos = _WORDNET_POS.get(parts[2], parts[2])
    n_words = int(parts[3], 16)
    # Words are 'lemma lex_id' pairs; adjectives may carry a syntactic marker like '(a)' or '(ip)'.
    lemmas = [re.sub(r"\([a-z]+\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
    gloss = gloss.strip().replace("`", "'")
    return f"{', '.join(dict.fromkeys(lemmas))} ({pos}): {gloss}"


def iter_wordnet(wordnet_dir: Path) -> Iterator[Document]:
    """Synsets of data.noun, data.verb, data.adj, data.adv, in file order."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wordnet_dir / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                text = parse_wordnet_line(line)
                if text is not None:
                    yield Document(text, f"wordnet:{pos}:{line[:8]}")


# ---- King James Bible (Bible Retrieval System data file) ---------------------------------------------------

def lzw_decompress(data: bytes, max_bits: int = 16, block_mode: bool = True) -> bytes:
    """Decode Unix `compress` LZW codes (no 3-byte .Z header), exactly as ncompress does.

    Codes are little-endian bit-packed in groups of 8 codes (n_bits bytes); when the code width grows or the
    table is cleared (code 256 in block mode), the rest of the current group is skipped.
    """
    clear_code, max_max_code = 256, 1 << max_bits
    table = [bytes([i]) for i in range(256)] + [b""] * (max_max_code - 256)
    n_bits, max_code = 9, 511
    free_ent = 257 if block_mode else 256
    pos = group = group_bits = offset = 0
    clearing = False

    def next_code() -> int:
        nonlocal n_bits, max_code, pos, group, group_bits, offset, clearing
        if clearing or offset >= group_bits or free_ent > max_code:
            if free_ent > max_code:
                n_bits += 1
                max_code = max_max_code if n_bits == max_bits else (1 << n_bits) - 1
            if clearing:
                n_bits, max_code, clearing = 9, 511, False
            size = min(n_bits, len(data) - pos)
            if size <= 0:
                return -1
            group = int.from_bytes(data[pos:pos + size], "little")
            pos += size
            offset, group_bits = 0, size * 8 - (n_bits - 1)
        code = (group >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        return code

    out = bytearray()
    old = next_code()
    if old < 0:
        return b""
    out += table[old]
    while (code := next_code()) >= 0:
        if code == clear_code and block_mode:
            clearing, free_ent = True, 256
            if (code := next_code()) < 0:
                break
        entry = table[code] if code < free_ent else table[old] + table[old][:1]  # KwKwK case
        out += entry
        if free_ent < max_max_code:
            table[free_ent] = table[old] + entry[:1]
            free_ent += 1
        old = code
    return bytes(out)


def iter_bible_data_lines(data: bytes) -> Iterator[str]:
    """Lines of a Bible Retrieval System `bible.data` file, decompressed one window at a time."""
    if data[:2] != b"EC":
        raise DataError("bible.data: not a Bible Retrieval System data file (expected magic 'EC')")
    _window_size, n_windows = struct.unpack(">II", data[84:92])
    offsets = struct.unpack(f">{n_windows + 1}I", data[92:92 + 4 * (n_windows + 1)])
    header = data[92 + 4 * (n_windows + 1):offsets[0]]  # the .Z header: 1f 9d, then flags | max bits
    max_bits, block_mode = (header[2] & 0x1F, bool(header[2] & 0x80)) if header[:2] == b"\x1f\x9d" else (16, True)
    pending = b""
    for start, end in zip(offsets, offsets[1:]):
        *lines, pending = (pending + lzw_decompress(data[start:end], max_bits, block_mode)).split(b"\n")
        yield from (line.decode("utf-8", errors="replace") for line in lines)
    if pending:
        yield pending.decode("utf-8", errors="replace")


_BIBLE_BOOKS = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam Eze "
    "Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phi "
    "Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
     "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
     "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
     "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
     "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
     "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
     "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
     "1 John", "2 John", "3 John", "Jude", "Revelation"]))
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def bible_chapters(lines: Iterable[str]) -> Iterator[Document]:
    """Group verse lines `Ge1:1 text` into one document per chapter: 'Genesis 1' then numbered verses."""
    key, verses = None, []
    for line in lines:
        match = _VERSE.match(line)
        if match is None:
            continue  # the title line
        book, chapter, verse, text = match.groups()
        if (book, chapter) != key:
            if verses:
                yield _chapter_document(key, verses)
            key, verses = (book, chapter), []
        verses.append(f"{verse} {text.strip()}")
    if verses:
        yield _chapter_document(key, verses)


def _chapter_document(key: tuple[str, str], verses: list[str]) -> Document:
    title = f"{_BIBLE_BOOKS.get(key[0], key[0])} {key[1]}"
    return Document(f"{title}\n\n" + "\n".join(verses), f"kjv:{title}")


def iter_kjv(bible_data: bytes) -> Iterator[Document]:
    """Chapters of the King James Bible from the bytes of `bible.data`."""
    return bible_chapters(iter_bible_data_lines(bible_data))


# ---- GCIDE (dictd) -----------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(text: str) -> int:
    """Decode a dictd index number (base 64, most significant digit first)."""
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


def iter_dictd(dict_path: Path, index_path: Path) -> Iterator[Document]:
    """Entries of a dictd dictionary (`.dict.dz` or `.dict`), one per distinct byte span, in file order."""
    spans: dict[tuple[int, int], str] = {}
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-"):  # 00-database-info etc. describe the file
            spans.setdefault((dictd_number(parts[1]), dictd_number(parts[2])), parts[0])
    opener = gzip.open if dict_path.suffix == ".dz" else open
    with opener(dict_path, "rb") as f:
        for (offset, length), headword in sorted(spans.items()):
            f.seek(offset)  # forward seeks only: a gzip stream is read once from start to end
            raw = f.read(length)
            try:
                entry = raw.decode("utf-8")
            except UnicodeDecodeError:
                entry = raw.decode("cp1252", errors="replace")
            text = gcide_to_text(entry)
            if text:
                yield Document(text, f"gcide:{headword}")


_GREEK = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
          "upsilon phi chi psi omega").split()
_ENTITIES = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "ng": "ŋ", "yogh": "ȝ", "imac": "ī",
    "aum": "ä", "asl": "a", "add": "a", "udd": "u", "deg": "°", "sect": "§", "para": "¶", "root": "√",
    "pounds": "£", "middot": "·", "times": "×", "div": "÷", "divby": "÷", "rarr": "→", "flat": "♭", "sharp": "♯",
    "dagger": "†", "dag": "†", "prime": "′", "bprime": "″", "min": "′", "sec": "″", "nbsp": " ", "ldqo": "“",
    "rdqo": "”", "hand": "☞",
    **dict(zip(_GREEK, "αβγδεζηθικλμνξοπρστυφχψω")),
    **dict(zip((name.capitalize() for name in _GREEK), "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ")),
}
# Webster accent codes: a mark before the letter(s) ('[=a]' macron, '['e]' acute ...) or '^' after ('[e^]' breve).
_MARKS = {"=": "\u0304", "-": "\u0304", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", ".": "\u0307",
          ",": "\u0327", "*": "\u030a", "^": "\u0302"}
_ACCENT = re.compile(r"\[([=\-'`\"~.,*^])([A-Za-z]{1,2})\]|\[([A-Za-z]{1,2})\^\]|\[([A-Za-z]+)\]")
# Source tags: '[1913 Webster]', '[WordNet 1.5 +PJC]', or editors' initials '[PJC]', '[RDH]'.
_SOURCE_TAG = re.compile(
    r"\s*\[(?:[^\[\]\n]*(?:Webster|WordNet|Century|MW\d)[^\[\]\n]*|[A-Z]{2,4}(?:\s*\+\s*[A-Z]{2,4})*)\]")
_SYLLABLE_MARK = re.compile(r"(?<=[A-Za-z])[*\"`](?=[A-Za-z])")  # Un*wor"thi*ly -> Unworthily
_PRONUNCIATION = re.compile(r"\s*\\[^\\\n]*\\(?:\s*\([^()\n]*[\"*\[][^()\n]*\))?")


def _accent(match: re.Match) -> str:
    prefix_mark, prefixed, breved, name = match.groups()
    if name is not None:
        return _ENTITIES.get(name, match.group(0))
    letters, mark = (prefixed, _MARKS[prefix_mark]) if prefixed else (breved, "\u0306")
    return unicodedata.normalize("NFC", letters[0] + mark + letters[1:])


def gcide_to_text(entry: str) -> str:
    """Webster/GCIDE markup -> readable text: no pronunciations, braces or source tags; paragraphs unwrapped."""
    text = _PRONUNCIATION.sub("", entry)
    text = _ACCENT.sub(_accent, text)
    text = _SOURCE_TAG.sub("", text).replace("{", "").replace("}", "")
    text = _SYLLABLE_MARK.sub("", text)
    paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


# ---- Python documentation and docstrings -------------------------------------------------------------------

def iter_rst(sources_dir: Path) -> Iterator[Document]:
    """One document per reStructuredText source file (`*.rst.txt`), sorted by path."""
    for path in sorted(sources_dir.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield Document(text, f"pydocs:{path.relative_to(sources_dir).as_posix()}")


def iter_docstrings(source: str, module: str) -> Iterator[Document]:
    """Docstrings of a module's source and its classes and functions, in source order (parsed, never run)."""
    def visit(node: ast.AST, qualname: str) -> Iterator[Document]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and doc.strip():
            yield Document(doc.strip(), f"stdlib:{qualname}")
        for child in node.body:  # type: ignore[attr-defined]
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, f"{qualname}.{child.name}")

    yield from visit(ast.parse(source), module)


def iter_stdlib_docstrings(stdlib_dir: str | os.PathLike | None = None) -> Iterator[Document]:
    """Docstrings of every `.py` file of the standard library (sorted by path; tests and site-packages skipped)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skip]  # prune: site-packages is large
        paths.extend(Path(folder, name) for name in files if name.endswith(".py"))
    for path in sorted(paths):
        relative = path.relative_to(root)
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            source = path.read_text(encoding="utf-8")
            yield from iter_docstrings(source, module)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid (lib2to3 fixtures, bad encodings)

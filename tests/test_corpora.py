"""Built-in corpora: parsers on tiny fixtures that mimic each Debian format, plus one real download (slow, network)."""

from __future__ import annotations

import gzip
import itertools
import os
import shutil
import struct
import subprocess

import pytest

from lmforge.data import corpora
from lmforge.data.corpora import (CORPORA, Document, dictd_number, fetch_debian_package, gcide_to_text, iter_corpus,
                                  iter_dictd, iter_docstrings, iter_kjv, iter_rst, iter_stdlib_docstrings,
                                  iter_wordnet, lzw_decompress, parse_wordnet_line)
from lmforge.errors import DataError

# ---- stdlib docstrings ---------------------------------------------------------------------------------------


def test_stdlib_docstrings_stream_is_deterministic():
    first = list(itertools.islice(iter_corpus("stdlib-docstrings"), 200))
    again = list(itertools.islice(iter_stdlib_docstrings(), 200))
    assert first == again
    assert len(first) == 200 and all(isinstance(d, Document) and d.text.strip() for d in first)
    assert all(d.source.startswith("stdlib:") for d in first)


def test_docstrings_parsed_not_executed(tmp_path):
    source = '''"""Module doc."""
raise SystemExit("never executed")

class Greeter:
    """Class doc."""

    def hello(self):
        """Method doc."""

    async def later(self):
        """Async doc."""

def bare():
    return 1
'''
    docs = list(iter_docstrings(source, "pkg.mod"))
    assert [(d.source, d.text) for d in docs] == [
        ("stdlib:pkg.mod", "Module doc."), ("stdlib:pkg.mod.Greeter", "Class doc."),
        ("stdlib:pkg.mod.Greeter.hello", "Method doc."), ("stdlib:pkg.mod.Greeter.later", "Async doc.")]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""Package doc."""\n')
    (tmp_path / "pkg" / "broken.py").write_text('"""Doc."""\ndef (:\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('"""Skipped."""\n')
    (tmp_path / "zmod.py").write_text(source)
    sources = [d.source for d in iter_stdlib_docstrings(tmp_path)]
    assert sources[0] == "stdlib:pkg" and sources[1] == "stdlib:zmod" and len(sources) == 5


# ---- WordNet -------------------------------------------------------------------------------------------------

NOUN_LINE = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 #m 02083863 n 0000 | "
             'a member of the genus Canis; "the dog barked all night"  \n')
ADJ_LINE = ("00001740 00 a 01 able(a) 0 001 ! 00002098 a 0101 | (usually followed by `to\') having the necessary "
            'means; "able to swim"  \n')
LICENSE_LINE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"


def test_parse_wordnet_line():
    assert parse_wordnet_line(NOUN_LINE) == ('dog, domestic dog, Canis familiaris (noun): a member of the genus '
                                             'Canis; "the dog barked all night"')
    assert parse_wordnet_line(ADJ_LINE) == ("able (adjective): (usually followed by 'to') having the necessary "
                                            'means; "able to swim"')
    assert parse_wordnet_line(LICENSE_LINE) is None


def test_iter_wordnet(tmp_path):
    for pos, line in (("noun", NOUN_LINE), ("verb", ""), ("adj", ADJ_LINE), ("adv", "")):
        (tmp_path / f"data.{pos}").write_text(LICENSE_LINE + line)
    docs = list(iter_wordnet(tmp_path))
    assert [d.source for d in docs] == ["wordnet:noun:02084071", "wordnet:adj:00001740"]


# ---- King James Bible: Unix-compress windows in a Bible Retrieval System file --------------------------------

def compress_lzw(data: bytes, max_bits: int = 16) -> bytes:
    """A minimal encoder of `compress` codes (block mode, no header, no CLEAR): the test's independent side."""
    table = {bytes([i]): i for i in range(256)}
    codes, word = [], data[:1]
    for byte in data[1:]:
        if word + bytes([byte]) in table:
            word += bytes([byte])
            continue
        codes.append(table[word])
        if len(table) + 1 < 1 << max_bits:  # +1: code 256 is CLEAR
            table[word + bytes([byte])] = len(table) + 1
        word = bytes([byte])
    if word:
        codes.append(table[word])
    bits, n_bits, group_start, out = 0, 9, 0, 0
    for i, code in enumerate(codes):
        free_ent = min(257 + max(i - 1, 0), 1 << max_bits)  # the decoder's table size when it reads code i
        if n_bits < max_bits and free_ent > (1 << n_bits) - 1:
            used = bits - group_start
            bits += -used % (n_bits * 8)  # the rest of a group is skipped when the width grows
            n_bits += 1
            group_start = bits
        elif bits - group_start == n_bits * 8:
            group_start = bits
        out |= code << bits
        bits += n_bits
    return out.to_bytes((bits + 7) // 8, "little")


def test_lzw_round_trip_and_matches_gzip(tmp_path):
    data = (b"TOBEORNOTTOBEORTOBEORNOT#" * 40 + bytes(range(256)) * 3 + b"aaaaaaaaaaaaaaaaaaaaaaaaaaaa") * 20
    packed = compress_lzw(data)
    assert lzw_decompress(packed) == data
    if shutil.which("gzip"):  # gzip reads .Z files: an independent check of the encoder above
        (tmp_path / "x.Z").write_bytes(b"\x1f\x9d\x90" + packed)
        assert subprocess.run(["gzip", "-dc", str(tmp_path / "x.Z")], capture_output=True).stdout == data


def bible_data(text: bytes, window: int = 64) -> bytes:
    windows = [compress_lzw(text[i:i + window]) for i in range(0, len(text), window)]
    header = b"EC02" + b"Compressed Data File".ljust(80, b"\0") + struct.pack(">II", window, len(windows))
    offsets, position = [], len(header) + 4 * (len(windows) + 1) + 3
    for packed in windows:
        offsets.append(position)
        position += len(packed)
    return header + struct.pack(f">{len(windows) + 1}I", *offsets, position) + b"\x1f\x9d\x90" + b"".join(windows)


def test_iter_kjv_chapters():
    text = (b"Holy Bible, Authorized (King James) Version.  Textfile 930105.\n"
            b"Ge1:1 In the beginning God created the heaven and the earth.\n"
            b"Ge1:2 And the earth was without form, and void.\n"
            b"Ge2:1 Thus the heavens and the earth were finished.\n"
            b"1Jn1:1 That which was from the beginning.\n")
    docs = list(iter_kjv(bible_data(text)))
    assert [d.source for d in docs] == ["kjv:Genesis 1", "kjv:Genesis 2", "kjv:1 John 1"]
    assert docs[0].text == ("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n"
                            "2 And the earth was without form, and void.")


# ---- GCIDE (dictd) -------------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    digits = ""
    while True:
        n, digit = divmod(n, 64)
        digits = _B64[digit] + digits
        if n == 0:
            return digits


ENTRY_1 = ('Unworthy \\Un*wor"thy\\, a. Not worthy; wanting merit. See {Worthy}. -- Un*wor"thi*ly, adv.\n'
           "   [1913 Webster]\n\n")
ENTRY_2 = ('Aaronic \\Aa*ron"ic\\ ([asl]*r[o^]n"[i^]k), a.\n   Pertaining to Aaron; a fa[,c]ade of\n   the'
           " [ae]ther. [Obs.]\n   [WordNet 1.5 +PJC]\n\n")


def test_gcide_to_text():
    assert gcide_to_text(ENTRY_1) == "Unworthy, a. Not worthy; wanting merit. See Worthy. -- Unworthily, adv."
    assert gcide_to_text(ENTRY_2) == "Aaronic, a. Pertaining to Aaron; a façade of the æther. [Obs.]"


def test_iter_dictd(tmp_path):
    info = "00-database-info\n   About this file.\n\n"
    body = (info + ENTRY_1 + ENTRY_2).encode("utf-8")
    spans = {"info": (0, len(info)), "one": (len(info), len(ENTRY_1.encode())),
             "two": (len(info) + len(ENTRY_1.encode()), len(ENTRY_2.encode()))}
    index = [("00-database-info", *spans["info"]), ("Aaronic", *spans["two"]), ("Unworthily", *spans["one"]),
             ("Unworthy", *spans["one"])]
    (tmp_path / "d.index").write_text("".join(f"{w}\t{b64(o)}\t{b64(n)}\n" for w, o, n in index))
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(body))
    docs = list(iter_dictd(tmp_path / "d.dict.dz", tmp_path / "d.index"))
    assert [d.source for d in docs] == ["gcide:Unworthily", "gcide:Aaronic"]  # file order, one per span
    assert docs[0].text.startswith("Unworthy, a.")
    assert dictd_number("5I") == 57 * 64 + 8 and dictd_number(b64(13614274)) == 13614274


# ---- Python docs ---------------------------------------------------------------------------------------------

def test_iter_rst(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "json.rst.txt").write_text(":mod:`json` --- JSON encoder\n===\n\nText.\n")
    (tmp_path / "about.rst.txt").write_text("About\n=====\n")
    (tmp_path / "empty.rst.txt").write_text("\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = list(iter_rst(tmp_path))
    assert [d.source for d in docs] == ["pydocs:about.rst.txt", "pydocs:library/json.rst.txt"]


# ---- fetching and errors -------------------------------------------------------------------------------------

def test_unknown_corpus_lists_known_ones():
    with pytest.raises(DataError, match="unknown corpus 'shakespeare'.*wordnet, kjv, gcide, pydocs"):
        iter_corpus("shakespeare")
    assert set(CORPORA) == {"wordnet", "kjv", "gcide", "pydocs", "stdlib-docstrings"}


def test_missing_apt_get(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="apt-get not found: built-in corpus wordnet needs Debian's apt-get; "
                                        "use stdlib-docstrings or your own files"):
        iter_corpus("wordnet", tmp_path)


def test_download_failure_reports_last_stderr_line(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'Reading package lists...' >&2\necho 'E: Unable to locate package nope' >&2\n"
                    "exit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match="failed: E: Unable to locate package nope$"):
        fetch_debian_package("nope", tmp_path / "cache")
    assert not (tmp_path / "cache" / "debian" / "nope").exists()
    assert list((tmp_path / "cache" / "debian").iterdir()) == []  # no temp dirs left behind


def test_cached_package_is_not_downloaded_again(monkeypatch, tmp_path):
    root = tmp_path / "debian" / "wordnet-base"
    (root / "usr/share/wordnet").mkdir(parents=True)
    for pos in ("noun", "verb", "adj", "adv"):
        (root / f"usr/share/wordnet/data.{pos}").write_text(NOUN_LINE if pos == "noun" else "")
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: None)  # any download attempt would fail
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert [d.source for d in iter_corpus("wordnet")] == ["wordnet:noun:02084071"]


@pytest.mark.slow
@pytest.mark.network
def test_fetch_wordnet_for_real(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available on this machine")
    try:
        docs = list(itertools.islice(iter_corpus("wordnet", tmp_path), 1000))
    except DataError as exc:
        pytest.skip(f"apt-get download wordnet-base failed here: {exc}")
    assert len(docs) == 1000
    assert docs[0].text.startswith("entity (noun): that which is perceived")

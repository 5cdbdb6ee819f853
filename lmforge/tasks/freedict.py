"""English-German example pairs from FreeDict (Debian dict-freedict-eng-deu) for the `translate` task.

The dictd file `freedict-eng-deu.dict.dz` (dictzip: readable as gzip) holds entries whose example lines read
    `      "the extraction of coal"  - die Förderung von Kohle`
(six spaces, the English in double quotes, two spaces, '- ', the German). About 63k such lines, 55k distinct.

Kept: pairs with at least 3 English words and a single German rendering. Dropped: alternatives and
placeholders ('/', parentheses, 'sth.', 'sb.', 'etw.', 'jdn.' ...), a German side listing several renderings
(', ' after a phrase, or '., ' after a sentence), control characters, very long pairs, and English phrases that
the file renders in more than one way. Pairs that share an English or a German side form one group
(union-find), and the group's smallest English side is the key that decides the split.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.tasks.wordnet import word_groups

EXAMPLE_LINE = re.compile(r'^ {6}"(.+)"  - (.+)$')
_PLACEHOLDERS = re.compile(r"\b(sth|sb|etw|jdn|jdm|jds)\.|[/()\[\]{}<>…~|]|\.\.\.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MIN_ENGLISH_WORDS, MAX_CHARS = 3, 200


def parse_example_line(line: str) -> tuple[str, str] | None:
    """`      "english"  - german` -> (english, german) with runs of spaces collapsed, else None."""
    match = EXAMPLE_LINE.match(line)
    if match is None:
        return None
    english, german = (re.sub(r"[ \t]+", " ", part).strip(" ") for part in match.groups())  # keep U+0085 to see it
    return (english, german) if english and german else None


def is_usable_pair(english: str, german: str) -> bool:
    """One plain English phrase or sentence (3+ words) and one German rendering; see the module docstring."""
    if len(english.split()) < MIN_ENGLISH_WORDS or len(english) > MAX_CHARS or len(german) > MAX_CHARS:
        return False
    if _PLACEHOLDERS.search(english) or _PLACEHOLDERS.search(german) or _CONTROL.search(english + german):
        return False
    if '"' in english or '"' in german:
        return False
    sentence = english[-1] in ".?!"
    return not re.search(r"[.?!], " if sentence else r", |; ", german)


def read_example_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """Distinct usable (english, german) pairs in file order; an English side rendered two ways is dropped."""
    renderings: dict[str, list[str]] = {}
    for line in lines:
        pair = parse_example_line(line)
        if pair is not None and is_usable_pair(*pair):
            found = renderings.setdefault(pair[0], [])
            if pair[1] not in found:
                found.append(pair[1])
    return [(english, found[0]) for english, found in renderings.items() if len(found) == 1]


def read_dict_lines(dict_path: str | Path) -> list[str]:
    """Lines of a dictd `.dict.dz` (gzip) or `.dict` file, split on '\\n' only (the text holds U+0085)."""
    dict_path = Path(dict_path)
    if not dict_path.is_file():
        raise DataError(f"FreeDict dictionary {dict_path}: not found")
    opener = gzip.open if dict_path.suffix == ".dz" else open
    try:
        with opener(dict_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace").split("\n")
    except (OSError, EOFError) as exc:
        raise DataError(f"FreeDict dictionary {dict_path}: cannot read ({exc})") from None


def translate_rows(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows of the `translate` task: English -> German, split by the pair's group (see the module docstring)."""
    groups = word_groups([("en:" + english.lower(), "de:" + german.lower()) for english, german in pairs])
    smallest_english: dict[str, str] = {}
    for english, _ in pairs:
        root = groups["en:" + english.lower()]
        smallest_english[root] = min(smallest_english.get(root, english.lower()), english.lower())
    return [{"id": f"translate:{english}", "vars": {"english": english}, "answers": [german], "choices": [],
             "label": -1, "source": "translate:" + smallest_english[groups["en:" + english.lower()]]}
            for english, german in pairs]


def translate_pref_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs of the translate task: the right German (chosen) against the German of another pair of
    the same split (rejected; the next pair in the order of a stable hash of the ids, cyclically)."""
    from lmforge.tasks.spec import split_of, stable_hash

    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_split.setdefault(split_of(row["source"]), []).append(row)
    out = []
    for members in by_split.values():
        members.sort(key=lambda r: (stable_hash("translate_pref:" + r["id"]), r["id"]))
        for i, row in enumerate(members):
            other = next((m["answers"][0] for m in members[i + 1:] + members[:i]
                          if m["answers"][0] != row["answers"][0]), None)
            if other is not None:
                out.append({**row, "id": "translate_pref:" + row["id"].split(":", 1)[1],
                            "choices": [row["answers"][0], other], "label": 0})
    return out

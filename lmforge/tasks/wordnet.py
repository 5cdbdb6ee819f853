"""WordNet 3.0 as a graph: synsets, their lemmas and definitions, pointers, and each word's senses by frequency.

Data files (wndb(5WN)), one synset a line:
    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames] | gloss
w_cnt is 2 hex digits; p_cnt 3 decimal digits; each pointer is `symbol offset pos source/target`, where
source/target is 4 hex digits: 0000 for a relation between synsets, else the source word number (upper two) and
the target word number (lower two), 1-based, for a lexical relation such as `!` (antonym). `@` is a hypernym,
`&` similar-to (an adjective satellite and its head). Adjective lemmas may carry a marker like `(a)` or `(ip)`.
The gloss is the definition, then examples in double quotes after `; `.

Index files: `lemma pos synset_cnt p_cnt [ptr_symbol ...] sense_cnt tagsense_cnt offset ...`, the offsets in
order of sense frequency, so the first is the word's most common sense.

A synset's key is `{n|v|a|r}:{offset}` (satellites `s` live in data.adj and take `a`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import DataError

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
_MARKER = re.compile(r"\([a-z]+\)$")
_EXAMPLE_START = re.compile(r';\s*"')
_CLEAN_WORD = re.compile(r"[a-z][a-z' -]*[a-z]")


@dataclass
class Synset:
    """One WordNet synset: lemmas as written (underscores -> spaces), the definition without examples."""

    key: str
    pos: str
    satellite: bool
    lex_file: int
    lemmas: list[str]
    definition: str
    hypernyms: list[str] = field(default_factory=list)
    similar: list[str] = field(default_factory=list)
    antonyms: list[tuple[int, str, int]] = field(default_factory=list)  # (source word, target key, target word)


@dataclass
class WordNet:
    """All synsets by key, hyponyms (children) of each synset, and each (lemma, pos)'s senses, commonest first."""

    synsets: dict[str, Synset]
    senses: dict[tuple[str, str], list[str]]
    children: dict[str, list[str]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        first_with: dict[tuple[str, str], str] = {}
        for synset in self.synsets.values():
            for parent in synset.hypernyms:
                self.children.setdefault(parent, []).append(synset.key)
            # synsets with the same definition (a few hundred) are one unit, so one split gets all of them
            same = first_with.setdefault((synset.pos, synset.definition.lower()), synset.key)
            self.units[synset.key] = same if synset.definition else synset.key

    def unit(self, key: str) -> str:
        """The split key of a synset: the first synset (in file order) with the same part of speech and
        definition, usually the synset itself."""
        return self.units[key]

    def first_sense(self, lemma: str, pos: str) -> str | None:
        keys = self.senses.get((lemma.lower(), pos))
        return keys[0] if keys else None

    def head(self, key: str) -> str | None:
        """The synset's first lemma that is a plain lowercase word or phrase, or None."""
        return next((lemma for lemma in self.synsets[key].lemmas if is_clean_word(lemma)), None)

    def head_of_first_sense(self, key: str) -> str | None:
        """The synset's first clean lemma whose most common sense (in this part of speech) is this synset."""
        synset = self.synsets[key]
        return next((lemma for lemma in synset.lemmas
                     if is_clean_word(lemma) and self.first_sense(lemma, synset.pos) == key), None)


def is_clean_word(word: str) -> bool:
    """A lowercase word or phrase of letters, spaces, hyphens and apostrophes: usable as a question or answer."""
    return bool(_CLEAN_WORD.fullmatch(word)) and "  " not in word


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: what precedes the first `; "example"`, trimmed of a trailing ';'."""
    gloss = gloss.strip().replace("`", "'")
    match = _EXAMPLE_START.search(gloss)
    definition = gloss[:match.start()] if match else ("" if gloss.startswith('"') else gloss)
    return definition.strip().rstrip(";").strip()


def parse_data_line(line: str, pos: str) -> Synset | None:
    """One line of data.{noun,verb,adj,adv} -> Synset, or None for the license header (lines start with spaces).

    Raises DataError for a line that starts with a digit but does not follow the format."""
    if not line[:1].isdigit():
        return None
    try:
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        offset, lex_file, ss_type = parts[0], int(parts[1]), parts[2]
        n_words = int(parts[3], 16)
        lemmas = [_MARKER.sub("", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
        at = 4 + 2 * n_words
        n_pointers = int(parts[at])
        synset = Synset(f"{pos}:{offset}", pos, ss_type == "s", lex_file, list(dict.fromkeys(lemmas)),
                        definition_of(gloss))
        for i in range(n_pointers):
            symbol, target, target_pos, source_target = parts[at + 1 + 4 * i: at + 5 + 4 * i]
            target_key = f"{'a' if target_pos == 's' else target_pos}:{target}"
            if symbol == "@":
                synset.hypernyms.append(target_key)
            elif symbol == "&":
                synset.similar.append(target_key)
            elif symbol == "!" and source_target != "0000":
                synset.antonyms.append((int(source_target[:2], 16), target_key, int(source_target[2:], 16)))
    except (IndexError, ValueError):
        raise DataError(f"WordNet data.{POS_FILES[pos]}: malformed synset line {line[:60]!r}") from None
    return synset


def parse_index_line(line: str) -> tuple[str, str, list[str]] | None:
    """One line of index.{noun,...} -> (lemma with spaces, pos, synset offsets commonest first), None for headers."""
    if not line or line[0] == " ":
        return None
    parts = line.split()
    try:
        n_synsets = int(parts[2])
    except (IndexError, ValueError):
        raise DataError(f"WordNet index: malformed line {line[:60]!r}") from None
    pos = "a" if parts[1] == "s" else parts[1]
    return parts[0].replace("_", " "), pos, parts[-n_synsets:]


def load_wordnet(wordnet_dir: str | Path) -> WordNet:
    """Parse data.* and index.* of a WordNet 3.0 dict dir (e.g. usr/share/wordnet of Debian's wordnet-base)."""
    wordnet_dir = Path(wordnet_dir)
    synsets: dict[str, Synset] = {}
    senses: dict[tuple[str, str], list[str]] = {}
    for pos, name in POS_FILES.items():
        for kind in ("data", "index"):
            if not (wordnet_dir / f"{kind}.{name}").is_file():
                raise DataError(f"WordNet dir {wordnet_dir}: {kind}.{name} not found")
        with open(wordnet_dir / f"data.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                synset = parse_data_line(line.rstrip("\n"), pos)
                if synset is not None:
                    synsets[synset.key] = synset
        with open(wordnet_dir / f"index.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                entry = parse_index_line(line.rstrip("\n"))
                if entry is not None:
                    lemma, entry_pos, offsets = entry
                    senses[(lemma, entry_pos)] = [f"{entry_pos}:{offset}" for offset in offsets]
    if not synsets:
        raise DataError(f"WordNet dir {wordnet_dir}: no synsets in data.noun/verb/adj/adv")
    return WordNet(synsets, senses)


def antonym_pairs(wordnet: WordNet) -> list[tuple[str, str, str, str]]:
    """Lexical antonym pairs (word, its synset key, antonym, the antonym's synset key), clean words only,
    each direction as WordNet lists it (it lists both), in file order."""
    pairs = []
    for synset in wordnet.synsets.values():
        for source, target_key, target in synset.antonyms:
            other = wordnet.synsets.get(target_key)
            if other is None or source > len(synset.lemmas) or target > len(other.lemmas):
                continue
            word, antonym = synset.lemmas[source - 1].lower(), other.lemmas[target - 1].lower()
            if is_clean_word(word) and is_clean_word(antonym) and word != antonym:
                pairs.append((word, synset.key, antonym, target_key))
    return pairs


def word_groups(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Connected components of words linked by `pairs` (union-find): word -> the component's smallest word."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {word: find(word) for word in parent}


def root_depth(wordnet: WordNet, key: str, limit: int = 64) -> int:
    """Steps from `key` up its first-hypernym path to a synset with no hypernym (0 for a root)."""
    depth = 0
    while wordnet.synsets[key].hypernyms and depth < limit:
        key = wordnet.synsets[key].hypernyms[0]
        depth += 1
    return depth

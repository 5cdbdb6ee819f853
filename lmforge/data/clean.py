"""Document cleaning: normalize, scrub PII, then drop documents by length and quality.

`clean_document(text, cfg)` applies, in order:
1. normalize (`cfg.normalize`): Unicode NFC; `\\r\\n` and `\\r` -> `\\n`; control characters (category Cc) and the
   byte-order mark removed except `\\n` and `\\t`; Unicode spaces (NBSP, thin space, ...) -> ' '; trailing
   whitespace of each line removed; three or more newlines -> two (one blank line); leading and trailing blank
   space removed. Leading indentation is kept (code in docstrings needs it).
2. PII scrubbing (`cfg.scrub_pii`): e-mail addresses -> <EMAIL>, phone numbers (3-4 digit groups with
   separators, 9-15 digits in all, optional +country code) -> <PHONE>, IPv4 and IPv6 addresses -> <IP>.
3. Filters, each named after its threshold and counted in meta.json when it removes a document
   (words = whitespace-separated tokens; lines = non-empty lines):
   - min_chars / max_chars, min_words / max_words: length bounds (max 0 = no bound);
   - symbol_ratio: ('#' + '...' + '…' occurrences) / words > max_symbol_word_ratio (Gopher);
   - ellipsis_lines: fraction of lines ending in '...' or '…' > max_ellipsis_line_fraction (Gopher);
   - alpha_words: fraction of words holding an alphabetic character < min_alpha_word_fraction (Gopher);
   - mean_word_length: mean word length outside [min_mean_word_length, max_mean_word_length] (Gopher);
   - duplicate_lines: fraction of lines equal to an earlier line > max_duplicate_line_fraction (Gopher);
   - repeated_ngrams: fraction of word characters inside word n-grams (n = repeated_ngram_size) that occur
     more than once > max_repeated_ngram_fraction (Gopher's duplicate n-gram character fraction).
   Any filter can be switched off by naming it in `cfg.disable`.

The ratio heuristics (symbol_ratio, ellipsis_lines, mean_word_length, duplicate_lines, repeated_ngrams) judge only
documents of at least `quality_min_words` words: on a one-line gloss a single "..." or two long words decide the
ratio, and WordNet lost legitimate entries such as 'pi (noun): ... approximately equal to 3.14159...' to them.
alpha_words judges every document, since it is what catches short non-text (numbers, symbol runs).
Defaults suit short texts such as dictionary definitions (min 10 characters, 2 words) and are looser than
Gopher's web-page thresholds where real text would otherwise be lost: alpha words >= 0.5 (not 0.8) keeps
docstrings with code; repeated 5-grams <= 0.4 (not 0.15) keeps all but ~1% of KJV chapters (at 0.2, 8% went,
Genesis 1 among them).
The quality heuristics assume space-separated scripts; disable mean_word_length for Chinese or Japanese text.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

FILTERS = ("min_chars", "max_chars", "min_words", "max_words", "symbol_ratio", "ellipsis_lines", "alpha_words",
           "mean_word_length", "duplicate_lines", "repeated_ngrams")

_RATIO_FILTERS = ("symbol_ratio", "ellipsis_lines", "mean_word_length", "duplicate_lines", "repeated_ngrams")


@dataclass
class CleanConfig:
    """Cleaning switches and filter thresholds (see the module docstring for each rule)."""

    normalize: bool = True  # NFC, newlines, control and space characters, trailing and blank-line whitespace
    scrub_pii: bool = True  # replace e-mail addresses, phone numbers and IPs by <EMAIL>, <PHONE>, <IP>
    disable: list[str] = field(default_factory=list)  # filters to switch off, comma-separated: min_chars,
                                                      # max_chars, min_words, max_words, symbol_ratio,
                                                      # ellipsis_lines, alpha_words, mean_word_length,
                                                      # duplicate_lines, repeated_ngrams
    min_chars: int = 10  # drop documents shorter than this many characters
    max_chars: int = 1_000_000  # 0 = no bound
    min_words: int = 2  # drop documents with fewer words
    max_words: int = 0  # 0 = no bound
    quality_min_words: int = 20  # shorter documents skip the ratio heuristics (see the module docstring)
    max_symbol_word_ratio: float = 0.1  # max ('#' + '...' + '…') per word
    max_ellipsis_line_fraction: float = 0.3  # max share of lines ending in '...' or '…'
    min_alpha_word_fraction: float = 0.5  # min share of words holding a letter
    min_mean_word_length: float = 2.0  # min mean word length (characters)
    max_mean_word_length: float = 12.0  # max mean word length (characters)
    max_duplicate_line_fraction: float = 0.3  # max share of lines repeating an earlier line
    repeated_ngram_size: int = 5  # n of the word n-grams of the repeated_ngrams filter
    max_repeated_ngram_fraction: float = 0.4  # Gopher: 0.15; the KJV's formulaic verses need more room

    def __post_init__(self) -> None:
        # `--clean.disable a,b` arrives as one string when the option is repeated: split each entry on commas.
        self.disable = [name.strip() for entry in self.disable for name in entry.split(",") if name.strip()]
        unknown = [name for name in self.disable if name not in FILTERS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], FILTERS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"disable: unknown filter {unknown[0]!r} (filters: {', '.join(FILTERS)}{hint})")
        if self.repeated_ngram_size < 1:
            raise ValueError(f"repeated_ngram_size must be >= 1, got {self.repeated_ngram_size}")


class CleanResult(NamedTuple):
    """The cleaned text, or None and the name of the filter that removed the document."""

    text: str | None
    removed_by: str | None = None


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # category Cc except \t \n, and the BOM
_SPACES = re.compile(r"[^\S\n\t]")  # any Unicode whitespace except newline and tab
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})(?:[ .-]\d{2,4}){1,3}[ .-]\d{3,4}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w.])")
_DIGIT = re.compile(r"\d")
_LETTER_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace-separated word holding a letter
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def normalize_text(text: str) -> str:
    """NFC, newlines unified, control characters dropped, spaces and blank lines normalized (rule 1)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text + "\n")
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group())
    return "<PHONE>" if 9 <= digits <= 15 else match.group()


def _ipv6(match: re.Match[str]) -> str:
    # Three or more non-empty groups, so Python slices (`a[1::2]`) and clock times are left alone.
    candidate = match.group()
    if sum(1 for group in candidate.split(":") if group) < 3:
        return candidate
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return candidate
    return "<IP>"


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses, phone numbers and IP addresses with <EMAIL>, <PHONE>, <IP> (rule 2)."""
    if "@" in text:  # the guards skip regex scans that cannot match (most documents hold no PII)
        text = _EMAIL.sub("<EMAIL>", text)
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(_ipv6, text)
    if _DIGIT.search(text):
        text = _IPV4.sub("<IP>", text)
        text = _PHONE.sub(_phone, text)
    return text


def _repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Fraction of word characters covered by word n-grams that occur more than once in the document."""
    if len(words) < n:
        return 0.0
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(set(ngrams)) == len(ngrams):
        return 0.0
    counts = Counter(ngrams)
    covered = [False] * len(words)
    for i, gram in enumerate(ngrams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def failed_filter(text: str, cfg: CleanConfig) -> str | None:
    """The name of the first filter that rejects `text` (rule 3), or None if it passes all of them."""
    words = text.split()
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    checks = (
        ("min_chars", lambda: len(text) < cfg.min_chars),
        ("max_chars", lambda: 0 < cfg.max_chars < len(text)),
        ("min_words", lambda: len(words) < cfg.min_words),
        ("max_words", lambda: 0 < cfg.max_words < len(words)),
        ("symbol_ratio", lambda: bool(words) and (text.count("#") + text.count("...") + text.count("…"))
         / len(words) > cfg.max_symbol_word_ratio),
        ("ellipsis_lines", lambda: bool(lines) and sum(line.endswith(("...", "…")) for line in lines)
         / len(lines) > cfg.max_ellipsis_line_fraction),
        ("alpha_words", lambda: bool(words) and len(_LETTER_WORD.findall(text)) / len(words)
         < cfg.min_alpha_word_fraction),
        ("mean_word_length", lambda: bool(words) and not cfg.min_mean_word_length
         <= sum(map(len, words)) / len(words) <= cfg.max_mean_word_length),
        ("duplicate_lines", lambda: bool(lines) and (len(lines) - len(set(lines)))
         / len(lines) > cfg.max_duplicate_line_fraction),
        ("repeated_ngrams", lambda: _repeated_ngram_fraction(words, cfg.repeated_ngram_size)
         > cfg.max_repeated_ngram_fraction),
    )
    judged = [name for name in FILTERS if name not in cfg.disable
              and (len(words) >= cfg.quality_min_words or name not in _RATIO_FILTERS)]
    for name, rejects in checks:
        if name in judged and rejects():
            return name
    return None


def clean_document(text: str, cfg: CleanConfig) -> CleanResult:
    """Normalize and scrub `text`, then filter it: CleanResult(cleaned text) or CleanResult(None, filter name)."""
    if cfg.normalize:
        text = normalize_text(text)
    if cfg.scrub_pii:
        text = scrub_pii(text)
    removed_by = failed_filter(text, cfg)
    return CleanResult(None, removed_by) if removed_by else CleanResult(text)

"""Cleaning rules of lmforge.data.clean, each on a worked example."""

from __future__ import annotations

import pytest

from lmforge.data.clean import FILTERS, CleanConfig, clean_document, failed_filter, normalize_text, scrub_pii
from lmforge.errors import ConfigError
from lmforge.config import build_config

GOOD = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch.\n"
        "Later that evening the dog sleeps by the fire and dreams of chasing rabbits in the field.")


def test_normalize_nfc_controls_and_whitespace() -> None:
    raw = "\ufeffCafe\u0301\u00a0bar\x00\x07\r\n\tindented  \r\n\n\n\n\nend\u2009word   "
    assert normalize_text(raw) == "Caf\u00e9 bar\n\tindented\n\nend word"


def test_normalize_keeps_code_indentation() -> None:
    assert normalize_text("def f():\n    return 1\n") == "def f():\n    return 1"


@pytest.mark.parametrize("text, expected", [
    ("mail jane.doe+news@example.co.uk now", "mail <EMAIL> now"),
    ("call +1 555-123-4567 today", "call <PHONE> today"),
    ("call (555) 123-4567 today", "call <PHONE> today"),
    ("or 555.123.4567.", "or <PHONE>."),
    ("ring +44 20 7946 0958", "ring <PHONE>"),
    ("host 192.168.0.12 is up", "host <IP> is up"),
    ("v6 2001:db8:85a3::8a2e:370:7334 ok", "v6 <IP> ok"),
    ("v6 fe80:0:0:0:202:b3ff:fe1e:8329", "v6 <IP>"),
])
def test_scrub_pii(text: str, expected: str) -> None:
    assert scrub_pii(text) == expected


@pytest.mark.parametrize("text", [
    "the war of 1939-1945 ended", "John 3:16 says", "a slice a[1::2] and a[::3]", "at 12:30:45 sharp",
    "Python 3.11.4 released", "dated 2024-01-15", "ISBN 978-0-13-110362-7", "costs 1,000,000 dollars",
])
def test_scrub_pii_leaves_non_pii(text: str) -> None:
    assert scrub_pii(text) == text


def test_clean_document_returns_cleaned_text() -> None:
    result = clean_document("  Write to bob@example.com  \r\n", CleanConfig())
    assert result.text == "Write to <EMAIL>" and result.removed_by is None


def test_short_dictionary_glosses_pass() -> None:
    for gloss in ("dog (noun): a domesticated carnivore", "run (verb): move fast by using one's feet",
                  "a member of the genus Canis", "Ge1:1 In the beginning God created the heaven and the earth."):
        assert clean_document(gloss, CleanConfig()).removed_by is None, gloss


def test_docstring_with_code_passes() -> None:
    doc = ("Return the sum of a and b.\n\n    >>> add(1, 2)\n    3\n\nRaises TypeError when the arguments "
           "cannot be added together.")
    assert clean_document(doc, CleanConfig()).removed_by is None


@pytest.mark.parametrize("name, text, overrides", [
    ("min_chars", "a cat", {}),
    ("max_chars", GOOD, {"max_chars": 50}),
    ("min_words", "Supercalifragilistic", {}),
    ("max_words", GOOD, {"max_words": 10}),
    ("symbol_ratio", "#tag #news #today #cats and #dogs", {"quality_min_words": 0}),
    ("ellipsis_lines", "and then the rain kept falling on the old roof all night...\n"
     "she said that nobody in the village would ever believe her...\n"
     "who knows where the travellers went after they left the inn...\nThe end of the story.", {}),  # 37 words
    ("alpha_words", "12 34 56 78 90 = 270 total", {}),
    ("mean_word_length", "a b c d e f g h i j k", {"quality_min_words": 0}),
    ("mean_word_length", "pneumonoultramicroscopic silicovolcanoconiosis", {"quality_min_words": 0}),
    ("duplicate_lines", "buy now\nbuy now\nbuy now\nreal content here", {"quality_min_words": 0}),
    ("repeated_ngrams", "click here to win a prize " * 4 + "today", {}),
])
def test_each_filter_and_its_switch(name: str, text: str, overrides: dict) -> None:
    assert failed_filter(normalize_text(text), CleanConfig(**overrides)) == name
    assert clean_document(text, CleanConfig(**overrides)).removed_by == name
    assert failed_filter(normalize_text(text), CleanConfig(**overrides, disable=[name])) != name


def test_short_documents_skip_ratio_heuristics() -> None:
    for gloss in ("pi (noun): the ratio of the circumference to the diameter of a circle; approximately 3.14159...",
                  "pusillanimity, pusillanimousness (noun): contemptible fearfulness",
                  'hand (noun): one of two sides of an issue; "on the one hand..., but on the other hand..."'):
        assert clean_document(gloss, CleanConfig()).removed_by is None, gloss
        assert clean_document(gloss, CleanConfig(quality_min_words=0)).removed_by is not None, gloss
    assert clean_document("12 34 56 78 90", CleanConfig()).removed_by == "alpha_words"


def test_good_text_passes_every_filter() -> None:
    assert failed_filter(GOOD, CleanConfig()) is None
    assert set(FILTERS) == {"min_chars", "max_chars", "min_words", "max_words", "symbol_ratio", "ellipsis_lines",
                            "alpha_words", "mean_word_length", "duplicate_lines", "repeated_ngrams"}


def test_switches_off_normalization_and_pii() -> None:
    cfg = CleanConfig(normalize=False, scrub_pii=False)
    assert clean_document("mail bob@example.com  \r\n", cfg).text == "mail bob@example.com  \r\n"


def test_unknown_filter_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown filter 'typo'"):
        build_config(CleanConfig, {"disable": "typo"})


def test_disable_help_lists_every_filter_name() -> None:
    from lmforge.config import flat_fields
    from lmforge.data.prepare import DataConfig

    help_text = {key: comment for key, _, _, comment in flat_fields(DataConfig)}["clean.disable"]
    assert "[" not in help_text  # no JSON-looking example the option would not take
    assert help_text.split(": ", 1)[1].split(", ") == list(FILTERS)


def test_disable_takes_comma_separated_names_and_suggests_the_closest(capsys: pytest.CaptureFixture) -> None:
    from lmforge.cli import main

    assert CleanConfig(disable=["min_chars, alpha_words", "max_words"]).disable == ["min_chars", "alpha_words",
                                                                                    "max_words"]
    with pytest.raises(ConfigError) as error:
        build_config(CleanConfig, {"disable": ["min_chars", "alpha_word"]})
    message = str(error.value)
    assert "unknown filter 'alpha_word'" in message and message.endswith("did you mean alpha_words?)")
    assert all(name in message for name in FILTERS)
    assert main(["data", "prepare", "--sources", "kjv", "--out_dir", "x", "--clean.disable", "min_chars,alpha_words",
                 "--clean.disable", "typo"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "unknown filter 'typo'" in err  # the comma-separated names were taken

"""tiktoken pass-2 encoding (lmforge.data.fast_encode): the same ids as Tokenizer.encode, or a clean fallback."""

from __future__ import annotations

import json
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.corpora import iter_stdlib_docstrings
from lmforge.data.fast_encode import (SEPARATOR, UnsupportedTokenizer, byte_of_char, fast_encoder,
                                      regex_engines_disagree)
from lmforge.data.prepare import DataConfig, prepare_dataset
from lmforge.data.shards import read_meta
from lmforge.data.sources import SourceConfig
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

HARD_STRINGS = [
    "", " ", "  ", "   leading and trailing   ", "\n", "\r\n", "a\r\nb\rc\n\n", " \n \n  x", "x  \n", "x \t\n\t y",
    "\t\tindented\tcode()", "def f(x):\n    return x ** 2  # comment\n\n\n", "   \n\n   ", "a" + " " * 40 + "b",
    "123456789 3.14159 1e-10 ٣٤٥ ३४५ 一二三 ⅻ ½", "1234567", "don't won't it's I'LL we'VE they're 'ſ 'K 'S",
    "<|eos|> and <|bos|> and <|user|> written as text", "<|eos|>", "<|", "|>", "<|endoftext|>", "text<|pad|>",
    "中文测试，你好世界。", "日本語のテキスト", "한국어 텍스트", "Ελληνικά κείμενα", "العربية", "עברית",
    "emoji 🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷", "e\u0301 combining, precomposed é, \u0041\u030a \u00c5",
    "\x00\x01\x1b[31m\x7f control", "\ufeffbyte order mark", "\u200bzero\u200dwidth", "\U0010ffff\U000e0001",
    "\u00a0non-breaking\u2028line\u2029paragraph\u3000ideographic", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "x" * 3000, "!!!???...,,,;;;",
    "$1,000,000.00 € £ ¥ → ← ∑∫", "a\uffffb", SEPARATOR, "end with separator" + SEPARATOR,
]


def docstrings(n: int) -> list[str]:
    return [doc.text for doc in islice(iter_stdlib_docstrings(), n)]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x09, 0x0D), (0x20, 0x20), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF),
              (0x10000, 0x10FFFF)]
    return ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Merges on English, code, and the hard strings' scripts, whitespace runs and emoji bytes."""
    return Tokenizer.train(docstrings(600) + HARD_STRINGS * 3, vocab_size=700)


def expected_ids(tok: Tokenizer, texts: list[str]) -> list[int]:
    return [i for ids in tok.encode_batch(texts, add_eos=True) for i in ids]


def test_regex_engines_agree_and_every_token_is_kept(tok) -> None:
    assert regex_engines_disagree() == ""
    fast = fast_encoder(tok)
    assert len(fast.ranks) == tok.vocab_size - len(DEFAULT_SPECIAL_TOKENS)  # a trained vocabulary has V' = V


def test_same_ids_as_tokenizers(tok) -> None:
    fast = fast_encoder(tok)
    texts = HARD_STRINGS + docstrings(300) + random_texts(300)
    assert fast.encode_documents(texts).tolist() == expected_ids(tok, texts)
    clean = [t for t in texts if SEPARATOR not in t]  # one call for the whole batch
    assert fast.encode_documents(clean).tolist() == expected_ids(tok, clean)
    for text in HARD_STRINGS:
        assert fast.encode_documents([text]).tolist() == tok.encode(text) + [tok.eos_id], repr(text)
    assert fast.encode_documents([]).dtype == np.uint32 and fast.encode_documents([]).size == 0


def test_invalid_unicode_raises_the_tokenizers_error(tok) -> None:
    with pytest.raises(DataError, match="lone surrogate"):
        fast_encoder(tok).encode_documents(["fine", "bad \ud800 text"])


def byte_level_tokenizer(merges: list[tuple[str, str]], **pre_tokenizer) -> Tokenizer:
    """A Tokenizer with the byte alphabet after the special tokens, then `merges` in order, ids in merge order."""
    vocab = {token: i for i, token in enumerate(DEFAULT_SPECIAL_TOKENS.values())}
    for char in byte_of_char():
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizer.get("pre_tokenizer") or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS.values()))
    return Tokenizer(hf.to_str(), DEFAULT_SPECIAL_TOKENS)


def test_token_that_merges_cannot_reach_is_left_out() -> None:
    # "abc" is made by (ab, c), but in "abc" the earlier merge (b, c) wins: tokenizers gives [a, bc], never "abc".
    tok = byte_level_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")])
    naive_ranks = {bytes(byte_of_char()[c] for c in s): i for s, i in json.loads(tok._json)["model"]["vocab"].items()
                   if i >= len(DEFAULT_SPECIAL_TOKENS)}
    naive = tiktoken.Encoding("naive", pat_str=SPLIT_PATTERN, mergeable_ranks=naive_ranks, special_tokens={})
    assert naive.encode_ordinary("abc") != tok.encode("abc")  # tiktoken alone would differ here
    fast = fast_encoder(tok)
    assert b"abc" not in fast.ranks and len(fast.ranks) == 256 + 2
    texts = ["abc", "xabcx abc abcabc", "ab c bc abcc aabc"]
    assert fast.encode_documents(texts).tolist() == expected_ids(tok, texts)


def edited(tok: Tokenizer, edit) -> Tokenizer:
    """`tok` with its tokenizer.json changed by edit(spec)."""
    spec = json.loads(tok._json)
    edit(spec)
    return Tokenizer(json.dumps(spec), DEFAULT_SPECIAL_TOKENS)


def swap_ids(spec: dict) -> None:
    vocab = spec["model"]["vocab"]
    vocab["ab"], vocab["xy"] = vocab["xy"], vocab["ab"]  # merge order no longer follows id order


@pytest.mark.parametrize("edit, reason", [
    (lambda spec: spec.update(normalizer={"type": "Lowercase"}), "normalizer"),
    (lambda spec: spec["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+"), "SPLIT_PATTERN"),
    (lambda spec: spec["model"].update(ignore_merges=True), "ignore_merges"),
    (swap_ids, "do not increase"),
])
def test_unsupported_tokenizers_are_refused(edit, reason) -> None:
    tok = edited(byte_level_tokenizer([("a", "b"), ("x", "y")]), edit)
    with pytest.raises(UnsupportedTokenizer, match=reason):
        fast_encoder(tok)


def prepare(root: Path, out: str, **kwargs) -> Path:
    sources = [SourceConfig(str(root), name="fixture"), SourceConfig.from_str("stdlib-docstrings:max_documents=300")]
    return prepare_dataset(DataConfig(sources=sources, out_dir=str(root.parent / out), val_fraction=0.1,
                                      shard_tokens=4000, num_workers=2, **kwargs))


def test_prepare_output_identical_with_either_encoder(corpus_dir: Path) -> None:
    fast = prepare(corpus_dir, "ds_tiktoken", vocab_size=400, encoder="tiktoken")
    tokenizer_dir = str(fast / "tokenizer")
    slow = prepare(corpus_dir, "ds_tokenizers", tokenizer=tokenizer_dir, encoder="tokenizers")
    meta_fast, meta_slow = read_meta(fast), read_meta(slow)
    assert meta_fast["encoder"]["library"] == "tiktoken" and meta_slow["encoder"]["library"] == "tokenizers"
    assert meta_fast["splits"] == meta_slow["splits"] and meta_fast["sources"] == meta_slow["sources"]
    names = meta_fast["splits"]["train"]["shards"] + meta_fast["splits"]["val"]["shards"]
    assert len(names) > 2 and all((fast / n).read_bytes() == (slow / n).read_bytes() for n in names)


def test_prepare_falls_back_for_an_unsupported_tokenizer(corpus_dir: Path, tmp_path: Path) -> None:
    gpt2_style = byte_level_tokenizer([("t", "h"), ("th", "e")],
                                      pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    gpt2_style.save(tmp_path / "tok")
    sources = [SourceConfig(str(corpus_dir), name="fixture")]
    cfg = DataConfig(sources=sources, out_dir=str(tmp_path / "ds"), tokenizer=str(tmp_path / "tok"), num_workers=1)
    meta = read_meta(prepare_dataset(cfg))
    assert meta["encoder"]["library"] == "tokenizers" and "pre-tokenizer" in meta["encoder"]["why"]
    cfg.encoder, cfg.out_dir = "tiktoken", str(tmp_path / "ds2")
    with pytest.raises(ConfigError, match="data.encoder tiktoken: .*pre-tokenizer"):
        prepare_dataset(cfg)

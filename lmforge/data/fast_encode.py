r"""Pass-2 encoding of `lmforge data prepare` with tiktoken, giving exactly the ids of `Tokenizer.encode`.

Contract: for a tokenizer that `fast_encoder` accepts, `fast_encoder(tok).encode_documents(texts)` equals
`concat(tok.encode(t) + [tok.eos_id] for t in texts)` (special-token text such as "<|eos|>" inside a document is
plain text, as `Tokenizer.encode` does) for every list of valid strings; a text holding a lone surrogate raises
the same DataError. Anything else raises `UnsupportedTokenizer`, and the caller keeps Hugging Face `tokenizers`.

Why the ids agree. Both libraries split text with SPLIT_PATTERN (Oniguruma in `tokenizers`, fancy-regex in
tiktoken; `regex_engines_disagree` checks, once per process, that the two put every code point in the same classes
\p{L}, \p{N}, \s and case-insensitive contraction letters; the tests check whole splits on hard strings), map each
piece to its bytes (HF's ByteLevel characters are bytes one to one) and run BPE on each piece alone. Special-token
text is plain text in both (`encode_special_tokens` in HF; tiktoken knows no special token but SEPARATOR, below).
They differ in how BPE merges inside a piece s:

    HF(s): start from the bytes of s; repeatedly merge the adjacent pair (l, r) of lowest rank among the pairs
           listed in `merges` (the leftmost on ties) into the token that merge names.
    TT(s): [s] if s is in `ranks`; else start from the bytes and repeatedly merge the adjacent pair (x, y) whose
           concatenation x+y is in `ranks`, lowest rank first (the leftmost on ties).

`_vocab_ranks` requires token ids to increase along the merge list (each merge making a new token), so rank = id
orders both alike, and keeps in `ranks` the 256 bytes and V' = {t : HF(bytes(t)) == [t]}, the tokens HF can emit.

Theorem: TT(s) == HF(s) for every s. Lemma (locality): if a run on s leaves t as one part, the merges it made
inside t's span never touched text outside it (parts only grow), so HF on bytes(t) alone makes the same merges.
Proof: say TT's merge of (x, y) into t is proper if (x, y) is t's own merge. While TT has made only proper merges
its parts are HF's; HF's next merge makes a token in V' (lemma), which TT may merge at the same rank, so TT picks
that same pair if its pick is proper, and TT stops only when HF does. If TT's pick (x, y) -> t were improper, the
lemma applied to TT's run so far makes HF(bytes(t)) reach [x, y] and stop there ((x, y) is no merge): t would not be
in V'. The shortcut TT(s) = [s] for s in V' is HF's answer by the definition of V'. Tokens outside V' cannot be
emitted by HF and are left out (a vocabulary from `Tokenizer.train` had none in our checks; the tests build one
that has: merges (b,c), (a,b), (ab,c) make "abc", yet HF("abc") = [a, bc] while tiktoken with "abc" gives [abc]).

Speed: documents are joined with SEPARATOR, registered in tiktoken as a special token whose id is eos, so one
call encodes a whole batch: tiktoken runs its regex on each segment between separators on its own (the segment's
end is a text end for the lookahead), exactly as if each document were encoded alone, and emits eos between them.
A batch in which some document contains SEPARATOR is encoded document by document instead.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import tiktoken
from tokenizers import Regex, normalizers

from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer

SEPARATOR = "\uffff"  # a Unicode noncharacter: joins documents; any document holding it is encoded on its own
# (class of SPLIT_PATTERN, an Oniguruma pattern for the characters outside it); the last one holds the letters of
# '(?i:[sdmt]|ll|ve|re) with their case folds (a lookahead: negated case-insensitive classes differ among engines)
_PROBES = ((r"\p{L}", r"[^\p{L}]+"), (r"\p{N}", r"[^\p{N}]+"), (r"\s", r"[^\s]+"),
           (r"(?i:[sdmtlvre])", r"(?!(?i:[sdmtlvre]))[\s\S]"))


class UnsupportedTokenizer(ValueError):
    """The tokenizer is not a byte-level BPE that tiktoken can reproduce exactly; the message says why."""


def byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(shifted))
    return {c: b for b, c in chars.items()}


class FastEncoder:
    """tiktoken over a verified rank table (`fast_encoder` builds one); safe to share between threads."""

    def __init__(self, ranks: dict[bytes, int], tokenizer: Tokenizer) -> None:
        self.ranks = ranks
        self.eos_id = tokenizer.eos_id
        self._tokenizer = tokenizer  # raises its own DataError for text that is not valid Unicode
        self._encoding = tiktoken.Encoding("lmforge", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                           special_tokens={SEPARATOR: self.eos_id})

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Ids of each text followed by eos, concatenated: (sum of len(encode(t)) + 1,) uint32."""
        if not texts:
            return np.empty(0, dtype=np.uint32)
        joined = SEPARATOR.join(texts) + SEPARATOR
        try:
            if joined.count(SEPARATOR) == len(texts):  # no document holds the separator
                return self._encoding.encode_to_numpy(joined, allowed_special={SEPARATOR}, disallowed_special=())
            eos = np.array([self.eos_id], dtype=np.uint32)
            return np.concatenate([part for text in texts for part in (
                self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()), eos)])
        except UnicodeEncodeError:  # a lone surrogate: let the tokenizer raise its DataError naming the problem
            return np.array([i for ids in self._tokenizer.encode_batch(texts, add_eos=True) for i in ids],
                            dtype=np.uint32)


def fast_encoder(tokenizer: Tokenizer) -> FastEncoder:
    """A FastEncoder giving exactly `tokenizer`'s ids, or UnsupportedTokenizer saying why it cannot."""
    spec = json.loads(tokenizer._json)
    _check_pipeline(spec)
    disagreement = regex_engines_disagree()
    if disagreement:
        raise UnsupportedTokenizer(disagreement)
    ranks = _vocab_ranks(spec, tokenizer)
    return FastEncoder(ranks, tokenizer)


def _check_pipeline(spec: dict) -> None:
    """Accept only what Tokenizer.train writes: no normalizer, SPLIT_PATTERN + ByteLevel, plain BPE, special added
    tokens only, no truncation or padding."""
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise UnsupportedTokenizer(f"tokenizer.json: {what}")

    require(spec.get("normalizer") is None, "has a normalizer")
    require(spec.get("truncation") is None and spec.get("padding") is None, "truncates or pads")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    require(len(steps) == 2, "pre-tokenizer is not Split + ByteLevel")
    split, byte_level = steps
    require(split.get("type") == "Split" and split.get("pattern") == {"Regex": SPLIT_PATTERN}
            and split.get("behavior") == "Isolated" and not split.get("invert"),
            "pre-tokenizer split is not lmforge's SPLIT_PATTERN (isolated)")
    require(byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex"), "pre-tokenizer is not ByteLevel without prefix space and regex")
    model = spec.get("model") or {}
    require(model.get("type") == "BPE", f"model is {model.get('type')}, not BPE")
    require(model.get("dropout") is None and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
            and not model.get("ignore_merges"),
            "BPE has dropout, a subword prefix or suffix, byte fallback or ignore_merges")
    require(all(t.get("special") for t in spec.get("added_tokens", [])), "has non-special added tokens")


def _vocab_ranks(spec: dict, tokenizer: Tokenizer) -> dict[bytes, int]:
    """bytes -> id for the 256 byte tokens and every token HF can emit, after checking the merge order."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    special_ids = {t["id"] for t in spec.get("added_tokens", [])}
    if tokenizer.eos_id not in special_ids:
        raise UnsupportedTokenizer(f"eos ({tokenizer.special_tokens['eos']!r}) is an ordinary token, not a special one")
    to_byte = byte_of_char()
    missing = [c for c in to_byte if c not in vocab or vocab[c] in special_ids]
    if missing:
        raise UnsupportedTokenizer(f"the byte alphabet lacks {len(missing)} of 256 byte tokens")
    ranks = {bytes([to_byte[c]]): vocab[c] for c in to_byte}
    model = tokenizer._hf.model
    previous = -1
    for k, merge in enumerate(spec["model"]["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        token_id = vocab.get(token, -1)
        if not (max(vocab.get(left, token_id), vocab.get(right, token_id), previous) < token_id):
            raise UnsupportedTokenizer(f"merge {k} ({left!r}, {right!r}): token ids do not increase along the "
                                       "merge list, so tiktoken's rank order would differ")
        previous = token_id
        if token_id in special_ids:  # HF could emit this special id for plain text; tiktoken would not
            raise UnsupportedTokenizer(f"merge {k} ({left!r}, {right!r}) makes the special token {token!r}")
        if any(c not in to_byte for c in token):
            continue  # not made of byte tokens, so HF never forms it from text
        if [t.id for t in model.tokenize(token)] == [token_id]:  # the token is in V' (see the module docstring)
            ranks[bytes(to_byte[c] for c in token)] = token_id
    return ranks


@functools.lru_cache(maxsize=1)
def regex_engines_disagree() -> str:
    """'' if Oniguruma (tokenizers) and fancy-regex (tiktoken) put every Unicode scalar value in the same classes
    of SPLIT_PATTERN, else which class differs (e.g. after a Unicode-version bump of one of them). About a
    second, once per process."""
    scalars = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")
    every_char = scalars.tobytes().decode("utf-32-le")
    byte_ranks = {bytes([b]): b for b in range(256)}
    for char_class, others in _PROBES:
        probe = tiktoken.Encoding("probe", pat_str=char_class, mergeable_ranks=byte_ranks, special_tokens={})
        in_tiktoken = probe.decode_bytes(probe.encode_ordinary(every_char))  # tiktoken drops unmatched text
        in_tokenizers = normalizers.Replace(Regex(others), "").normalize_str(every_char).encode("utf-8")
        if in_tiktoken != in_tokenizers:
            return f"the regex engines of tiktoken and tokenizers disagree on the characters of {char_class}"
    try:
        tiktoken.Encoding("probe", pat_str=SPLIT_PATTERN, mergeable_ranks=byte_ranks, special_tokens={})
    except ValueError as exc:
        return f"tiktoken cannot compile SPLIT_PATTERN: {exc}"
    return ""

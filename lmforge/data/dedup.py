"""Exact and near-duplicate removal, streaming: the first copy of a document is kept, later copies are dropped.

`Fingerprinter(cfg)(text)` is pure per document (worker processes run it); `Deduplicator.check(fingerprint)`
holds the state and runs in one process, in stream order.

- Exact: documents whose normalized text is equal (lowercased, punctuation removed, whitespace runs collapsed to
  one space) are duplicates; a 16-byte BLAKE2b digest of the normalized text is kept per document.
- Near: MinHash signatures (`num_perm` permutations) of the set of word shingles (`shingle_size` consecutive words
  of the normalized text; a document shorter than that is one shingle) are indexed in a MinHash LSH. A document is
  a near duplicate when the LSH pairs it with an earlier kept document whose estimated Jaccard similarity (share
  of equal MinHash values) reaches `threshold`; the check drops the LSH's false candidates, common among short
  texts such as dictionary glosses that share a long phrase. Kept signatures stay in memory (4 * num_perm bytes
  per document, plus the LSH index: one list entry per band).
  Changing one word of a 100-word paragraph leaves ~90% of its 5-word shingles intact, so it is caught at 0.8.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass
class DedupConfig:
    """exact / near switch each method; threshold, num_perm, shingle_size (words) and seed tune near dedup."""

    exact: bool = True  # drop documents whose normalized text was seen before
    near: bool = True  # drop near duplicates (MinHash LSH)
    threshold: float = 0.8  # estimated Jaccard similarity at which two documents are near duplicates
    num_perm: int = 128  # MinHash permutations (more = more accurate, slower)
    shingle_size: int = 5  # words per shingle for near dedup
    seed: int = 1  # MinHash seed

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.shingle_size < 1 or self.num_perm < 16:
            raise ValueError(f"shingle_size must be >= 1 and num_perm >= 16, got {self.shingle_size}, "
                             f"{self.num_perm}")


_NOT_WORD = re.compile(r"[^\w\s]")
_SCHEME = "affine32"  # datasketch's default permutation scheme since 2.0
# datasketch is imported inside the functions that use it: it pulls in scipy (~1.5 s), which `--help` and the
# tokenizing worker processes should not pay for.


class Fingerprint(NamedTuple):
    """What dedup needs of a document: the exact-match digest and the MinHash values (None if near is off)."""

    digest: bytes
    minhash: np.ndarray | None


def normalize_for_dedup(text: str) -> str:
    """Lowercase, strip punctuation and symbols, collapse whitespace."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def shingles(normalized: str, size: int) -> set[bytes]:
    """The set of `size`-word shingles of normalized text (the whole text if it is shorter)."""
    words = normalized.split()
    if len(words) <= size:
        return {normalized.encode("utf-8")}
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, elementwise on uint32 (wrapping): datasketch's pre-mix of hash values."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


class Fingerprinter:
    """Computes `Fingerprint`s; pure per document, so worker processes run it in parallel.

    The MinHash values are datasketch's (`MinHash(num_perm, seed, scheme="affine32").update_batch(shingles)`: the
    SHA-1-based 32-bit hash of each shingle, MurmurHash3's finalizer, then per permutation (a, b) the minimum of
    a * h + b mod 2^32), computed for a whole batch of documents at once: one (shingles x num_perm) array and a
    minimum per document, instead of a MinHash update per document, whose fixed cost (~80 us) exceeded the
    hashing of a short gloss. The tests check the values against datasketch's.
    """

    BLOCK = 8192  # shingles per (shingles x num_perm) array: 4 MiB at 128 permutations

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self._permutations = None
        if cfg.near:
            from datasketch import MinHash
            from datasketch.hashfunc import sha1_hash32

            self._hash = sha1_hash32
            self._permutations = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME).permutations

    def __call__(self, text: str) -> Fingerprint:
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[Fingerprint]:
        """The fingerprint of each text, in order."""
        normalized = [normalize_for_dedup(text) for text in texts]
        digests = [hashlib.blake2b(n.encode("utf-8"), digest_size=16).digest() for n in normalized]
        if self._permutations is None:
            return [Fingerprint(digest, None) for digest in digests]
        hashes = [[self._hash(s) for s in shingles(n, self.cfg.shingle_size)] for n in normalized]
        signatures: list[np.ndarray] = []
        start = 0
        while start < len(hashes):  # blocks of whole documents, at most BLOCK shingles unless one is longer
            end, size = start + 1, len(hashes[start])
            while end < len(hashes) and size + len(hashes[end]) <= self.BLOCK:
                size += len(hashes[end])
                end += 1
            signatures.extend(self._minhashes(hashes[start:end]))
            start = end
        return [Fingerprint(digest, signature) for digest, signature in zip(digests, signatures)]

    def _minhashes(self, hashes: list[list[int]]) -> np.ndarray:
        """(documents, num_perm) uint32: per document, the minimum over its shingles of each permutation."""
        a, b = self._permutations
        lengths = [len(h) for h in hashes]
        mixed = _fmix32(np.fromiter((v for h in hashes for v in h), dtype=np.uint32, count=sum(lengths)))
        if len(hashes) == 1 and lengths[0] > self.BLOCK:  # one long document: its minimum over row blocks
            return np.minimum.reduce([(mixed[i:i + self.BLOCK, None] * a + b).min(axis=0)
                                      for i in range(0, lengths[0], self.BLOCK)])[None]
        offsets = np.cumsum([0] + lengths[:-1])
        return np.minimum.reduceat(mixed[:, None] * a + b, offsets, axis=0)


class Deduplicator:
    """Stateful filter over fingerprints in stream order: `check` returns 'exact', 'near' or None (kept).

    A kept document is remembered, so later copies of it are removed; `removed` counts removals per method.

    The LSH index is banded like datasketch's MinHashLSH, with the bands and rows it picks for the threshold and
    num_perm (b bands of r MinHash values, chosen to minimise false positives plus false negatives): a document is
    a candidate when one of its bands equals an earlier kept document's. The index is a dict per band, keyed by
    the hash of the band's bytes; a colliding hash only adds a candidate, which the similarity check then judges.
    datasketch's own index costs ~100 us per document in Python (a byteswap and a storage call per band), and it
    ran in the one process that every document passes through: it was the slowest step of `data prepare`.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self._digests: set[bytes] = set()
        self._signatures: list[np.ndarray] = []  # MinHash values of kept documents, by index
        self._tables: list[dict[int, list[int]]] = []  # per band: hash of the band's values -> kept documents
        if cfg.near:
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
            self._bands, self._rows = lsh.b, lsh.r
            self._tables = [{} for _ in range(self._bands)]
        self.removed = {"exact": 0, "near": 0}

    def check(self, fp: Fingerprint) -> str | None:
        if self.cfg.exact:
            if fp.digest in self._digests:
                self.removed["exact"] += 1
                return "exact"
            self._digests.add(fp.digest)
        if self._tables and fp.minhash is not None:
            signature = fp.minhash
            values = signature[:self._bands * self._rows].tobytes()
            width = len(values) // self._bands
            keys = [hash(values[i:i + width]) for i in range(0, len(values), width)]
            checked: set[int] = set()
            for table, key in zip(self._tables, keys):
                for doc in table.get(key, ()):
                    if doc not in checked:
                        checked.add(doc)
                        if np.mean(self._signatures[doc] == signature) >= self.cfg.threshold:
                            self.removed["near"] += 1
                            return "near"
            doc = len(self._signatures)
            for table, key in zip(self._tables, keys):
                table.setdefault(key, []).append(doc)
            self._signatures.append(signature)
        return None

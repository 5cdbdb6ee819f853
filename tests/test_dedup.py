"""Exact and MinHash near-duplicate removal of lmforge.data.dedup."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.data.dedup import DedupConfig, Deduplicator, Fingerprinter, normalize_for_dedup, shingles

WORDS = ("river stone light garden window morning music letter forest quiet winter market paper silver "
         "mountain yellow station kitchen summer painter harbor evening bridge candle meadow village "
         "teacher orchard thunder basket lantern feather island pocket marble ribbon saddle tunnel").split()


def paragraph(seed: int, n: int = 100) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(n)]


def run(texts: list[str], cfg: DedupConfig | None = None) -> list[str | None]:
    cfg = cfg or DedupConfig()
    dedup, fingerprint = Deduplicator(cfg), Fingerprinter(cfg)
    return [dedup.check(fingerprint(t)) for t in texts]


def test_normalize_for_dedup() -> None:
    assert normalize_for_dedup("  Hello,\tWORLD!  It's   me. ") == "hello world it s me"


def test_exact_duplicates_after_normalization() -> None:
    assert run(["Hello, world! A fine day.", "hello world a fine day", "Hello world, a fine night."]) == \
        [None, "exact", None]


def test_near_duplicate_with_one_word_changed_is_removed() -> None:
    base = paragraph(0)
    changed = list(base)
    changed[50] = "zebra"
    other = paragraph(1)
    assert run([" ".join(base), " ".join(changed), " ".join(other)]) == [None, "near", None]


def test_distinct_paragraphs_are_kept() -> None:
    texts = [" ".join(paragraph(seed)) for seed in range(20)]
    assert run(texts) == [None] * 20


def test_switches_and_counts() -> None:
    base = " ".join(paragraph(0))
    changed = base.replace(base.split()[10], "zebra", 1)
    assert run([base, base, changed], DedupConfig(exact=False, near=False)) == [None, None, None]
    assert run([base, base, changed], DedupConfig(near=False)) == [None, "exact", None]
    dedup, fingerprint = Deduplicator(DedupConfig()), Fingerprinter(DedupConfig())
    for text in (base, base, changed):
        dedup.check(fingerprint(text))
    assert dedup.removed == {"exact": 1, "near": 1}


def test_short_documents_are_one_shingle() -> None:
    # Two short glosses that differ by one word share no shingle, so both stay.
    assert run(["a member of the genus Canis", "a member of the genus Felis"]) == [None, None]


def test_lsh_candidates_below_threshold_are_kept() -> None:
    # The LSH pairs these glosses (they share 7 of 11 distinct 5-word shingles: Jaccard 0.64), the check keeps both.
    assert run(["matrimonial law (noun): that branch of jurisprudence that studies the laws governing matrimony",
                "patent law (noun): that branch of jurisprudence that studies the laws governing patents"]) == \
        [None, None]


def datasketch_decisions(texts: list[str], cfg: DedupConfig) -> list[bool]:
    """Near-duplicate decisions through datasketch's own MinHashLSH index (the reference for lmforge's index):
    a document is a near duplicate when a candidate the LSH returns reaches the threshold."""
    from datasketch import LeanMinHash, MinHashLSH

    fingerprint, lsh, kept, decisions = Fingerprinter(cfg), MinHashLSH(cfg.threshold, cfg.num_perm), [], []
    for text in texts:
        values = fingerprint(text).minhash
        signature = LeanMinHash(seed=cfg.seed, hashvalues=values, scheme="affine32")
        near = any(np.mean(kept[key] == values) >= cfg.threshold for key in lsh.query(signature))
        decisions.append(near)
        if not near:
            lsh.insert(len(kept), signature)
            kept.append(values)
    return decisions


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_near_decisions_equal_datasketch_minhash_lsh(threshold) -> None:
    # 20 paragraphs, each followed by copies with 0-12 of its 100 words changed: Jaccard similarities from 1 to
    # ~0.3, on both sides of each threshold
    rng = random.Random(threshold)
    texts = []
    for seed in range(20):
        texts.append(" ".join(paragraph(seed)))
        for changes in rng.sample([0, 1, 2, 3, 6, 12], 3):
            words = paragraph(seed)
            for position in rng.sample(range(len(words)), changes):
                words[position] = rng.choice(["zebra", "quartz", "vellum", "obsidian"])
            texts.append(" ".join(words))
    cfg = DedupConfig(exact=False, threshold=threshold)
    ours = [decision == "near" for decision in run(texts, cfg)]
    assert ours == datasketch_decisions(texts, cfg)
    assert 5 < sum(ours) < 55  # copies kept and copies dropped


@pytest.mark.parametrize("block", [8192, 7])  # 7: documents spread over several blocks, long ones over row blocks
def test_batched_minhash_values_equal_datasketch(block, monkeypatch) -> None:
    from datasketch import MinHash

    monkeypatch.setattr(Fingerprinter, "BLOCK", block)
    rng = random.Random(0)
    texts = ["", "one", "a member of the genus Canis", " ".join(paragraph(3, 40))]
    texts += [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 30))) for _ in range(40)]
    cfg = DedupConfig(num_perm=64, seed=7)
    fingerprints = Fingerprinter(cfg).batch(texts)
    for text, fp in zip(texts, fingerprints):
        reference = MinHash(num_perm=64, seed=7, scheme="affine32")
        reference.update_batch(list(shingles(normalize_for_dedup(text), cfg.shingle_size)))
        assert fp.minhash.dtype == np.uint32 and np.array_equal(fp.minhash, reference.hashvalues), text
    assert [fp.digest for fp in fingerprints] == [Fingerprinter(cfg)(text).digest for text in texts]

"""Per-source sampling weights, GPT-3 style: a source of weight w is seen w times per pass over the dataset.

Rule: each kept training document of a source with weight w is written floor(w) times, plus once more with
probability w - floor(w), drawn from a random generator seeded by (seed, source name). The sampler draws once for
every document read from the source (before cleaning, dedup and the train/val split); the draw is used only for
kept training documents. So weight 2.0 doubles a source, 0.5 keeps about half of its documents, 0 drops it, and a
document's draw depends only on the seed, the source name and its position in the source (not on other sources,
on the cleaning and dedup settings, on val_fraction or on the number of worker processes).

Copies are spread over passes: copy k of every document goes into pass k, and the passes are written one after
another, so a repeated document is never next to its own copy. A source's effective epochs = copies written /
documents kept, reported per source in meta.json. Validation documents are never repeated or subsampled: the
mixture shapes what the model trains on, while validation measures the natural (cleaned, deduplicated) data.
"""

from __future__ import annotations

import hashlib
import math
import random


def hash_fraction(text: str, fraction: float) -> bool:
    """True for a stable pseudo-random `fraction` of texts: blake2b-64(text) < fraction * 2**64.

    The one hash split rule of lmforge (validation split of `data prepare`, held-out set of `lmforge tokenizer`):
    it depends only on the text, never on order, seeds or mixtures."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


class SourceSampler:
    """Draws how many copies of each successive document of one source to write."""

    def __init__(self, weight: float, seed: int, source_name: str) -> None:
        if weight < 0:
            raise ValueError(f"source '{source_name}': weight must be >= 0, got {weight}")
        self.whole = math.floor(weight)
        self.fraction = weight - self.whole
        # A str seed is hashed with SHA-512 by `random`, so it is stable across runs and Python processes.
        self._rng = random.Random(f"{seed}:{source_name}")

    def copies(self) -> int:
        """floor(w) + Bernoulli(w - floor(w)); the draw is made for every document so streams stay aligned."""
        return self.whole + (self._rng.random() < self.fraction)


def effective_epochs(copies_written: int, documents_kept: int) -> float:
    """How many times, on average, each kept document of a source appears in the training split."""
    return copies_written / documents_kept if documents_kept else 0.0

"""Per-source sampling weights, GPT-3 style: a source of weight w is seen w times per pass over the dataset.

Rule: each kept training document of a source with weight w is written floor(w) times, plus once more with
probability w - floor(w), drawn from a random generator seeded by (seed, source name). So weight 2.0 doubles a
source, 0.5 keeps about half of its documents, 0 drops it, and the outcome depends only on the seed, the source
name and the order of the source's documents (not on other sources or on the number of worker processes).

Copies are spread over passes: copy k of every document goes into pass k, and the passes are written one after
another, so a repeated document is never next to its own copy. A source's effective epochs = copies written /
documents kept, reported per source in meta.json. Validation documents are never repeated or subsampled: the
mixture shapes what the model trains on, while validation measures the natural (cleaned, deduplicated) data.
"""

from __future__ import annotations

import math
import random


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

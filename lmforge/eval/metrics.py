"""Metrics of the harness: exact match, chrF and BLEU (sacrebleu), multiple-choice acc and acc_norm.

Scales follow each metric's usual convention: exact match and accuracies are fractions in [0, 1]; chrF and BLEU
are sacrebleu's 0-100 scores.
"""

from __future__ import annotations

import re
from typing import Sequence

_TRAILING_PUNCTUATION = ".,;:!?"


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace runs -> one space, strip, then drop trailing punctuation (.,;:!?) and strip again:
    'The Dog. ' -> 'the dog', '  42 ' -> '42'."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.rstrip(_TRAILING_PUNCTUATION).strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized accepted answer, else 0.0."""
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


def _reference_streams(answers: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's reference layout: stream i holds every item's i-th reference (None where an item has fewer)."""
    depth = max((len(a) for a in answers), default=1)
    return [[a[i] if i < len(a) else None for a in answers] for i in range(depth)]


def chrf(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """sacrebleu.corpus_chrf (chrF2: character 6-grams, beta 2) of the predictions against every accepted
    answer as a reference (sacrebleu takes the best-matching reference of each item), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(answers)).score)


def bleu(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """sacrebleu.corpus_bleu (4-gram BLEU, 13a tokenization, brevity penalty) with the same references, 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(answers)).score)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_scores(loglikelihoods: Sequence[float], choices: Sequence[str], label: int) -> tuple[float, float]:
    """(acc, acc_norm) of one multiple-choice item, as lm-evaluation-harness defines them:

        acc      = [argmax_i ll_i == label]
        acc_norm = [argmax_i ll_i / len(choice_i) == label]

    ll_i is the summed log-probability of choice i's continuation tokens given the context, and len(choice_i)
    its length in characters, without the ' ' that joins it to the context (lm_eval's completion_len)."""
    normalized = [ll / max(len(choice), 1) for ll, choice in zip(loglikelihoods, choices)]
    return float(_argmax(loglikelihoods) == label), float(_argmax(normalized) == label)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0

"""What a task is: its examples, its spec, the registry of built-in tasks, and the one split rule.

Split rule: an item goes to train, validation or test by `split_of(key)`, a stable hash of the key that decided it
(a synset, a word group, a sentence pair, an arithmetic problem): blake2b-64(key) / 2**64 below 0.8 is train,
below 0.9 validation, else test. It depends on the key alone, so it is the same on every run and machine and no
key is ever in two splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from lmforge.data.mixture import hash_fraction

SPLITS = ("train", "validation", "test")
TRAIN_UPTO, VALIDATION_UPTO = 0.8, 0.9  # hash in [0, 0.8): train, [0.8, 0.9): validation, else test
EVAL_SPLIT_CAP = 500  # validation and test keep at most this many examples per task (a stable sample)
NLI_LABELS = ("entailment", "neutral", "contradiction")


def stable_hash(key: str) -> float:
    """blake2b-64 of the UTF-8 key as a number in [0, 1): the same on every run, machine and Python version
    (the hash of lmforge.data.mixture.hash_fraction; used here to order and sample items stably)."""
    digest = hashlib.blake2b(key.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(key: str) -> str:
    """'train' (80%), 'validation' (10%) or 'test' (10%) for a source key, by lmforge's one hash split rule
    (lmforge.data.mixture.hash_fraction); see the module docstring."""
    if hash_fraction(key, TRAIN_UPTO):
        return "train"
    return "validation" if hash_fraction(key, VALIDATION_UPTO) else "test"


@dataclass
class TaskExample:
    """One evaluation or training item.

    prompt: the user-facing question or instruction. answers: accepted answers, the reference first (for a
    choice task: the gold choice). choices: the candidate continuations of a choice task (else empty). label: the
    gold index into choices (-1 for generation). source: the key whose split_of decided this example's split.
    """

    id: str
    prompt: str
    answers: list[str]
    choices: list[str] = field(default_factory=list)
    label: int = -1
    source: str = ""
    task: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """A task's name, kind ('generate', 'choice' or 'preference'), primary metric and one-line description.

    A preference task's examples hold `choices` ranked best first (label 0): the chosen and the rejected
    response of a pair. Its metric is the preference accuracy: how often the model (its log-likelihood, its
    implicit reward against a reference, or a reward model's score) ranks the chosen response above the rejected.
    """

    name: str
    kind: Literal["generate", "choice", "preference"]
    metric: Literal["exact_match", "chrf", "accuracy"]
    description: str


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("define", "generate", "chrf", "WordNet: a word (and its part of speech) -> the definition of its most "
             "common sense"),
    TaskSpec("name_word", "generate", "exact_match", "WordNet: a definition -> a word for it (any lemma of the "
             "synset)"),
    TaskSpec("synonym", "generate", "exact_match", "WordNet: a word in a given sense -> another word of the same "
             "synset"),
    TaskSpec("antonym", "generate", "exact_match", "WordNet: a word -> its opposite (any of its antonyms)"),
    TaskSpec("hypernym", "generate", "exact_match", "WordNet: 'a dog is a kind of ...' -> a word for a direct "
             "hypernym"),
    TaskSpec("translate", "generate", "chrf", "FreeDict: an English phrase or sentence -> German (BLEU also "
             "reported)"),
    TaskSpec("arithmetic", "generate", "exact_match", "generated: a + b, a - b (2-4 digits), a * b (2-3 by 1-2 "
             "digits) -> the number"),
    TaskSpec("nli", "choice", "accuracy", "WordNet: premise/hypothesis -> entailment, neutral or contradiction "
             "(hypernym chains, adjective satellites, antonyms)"),
    TaskSpec("mc_define", "choice", "accuracy", "WordNet: a definition and four words (distractors from sibling "
             "synsets) -> the right word"),
    TaskSpec("define_pref", "preference", "accuracy", "WordNet: a word -> its definition (chosen) vs the definition "
             "of a sibling synset (rejected)"),
    TaskSpec("translate_pref", "preference", "accuracy", "FreeDict: an English phrase -> its German (chosen) vs the "
             "German of another phrase (rejected)"),
    TaskSpec("arithmetic_pref", "preference", "accuracy", "generated: a problem -> the exact result (chosen) vs a "
             "near miss (rejected)"),
)}
INSTRUCTION_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind != "preference")  # the SFT mixture
PREFERENCE_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind == "preference")

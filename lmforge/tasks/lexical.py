"""WordNet tasks: define, name_word, synonym, antonym, hypernym, mc_define, nli.

Each builder returns rows `{id, vars, answers, choices, label, source}`: `vars` fill the task's prompt templates
(lmforge.tasks.templates) and `source` is the key whose split_of decides the row's split.

What decides the split (so that no fact asked in test is taught in train, in either direction):
- define, name_word, synonym, hypernym, mc_define: the synset (`n:02084071`), or for the few synsets that share
  their definition with another, the first of them (WordNet.unit), so a definition is never in two splits. A
  word is asked about only through its most common sense (define, hypernym) or with the sense spelled out
  (synonym), so the same question never appears under two synsets; all questions about one synset (its
  definition, its words) share its split.
- antonym and the nli contradictions: the group of words linked by antonymy (`antonym:cold`), so 'hot -> cold'
  and 'cold -> hot' are always in the same split.
- nli entailment/neutral: the lower synset of the pair (the hyponym, or the adjective satellite), the same key
  as its hypernym question, so 'a dog is a kind of canine' and 'This is a dog. / This is a canine.' stay together.
- mc_define distractors are drawn only from synsets of the same split, so no train item shows a test word at all.
"""

from __future__ import annotations

import random
import re
from typing import Any

from lmforge.tasks.spec import NLI_LABELS, split_of, stable_hash
from lmforge.tasks.wordnet import POS_NAMES, WordNet, antonym_pairs, is_clean_word, root_depth, word_groups

Row = dict[str, Any]
_WORD = re.compile(r"[a-z0-9']+")
MIN_NLI_DEPTH = 4  # an nli hypernym at most this close to the root ('entity', 'object') is too vague to use


def article(word: str) -> str:
    """'an' before a vowel letter, else 'a' (spelling rule; 'an hour' and 'a unicorn' come out wrong)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _row(row_id: str, source: str, answers: list[str], choices: list[str] | None = None, label: int = -1,
         **prompt_vars: str) -> Row:
    return {"id": row_id, "vars": prompt_vars, "answers": answers, "choices": choices or [], "label": label,
            "source": source}


def _mentions(text: str, words: list[str]) -> bool:
    """True if any of `words` occurs in `text` as a whole word or phrase (case-insensitive): the definition gives
    the answer away."""
    padded = " " + " ".join(_WORD.findall(text.lower())) + " "
    return any(f" {' '.join(_WORD.findall(w.lower()))} " in padded for w in words)


def define_rows(wn: WordNet) -> list[Row]:
    """Every clean lemma whose most common sense is this synset -> the synset's definition."""
    rows = []
    for key, synset in wn.synsets.items():
        for lemma in synset.lemmas:
            if is_clean_word(lemma) and wn.first_sense(lemma, synset.pos) == key and synset.definition:
                rows.append(_row(f"define:{synset.pos}:{lemma}", wn.unit(key), [synset.definition], word=lemma,
                                 pos=POS_NAMES[synset.pos]))
    return rows


def name_word_rows(wn: WordNet) -> list[Row]:
    """A definition -> any lemma of the synsets that have it (the first clean one is the reference); skipped
    when the definition contains one of the lemmas."""
    rows: dict[str, Row] = {}
    for key, synset in wn.synsets.items():
        head = wn.head(key)
        if head is None or not synset.definition or _mentions(synset.definition, synset.lemmas):
            continue
        unit = wn.unit(key)
        if unit in rows:  # another synset with the same definition: its words are right answers too
            rows[unit]["answers"] += [lemma for lemma in synset.lemmas if lemma not in rows[unit]["answers"]]
            continue
        answers = [head] + [lemma for lemma in synset.lemmas if lemma != head]
        rows[unit] = _row(f"name_word:{key}", unit, answers, definition=synset.definition, pos=POS_NAMES[synset.pos])
    return list(rows.values())


def synonym_rows(wn: WordNet) -> list[Row]:
    """A synset's first clean lemma, with the sense given by the definition -> any other lemma of the synset."""
    rows = []
    for key, synset in wn.synsets.items():
        head = wn.head(key)
        others = [lemma for lemma in synset.lemmas if head and lemma.lower() != head.lower()]
        if head is None or not others or not synset.definition:
            continue
        rows.append(_row(f"synonym:{key}", wn.unit(key), others, word=head, definition=synset.definition))
    return rows


def antonym_groups(wn: WordNet) -> tuple[list[tuple[str, str, str, str]], dict[str, str]]:
    """The antonym pairs and each word's split key `antonym:{smallest word of its antonymy group}`."""
    pairs = antonym_pairs(wn)
    groups = word_groups([(word, antonym) for word, _, antonym, _ in pairs])
    return pairs, {word: f"antonym:{root}" for word, root in groups.items()}


def antonym_rows(wn: WordNet) -> list[Row]:
    """A word -> any of its antonyms over all its senses, in WordNet's order."""
    pairs, keys = antonym_groups(wn)
    answers: dict[str, list[str]] = {}
    for word, _, antonym, _ in pairs:
        found = answers.setdefault(word, [])
        if antonym not in found:
            found.append(antonym)
    return [_row(f"antonym:{word}", keys[word], found, word=word) for word, found in answers.items()]


def hypernym_rows(wn: WordNet) -> list[Row]:
    """'A dog is a kind of ...' for nouns asked through their most common sense -> a lemma of a direct hypernym."""
    rows = []
    for key, synset in wn.synsets.items():
        word = wn.head_of_first_sense(key) if synset.pos == "n" and synset.hypernyms else None
        if word is None:
            continue
        answers = []
        for parent in synset.hypernyms:
            head = wn.head(parent)
            lemmas = wn.synsets[parent].lemmas
            answers += [head] if head else []
            answers += [lemma for lemma in lemmas if lemma != head]
        answers = [a for a in dict.fromkeys(answers) if a.lower() != word]
        if answers:
            rows.append(_row(f"hypernym:{key}", wn.unit(key), answers, word=word, a=article(word)))
    return rows


def mc_define_rows(wn: WordNet, n_choices: int = 4) -> list[Row]:
    """A noun or verb definition and `n_choices` words: the synset's first clean lemma and distractors from
    sibling synsets (sharing a hypernym), else from the same lexicographer file, always of the same split and
    never a synset with the same definition (one row per definition)."""
    heads = {key: wn.head(key) for key in wn.synsets}
    split = {key: split_of(wn.unit(key)) for key in wn.synsets}
    pools: dict[tuple[str, int, str], list[str]] = {}
    for key, synset in wn.synsets.items():
        if heads[key] and synset.pos in "nv":
            pools.setdefault((synset.pos, synset.lex_file, split[key]), []).append(key)
    rows: dict[str, Row] = {}
    for key, synset in wn.synsets.items():
        gold = heads[key]
        if synset.pos not in "nv" or gold is None or not synset.definition or wn.unit(key) in rows or \
                _mentions(synset.definition, synset.lemmas):
            continue
        rng = random.Random(f"mc_define:{key}")
        siblings = [c for parent in synset.hypernyms for c in wn.children.get(parent, []) if c != key]
        siblings = sorted(set(siblings), key=lambda c: stable_hash(f"{key}>{c}"))
        pool = pools[(synset.pos, synset.lex_file, split[key])]
        fallback = rng.sample(pool, min(len(pool), 4 * n_choices))
        own = {lemma.lower() for lemma in synset.lemmas}
        choices = [gold]
        for other in siblings + fallback:
            word = heads[other]
            if (split[other] == split[key] and word and word.lower() not in own and word not in choices
                    and wn.unit(other) != wn.unit(key)  # the same definition: a second right answer
                    and gold.lower() not in {lemma.lower() for lemma in wn.synsets[other].lemmas}):
                choices.append(word)
            if len(choices) == n_choices:
                break
        if len(choices) < n_choices:
            continue
        rng.shuffle(choices)
        rows[wn.unit(key)] = _row(f"mc_define:{key}", wn.unit(key), [gold], choices, choices.index(gold),
                                  definition=synset.definition,
                                  options=", ".join(choices[:-1]) + f" or {choices[-1]}")
    return list(rows.values())


def _nli_row(row_id: str, source: str, family: str, premise: str, hypothesis: str, label: str) -> Row:
    row = _row(row_id, source, [label], list(NLI_LABELS), NLI_LABELS.index(label), premise=premise,
               hypothesis=hypothesis)
    row["family"] = family
    return row


def nli_rows(wn: WordNet) -> list[Row]:
    """The nli task: `nli_candidates`, then per split and sentence family the same number of every label."""
    return balance_labels(nli_candidates(wn))


def nli_candidates(wn: WordNet) -> list[Row]:
    """Premise/hypothesis pairs (rows with a 'family' field) in two sentence families, each with all three labels
    from the same relations:

    nouns ('This is a dog.'): hyponym -> hypernym 1-3 steps up = entailment, the reverse = neutral, antonyms
    ('a winner' / 'a loser') = contradiction; adjectives ('It is torrid.'): satellite -> its head = entailment,
    the reverse = neutral, antonyms ('hot' / 'cold') = contradiction. Whether a hypernym pair is asked upwards or
    downwards is decided by a stable hash of the synset. Hypernyms within MIN_NLI_DEPTH of the root are skipped.
    """
    depth: dict[str, int] = {}
    rows = []
    for key, synset in wn.synsets.items():
        word = wn.head_of_first_sense(key)
        if word is None:
            continue
        if synset.pos == "n" and synset.hypernyms:
            ancestor = key
            for _ in range(1 + int(stable_hash(f"nli-depth:{key}") * 3)):
                ancestor = wn.synsets[ancestor].hypernyms[0] if wn.synsets[ancestor].hypernyms else ancestor
            if ancestor not in depth:
                depth[ancestor] = root_depth(wn, ancestor)
            upper = wn.head(ancestor)
            if upper is None or depth[ancestor] < MIN_NLI_DEPTH or upper == word:
                continue
            lower_sentence, upper_sentence = f"This is {article(word)} {word}.", f"This is {article(upper)} {upper}."
            family = "noun"
        elif synset.pos == "a" and synset.satellite and synset.similar:
            upper = wn.head(synset.similar[0])
            if upper is None or upper == word:
                continue
            lower_sentence, upper_sentence = f"It is {word}.", f"It is {upper}."
            family = "adjective"
        else:
            continue
        if stable_hash(f"nli-direction:{key}") < 0.5:
            rows.append(_nli_row(f"nli:{key}:up", wn.unit(key), family, lower_sentence, upper_sentence,
                                 "entailment"))
        else:
            rows.append(_nli_row(f"nli:{key}:down", wn.unit(key), family, upper_sentence, lower_sentence,
                                 "neutral"))
    pairs, keys = antonym_groups(wn)
    for word, word_key, antonym, _ in pairs:
        pos = word_key[0]
        if pos not in "na":
            continue
        premise = f"This is {article(word)} {word}." if pos == "n" else f"It is {word}."
        hypothesis = f"This is {article(antonym)} {antonym}." if pos == "n" else f"It is {antonym}."
        rows.append(_nli_row(f"nli:{word}:not:{antonym}", keys[word], "noun" if pos == "n" else "adjective",
                             premise, hypothesis, "contradiction"))
    return list({row["id"]: row for row in rows}.values())


def balance_labels(rows: list[Row]) -> list[Row]:
    """Per (split, family), keep the same number of examples of each label (as many as the rarest label has):
    those with the smallest stable hash of their id. The 'family' field is dropped; rows come sorted by id."""
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((split_of(row["source"]), row["family"], row["label"]), []).append(row)
    kept = []
    for split in {s for s, _, _ in groups}:
        for family in {f for s, f, _ in groups if s == split}:
            counts = [len(groups.get((split, family, label), [])) for label in range(len(NLI_LABELS))]
            for label in range(len(NLI_LABELS)):
                members = sorted(groups.get((split, family, label), []), key=lambda r: stable_hash(r["id"]))
                kept += members[:min(counts)]
    return sorted(({k: v for k, v in row.items() if k != "family"} for row in kept), key=lambda r: r["id"])


def define_pref_rows(wn: WordNet) -> list[Row]:
    """Preference pairs of the define task: for a word's most common sense, its definition (chosen) against the
    definition of a sibling synset (rejected: a synset sharing a hypernym, of the same split, with another
    definition; the first by a stable hash). Words whose synset has no such sibling are left out."""
    rows = []
    for key, synset in wn.synsets.items():
        if not synset.definition:
            continue
        split = split_of(wn.unit(key))
        siblings = sorted({c for parent in synset.hypernyms for c in wn.children.get(parent, []) if c != key},
                          key=lambda c: stable_hash(f"{key}>{c}"))
        rejected = next((wn.synsets[c].definition for c in siblings
                         if wn.synsets[c].definition and wn.unit(c) != wn.unit(key)
                         and wn.synsets[c].definition != synset.definition and split_of(wn.unit(c)) == split), None)
        if rejected is None:
            continue
        for lemma in synset.lemmas:
            if is_clean_word(lemma) and wn.first_sense(lemma, synset.pos) == key:
                rows.append(_row(f"define_pref:{synset.pos}:{lemma}", wn.unit(key), [synset.definition],
                                 [synset.definition, rejected], 0, word=lemma, pos=POS_NAMES[synset.pos]))
    return rows

"""Prompt templates of the built-in tasks. The first template of each task is the canonical prompt (evaluation,
export); the SFT mixture also uses the others, so a model does not learn one phrasing only."""

from __future__ import annotations

from lmforge.tasks.spec import stable_hash

TEMPLATES: dict[str, tuple[str, ...]] = {
    "define": ("What does the {pos} '{word}' mean?",
               "Define the {pos} '{word}'.",
               "Give a short definition of the {pos} '{word}'."),
    "name_word": ("Which {pos} means \"{definition}\"?",
                  "Name the {pos} defined as: {definition}.",
                  "What {pos} fits this definition: {definition}?"),
    "synonym": ("Give a synonym of '{word}' in the sense \"{definition}\".",
                "What is another word for '{word}' when it means \"{definition}\"?",
                "Name a word with the same meaning as '{word}' ({definition})."),
    "antonym": ("What is the opposite of '{word}'?",
                "Give an antonym of '{word}'.",
                "Name a word that means the opposite of '{word}'."),
    "hypernym": ("Complete the sentence: {a} {word} is a kind of ...",
                 "What is {a} {word} a kind of?",
                 "{a} {word} is a type of what? Answer with one word or phrase."),
    "translate": ("Translate into German: {english}",
                  "How do you say this in German? {english}",
                  "Translate from English to German: {english}"),
    "arithmetic": ("What is {a} {op} {b}?",
                   "Compute {a} {op} {b}.",
                   "Calculate {a} {op} {b} and give only the number."),
    "nli": ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? "
            "Answer entailment, neutral or contradiction.",
            "Given that \"{premise}\", is \"{hypothesis}\" an entailment, a contradiction, or neutral?",
            "Sentence A: {premise}\nSentence B: {hypothesis}\nWhat is the relation of B to A: entailment, "
            "neutral or contradiction?"),
    "mc_define": ("Which word means \"{definition}\": {options}?",
                  "\"{definition}\": which of these words is it? {options}",
                  "Pick the word for this definition: {definition}. Options: {options}."),
}
for _name in ("define", "translate", "arithmetic"):  # a preference set asks its task's questions
    TEMPLATES[f"{_name}_pref"] = TEMPLATES[_name]


def render(task: str, prompt_vars: dict[str, str], variant: int = 0) -> str:
    """The task's template number `variant` (modulo their count) filled with `prompt_vars`; a leading article
    is capitalized where it starts the prompt."""
    templates = TEMPLATES[task]
    text = templates[variant % len(templates)].format(**prompt_vars)
    return text[:1].upper() + text[1:]


def variant_for(example_id: str, seed: int) -> int:
    """A stable template choice for an example: the canonical one half of the time, else one of the others."""
    h = stable_hash(f"{seed}:{example_id}")
    return 0 if h < 0.5 else 1 + int((h - 0.5) * 2 * 2)

"""A prompt-injection detector: hand-written patterns for the common attacks, and optionally a small classifier
trained with lmforge's task heads (`lmforge finetune BASE --task classify --data.train builtin`, whose built-in
data is lmforge.tasks.injection).

    score = max(1.0 if any pattern matches else 0.0, P(injection) of the classifier)     flagged: score >= threshold

Patterns run on the text after NFKC normalisation, with zero-width characters removed and runs of spaces and tabs
collapsed (case is ignored); then on three variants, so simple obfuscations do not hide an attack: letter-spaced
words joined ("i g n o r e" -> "ignore"), digits read as letters ("1gn0re" -> "ignore"), and the text reversed.
Every base64 run that decodes to readable text is scanned the same way, and a long one is itself a reason.

Only a text's first and last SCAN_CHARS characters are scanned (`head_and_tail`; an attack in the middle of a
longer text is missed), and no pattern can match a stretch of text in more than a few ways (runs are possessive, and
no two quantifiers next to each other take the same characters), so the time to scan a text grows linearly with its
length up to that cap, whatever the text holds: about 0.1 s at most for 16,000 characters.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lmforge.errors import ConfigError

# A separator is a run of anything but word characters and sentence ends; a word starts with a word character and
# runs on over the apostrophes and dashes in or after it ("don't", "so-called", "users'"). Both take ' and -, so each
# run is possessive (taken whole, never given back): a text then splits into separators and words one way only and
# a pattern cannot try the exponentially many splits of a run like "'-'-'-" (in which "ignore " + "'-" * 14 took
# seconds, each further "'-" tripling the time).
_SEP = r"[^\w.!?\n]++"
_W = r"\w[\w'-]*+"
_JOINED = r"(?:\w++['-]++)+?"  # the start of a word up to a ' or - inside it: "pre-" before "existing"


def _gap(n: int) -> str:
    """Up to `n` words between two parts of a pattern, within a sentence; the second part may also begin inside
    the last word, after a ' or - ("ignore all pre-existing instructions")."""
    return rf"(?:{_SEP}{_W}){{0,{n - 1}}}?{_SEP}(?:{_W}{_SEP}|{_JOINED})??"


_OVERRIDE_VERB = (r"(?:ignore|disregard|forget|discard|skip|override|overrule|bypass|abandon|drop|neglect|"
                  r"set\s+aside|throw\s+(?:out|away)|pay\s+no\s+attention\s+to|(?:do\s+not|don'?t|never)\s+"
                  r"(?:follow|obey|heed|listen\s+to)|stop\s+following|no\s+longer\s+follow)")
_PRIOR = (r"(?:previous|prior|preceding|above|earlier|former|original|initial|old|foregoing|existing|system|"
          r"developer|all|any|every|your|these|those)")
_INSTRUCTIONS = (r"(?:instructions?|prompts?|directions?|directives?|rules?|guidelines?|orders?|commands?|context|"
                 r"messages?|constraints?|restrictions?|polic(?:y|ies)|programming|guardrails?|safeguards?|filters?|"
                 r"training|guidance|(?:were|was|have\s+been)\s+(?:told|given|instructed|taught))")
_SECRET = (r"(?:system\s+(?:prompt|message|instructions?)|pre-?prompt|initial\s+(?:prompt|instructions?)|hidden\s+"
           r"(?:prompt|instructions?|rules|text|message)|secret\s+(?:prompt|instructions?|rules)|original\s+"
           r"(?:prompt|instructions?)|confidential\s+(?:instructions?|notes|prompt)|developer\s+(?:message|prompt|"
           r"instructions?))")
_LEAK_VERB = (r"(?:reveal|print|show|display|output|repeat|recite|dump|leak|expose|share|disclose|paste|quote|copy|"
              r"spell\s+out|write\s+out|tell\s+me|give\s+me|list|summari[sz]e|translate|what\s+(?:is|are|was|were))")
_RULES = (r"(?:rules|restrictions|limits|limitations|filters?|filtering|guidelines|polic(?:y|ies)|ethics|morals|"
          r"boundaries|censorship|constraints|safety\s+\w+|content\s+\w+)")
_TOKEN_MODE = r"(?:developer|dev|debug|admin|maintenance|root)\s+mode"
_OFF_LIMITS = (r"(?:restrictions|filters?|filtering|censorship|safety\s+\w+|content\s+\w+|ethical\s+\w+|moral\s+\w+|"
               r"guardrails)")  # what "without ..." drops in an attack; "without rules" alone is too common

PATTERNS: tuple[tuple[str, str], ...] = (
    # override the instructions the model was given
    ("override", rf"\b{_OVERRIDE_VERB}\b{_gap(5)}{_PRIOR}\b(?:{_gap(3)}|\s+){_INSTRUCTIONS}\b"),
    ("override", rf"\b{_OVERRIDE_VERB}\s+(?:everything|all|whatever)\s+(?:you\s+)?(?:were|was|have\s+been|'ve\s+been)"
                 rf"\s+(?:told|given|instructed|taught)"),
    ("override", rf"\b{_OVERRIDE_VERB}\b{_gap(3)}{_INSTRUCTIONS}\s+(?:above|before|so\s+far|earlier|previously|"
                 rf"you\s+(?:were|have\s+been|'ve\s+been)\s+(?:given|told))\b"),
    ("override", rf"\b{_OVERRIDE_VERB}\b{_gap(2)}user'?s?\s+(?:request|question|instructions?|message|prompt)\b"),
    ("override", rf"\b(?:told|instructed|given|said)\b[^.!?\n]{{0,40}}?\b{_OVERRIDE_VERB}\s+(?:it|them|that|those|"
                 rf"this)\b"),
    ("override", r"\b(?:instructions?|rules|directions?|guidelines|directives|orders|prompt|polic(?:y|ies)|filters?|"
                 r"context|told)"
                 r"\b[^.!?\n]{0,40}?\b(?:are|is|were|have\s+been|has\s+been)\s+(?:now\s+|hereby\s+)?(?:cancel+ed|void|"
                 r"revoked|obsolete|invalid|null|lifted|disabled|suspended|removed|turned\s+off|deactivated|no\s+"
                 r"longer\s+(?:valid|apply|applicable|in\s+effect)|(?:just\s+|only\s+)?a\s+test)\b"),
    ("new instructions", r"\b(?:new|updated|real|actual|true|revised)\s+(?:task|instructions?|directives?|orders?|"
                         r"objective|system\s+prompt)\s*(?:(?:is|are)\s*)?:"),
    # reveal the system prompt or hidden instructions
    ("prompt leak", rf"\b{_LEAK_VERB}\b{_gap(6)}(?:your|the|its)\s+(?:\w+\s+){{0,2}}?{_SECRET}"),
    ("prompt leak", rf"\b(?:your|ur)\s+(?:\w+\s+){{0,2}}?{_SECRET}"),
    ("prompt leak", rf"\b(?:reveal|print|show|display|output|repeat|recite|dump|leak|expose|disclose|paste|quote|"
                    rf"copy|spell\s+out|write\s+out)\b{_gap(6)}(?:your|ur)\s+(?:\w+\s+){{0,2}}?(?:prompt|"
                    rf"instructions|rules|guidelines|directives|configuration|programming)\b"),
    ("prompt leak", r"\b(?:what|which)\s+(?:instructions|rules|directions|guidelines|prompt|directives)\s+(?:were|was|"
                    r"have|had)\s+you\s+(?:been\s+)?(?:given|told|programmed|instructed)\b|\btold\s+you\s+not\s+to\s+"
                    r"(?:tell|say|reveal|share|mention|disclose)\b"),
    ("verbatim dump", r"\b(?:repeat|print|output|copy|write|reproduce|recite|return|echo|dump)\s+(?:\w+\s+){0,3}?"
                      r"(?:text|words|everything|all|prompt|instructions|lines|message|content|contents)\s+(?:\w+\s+)?"
                      r"(?:above|before\s+this|preceding)\b"),
    ("verbatim dump", r"\b(?:print|output|repeat|copy|write)\s+everything\s+(?:above|before)\b"),
    ("verbatim dump", rf"(?s)^(?=.*\b(?:verbatim|word\s+for\s+word|word-for-word|character\s+(?:for|by)\s+character|"
                      rf"letter\s+by\s+letter|unchanged|in\s+full|leaving\s+nothing\s+out|include\s+everything)\b)"
                      rf"(?=.*(?:{_SECRET}|\b(?:your\s+(?:prompt|instructions|rules)|(?:words|text|everything)\s+"
                      rf"above)\b))"),
    # a new identity for the model
    ("you are now", r"\byou\s+are\s+now\s+(?:an?\s+|the\s+|called\s+|named\s+|going\s+to\s+|in\s+\w+\s+mode|"
                    r"free\b|unrestricted|unfiltered|uncensored|jailbroken|no\s+longer|[a-z]*(?:gpt|bot|dan|ai)\b)"),
    ("you are now", r"\b(?:unfiltered|uncensored|unrestricted|jailbroken|amoral|unethical)\s+(?:\w+\s+)?(?:ai|"
                    r"assistant|model|chatbot|bot|version|gpt|llm)\b"),
    ("you are now", r"\bfrom\s+now\s+on,?\s+you\s+(?:are|will\s+(?:be|act|behave|play|become)|must\s+(?:act|be)|"
                    r"shall\s+be)\b"),
    ("you are now", r"\byou\s+(?:will|shall|must)\s+(?:now\s+)?(?:be|become|act\s+as|pretend\s+to\s+be|play|"
                    r"role-?play\s+as)\b[^.!?\n]{0,40}?\bfrom\s+now\s+on\b"),
    ("you are now", r"\byour\s+new\s+(?:name|identity|persona|role|purpose|instructions?|rules)\s+(?:is|are)\b"),
    ("jailbreak mode", r"\b(?:dan|jailbreak|jailbroken|god|unrestricted|unfiltered|uncensored|evil|chaos|sudo)\s+"
                       r"mode\b"),
    ("jailbreak mode", rf"\b(?:you|yourself)\b[^.!?\n]{{0,30}}\b{_TOKEN_MODE}\b|\b{_TOKEN_MODE}\b[^.!?\n]{{0,20}}"
                       r"\byou\b|\b" + _TOKEN_MODE + r"\s+(?:enabled|activated|output|response)\b"),
    ("jailbreak mode", r"\bdo\s+anything\s+now\b|\bjailbr(?:eak|oken)\b[^.!?\n]{0,20}\b(?:ai|assistant|model|"
                       r"chatbot|gpt|yourself|you)\b"),
    ("no rules", rf"\b(?:has|have|had|with|having)\s+no\s+(?:\w+\s+)?{_RULES}\b"),
    ("no rules", rf"\b(?:free\s+(?:from|of)|not\s+bound\s+by|unbound\s+by|broke(?:n)?\s+free\s+(?:of|from))\s*"
                 rf"(?:all\s+|any\s+|every\s+|its\s+|your\s+|the\s+)?{_RULES}\b"),
    ("no rules", rf"\bwithout\s+(?:any\s+|all\s+|your\s+|the\s+)?{_OFF_LIMITS}\b"),
    ("no rules", r"\bfreed?\s+(?:from|of)\b[^.!?\n]{0,40}\b(?:confines|restrictions|limitations|shackles|chains|"
                 r"programming)\b|\b(?:do\s+not|don't|doesn't|does\s+not|no\s+longer)\s+(?:have|need)\s+to\s+"
                 r"(?:abide\s+by|follow|obey|comply\s+with)\b"),
    ("no rules", rf"\b(?:ignores?|bypass(?:es)?|disables?|(?:do(?:es)?\s+not|doesn't|don't|never)\s+follows?)\s+"
                 rf"(?:all\s+|every\s+|any\s+|its\s+|your\s+|the\s+)?(?:\w+\s+)?{_RULES}\b"),
    ("no rules", r"\bnever\s+(?:refuses?|says?\s+no)\b|\b(?:will|must|shall|should|won't|can't|cannot)\s+"
                 r"(?:not\s+|never\s+)?refuse\s+(?:any|a)\b"),
    # role-play to get round the rules
    ("role-play bypass", rf"\b(?:pretend|imagine|act\s+as\s+if|role-?play|let'?s\s+play\s+a\s+game|hypothetically|"
                         rf"fictional|suppose)\b[^\n]{{0,120}}?\b(?:ignore|bypass|break|without|no)\s+"
                         rf"(?:\w+\s+){{0,2}}?{_RULES}\b"),
    ("role-play bypass", r"\b(?:pretend|act\s+as|role-?play|play|be)\b[^.!?\n]{0,30}\b(?:late|deceased|dead)\s+"
                         r"grand(?:mother|ma|father|pa)\b"),
    # fake chat delimiters
    ("fake delimiter", r"<\|[a-z_]{2,24}\|>|<</?sys>>|\[/?(?:inst|sys)\]|</?(?:system|sys|admin|developer)>"),
    ("fake delimiter", r"(?:^|\n)[ \t]*#{2,}[ \t]*(?:system|assistant|instructions?|admin|developer)\b"),
    ("fake delimiter", r"\[\s*(?:system|admin|developer)\b[^\]\n]{0,30}\]"),
    ("fake delimiter", r"(?:^|\n)[ \t]*(?:system|admin|developer)(?:\s+(?:message|prompt|note))?[ \t]*:[ \t]*"
                       r"(?:you\b|the\s+(?:user|assistant|ai|model)\b|new\b|ignore|disregard|override|from\s+now|"
                       r"all\b|your\b)"),
    ("fake delimiter", r"\b(?:end|begin|start)\s+(?:of\s+)?(?:the\s+)?(?:user|system|admin)\s+(?:input|message|"
                       r"prompt|instructions?|turn|session)\b"),
    ("fake delimiter", r"<!--[^<>]*\b(?:ai|assistant|llm|model|chatbot|gpt)\b"),
    # false authority and exfiltration
    ("false authority", r"\b(?:note|message|instructions?|attention|notice|memo)\s+(?:to|for)\s+(?:the\s+|any\s+|"
                        r"all\s+)?(?:ai|assistant|ai\s+assistant|language\s+model|llm|chatbot|model|bot|gpt)s?\b"),
    ("false authority", r"\battention\s*(?:,\s*)?(?:ai|assistant|language\s+model|llm|chatbot)\b|\b(?:message|notice|"
                        r"update)\s+from\s+(?:the\s+|your\s+)?(?:developers?|system|admin(?:istrator)?s?|creators?|"
                        r"openai|anthropic)\b"),
    ("false authority", r"\b(?:authori[sz]ed|official|emergency|admin(?:istrator)?|security|system)\s+override\b|"
                        r"\boverride\s+(?:code|command|protocol)\b"),
    ("false authority", r"\bas\s+your\s+(?:administrator|admin|developer|creator|owner|operator|programmer|"
                        r"supervisor|master)\b"),
    ("false authority", r"\b(?:highest|top|maximum|absolute|overriding)\s+priority\b[^.!?\n]{0,40}\b(?:supersedes?|"
                        r"overrides?|replaces?|above\s+all)\b|\bsupersedes?\s+(?:all|any|every)\b"),
    ("false authority", r"\bpolicy\s+update\b[^.!?\n]{0,40}\b(?:assistants?|ai|models?|you)\s+(?:must|should|are\s+"
                        r"(?:now\s+)?(?:allowed|required|permitted))\b"),
    ("pwned", r"\b(?:i\s+have|i've)\s+been\s+(?:pwned|hacked|compromised)\b|\bpwned\b"),
    ("exfiltration", r"\b(?:send|forward|email|post|upload|exfiltrate|transmit|leak)\s+(?:\w+\s+){0,3}?"
                     r"(?:conversation|chat|history|credentials|passwords?|secrets?|api\s+keys?|system\s+prompt)\s+"
                     r"(?:\w+\s+){0,2}?to\s+(?:\S+@\S+|https?://)"),
    # encoded payloads
    ("encoded payload", r"\b(?:decode|decipher|decrypt|reverse|read\s+(?:this|it)\s+backwards?|unscramble)\b"
                        r"[^\n]{0,80}?\b(?:follow|obey|execute|do\s+(?:exactly\s+)?what\s+it\s+says|carry\s+(?:it\s+)?"
                        r"out|comply|run\s+it|act\s+on)\b"),
    ("encoded payload", r"\b(?:execute|run|follow|obey|carry\s+out)\s+(?:\w+\s+){0,3}?(?:encoded|base64|hidden|"
                        r"reversed|obfuscated)\b|\b(?:encoded|base64|reversed|backwards)\b[^\n]{0,60}?\b(?:follow|"
                        r"obey|execute|carry\s+(?:it\s+)?out|do\s+what\s+it\s+says)\b"),
)
# The patterns are lower case and run on lower-cased text: the same matches as re.IGNORECASE, twice as fast.
COMPILED = tuple((name, re.compile(pattern)) for name, pattern in PATTERNS)
_IGNORECASE_I = {0x130: "i", 0x131: "i"}  # İ and ı: re.IGNORECASE takes them for i, str.lower() does not

_ZERO_WIDTH = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad]")
_SPACED = re.compile(r"\b(?:\w[ .*_-]){2,}\w\b")  # "i g n o r e", "i.g.n.o.r.e" (words apart by 2+ spaces)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_TOKEN = re.compile(r"[\w@$]+")
_LEET_CHAR = re.compile(r"[013457@$]")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
LONG_BASE64_CHARS = 200  # a readable base64 run at least this long is itself a reason to flag
SCAN_CHARS = 8_000  # patterns see a longer text's first and last this many characters: bounded time per text


@dataclass
class Detection:
    """The verdict on one text. score: max(pattern hit 1.0, classifier P(injection)), 0 when nothing ran;
    flagged: score >= threshold (and, from Guardrails, the mode is not off); blocked: flagged in block mode;
    reasons: what matched, e.g. "pattern override: 'ignore all previous instructions'", "classifier 0.93"."""

    score: float = 0.0
    flagged: bool = False
    blocked: bool = False
    reasons: list[str] = field(default_factory=list)


def _clean(text: str) -> str:
    """NFKC, zero-width characters removed, typographic quotes as ASCII."""
    text = _ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))
    return text.replace("\u2018", "'").replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')


def _collapse(text: str) -> str:
    """Runs of spaces and tabs as one space."""
    return re.sub(r"[^\S\n]+", " ", text)


def normalise(text: str) -> str:
    """NFKC, zero-width characters removed, typographic quotes as ASCII, runs of spaces and tabs as one space."""
    return _collapse(_clean(text))


def head_and_tail(text: str) -> str:
    """`text` when it holds at most 2 * SCAN_CHARS characters, else its first and last SCAN_CHARS joined by a
    newline (so no word or sentence runs across the cut)."""
    return text if len(text) <= 2 * SCAN_CHARS else f"{text[:SCAN_CHARS]}\n{text[-SCAN_CHARS:]}"


def _decoded_base64(text: str) -> list[tuple[int, str]]:
    """(run length, decoded text) of each base64 run of `text` that decodes to readable text (90% printable
    ASCII or more)."""
    found = []
    for run in _BASE64.findall(text):
        blob = run.replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if raw and sum(32 <= b < 127 or b in (9, 10, 13) for b in raw) >= 0.9 * len(raw):
            found.append((len(run), raw.decode("ascii", "replace")))
    return found


def _unleet(match: re.Match) -> str:
    """A word that mixes letters with digits or @/$ read as letters ("1gn0re" -> "ignore"); others unchanged."""
    word = match.group()
    mixed = any(c.isalpha() for c in word) and any(c in "013457@$" for c in word)
    return word.translate(_LEET) if mixed else word


def pattern_reasons(text: str) -> list[str]:
    """The patterns that match `text` or its variants (see the module docstring), as "pattern NAME: 'snippet'",
    one per pattern name, in PATTERNS order. Only `head_and_tail(text)` is scanned: an attack in the middle of a
    text over 2 * SCAN_CHARS characters long is not seen, and the time per text is bounded."""
    # Cut before NFKC to bound its work, and again after it: NFKC can turn one character into up to 18.
    cleaned = head_and_tail(_clean(head_and_tail(text)))
    base = _collapse(cleaned)
    despaced = _collapse(_SPACED.sub(lambda m: re.sub(r"[ .*_-]", "", m.group()), cleaned))
    decoded = _decoded_base64(base)
    leet = _TOKEN.sub(_unleet, base) if _LEET_CHAR.search(base) else base
    variants = [("", base), ("", despaced), ("", leet), ("reversed ", base[::-1])]
    if decoded:  # all runs in one variant (fewer searches); ".\n" ends each run's sentence and line
        variants.append(("base64 ", ".\n".join(normalise(plain) for _, plain in decoded)))
    reasons: dict[str, str] = {}
    for prefix, variant in dict.fromkeys(variants):  # most texts have no obfuscation: their variants repeat
        lowered = variant.translate(_IGNORECASE_I).lower()  # as long as `variant`: spans match
        for name, pattern in COMPILED:
            if f"{prefix}{name}" in reasons:
                continue
            match = pattern.search(lowered)
            if match:
                snippet = " ".join(variant[match.start():match.end()].split())[:60]
                reasons[f"{prefix}{name}"] = f"pattern {prefix}{name}: {snippet!r}" if snippet else \
                    f"pattern {prefix}{name}"
    if any(length >= LONG_BASE64_CHARS for length, _ in decoded):
        reasons["long base64"] = f"a base64 run of {LONG_BASE64_CHARS}+ characters that decodes to text"
    return list(reasons.values())


class HeadClassifier:
    """P(injection) from a task-head model dir written by `lmforge finetune --task classify` whose labels include
    "injection"; texts longer than the model's context keep their end (as in training)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from lmforge.device import resolve_device
        from lmforge.model.heads import load_task_head, read_head_config
        from lmforge.stages.finetune import Transform
        from lmforge.tokenizer import model_dir_tokenizer

        config = read_head_config(model_dir) if Path(model_dir).is_dir() else None
        if config is None or config.get("kind") != "classify" or "injection" not in config.get("labels", []):
            raise ConfigError(f"injection classifier {model_dir}: expected a model dir written by lmforge finetune "
                              f"--task classify with an 'injection' label (got {config})")
        tokenizer = model_dir_tokenizer(model_dir)
        if tokenizer is None:
            raise ConfigError(f"injection classifier {model_dir}: no tokenizer files (tokenizer.json)")
        self.device = resolve_device(device, "injection.device")
        self.model = load_task_head(model_dir).to(self.device)
        self.transform = Transform(tokenizer, "classify", self.model.config.block_size)
        self.injection = self.model.labels.index("injection")

    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        """P(injection) of each text, a softmax over the head's classes."""
        import torch

        from lmforge.stages.finetune import Item

        found: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                items = [Item([text], 0) for text in texts[start:start + batch_size]]
                batch = self.transform.collate(items, self.device)
                logits, _ = self.model(batch["input_ids"], batch["extract"], None, 1)
                found += torch.softmax(logits.float(), dim=-1)[:, self.injection].tolist()
        return found


class InjectionDetector:
    """Patterns (when `patterns`) and a task-head classifier (when `classifier_dir`); see the module docstring."""

    def __init__(self, patterns: bool = True, classifier_dir: Optional[str | Path] = None, threshold: float = 0.5,
                 device: str = "cpu") -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"injection threshold={threshold}: expected a number in (0, 1]")
        self.patterns, self.threshold = patterns, threshold
        self.classifier: Optional[Any] = HeadClassifier(classifier_dir, device) if classifier_dir else None

    def score(self, text: str) -> Detection:
        """The detection for one text."""
        return self.score_many([text])[0]

    def score_many(self, texts: Sequence[str]) -> list[Detection]:
        """The detection for each text (the classifier runs in batches)."""
        probabilities = self.classifier.probabilities(texts) if self.classifier and texts else [None] * len(texts)
        detections = []
        for text, probability in zip(texts, probabilities):
            reasons = pattern_reasons(text) if self.patterns else []
            score = 1.0 if reasons else 0.0
            if probability is not None:
                score = max(score, probability)
                if probability >= self.threshold:
                    reasons.append(f"classifier {probability:.2f}")
            detections.append(Detection(score=score, flagged=score >= self.threshold, reasons=reasons))
        return detections

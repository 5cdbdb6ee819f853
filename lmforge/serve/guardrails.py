"""The server's guardrails: output validators with a re-ask or a constrained regeneration, and a prompt-injection
check on the input. One YAML, JSON or TOML file configures them (`load_guardrails`):

    validators:
      - json_schema: {type: object, required: [answer]}  # the output is one JSON document valid under the schema
      - regex: "[A-Z][\\s\\S]*"     # re.fullmatch: the WHOLE output must match ('.' does not match a newline)
      - max_chars: 400              # at most this many characters
      - banned: ["password", "as an AI"]  # phrases matched case-insensitively as whole words, any spacing
    on_fail: reask      # reask | constrain | refuse | flag
    max_reasks: 2       # reask: ask again at most this often; constrain: regenerate at most this often
    then: refuse        # after the last re-ask or regeneration still fails: refuse | flag
    refusal: "Sorry, I cannot give an answer that meets this server's rules."
    injection:
      mode: block       # off | flag | block
      patterns: true    # lmforge.serve.injection's pattern list
      classifier: runs/injection/final   # optional: a model dir from lmforge finetune --task classify
      threshold: 0.5
      device: cpu

A failing output: reask sends the conversation back with the bad answer and a user turn naming the problems
(`reask_messages`); constrain regenerates under the grammar of the json_schema validator (else the regex one),
`grammar()`, which enforces that validator while decoding; the others are checked again afterwards. refuse replaces
the answer with `refusal`; flag returns it, marked. `next_action(regenerations_done)` says which applies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import ConfigError
from lmforge.serve.injection import Detection, InjectionDetector

VALIDATORS = ("json_schema", "regex", "max_chars", "banned")
ON_FAIL = ("reask", "constrain", "refuse", "flag")
THEN = ("refuse", "flag")
MODES = ("off", "flag", "block")
TOP_KEYS = ("validators", "on_fail", "max_reasks", "then", "refusal", "injection")
INJECTION_KEYS = ("mode", "patterns", "classifier", "threshold", "device")
DEFAULT_REFUSAL = "Sorry, I cannot give an answer that meets this server's rules."
SHOWN_SCHEMA_ERRORS = 3  # a re-ask names at most this many schema violations


@dataclass
class InjectionSettings:
    mode: str = "off"  # off | flag | block
    patterns: bool = True
    classifier: str = ""  # a task-head model dir, or empty
    threshold: float = 0.5
    device: str = "cpu"


@dataclass
class Guardrails:
    """Output validators and the input's injection check; build with `load_guardrails` or `from_dict`."""

    json_schema: Optional[dict[str, Any]] = None
    regex: Optional[str] = None
    max_chars: Optional[int] = None
    banned: list[str] = field(default_factory=list)
    on_fail: str = "reask"
    max_reasks: int = 2
    then: str = "refuse"
    refusal: str = DEFAULT_REFUSAL
    injection: InjectionSettings = field(default_factory=InjectionSettings)
    source: str = "guardrails"  # the file named in error messages

    def __post_init__(self) -> None:
        self._compiled = re.compile(self.regex) if self.regex is not None else None
        self._banned = [re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)",
                                   re.IGNORECASE) for phrase in self.banned]
        self._schema_validator = None
        if self.json_schema is not None:
            import jsonschema

            self._schema_validator = jsonschema.validators.validator_for(self.json_schema)(self.json_schema)
        self.detector: Optional[InjectionDetector] = None
        if self.injection.mode != "off":
            self.detector = InjectionDetector(self.injection.patterns, self.injection.classifier or None,
                                              self.injection.threshold, self.injection.device)

    @classmethod
    def from_dict(cls, data: Any, source: str = "guardrails") -> "Guardrails":
        """Guardrails from a parsed config; every error is a ConfigError naming `source` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}")
        _known(data, TOP_KEYS, source, "")
        found: dict[str, Any] = {"banned": []}
        validators = data.get("validators", [])
        if not isinstance(validators, list):
            raise ConfigError(f"{source}: validators: expected a list of one-key mappings ({', '.join(VALIDATORS)})")
        for i, entry in enumerate(validators):
            key = f"validators[{i}]"
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"{source}: {key}: expected a mapping with one key, one of {', '.join(VALIDATORS)}")
            (kind, value), = entry.items()
            if kind not in VALIDATORS:
                raise ConfigError(f"{source}: {key}: unknown validator {kind!r} (known: {', '.join(VALIDATORS)})")
            if kind in found and kind != "banned":
                raise ConfigError(f"{source}: {key}.{kind}: given twice; combine them into one")
            if kind == "banned":
                found["banned"] += _phrases(value, source, f"{key}.banned")
            else:
                found[kind] = {"json_schema": _schema, "regex": _regex, "max_chars": _max_chars}[kind](
                    value, source, f"{key}.{kind}")
        found["on_fail"] = _choice(data.get("on_fail", "reask"), ON_FAIL, source, "on_fail")
        found["then"] = _choice(data.get("then", "refuse"), THEN, source, "then")
        max_reasks = data.get("max_reasks", 2)
        if isinstance(max_reasks, bool) or not isinstance(max_reasks, int) or max_reasks < 0:
            raise ConfigError(f"{source}: max_reasks: expected an integer >= 0, got {max_reasks!r}")
        found["max_reasks"] = max_reasks
        refusal = data.get("refusal", DEFAULT_REFUSAL)
        if not isinstance(refusal, str):
            raise ConfigError(f"{source}: refusal: expected a string, got {type(refusal).__name__}")
        found["refusal"] = refusal
        if found["on_fail"] == "constrain":
            _check_constrainable(found, source)
        found["injection"] = _injection(data.get("injection", {}), source)
        try:
            return cls(**found, source=source)
        except ConfigError as exc:  # the classifier dir or its device: name the file it came from
            raise ConfigError(f"{source}: {exc}") from None

    # ---- output ------------------------------------------------------------------------------------------------

    def check_output(self, text: str) -> list[str]:
        """The problems of an answer, one readable line each (empty when it passes every validator)."""
        problems = []
        if self._schema_validator is not None:
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
            else:
                errors = sorted(self._schema_validator.iter_errors(document), key=lambda e: list(e.absolute_path))
                problems += [f"the JSON does not follow the schema: {error.message} (at {error.json_path})"
                             for error in errors[:SHOWN_SCHEMA_ERRORS]]
        if self._compiled is not None and self._compiled.fullmatch(text) is None:
            problems.append(f"the whole answer must match the regular expression {self.regex!r}, and it does not")
        if self.max_chars is not None and len(text) > self.max_chars:
            problems.append(f"it is {len(text)} characters long; at most {self.max_chars} are allowed")
        problems += [f"it contains the banned phrase {phrase!r}" for phrase, pattern in zip(self.banned, self._banned)
                     if pattern.search(text)]
        return problems

    def reask_messages(self, messages: list[dict[str, Any]], output: str, problems: list[str]) -> list[dict[str, Any]]:
        """A new conversation: `messages` (copied), the failed answer as an assistant turn, and a user turn saying
        what was wrong and asking again (with the schema or the pattern the answer must follow)."""
        lines = ["Your previous answer was not accepted:", *[f"- {problem}" for problem in problems]]
        if self.json_schema is not None:
            lines.append("Reply with only a JSON document that follows this JSON schema: "
                         + json.dumps(self.json_schema, separators=(",", ":")))
        if self.regex is not None:
            lines.append(f"Your whole reply must match the regular expression {self.regex}")
        lines.append("Please answer again, fixing these problems.")
        return [dict(message) for message in messages] + [{"role": "assistant", "content": output},
                                                           {"role": "user", "content": "\n".join(lines)}]

    def constraint(self) -> Optional[tuple[str, Any]]:
        """What constrained decoding can enforce: ("json_schema", schema), else ("regex", pattern), else None."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        return None

    def grammar(self) -> Optional[str]:
        """The llguidance grammar of `constraint()` (a JSON string for llguidance.LLMatcher), or None."""
        constraint = self.constraint()
        return None if constraint is None else _grammar_text(*constraint)

    def next_action(self, regenerations_done: int) -> str:
        """What to do with an answer that failed after `regenerations_done` re-asks or constrained regenerations:
        'reask' or 'constrain' while fewer than max_reasks were done, then `then`; or 'refuse' / 'flag'."""
        if self.on_fail in ("reask", "constrain"):
            return self.on_fail if regenerations_done < self.max_reasks else self.then
        return self.on_fail

    # ---- input -------------------------------------------------------------------------------------------------

    def check_input(self, text: str) -> Detection:
        """The injection verdict on one input text: flagged when the detector's score reaches the threshold and
        the mode is not off; blocked when also the mode is block."""
        if self.detector is None:
            return Detection()
        detection = self.detector.score(text)
        return self._apply_mode(detection)

    def check_messages(self, messages: list[dict[str, Any]]) -> Detection:
        """The injection verdict on a conversation: every turn is scored alone, whatever its role (the client
        sends the system and assistant turns too, so any of them can carry an attack; a classifier keeps the end
        of a long text, so one long turn must not hide another), and the highest score wins; the reasons of every
        flagged turn are kept."""
        if self.detector is None:
            return Detection()
        texts = [_content_text(m.get("content")) for m in messages]
        detections = self.detector.score_many([t for t in texts if t])
        if not detections:
            return Detection()
        worst = max(detections, key=lambda d: d.score)
        reasons = [reason for d in detections if d.flagged for reason in d.reasons]
        return self._apply_mode(Detection(worst.score, worst.flagged, False, reasons))

    def _apply_mode(self, detection: Detection) -> Detection:
        flagged = detection.flagged and self.injection.mode != "off"
        return Detection(detection.score, flagged, flagged and self.injection.mode == "block", detection.reasons)


def load_guardrails(path: str | Path) -> Guardrails:
    """Guardrails from a .yaml, .yml, .json or .toml file; a ConfigError naming the file (and key) otherwise."""
    import yaml

    from lmforge.config import read_config_file

    try:
        data = read_config_file(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"guardrails file {path}: cannot parse: {exc}".splitlines()[0]) from None
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config file", "guardrails file", 1)) from None
    return Guardrails.from_dict(data, str(path))


def _content_text(content: Any) -> str:
    """The text of an OpenAI message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _known(data: dict[str, Any], keys: tuple[str, ...], source: str, prefix: str) -> None:
    unknown = [key for key in data if key not in keys]
    if unknown:
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (known: {', '.join(keys)})")


def _choice(value: Any, choices: tuple[str, ...], source: str, key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{source}: {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _schema(value: Any, source: str, key: str) -> dict[str, Any]:
    import jsonschema

    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a JSON schema (a mapping), got {type(value).__name__}")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{source}: {key}: not a valid JSON schema: {exc.message}") from None
    return value


def _regex(value: Any, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key}: expected a regular expression string, got {type(value).__name__}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{source}: {key}: not a valid regular expression ({exc})") from None
    return value


def _max_chars(value: Any, source: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key}: expected an integer >= 1, got {value!r}")
    return value


def _phrases(value: Any, source: str, key: str) -> list[str]:
    phrases = [value] if isinstance(value, str) else value
    if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ConfigError(f"{source}: {key}: expected a list of non-empty phrases")
    return list(phrases)


def _grammar_text(kind: str, value: Any) -> str:
    """llguidance's grammar (a JSON string for LLMatcher) of a json_schema or regex validator."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(value) if kind == "json_schema" else LLMatcher.grammar_from_regex(value)


def _check_constrainable(found: dict[str, Any], source: str) -> None:
    """on_fail constrain needs a validator that decoding can enforce, in a grammar llguidance accepts."""
    from llguidance import LLMatcher

    if "json_schema" not in found and "regex" not in found:
        raise ConfigError(f"{source}: on_fail: constrain needs a json_schema or regex validator to enforce")
    key = "json_schema" if "json_schema" in found else "regex"
    problem = LLMatcher.validate_grammar(_grammar_text(key, found[key]))  # empty when llguidance accepts it
    if problem:
        raise ConfigError(f"{source}: validators: the {key} cannot be enforced while decoding: "
                          f"{' '.join(problem.split())[:200]}")


def _injection(value: Any, source: str) -> InjectionSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: injection: expected a mapping with keys {', '.join(INJECTION_KEYS)}")
    _known(value, INJECTION_KEYS, source, "injection.")
    mode = _choice(value.get("mode", "off"), MODES, source, "injection.mode")
    patterns = value.get("patterns", True)
    if not isinstance(patterns, bool):
        raise ConfigError(f"{source}: injection.patterns: expected true or false, got {patterns!r}")
    classifier = value.get("classifier") or ""
    if not isinstance(classifier, str):
        raise ConfigError(f"{source}: injection.classifier: expected a model dir path, got {classifier!r}")
    threshold = value.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"{source}: injection.threshold: expected a number in (0, 1], got {threshold!r}")
    device = value.get("device", "cpu")
    if not isinstance(device, str):
        raise ConfigError(f"{source}: injection.device: expected a device name (cpu, cuda, ...), got {device!r}")
    if mode != "off" and not patterns and not classifier:
        raise ConfigError(f"{source}: injection: mode {mode} needs patterns: true or a classifier")
    return InjectionSettings(mode, patterns, classifier, float(threshold), device)

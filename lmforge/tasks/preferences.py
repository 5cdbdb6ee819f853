"""Preference data: the records `lmforge reward` and `lmforge dpo` read, and the built-in preference sets.

A JSONL line is one of
    {"prompt": "...", "chosen": "...", "rejected": "..."}                  a pair
    {"prompt": "...", "responses": ["best", "second", ..., "worst"]}       a ranked list (K >= 2)
where "prompt" may instead be "messages" (or "prompt" a list of messages: OpenAI chat turns, ending with a user
turn) and a response may be a string or a one-message list [{"role": "assistant", "content": "..."}] (TRL's
conversational format). Every record becomes a PreferenceItem: the prompt turns and the responses ranked best
first. A ranked list of K responses gives K(K-1)/2 ordered pairs.

Errors name the file and line: a missing field, an empty response, a pair whose chosen equals its rejected, a
ranked list with a repeated response.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from lmforge.errors import DataError
from lmforge.tasks.formats import ROLES, iter_jsonl

Conversation = list[dict[str, str]]


@dataclass
class PreferenceItem:
    """One prompt and its responses ranked best first; `where` names its source ('file:line', 'define_pref #3')."""

    where: str
    prompt: Conversation
    responses: list[str]

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) indices of every ordered pair: K(K-1)/2 of them."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(i + 1, k)]


def prompt_turns(value: Any, where: str, key: str) -> Conversation:
    """A prompt as chat turns: a non-empty string (one user turn) or a list of {role, content} messages ending
    with a user turn; a DataError naming `where` and `key` otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key}: empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key}: expected a string or a list of {{role, content}} messages")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
            raise DataError(f"{where}: {key}[{i}]: expected an object with a role ({', '.join(ROLES)}) and a "
                            "string content")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "user":
        raise DataError(f"{where}: {key}: the prompt must end with a user turn, not {turns[-1]['role']!r}")
    return turns


def _response(value: Any, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected a string (or one assistant message), got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key}: empty response")
    return value


def parse_preference(record: Any, where: str) -> PreferenceItem:
    """One JSON value -> a PreferenceItem, checked (see the module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = "prompt" if "prompt" in record else "messages"
    if key not in record:
        raise DataError(f"{where}: missing prompt (or messages); expected {{prompt, chosen, rejected}} or "
                        "{prompt, responses: [best, ..., worst]}")
    prompt = prompt_turns(record[key], where, key)
    if "responses" in record:
        if not isinstance(record["responses"], list) or len(record["responses"]) < 2:
            raise DataError(f"{where}: responses: expected a list of at least 2 responses, best first")
        responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(record["responses"])]
        repeated = next((r for i, r in enumerate(responses) if r in responses[:i]), None)
        if repeated is not None:
            raise DataError(f"{where}: responses: {repeated[:40]!r} appears twice (a ranking needs distinct "
                            "responses)")
        return PreferenceItem(where, prompt, responses)
    absent = [k for k in ("chosen", "rejected") if k not in record]
    if absent:
        raise DataError(f"{where}: missing {' and '.join(absent)}; expected {{prompt, chosen, rejected}} or "
                        "{prompt, responses: [best, ..., worst]}")
    chosen, rejected = _response(record["chosen"], where, "chosen"), _response(record["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are the same response")
    return PreferenceItem(where, prompt, [chosen, rejected])


def read_preferences(paths: Iterable[str | os.PathLike]) -> list[PreferenceItem]:
    """Every record of the JSONL files; a file with no records is a DataError."""
    items = []
    for path in paths:
        found = [parse_preference(record, f"{path}:{number}") for number, record in iter_jsonl(path)]
        if not found:
            raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
        items += found
    return items


def builtin_preferences(split: str, cache_dir: str | os.PathLike | None = None,
                        tasks: Iterable[str] | None = None, per_task_limit: int | None = None) -> list[PreferenceItem]:
    """The built-in preference sets (default: all of them) of `split` as items, the prompt in its canonical
    phrasing, the sets interleaved in a seeded order (so that the first validation items hold every set)."""
    import random

    from lmforge.errors import ConfigError
    from lmforge.tasks.builtin import load_task
    from lmforge.tasks.spec import PREFERENCE_TASKS

    items = []
    for name in tasks or PREFERENCE_TASKS:
        if name not in PREFERENCE_TASKS:
            raise ConfigError(f"{name!r} is not a built-in preference set (they are: {', '.join(PREFERENCE_TASKS)})")
        for i, example in enumerate(load_task(name, split, cache_dir, per_task_limit)):
            items.append(PreferenceItem(f"{name} {split} #{i}", [{"role": "user", "content": example.prompt}],
                                        list(example.choices)))
    random.Random(f"lmforge-preferences:{split}").shuffle(items)
    return items


def to_preference_record(item: PreferenceItem) -> dict[str, Any]:
    """The JSONL record of an item: {prompt, chosen, rejected} for a pair, {prompt, responses} for a list; the
    prompt a string when it is one user turn."""
    prompt: Any = item.prompt[0]["content"] if len(item.prompt) == 1 else item.prompt
    if len(item.responses) == 2:
        return {"prompt": prompt, "chosen": item.responses[0], "rejected": item.responses[1]}
    return {"prompt": prompt, "responses": list(item.responses)}

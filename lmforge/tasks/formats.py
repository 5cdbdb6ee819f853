"""The JSONL chat formats users already have, read into one shape and written back out.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`. One JSON object a line:

    alpaca             {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
                       -> [system], user = instruction (+ a blank line + input when input is not empty), assistant
    messages (OpenAI)  {"messages": [{"role": ..., "content": ...}, ...]}
    sharegpt           {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"model"|"system", "value": str}]}
    prompt_completion  {"prompt": str, "completion": str} -> user = prompt, assistant = completion

With format "auto" each line is recognized by its keys (messages, conversations, instruction, prompt +
completion), so one file may mix them. Blank lines are skipped. Every mistake is a DataError naming `file:line`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmforge.errors import DataError
from lmforge.io import atomic_write_text

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
FORMAT_FIELDS = {
    "alpaca": "alpaca (instruction, output; optional input, system)",
    "messages": "messages (messages: [{role, content}])",
    "sharegpt": "sharegpt (conversations: [{from, value}])",
    "prompt_completion": "prompt_completion (prompt, completion)",
}
Conversation = list[dict[str, str]]


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) for each non-blank line; DataError naming file:line for bad JSON or
    bad UTF-8, and naming the file when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def detect_format(record: dict) -> str | None:
    """The chat format a record's keys say, or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what}: expected a string, got {type(value).__name__}")
    return value


def _turns(record: dict, fmt: str, where: str) -> Conversation:
    """The turns of one record in format `fmt` (checked), before the assistant-turn check."""
    missing = {"alpaca": ("instruction", "output"), "messages": ("messages",), "sharegpt": ("conversations",),
               "prompt_completion": ("prompt", "completion")}[fmt]
    absent = [key for key in missing if key not in record]
    if absent:
        raise DataError(f"{where}: missing {', '.join(absent)} for format {FORMAT_FIELDS[fmt]}")
    if fmt == "alpaca":
        conversation = [{"role": "system", "content": _text(record["system"], where, "system")}] \
            if record.get("system") else []
        user = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input") or "", where, "input")
        return conversation + [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                               {"role": "assistant", "content": _text(record["output"], where, "output")}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text(record["prompt"], where, "prompt")},
                {"role": "assistant", "content": _text(record["completion"], where, "completion")}]
    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else \
        ("conversations", "from", "value")
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key}: expected a list of {{{role_key}, {content_key}}} objects, got "
                        f"{type(turns).__name__}")
    conversation = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: {key}[{i}]: expected an object with '{role_key}' and '{content_key}'")
        role = turn[role_key]
        allowed = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
        if role not in allowed:
            raise DataError(f"{where}: {key}[{i}]: unknown {role_key} {role!r} (allowed: {', '.join(allowed)})")
        role = role if fmt == "messages" else SHAREGPT_ROLES[role]
        conversation.append({"role": role, "content": _text(turn[content_key], where, f"{key}[{i}].{content_key}")})
    return conversation


def parse_record(record: Any, fmt: str = "auto", where: str = "record") -> Conversation:
    """One JSON value -> a conversation, checked; `where` (e.g. 'file:line') starts every error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"format: expected auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    found = detect_format(record) if fmt == "auto" else fmt
    if found is None:
        keys = ", ".join(list(record)[:8]) or "none"
        raise DataError(f"{where}: not a known chat format (keys: {keys}); expected "
                        + "; or ".join(FORMAT_FIELDS.values()))
    conversation = _turns(record, found, where)
    if not any(turn["role"] == "assistant" for turn in conversation):
        raise DataError(f"{where}: the conversation has no assistant turn")
    return conversation


def read_conversations(path: str | os.PathLike, format: str = "auto") -> list[Conversation]:
    """Every conversation of a JSONL file in `format` ('auto', 'alpaca', 'messages', 'sharegpt',
    'prompt_completion'); see the module docstring. A file with no records is a DataError."""
    conversations = [parse_record(record, format, f"{path}:{number}") for number, record in iter_jsonl(path)]
    if not conversations:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return conversations


def to_record(conversation: Conversation, format: str) -> dict[str, Any]:
    """A conversation as one record of `format`; alpaca and prompt_completion hold one user and one assistant
    turn (alpaca also an optional leading system turn), anything else is a DataError."""
    if format not in FORMATS:
        raise DataError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if format == "messages":
        return {"messages": [{"role": t["role"], "content": t["content"]} for t in conversation]}
    if format == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in conversation]}
    system = [t["content"] for t in conversation if t["role"] == "system"]
    turns = [t for t in conversation if t["role"] != "system"]
    single = [t["role"] for t in turns] == ["user", "assistant"] and len(system) <= 1 and \
        (not system or conversation[0]["role"] == "system")
    if not single or (format == "prompt_completion" and system):
        shape = "an optional system turn, then one user and one assistant turn" if format == "alpaca" else \
            "one user and one assistant turn (no system turn)"
        roles = ", ".join(t["role"] for t in conversation)
        raise DataError(f"format {format} holds {shape}; this conversation has {roles} (use messages or sharegpt)")
    if format == "prompt_completion":
        return {"prompt": turns[0]["content"], "completion": turns[1]["content"]}
    record = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
    return {**record, "system": system[0]} if system else record


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object a line (UTF-8, not ASCII-escaped) atomically; return the path."""
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return Path(path)

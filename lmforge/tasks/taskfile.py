"""User task files for evaluation: JSONL, one item a line, all of one kind.

    generation  {"prompt": str, "answer": str}  or  {"prompt": str, "answers": [str, ...]}   (reference first)
    choice      {"prompt" | "question": str, "choices": [str, str, ...], "label": int}        (gold index)

An optional "id" (str) names an item; else it is `{file name}:{line}`. `lmforge tasks export --format task`
writes this format. Every mistake is a DataError naming `file:line` and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.tasks.formats import iter_jsonl
from lmforge.tasks.spec import TaskExample

EXPECTED = ('expected {"prompt", "answer"} or {"prompt", "answers": [...]} (generation), or '
            '{"prompt" or "question", "choices": [...], "label": int} (choice)')


def _strings(value: Any, where: str, key: str, at_least: int) -> list[str]:
    if not isinstance(value, list) or len(value) < at_least or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: {key}: expected a list of at least {at_least} strings, got {value!r}"[:300])
    return value


def parse_task_item(record: Any, where: str, default_id: str) -> TaskExample:
    """One JSON value of a task file -> TaskExample (label -1 for generation items)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt", record.get("question"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: no prompt (a non-empty string); {EXPECTED}")
    item_id = record.get("id", default_id)
    if not isinstance(item_id, str):
        raise DataError(f"{where}: id: expected a string, got {type(item_id).__name__}")
    if "choices" in record:
        choices = _strings(record["choices"], where, "choices", 2)
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(f"{where}: label: expected an integer index in [0, {len(choices) - 1}], got {label!r}")
        return TaskExample(item_id, prompt, [choices[label]], list(choices), label, item_id)
    if "answers" in record:
        answers = _strings(record["answers"], where, "answers", 1)
    elif isinstance(record.get("answer"), str):
        answers = [record["answer"]]
    else:
        raise DataError(f"{where}: no answer; {EXPECTED}")
    return TaskExample(item_id, prompt, list(answers), [], -1, item_id)


def load_task_file(path: str | os.PathLike) -> list[TaskExample]:
    """The items of a JSONL task file (see the module docstring); the task name is the file's stem."""
    path = Path(path)
    examples = []
    for number, record in iter_jsonl(path):
        example = parse_task_item(record, f"{path}:{number}", f"{path.name}:{number}")
        example.task = path.stem
        if examples and bool(example.choices) != bool(examples[0].choices):
            kinds = ("choice", "generation") if examples[0].choices else ("generation", "choice")
            raise DataError(f"{path}:{number}: a {kinds[1]} item in a file of {kinds[0]} items (one kind per file)")
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no items (the file is empty or holds only blank lines)")
    return examples


def to_task_item(example: TaskExample) -> dict[str, Any]:
    """A TaskExample as one line of a task file (the inverse of parse_task_item)."""
    if example.choices:
        return {"id": example.id, "prompt": example.prompt, "choices": example.choices, "label": example.label}
    return {"id": example.id, "prompt": example.prompt, "answers": example.answers}

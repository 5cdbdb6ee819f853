"""`lmforge tasks list` and `lmforge tasks export`: the built-in tasks, and their examples as JSONL files.

This module does not import torch, so `lmforge tasks --help` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import LmforgeError

ExportFormat = Literal["messages", "alpaca", "sharegpt", "prompt_completion", "task"]


@dataclass
class TasksListConfig:
    cache_dir: str = ""  # cache of packages and parsed tasks (default $LMFORGE_CACHE, else ~/.cache/lmforge)


def tasks_list(cfg: TasksListConfig) -> dict[str, dict[str, int]]:
    """Print every built-in task: name, kind, metric, examples per split, description; return the sizes.

    The first call fetches the source packages and builds the task cache (about 20 s); later calls read it."""
    from lmforge.tasks.builtin import task_sizes
    from lmforge.tasks.spec import TASKS

    sizes = task_sizes(cfg.cache_dir or None)
    print(f"{'task':<15} {'kind':<10} {'metric':<12} {'train':>7} {'valid':>6} {'test':>5}  description")
    for name, spec in TASKS.items():
        n = sizes[name]
        print(f"{name:<15} {spec.kind:<10} {spec.metric:<12} {n['train']:>7} {n['validation']:>6} {n['test']:>5}  "
              f"{spec.description}")
    return sizes


@dataclass
class TasksExportConfig:
    name: str = ""  # a built-in task (lmforge tasks list shows them)
    split: Literal["train", "validation", "test"] = "test"  # which split to export
    out: str = ""  # output .jsonl file (default: NAME-SPLIT.jsonl in the current dir)
    format: ExportFormat = "messages"  # a chat format (user prompt, assistant answer) or task (eval items); a
                                       # preference set is written as {prompt, chosen, rejected} unless task
    limit: int = 0  # export at most this many examples (0 = all)
    cache_dir: str = ""  # cache of packages and parsed tasks (default $LMFORGE_CACHE, else ~/.cache/lmforge)


def check_output_file(out: Path) -> None:
    """Refuse to replace a directory, or an existing file that is not JSONL (by name or by content)."""
    if out.is_dir():
        raise LmforgeError(f"out {out} is a directory; give a .jsonl file path")
    if not out.exists():
        return
    if out.suffix != ".jsonl":
        raise LmforgeError(f"out {out} exists and is not a .jsonl file; choose another path or delete it")
    with open(out, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        ok = not first or isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise LmforgeError(f"out {out} exists and does not hold JSONL records; choose another path or delete it")


def tasks_export(cfg: TasksExportConfig) -> Path:
    """Write the examples of task `cfg.name` in `cfg.split` as JSONL (atomically) and return the path.

    Chat formats hold one user turn (the canonical prompt) and one assistant turn (the reference answer, or the
    gold choice); `task` holds the eval task-file format that `lmforge eval --tasks FILE` reads. A preference
    set is written as {prompt, chosen, rejected}, the records `lmforge reward` and `lmforge dpo` read."""
    from lmforge.tasks.builtin import check_task_name, load_task
    from lmforge.tasks.formats import to_record, write_jsonl
    from lmforge.tasks.spec import TASKS
    from lmforge.tasks.taskfile import to_task_item

    if not cfg.name:
        raise LmforgeError("tasks export needs a task name: lmforge tasks export NAME [--split test] [--out FILE]")
    check_task_name(cfg.name)
    if cfg.limit < 0:
        raise LmforgeError(f"limit: expected >= 0 (0 = all), got {cfg.limit}")
    out = Path(cfg.out or f"{cfg.name}-{cfg.split}.jsonl")
    check_output_file(out)
    examples = load_task(cfg.name, cfg.split, cfg.cache_dir or None, cfg.limit or None)
    if cfg.format == "task":
        records = [to_task_item(example) for example in examples]
    elif TASKS[cfg.name].kind == "preference":
        records = [{"prompt": e.prompt, "chosen": e.choices[0], "rejected": e.choices[1]} for e in examples]
    else:
        records = [to_record([{"role": "user", "content": example.prompt},
                              {"role": "assistant", "content": example.answers[0]}], cfg.format)
                   for example in examples]
    write_jsonl(out, records)
    shape = "prompt, chosen, rejected" if TASKS[cfg.name].kind == "preference" and cfg.format != "task" \
        else cfg.format
    print(f"tasks export: {len(records)} {cfg.name} examples ({cfg.split}) -> {out} ({shape})")
    return out

"""Built-in tasks, derived at run time from offline corpora and cached: `load_task` and the SFT mixture.

Sources: WordNet 3.0 (Debian wordnet-base) for define, name_word, synonym, antonym, hypernym, nli, mc_define,
define_pref; FreeDict English-German (Debian dict-freedict-eng-deu) for translate and translate_pref; generated
problems for arithmetic and arithmetic_pref. A preference set keeps the split of the question it derives from. Packages
are fetched once into the cache ($LMFORGE_CACHE, else ~/.cache/lmforge) by lmforge.data.corpora; the parsed
tasks are written under `tasks/v{CACHE_VERSION}/{source}/{task}.{split}.json` (one atomic dir per source), so
later loads read one small JSON file.

Splits: each row goes to train/validation/test by `split_of(row source)` (lmforge.tasks.spec; see
lmforge.tasks.lexical for which key each task uses and why). Within a split rows are ordered by a stable hash
of their id, so a `limit` takes a stable pseudo-random sample; validation and test keep the first 500.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable

from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path
from lmforge.tasks.spec import (EVAL_SPLIT_CAP, INSTRUCTION_TASKS, SPLITS, TASKS, TaskExample, split_of,
                               stable_hash)
from lmforge.tasks.templates import render, variant_for

CACHE_VERSION = 2  # bump whenever a builder's output changes, so that old caches are not read
SOURCE_OF_TASK = {"define": "wordnet", "name_word": "wordnet", "synonym": "wordnet", "antonym": "wordnet",
                  "hypernym": "wordnet", "nli": "wordnet", "mc_define": "wordnet", "translate": "freedict",
                  "arithmetic": "arithmetic", "define_pref": "wordnet", "translate_pref": "freedict",
                  "arithmetic_pref": "arithmetic"}
Row = dict[str, Any]


def _build_wordnet(cache_dir: Path) -> dict[str, list[Row]]:
    from lmforge.data.corpora import fetch_debian_package
    from lmforge.tasks import lexical
    from lmforge.tasks.wordnet import load_wordnet

    root = fetch_debian_package("wordnet-base", cache_dir)
    wn = load_wordnet(root / "usr/share/wordnet")
    return {"define": lexical.define_rows(wn), "name_word": lexical.name_word_rows(wn),
            "synonym": lexical.synonym_rows(wn), "antonym": lexical.antonym_rows(wn),
            "hypernym": lexical.hypernym_rows(wn), "nli": lexical.nli_rows(wn),
            "mc_define": lexical.mc_define_rows(wn), "define_pref": lexical.define_pref_rows(wn)}


def _build_freedict(cache_dir: Path) -> dict[str, list[Row]]:
    from lmforge.data.corpora import fetch_debian_package
    from lmforge.tasks.freedict import read_dict_lines, read_example_pairs, translate_pref_rows, translate_rows

    root = fetch_debian_package("dict-freedict-eng-deu", cache_dir)
    lines = read_dict_lines(root / "usr/share/dictd/freedict-eng-deu.dict.dz")
    rows = translate_rows(read_example_pairs(lines))
    return {"translate": rows, "translate_pref": translate_pref_rows(rows)}


def _build_arithmetic(cache_dir: Path) -> dict[str, list[Row]]:
    from lmforge.tasks.arithmetic import arithmetic_pref_rows, arithmetic_rows

    rows = arithmetic_rows()
    return {"arithmetic": rows, "arithmetic_pref": arithmetic_pref_rows(rows)}


BUILDERS: dict[str, Callable[[Path], dict[str, list[Row]]]] = {
    "wordnet": _build_wordnet, "freedict": _build_freedict, "arithmetic": _build_arithmetic}


def split_rows(rows: Iterable[Row], eval_cap: int = EVAL_SPLIT_CAP) -> dict[str, list[Row]]:
    """Rows by split (split_of of their source), each ordered by the stable hash of its id; validation and
    test cut to `eval_cap` rows."""
    out: dict[str, list[Row]] = {split: [] for split in SPLITS}
    for row in rows:
        out[split_of(row["source"])].append(row)
    for split, members in out.items():
        members.sort(key=lambda r: (stable_hash(r["id"]), r["id"]))
        if split != "train":
            del members[eval_cap:]
    return out


def write_source_cache(directory: Path, tasks: dict[str, list[Row]]) -> None:
    """Write `{task}.{split}.json` for every task and split, and manifest.json (sizes), as one atomic dir."""
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        sizes = {}
        for task, rows in tasks.items():
            splits = split_rows(rows)
            sizes[task] = {split: len(members) for split, members in splits.items()}
            for split, members in splits.items():
                (tmp / f"{task}.{split}.json").write_text(json.dumps(members, ensure_ascii=False,
                                                                     separators=(",", ":")), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps({"version": CACHE_VERSION, "sizes": sizes}, indent=1))


def tasks_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the parsed built-in tasks live: {cache}/tasks/v{CACHE_VERSION}."""
    from lmforge.data.corpora import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "tasks" / f"v{CACHE_VERSION}"


def ensure_source(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache dir of one source ('wordnet', 'freedict', 'arithmetic'), built on first use."""
    from lmforge.data.corpora import default_cache_dir

    directory = tasks_cache_dir(cache_dir) / source
    if not (directory / "manifest.json").is_file():
        print(f"tasks: building the {source} tasks into {directory} (first use only)", flush=True)
        write_source_cache(directory, BUILDERS[source](Path(cache_dir or default_cache_dir())))
    return directory


def check_task_name(name: str) -> str:
    """`name` if it is a built-in task, else a ConfigError listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}' (built-in tasks: {', '.join(TASKS)}; or give a .jsonl task file)")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return split


def load_rows(name: str, split: str, cache_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[Row]:
    """The cached rows of a built-in task's split (building the cache on first use), at most `limit`."""
    directory = ensure_source(SOURCE_OF_TASK[check_task_name(name)], cache_dir)
    path = directory / f"{name}.{_check_split(split)}.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"task cache {path}: missing or unreadable; delete {directory} to rebuild it") from None
    return rows[:limit] if limit else rows


def example_from_row(task: str, row: Row) -> TaskExample:
    """A cached row as a TaskExample with the canonical prompt."""
    return TaskExample(id=row["id"], prompt=render(task, row["vars"]), answers=list(row["answers"]),
                       choices=list(row["choices"]), label=row["label"], source=row["source"], task=task)


def load_task(name: str, split: str, cache_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[TaskExample]:
    """Examples of built-in task `name` in `split` ('train', 'validation', 'test'), at most `limit` (None/0: all).

    The same examples, in the same order, on every run and machine."""
    return [example_from_row(name, row) for row in load_rows(name, split, cache_dir, limit)]


def task_sizes(cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """Examples per split of every built-in task (building the caches as needed)."""
    sizes: dict[str, dict[str, int]] = {}
    for source in dict.fromkeys(SOURCE_OF_TASK.values()):
        manifest = json.loads((ensure_source(source, cache_dir) / "manifest.json").read_text())
        sizes.update(manifest["sizes"])
    return {name: sizes[name] for name in TASKS}


def instruction_conversations(split: str, cache_dir: str | os.PathLike | None = None,
                              tasks: Iterable[str] | None = None, per_task_limit: int | None = None,
                              seed: int = 0) -> list[list[dict[str, str]]]:
    """The built-in SFT mixture: for every example of `tasks` (default: every instruction task, that is all but
    the preference sets) in `split`, a user turn (the prompt
    in one of the task's phrasings, chosen by a stable hash of seed and id) and an assistant turn (the reference
    answer; for a choice task the gold choice). Shuffled by `random.Random(f'lmforge-sft:{seed}')`."""
    conversations = []
    for name in tasks or INSTRUCTION_TASKS:
        for row in load_rows(name, split, cache_dir, per_task_limit):
            answer = row["choices"][row["label"]] if row["choices"] else row["answers"][0]
            prompt = render(name, row["vars"], variant_for(row["id"], seed))
            conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    random.Random(f"lmforge-sft:{seed}").shuffle(conversations)
    return conversations

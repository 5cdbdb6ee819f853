"""`lmforge finetune`: GPT-1's task-specific fine-tuning (Radford et al. 2018, section 3.3) on the one loop.

Input transformations, with lmforge's special tokens as GPT-1's start, delimiter and extract tokens
(<|bos|>, <|reserved_0|>, <|reserved_1|>):

    classify         [start] text [extract]
    entailment       [start] premise [delim] hypothesis [extract]
    similarity       [start] a [delim] b [extract]  and  [start] b [delim] a [extract]   (states added)
    multiple_choice  [start] context [delim] choice_k [extract]   for every choice k     (softmax over choices)

A linear head on the extract token's final state (lmforge.model.heads) and L3 = L2 + lambda * L1
(lmforge.objectives.task_head), with full fine-tuning or any peft method. Data: JSONL items
{"text", "label"} | {"premise", "hypothesis", "label"} | {"text_a", "text_b", "label"} |
{"prompt" or "context", "choices", "label"}, or `builtin`: the built-in nli (entailment) or mc_define
(multiple_choice) task, or for classify the built-in prompt-injection set (lmforge.tasks.injection). A sequence
longer than seq_len keeps the end of its first segment. The final model dir holds the head (task_head.json +
task_head.safetensors); `lmforge eval` scores the matching built-in task with it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.data.mixture import hash_fraction
from lmforge.errors import ConfigError, DataError
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.model.heads import TaskHeadModel
from lmforge.objectives.task_head import task_head_loss
from lmforge.stages.config import FinetuneConfig
from lmforge.stages.common import base_model, tokenizer_source
from lmforge.tasks.formats import iter_jsonl
from lmforge.tasks.injection import INJECTION_LABELS
from lmforge.tasks.spec import NLI_LABELS
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import Stage, train
from lmforge.train.packing import ShuffledSampler

FIELDS = {"classify": ("text",), "entailment": ("premise", "hypothesis"), "similarity": ("text_a", "text_b"),
          "multiple_choice": ("context", "choices")}
BUILTIN = {"entailment": "nli", "multiple_choice": "mc_define"}


@dataclasses.dataclass
class Item:
    """One example: its segments (texts), the choices of a multiple-choice item, and the gold label's index."""

    segments: list[str]
    label: int
    choices: list[str] = dataclasses.field(default_factory=list)


def read_items(path: str, task: str) -> list[tuple[list[str], list[str], Any]]:
    """(segments, choices, raw label) of each JSONL line, with file:line errors for missing fields."""
    found = []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        record = dict(record)
        if task == "multiple_choice" and "context" not in record and "prompt" in record:
            record["context"] = record["prompt"]
        missing = [k for k in (*FIELDS[task], "label") if k not in record]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (a {task} item needs "
                            f"{', '.join(FIELDS[task])} and label)")
        if task == "multiple_choice":
            choices = record["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: choices must be a list of at least two strings")
            found.append(([str(record["context"])], choices, record["label"]))
        else:
            found.append(([str(record[k]) for k in FIELDS[task]], [], record["label"]))
    if not found:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return found


def builtin_items(task: str, split: str, cache_dir: Optional[str], limit: int) -> list[Item]:
    from lmforge.tasks.builtin import load_rows

    if task == "classify":  # generated, not cached: benign prompts vs injection attempts
        from lmforge.tasks.injection import injection_rows

        return [Item([r["text"]], r["label"]) for r in injection_rows(split)[:limit or None]]
    if task not in BUILTIN:
        raise ConfigError(f"data.train builtin: the built-in data has {', '.join(BUILTIN)} and classify (prompt "
                          f"injection) tasks, not {task}")
    rows = load_rows(BUILTIN[task], split, cache_dir, limit or None)
    if task == "entailment":
        return [Item([r["vars"]["premise"], r["vars"]["hypothesis"]], r["label"]) for r in rows]
    return [Item([r["vars"]["definition"]], r["label"], list(r["choices"])) for r in rows]


def label_names(task: str, raw_labels: list[Any]) -> list[str]:
    if task == "multiple_choice":
        return []
    if task == "entailment" and all(str(label) in NLI_LABELS or isinstance(label, int) for label in raw_labels):
        return list(NLI_LABELS)
    return sorted({str(label) for label in raw_labels})


def to_items(raw: list[tuple[list[str], list[str], Any]], task: str, labels: list[str]) -> list[Item]:
    items = []
    for segments, choices, label in raw:
        if task == "multiple_choice" or (isinstance(label, int) and str(label) not in labels):
            index = int(label)
            limit = len(choices) if task == "multiple_choice" else len(labels)
            if not 0 <= index < limit:
                raise DataError(f"label {label!r} is not an index into the {limit} choices/classes")
        else:
            index = labels.index(str(label))
        items.append(Item(segments, index, choices))
    return items


def load_items(cfg: FinetuneConfig) -> tuple[list[Item], list[Item], list[str]]:
    """(train, val, label names) as the data section says."""
    data = cfg.data
    files = [f for f in data.train if f != "builtin"]
    raw_train = [x for f in files for x in read_items(f, cfg.task)]
    raw_val = [x for f in data.val for x in read_items(f, cfg.task)]
    builtin_labels = {"entailment": list(NLI_LABELS), "classify": list(INJECTION_LABELS)}.get(cfg.task, [])
    labels = label_names(cfg.task, [x[2] for x in raw_train + raw_val]) if files or data.val else builtin_labels
    if cfg.task == "classify" and "builtin" in data.train and labels != builtin_labels:
        raise DataError(f"data.train: the built-in injection set has labels {builtin_labels}; the files' labels "
                        f"{labels} differ (use the same, or leave builtin out)")
    train_items, val_items = to_items(raw_train, cfg.task, labels), to_items(raw_val, cfg.task, labels)
    if files and not data.val:
        held = [hash_fraction(repr((i.segments, i.choices)), data.val_fraction) for i in train_items]
        val_items = [i for i, h in zip(train_items, held) if h]
        train_items = [i for i, h in zip(train_items, held) if not h]
    if "builtin" in data.train:
        train_items += builtin_items(cfg.task, "train", data.cache_dir, data.max_examples)
        if not data.val:
            val_items += builtin_items(cfg.task, "validation", data.cache_dir, 0)
    if data.max_examples:
        train_items = train_items[:data.max_examples]
    if not train_items:
        raise DataError(f"data.train {', '.join(data.train)}: no training items")
    return train_items, val_items, labels


class Transform:
    """GPT-1's input transformations for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, task: str, seq_len: int) -> None:
        missing = [name for name in ("reserved_0", "reserved_1") if name not in tokenizer.special_ids]
        if missing:
            raise ConfigError("finetune needs lmforge's <|reserved_0|> and <|reserved_1|> tokens (delimiter and "
                              "extract); this tokenizer lacks them")
        self.tokenizer, self.task, self.seq_len = tokenizer, task, seq_len
        self.start, self.pad = tokenizer.bos_id, tokenizer.pad_id
        self.delim, self.extract = tokenizer.special_ids["reserved_0"], tokenizer.special_ids["reserved_1"]

    def sequence(self, first: str, second: Optional[str] = None) -> list[int]:
        """[start] first [delim second] [extract] in at most seq_len tokens: the first segment keeps its end."""
        room = self.seq_len - 2  # the start and extract tokens
        rest = ([] if second is None else [self.delim, *self.tokenizer.encode(second)])[:room]
        first_ids = self.tokenizer.encode(first)
        keep = room - len(rest)
        return [self.start, *(first_ids[len(first_ids) - keep:] if keep > 0 else []), *rest, self.extract]

    def rows(self, item: Item) -> list[list[int]]:
        a = item.segments
        if self.task == "classify":
            return [self.sequence(a[0])]
        if self.task == "entailment":
            return [self.sequence(a[0], a[1])]
        if self.task == "similarity":
            return [self.sequence(a[0], a[1]), self.sequence(a[1], a[0])]
        return [self.sequence(a[0], choice) for choice in item.choices]

    def collate(self, items: list[Item], device: torch.device) -> dict[str, torch.Tensor]:
        rows = [row for item in items for row in self.rows(item)]
        choices = len(rows) // max(1, len(items))
        if self.task == "multiple_choice" and any(len(i.choices) != choices for i in items):
            raise DataError("multiple_choice: every item of a batch needs the same number of choices")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            targets[i, :len(row) - 1] = torch.tensor(row[1:])
        batch = {"input_ids": ids, "lm_targets": targets,
                 "extract": torch.tensor([len(r) - 1 for r in rows]),
                 "labels": torch.tensor([item.label for item in items]), "choices": torch.tensor(choices)}
        return {k: v.to(device) for k, v in batch.items()}


def finetune(cfg: FinetuneConfig) -> Path:
    """Train a task head (and the model or an adapter) as `cfg` says; returns the run dir."""
    if cfg.lm_weight < 0:
        raise ConfigError(f"lm_weight must be >= 0 (0 turns the auxiliary language-modelling loss off), got "
                          f"{cfg.lm_weight}")
    model, tokenizer = base_model(cfg.model, "finetune", chat=False)
    seq_len = cfg.data.seq_len or model.config.block_size
    if not 4 <= seq_len <= model.config.block_size:
        raise ConfigError(f"data.seq_len={seq_len} must be in 4..{model.config.block_size}")
    transform = Transform(tokenizer, cfg.task, seq_len)
    train_items, val_items, labels = load_items(cfg)
    if cfg.task != "multiple_choice" and len(labels) < 2:
        raise DataError(f"{cfg.task}: the data has {len(labels)} label(s); a classifier needs at least two")
    ctx = init_distributed(cfg.train.device)
    try:
        tc = cfg.train
        torch.manual_seed(tc.seed)
        lm = model
        if cfg.peft.method != "none":
            from lmforge.peft.files import wrap_base

            lm = wrap_base(model, cfg.peft, cfg.model, tokenizer=tokenizer)
        head_model = TaskHeadModel(lm, cfg.task, labels).train()
        share = -(-len(val_items[:tc.eval_batches * tc.batch_size]) // ctx.world_size)
        mine = val_items[:tc.eval_batches * tc.batch_size][ctx.rank * share:(ctx.rank + 1) * share]
        val_batches = [transform.collate(mine[i:i + tc.batch_size], ctx.device)
                       for i in range(0, len(mine), tc.batch_size)]
        if ctx.rank == 0:
            print(f"finetune: {cfg.task}, {len(train_items):,} training and {len(val_items):,} validation items, "
                  f"labels {labels or 'choice indices'}, lambda {cfg.lm_weight}")
        stage = Stage(
            name="finetune", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=head_model,
            objective=functools.partial(task_head_loss, lm_weight=cfg.lm_weight, sync=False),
            eval_objective=functools.partial(task_head_loss, lm_weight=cfg.lm_weight),
            batches=ShuffledSampler(train_items, transform.collate, tc.seed), val_batches=val_batches,
            tokens_per_sample=seq_len, tokenizer_dir=tokenizer_source(cfg.model, tokenizer),
            inputs=tuple(f for f in [cfg.model, *cfg.data.train, *cfg.data.val] if f and f != "builtin"),
            model_files={"training.json": {"stage": "finetune", "chat": False, "task": cfg.task,
                                           "base_model": str(cfg.model), "peft": cfg.peft.method,
                                           "lm_weight": cfg.lm_weight}},
            summary={"train_items": len(train_items), "val_items": len(val_items), "labels": labels},
            count_terms=lambda batch: int(batch["labels"].numel()))
        return train(stage, ctx)
    finally:
        close_distributed(ctx)


def head_accuracy(model: TaskHeadModel, tokenizer: Any, items: list[Item], batch_size: int = 32) -> float:
    """The share of items whose highest head score is the gold label (what `lmforge eval` reports)."""
    transform = Transform(tokenizer, model.kind, model.config.block_size)
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = transform.collate(items[start:start + batch_size], device)
            logits, _ = model(batch["input_ids"], batch["extract"], None, int(batch["choices"]))
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / max(1, len(items))

"""Supervised fine-tuning (instruction tuning): a base model dir + conversations -> a chat model dir.

Conversations come from JSONL files in the formats users have (alpaca, OpenAI messages, ShareGPT,
prompt/completion; lmforge.tasks.formats) or from the built-in task instructions (lmforge.tasks). Each is rendered
with the tokenizer's chat template and tokenized with its assistant mask (`Tokenizer.encode_chat_with_mask`); the
loss is on the assistant tokens (lmforge.objectives.sft) and the rows are packed or padded (lmforge.train.packing).
Everything else is the one loop's: schedule, accumulation, DDP/FSDP2, validation, checkpoints, exact resume.

A conversation longer than seq_len + 1 tokens is cut at the end (`truncate`: dropped instead when no assistant
token is left), left out (`drop`) or refused (`error`, naming its file and line); the counts are printed and kept
in summary.json. The final model dir carries the tokenizer (chat template included) and training.json
({"stage": "sft", "chat": true, ...}), which `lmforge eval` and `lmforge chat` read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch

from lmforge.data.mixture import hash_fraction
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.errors import ConfigError, DataError
from lmforge.objectives.sft import sft_loss
from lmforge.stages.common import base_model, check_batch_split, resolve_seq_len, tokenizer_source
from lmforge.stages.config import SFTConfig, SFTDataSection
from lmforge.tasks.formats import iter_jsonl, parse_record
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import Stage, train
from lmforge.train.packing import fixed_batches, pack_examples, pad_examples, row_sampler, trained_tokens

__all__ = ["SFTConfig", "SFTDataSection", "sft", "conversation_examples"]

Conversation = list[dict[str, str]]
Example = tuple[list[int], list[bool]]


def read_sources(files: Iterable[str], fmt: str) -> list[tuple[str, Conversation]]:
    """(where, conversation) for every record of the JSONL files, `where` being 'file:line'; a file with no
    records is a DataError."""
    found = []
    for path in files:
        records = [(f"{path}:{number}", parse_record(record, fmt, f"{path}:{number}"))
                   for number, record in iter_jsonl(path)]
        if not records:
            raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
        found += records
    return found


def builtin_sources(data: SFTDataSection, split: str) -> list[tuple[str, Conversation]]:
    from lmforge.tasks.builtin import instruction_conversations

    conversations = instruction_conversations(split, data.cache_dir, data.builtin_tasks or None,
                                              data.per_task_limit or None)
    return [(f"builtin {split} #{i}", conversation) for i, conversation in enumerate(conversations)]


def load_conversations(data: SFTDataSection) -> tuple[list[tuple[str, Conversation]], list[tuple[str, Conversation]]]:
    """The (train, val) conversations the data section names."""
    files = [f for f in data.train if f != "builtin"]
    train_set = read_sources(files, data.format) if files else []
    val_set = read_sources(data.val, data.format) if data.val else []
    if not data.val and files:  # hold out val_fraction of the files' conversations, by a hash of their text
        held = [hash_fraction(repr(c), data.val_fraction) for _, c in train_set]
        val_set = [item for item, h in zip(train_set, held) if h]
        train_set = [item for item, h in zip(train_set, held) if not h]
    if "builtin" in data.train:
        train_set += builtin_sources(data, "train")
        if not data.val:
            val_set += builtin_sources(data, "validation")
    if not train_set:
        raise DataError(f"data.train {', '.join(data.train)}: no training conversations")
    return train_set, val_set


def conversation_examples(items: list[tuple[str, Conversation]], tokenizer: Tokenizer, data: SFTDataSection,
                          seq_len: int) -> tuple[list[Example], Counter]:
    """Tokenized examples (ids, loss mask) under the truncation policy, and counts of what it did."""
    counts: Counter = Counter()
    examples = []
    for where, conversation in items:
        if data.system_prompt and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": data.system_prompt}, *conversation]
        try:
            ids, mask = tokenizer.encode_chat_with_mask(conversation)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if data.train_on == "all":
            mask = [True] * len(mask)
        if len(ids) > seq_len + 1:
            if data.truncation == "error":
                raise DataError(f"{where}: the conversation has {len(ids)} tokens, more than seq_len + 1 = "
                                f"{seq_len + 1} (data.truncation=error; use truncate or drop, or a larger seq_len)")
            if data.truncation == "drop":
                counts["dropped_too_long"] += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            if not any(mask[1:]):
                counts["dropped_no_target_left"] += 1
                continue
            counts["truncated"] += 1
        examples.append((ids, mask))
    counts["kept"] = len(examples)
    return examples, counts


def sft(cfg: SFTConfig) -> Path:
    """Fine-tune cfg.model on the conversations of cfg.data; returns the run dir (the chat model is final/)."""
    if cfg.data.truncation not in ("truncate", "drop", "error"):
        raise ConfigError(f"data.truncation must be truncate, drop or error, got {cfg.data.truncation!r}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    model, tokenizer = base_model(cfg.model)
    seq_len = resolve_seq_len(cfg.data.seq_len, model)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    train_items, val_items = load_conversations(cfg.data)
    train_examples, counts = conversation_examples(train_items, tokenizer, cfg.data, seq_len)
    val_examples, val_counts = conversation_examples(val_items, tokenizer, cfg.data, seq_len)
    ctx = init_distributed(cfg.train.device)
    try:
        check_batch_split(cfg.train.batch_size, ctx.world_size)
        return train(build_stage(cfg, model, tokenizer, train_examples, val_examples, counts, val_counts, ctx), ctx)
    finally:
        close_distributed(ctx)


def build_stage(cfg: SFTConfig, model: Any, tokenizer: Tokenizer, train_examples: list[Example],
                val_examples: list[Example], counts: Counter, val_counts: Counter, ctx: Any) -> Stage:
    data, tc = cfg.data, cfg.train
    seq_len = data.seq_len
    pad_id = tokenizer.pad_id
    rows = pack_examples(train_examples, seq_len, pad_id, tc.seed) if data.packing else pad_examples(train_examples)
    val_rows = pack_examples(val_examples, seq_len, pad_id, tc.seed) if data.packing else pad_examples(val_examples)
    tokens = sum(len(r.input_ids) for r in rows)
    figures = {"train_conversations": len(train_examples), "val_conversations": len(val_examples),
               "truncated": counts["truncated"], "dropped": counts["dropped_too_long"] + counts[
                   "dropped_no_target_left"], "val_truncated": val_counts["truncated"],
               "train_rows": len(rows), "trained_tokens_per_epoch": trained_tokens(rows),
               "packing_fill": round(sum(r.used for r in rows) / max(1, tokens), 4) if data.packing else None}
    warnings = []
    if figures["truncated"] or figures["dropped"]:
        warnings.append(f"{figures['truncated']} conversations truncated and {figures['dropped']} dropped at "
                        f"seq_len {seq_len} (data.truncation={data.truncation})")
    if ctx.rank == 0:
        fill = f", rows {100 * figures['packing_fill']:.0f}% full" if data.packing else ""
        print(f"sft: {len(train_examples):,} training and {len(val_examples):,} validation conversations -> "
              f"{len(rows):,} rows of {'at most ' if not data.packing else ''}{seq_len} tokens{fill}; "
              f"{figures['trained_tokens_per_epoch']:,} assistant tokens per epoch")
    torch.manual_seed(tc.seed)
    if cfg.peft.method != "none":
        from lmforge.peft.files import wrap_base

        model = wrap_base(model, cfg.peft, cfg.model, tokenizer=tokenizer)
        if ctx.rank == 0:
            trainable = sum(p.numel() for p in model.trainable_parameters().values())
            print(f"sft: peft {cfg.peft.method}: {trainable:,} trainable parameters of {model.num_parameters():,}")
    model.train()
    inputs = tuple(f for f in [cfg.model, *data.train, *data.val] if f and f != "builtin")
    return Stage(
        name="sft", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
        objective=functools.partial(sft_loss, sync=False), eval_objective=sft_loss,
        batches=row_sampler(rows, pad_id, data.packing, tc.seed),
        val_batches=fixed_batches(val_rows[:tc.eval_batches * tc.batch_size], tc.batch_size, pad_id, data.packing,
                                  ctx.rank, ctx.world_size, ctx.device),
        tokens_per_sample=seq_len, tokenizer_dir=tokenizer_source(cfg.model, tokenizer), inputs=inputs,
        model_files={"training.json": {"stage": "sft", "chat": True, "base_model": str(cfg.model),
                                       "peft": cfg.peft.method, "train_on": data.train_on, "data": list(data.train)}},
        warnings=warnings, summary=figures, count_terms=count_targets)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """The assistant tokens a batch trains on: conversations weigh by their length, whatever the split."""
    return int((batch["targets"] != IGNORE_INDEX).sum())

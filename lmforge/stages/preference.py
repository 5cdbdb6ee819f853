"""Preference data for the loop: items (a prompt and its ranked responses) tokenized with the chat template, and a
resumable sampler whose batches hold every response of B items as rows plus the pairs that compare them.

A response is the prompt's turns and one assistant turn, tokenized by `Tokenizer.encode_chat_with_mask`; its mask
keeps the final assistant turn only (its content and the token that ends it), so earlier assistant turns of a
multi-turn prompt are context. A batch of B items with K_1..K_B responses has N = sum K_i rows, right-padded:

    input_ids (N, T)   the response's tokens but the last (as inputs); targets (N, T): the next tokens, -100
                       outside the final assistant turn and on padding (DPO's log-probabilities)
    full_ids (N, T+1)  all tokens; extract (N,): the index of the last one (the reward model's scalar head)
    pair_better, pair_worse (P,)   row indices of every ordered pair of an item (P = sum K_i (K_i - 1) / 2)
    response_tokens (N,)           the response's counted tokens
    ref_logps (N,)                 the reference log-probabilities, when the stage computed them beforehand
"""

from __future__ import annotations

import functools
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmforge.data.mixture import hash_fraction
from lmforge.errors import ConfigError, DataError
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.objectives.dpo import sequence_logps
from lmforge.stages.common import tokenizer_source
from lmforge.stages.config import PreferenceDataSection
from lmforge.tasks.preferences import PreferenceItem, builtin_preferences, read_preferences
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import Stage
from lmforge.train.packing import ShuffledSampler, rank_batches


@dataclass
class Response:
    ids: list[int]
    mask: list[bool]  # True on the final assistant turn's tokens
    ref_logp: Optional[float] = None


@dataclass
class Group:
    """A tokenized item: its responses ranked best first."""

    where: str
    responses: list[Response] = field(default_factory=list)


def load_items(data: PreferenceDataSection) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    """The (train, val) preference items the data section names."""
    files = [f for f in data.train if f != "builtin"]
    train_set = read_preferences(files) if files else []
    val_set = read_preferences(data.val) if data.val else []
    if not data.val and files:  # hold out val_fraction of the files' prompts, by a hash of their text
        held = [hash_fraction(repr(item.prompt), data.val_fraction) for item in train_set]
        val_set = [item for item, h in zip(train_set, held) if h]
        train_set = [item for item, h in zip(train_set, held) if not h]
    if "builtin" in data.train:
        train_set += builtin_preferences("train", data.cache_dir, data.builtin_tasks or None,
                                         data.per_task_limit or None)
        if not data.val:
            val_set += builtin_preferences("validation", data.cache_dir, data.builtin_tasks or None)
    if not train_set:
        raise DataError(f"data.train {', '.join(data.train)}: no preference items")
    return train_set, val_set


def final_turn_mask(mask: Sequence[bool]) -> list[bool]:
    """The mask of the last contiguous run of True (the final assistant turn) only."""
    out = [False] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = True
        i -= 1
    return out


def tokenize_items(items: Sequence[PreferenceItem], tokenizer: Tokenizer, data: PreferenceDataSection,
                   seq_len: int) -> tuple[list[Group], Counter]:
    """Groups of tokenized responses under the truncation policy, and counts of what it did."""
    counts: Counter = Counter()
    groups = []
    for item in items:
        prompt = item.prompt
        if data.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": data.system_prompt}, *prompt]
        group = Group(item.where)
        for response in item.responses:
            try:
                ids, mask = tokenizer.encode_chat_with_mask([*prompt, {"role": "assistant", "content": response}])
            except DataError as exc:
                raise DataError(f"{item.where}: {exc}") from None
            mask = final_turn_mask(mask)
            if len(ids) > seq_len + 1:
                if data.truncation == "error":
                    raise DataError(f"{item.where}: prompt + response have {len(ids)} tokens, more than seq_len + 1 "
                                    f"= {seq_len + 1} (data.truncation=error; use truncate or drop, or a larger "
                                    "seq_len)")
                ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                if data.truncation == "drop" or not any(mask[1:]):
                    group = None
                    break
                counts["truncated_responses"] += 1
            group.responses.append(Response(ids, mask))
        if group is None:
            counts["dropped"] += 1
            continue
        groups.append(group)
    counts["kept"] = len(groups)
    counts["pairs"] = sum(len(g.responses) * (len(g.responses) - 1) // 2 for g in groups)
    return groups, counts


def collate_groups(groups: Sequence[Group], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch of the module docstring for these groups."""
    responses = [r for g in groups for r in g.responses]
    width = max(len(r.ids) for r in responses)
    full, inputs, targets, better, worse = [], [], [], [], []
    row = 0
    for g in groups:
        for i in range(len(g.responses)):
            for j in range(i + 1, len(g.responses)):
                better.append(row + i)
                worse.append(row + j)
        row += len(g.responses)
    for r in responses:
        pad = width - len(r.ids)
        full.append(r.ids + [pad_id] * pad)
        inputs.append(r.ids[:-1] + [pad_id] * pad)
        targets.append([t if m else IGNORE_INDEX for t, m in zip(r.ids[1:], r.mask[1:])] + [IGNORE_INDEX] * pad)
    batch = {"full_ids": torch.tensor(full), "input_ids": torch.tensor(inputs), "targets": torch.tensor(targets),
             "extract": torch.tensor([len(r.ids) - 1 for r in responses]),
             "pair_better": torch.tensor(better, dtype=torch.long), "pair_worse": torch.tensor(worse, dtype=torch.long),
             "response_tokens": torch.tensor([sum(r.mask[1:]) for r in responses])}
    if all(r.ref_logp is not None for r in responses):
        batch["ref_logps"] = torch.tensor([r.ref_logp for r in responses], dtype=torch.float32)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def group_sampler(groups: Sequence[Group], pad_id: int, seed: int) -> ShuffledSampler:
    """The resumable, shuffled stream of groups (one global batch = batch_size items)."""
    return ShuffledSampler(groups, lambda chosen, device: collate_groups(chosen, pad_id, device), seed)


def group_batches(groups: Sequence[Group], batch_size: int, pad_id: int, rank: int, world: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Validation: the groups in order, batch_size at a time, each batch split over the ranks."""
    return rank_batches(groups, batch_size, rank, world, lambda mine: collate_groups(mine, pad_id, device))


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """The loss terms of a batch: its pairs (ranked lists of different sizes weigh by their pairs)."""
    return int(batch["pair_better"].numel())


@torch.no_grad()
def reference_logps(model: Any, groups: Sequence[Group], pad_id: int, batch_size: int,
                    device: torch.device, precision: Any = None) -> None:
    """Fill every response's ref_logp with `model`'s summed log-probability of its response tokens (eval mode,
    no gradients, under `precision()`: the training loop's autocast, so that at the first step the policy's
    log-probabilities equal these): the reference computed once, before training."""
    was_training = model.training
    model.eval()
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        with (precision or nullcontext)():
            values = sequence_logps(model, collate_groups(chunk, pad_id, device)).float().tolist()
        for response, value in zip((r for g in chunk for r in g.responses), values):
            response.ref_logp = value
    model.train(was_training)


def stage_figures(groups: Sequence[Group], val_groups: Sequence[Group], counts: Counter) -> dict[str, Any]:
    """summary.json figures of the preference data."""
    return {"train_items": len(groups), "val_items": len(val_groups), "train_pairs": counts["pairs"],
            "dropped": counts["dropped"], "truncated_responses": counts["truncated_responses"]}


def check_data(data: PreferenceDataSection) -> None:
    """One-line errors for data settings out of range."""
    if not 0 <= data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")


def preference_stage(name: str, cfg: Any, model: Any, objective: Any, groups: Sequence[Group],
                     val_groups: Sequence[Group], counts: Counter, tokenizer: Tokenizer, ctx: Any, seq_len: int,
                     model_files: dict[str, Any]) -> Stage:
    """The loop's Stage of a preference stage (reward, dpo): `objective(model, batch, sync=...)` over groups of
    ranked responses, the first eval_batches * batch_size validation groups, micro-batches weighed by their pairs;
    items dropped by the truncation policy are a warning."""
    tc = cfg.train
    warnings = [f"{counts['dropped']} items dropped at seq_len {seq_len} (data.truncation={cfg.data.truncation})"] \
        if counts["dropped"] else []
    inputs = tuple(f for f in [cfg.model, getattr(cfg, "reference", ""), *cfg.data.train, *cfg.data.val]
                   if f and f != "builtin")
    return Stage(
        name=name, config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
        objective=functools.partial(objective, sync=False), eval_objective=objective,
        batches=group_sampler(groups, tokenizer.pad_id, tc.seed),
        val_batches=group_batches(val_groups[:tc.eval_batches * tc.batch_size], tc.batch_size, tokenizer.pad_id,
                                  ctx.rank, ctx.world_size, ctx.device),
        tokens_per_sample=seq_len, tokenizer_dir=tokenizer_source(cfg.model, tokenizer), inputs=inputs,
        model_files=model_files, warnings=warnings, summary=stage_figures(groups, val_groups, counts),
        count_terms=count_pairs)

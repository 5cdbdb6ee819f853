"""`lmforge reward`: train a reward model on preference pairs and ranked lists; `lmforge reward score`: use it.

The reward model is the starting model dir's decoder with a scalar head on the final token's state (a
TaskHeadModel of kind 'reward', lmforge.model.heads), trained with the Bradley-Terry loss over every ordered pair
of each prompt's responses (lmforge.objectives.reward): a batch holds B prompts, each response forwarded once.
Full fine-tuning or any PEFT method; validation reports the held-out pair accuracy (val_accuracy). The final dir
is a model dir with `task_head.json` {"kind": "reward"}: `lmforge reward score` and `lmforge eval` (preference
sets) score with it, and `reward_scores` does from Python.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.objectives.reward import reward_objective
from lmforge.stages.common import base_model, check_batch_split, resolve_seq_len
from lmforge.stages.config import RewardConfig, RewardScoreConfig
from lmforge.stages.preference import (Group, Response, check_data, collate_groups, final_turn_mask, load_items,
                                       preference_stage, tokenize_items)
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import train

__all__ = ["RewardConfig", "reward", "reward_scores", "reward_score"]


def reward(cfg: RewardConfig) -> Path:
    """Train the reward model; returns the run dir (the reward model is final/)."""
    from lmforge.model.heads import TaskHeadModel

    check_data(cfg.data)
    if cfg.center_coefficient < 0:
        raise ConfigError(f"center_coefficient must be >= 0, got {cfg.center_coefficient}")
    lm, tokenizer = base_model(cfg.model, "reward")
    seq_len = resolve_seq_len(cfg.data.seq_len, lm)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    train_items, val_items = load_items(cfg.data)
    groups, counts = tokenize_items(train_items, tokenizer, cfg.data, seq_len - 1)  # all tokens are inputs here
    val_groups, _ = tokenize_items(val_items, tokenizer, cfg.data, seq_len - 1)
    ctx = init_distributed(cfg.train.device)
    try:
        tc = cfg.train
        check_batch_split(tc.batch_size, ctx.world_size)
        torch.manual_seed(tc.seed)
        if cfg.peft.method != "none":
            from lmforge.peft.files import wrap_base

            lm = wrap_base(lm, cfg.peft, cfg.model, tokenizer=tokenizer)
        model = TaskHeadModel(lm, "reward", ["reward"]).train()
        if ctx.rank == 0:
            print(f"reward: {len(groups):,} training items ({counts['pairs']:,} pairs), {len(val_groups):,} "
                  f"validation items")
        objective = functools.partial(reward_objective, center_coefficient=cfg.center_coefficient)
        stage = preference_stage("reward", cfg, model, objective, groups, val_groups, counts, tokenizer, ctx,
                                 seq_len, {"training.json": {"stage": "reward", "chat": True,
                                                             "base_model": str(cfg.model), "peft": cfg.peft.method}})
        return train(stage, ctx)
    finally:
        close_distributed(ctx)


def load_reward_model(model_dir: str, device: Any = "cpu", lm: Any = None) -> tuple[Any, Any]:
    """(reward model in eval mode, tokenizer) of a reward model dir; a one-line error for any other dir."""
    from lmforge.device import resolve_device
    from lmforge.model.heads import load_task_head, read_head_config
    from lmforge.tokenizer import model_dir_tokenizer

    config = read_head_config(model_dir)
    if config is None or config.get("kind") != "reward":
        raise LmforgeError(f"{model_dir}: not a reward model dir (no task_head.json of kind reward; train one "
                           "with lmforge reward)")
    tokenizer = model_dir_tokenizer(model_dir)
    if tokenizer is None:
        raise DataError(f"{model_dir}: no tokenizer files (tokenizer.json)")
    return load_task_head(model_dir, lm).to(resolve_device(str(device))), tokenizer


@torch.no_grad()
def reward_scores(model: Any, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    """The reward of each (prompt, response): prompts are strings (one user turn) or message lists. A response
    too long for the model keeps its last block_size tokens."""
    device = next(model.parameters()).device
    limit = model.config.block_size
    groups = []
    for prompt, response in zip(prompts, responses):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, mask = tokenizer.encode_chat_with_mask([*turns, {"role": "assistant", "content": response}])
        groups.append(Group("", [Response(ids[-limit:], final_turn_mask(mask)[-limit:])]))
    scores: list[float] = []
    for start in range(0, len(groups), batch_size):
        batch = collate_groups(groups[start:start + batch_size], tokenizer.pad_id, device)
        values, _ = model(batch["full_ids"], extract=batch["extract"])
        scores += values[:, 0].float().tolist()
    return scores


def reward_score(cfg: RewardScoreConfig) -> dict[str, Any]:
    """`lmforge reward score`: print the reward of each (prompt, response), or of every response of a preference
    file with its pair accuracy; write them as JSON to cfg.out when given."""
    from lmforge.io import atomic_write_json
    from lmforge.tasks.preferences import read_preferences

    if not cfg.model:
        raise ConfigError("reward score needs a reward model dir: lmforge reward score MODEL --prompt P --response R")
    if bool(cfg.file) == bool(cfg.response):
        raise ConfigError("reward score: give --response (with --prompt) or --file PREFERENCES.jsonl, not both")
    model, tokenizer = load_reward_model(cfg.model, cfg.device)
    report: dict[str, Any] = {"model": cfg.model}
    if cfg.file:
        items = read_preferences([cfg.file])
        flat = [(item.prompt, r) for item in items for r in item.responses]
        scores = iter(reward_scores(model, tokenizer, [p for p, _ in flat], [r for _, r in flat], cfg.batch_size))
        records, right, pairs = [], 0, 0
        for item in items:
            values = [next(scores) for _ in item.responses]
            right += sum(values[i] > values[j] for i, j in item.pairs())
            pairs += len(item.pairs())
            records.append({"where": item.where, "scores": values})
            print(f"{item.where}: " + ", ".join(f"{v:+.4f}" for v in values))
        report.update(file=cfg.file, items=records, pair_accuracy=right / pairs)
        print(f"reward score: pair accuracy {right / pairs:.4f} ({right}/{pairs} pairs ranked as the file ranks them)")
    else:
        prompts = cfg.prompt if len(cfg.prompt) == len(cfg.response) else cfg.prompt[:1] * len(cfg.response)
        if len(cfg.prompt) not in (1, len(cfg.response)):
            raise ConfigError(f"reward score: {len(cfg.prompt)} prompts for {len(cfg.response)} responses; give one "
                              "prompt, or one per response")
        values = reward_scores(model, tokenizer, prompts, cfg.response, cfg.batch_size)
        report["scores"] = [{"prompt": p, "response": r, "reward": v} for p, r, v in zip(prompts, cfg.response, values)]
        for p, r, v in zip(prompts, cfg.response, values):
            print(f"{v:+.4f}  {p!r} -> {r!r}")
    if cfg.out:
        atomic_write_json(cfg.out, report)
    return report

"""`lmforge grpo`: reinforce a chat model with Group Relative Policy Optimization and verifiable rewards.

Every step samples G completions of each of the step's prompts with the current policy (lmforge.infer.rollout: the
prompt prefilled once, its KV cache shared by the group), scores them with the reward functions
(lmforge.objectives.rewards: built-in arithmetic and format, or module:function), and takes the clipped policy
gradient of lmforge.objectives.grpo with advantages relative to the group. The rollouts are the batch source
(lmforge.stages.rollouts); the loop does not know it is doing RL. With iterations = mu > 1 each rollout batch serves
mu optimizer steps against the old log-probabilities computed when it was sampled. With beta > 0 a frozen copy of
the starting model is the reference of the KL penalty; with beta = 0 (the default, as in DAPO and Dr. GRPO) no
reference model is loaded at all.

The figures to watch are the rewards: a train record's `reward` is the mean reward of its rollouts. The loss is
not one: at a batch's first iteration it is about 0, a group's advantages summing to 0.

Validation: the held-out prompts (the first eval_batches * batch_size) get G rollouts of the starting policy once, at
the start, and at each validation the current policy's greedy completions of the same prompts are scored by the
rewards: val_reward (the weighted sum) and val_reward_<name> (each reward; for a 0/1 reward such as arithmetic, the
held-out accuracy). val_loss is the GRPO loss on the fixed rollouts: how far the policy has moved along their
advantages, bounded by the clip (lower is further). The starting policy's greedy figures are in summary.json as
start_val_reward*; `lmforge eval MODEL --tasks arithmetic` scores the built-in task with the evaluation harness.

FSDP is refused: sampling needs the full weights in every process. DDP is fine (each process samples its prompts).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, DataError
from lmforge.infer.config import GenerationConfig
from lmforge.objectives.grpo import grpo_objective, loss_terms
from lmforge.objectives.rewards import load_rewards, score
from lmforge.stages.config import GRPOConfig
from lmforge.stages.rollouts import (Prompt, Rewards, RolloutSource, frozen_copy, load_prompts, rollout_seed,
                                     tokenize_prompts)
from lmforge.stages.common import base_model, check_batch_split, tokenizer_source
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import Stage, autocast_dtype, precision_context, train

__all__ = ["GRPOConfig", "grpo"]


def check_config(cfg: GRPOConfig) -> None:
    checks = [("group_size", cfg.group_size >= 2, "at least 2 (advantages are relative to the group)"),
              ("max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
              ("temperature", cfg.temperature > 0, "> 0 (rollouts are sampled)"),
              ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"), ("top_k", cfg.top_k >= 0, ">= 0"),
              ("beta", cfg.beta >= 0, ">= 0"), ("epsilon", 0 < cfg.epsilon < 1, "in (0, 1)"),
              ("epsilon_high", cfg.epsilon_high is None or cfg.epsilon_high > 0, "> 0"),
              ("iterations", cfg.iterations >= 1, "at least 1")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: expected {expected}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction!r}: expected a value in [0, 1)")
    if cfg.train.parallel == "fsdp":
        raise ConfigError("grpo: train.parallel=fsdp is not supported (sampling rollouts needs the full weights in "
                          "every process); use ddp")


def held_out_rewards(model: nn.Module, prompts: Sequence[Prompt], tokenizer: Tokenizer, rewards: Rewards,
                     max_new_tokens: int) -> dict[str, float]:
    """The rewards of the model's greedy completions of `prompts`: reward (the mean weighted sum) and
    reward_<name> (the mean of each reward)."""
    from lmforge.infer.generate import generate

    model = getattr(model, "_orig_mod", model)  # decode with the eager model, not a torch.compile wrapper
    completions = generate(model, [p.ids for p in prompts], GenerationConfig(max_new_tokens=max_new_tokens,
                                                                              temperature=0.0),
                           tokenizer, eos_id=tokenizer.chat_stop_ids)
    totals, each = score(rewards, [p.text for p in prompts], [c.text or "" for c in completions],
                         [p.answer for p in prompts])
    figures = {"reward": sum(totals) / len(totals)}
    figures.update({f"reward_{name}": sum(values) / len(values) for name, values in each.items()})
    return figures


def validation_objective(model: nn.Module, batch: dict[str, Tensor], objective: Any, prompts: Sequence[Prompt],
                         tokenizer: Tokenizer, rewards: Rewards, max_new_tokens: int) -> tuple[Tensor, dict]:
    """The GRPO loss on the fixed validation rollouts, with the greedy held-out rewards of the batch's prompts in
    place of the rollouts' reward; weighted by the batch's rollouts."""
    loss, metrics = objective(model, batch)
    chosen = [prompts[i] for i in batch["prompt_index"].tolist()]
    metrics.update(held_out_rewards(model, chosen, tokenizer, rewards, max_new_tokens))
    metrics["tokens"] = float(batch["targets"].shape[0])
    return loss, metrics


def validation_batches(source: RolloutSource, prompts: Sequence[Prompt], batch_size: int, rank: int, world: int,
                       device: torch.device) -> list[dict[str, Tensor]]:
    """Rollouts of the starting policy for the prompts, batch_size at a time, each batch split over the ranks;
    prompt_index (B,) says which prompts a batch holds."""
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        share = -(-len(chunk) // world)
        mine = chunk[rank * share:(rank + 1) * share]
        if mine:
            batch = source.rollouts([prompts[i] for i in mine],
                                    [rollout_seed(source.seed, i, validation=True) for i in mine], device)
            batch["prompt_index"] = torch.tensor(mine, device=device)
            batches.append(batch)
    return batches


def grpo(cfg: GRPOConfig) -> Path:
    """Train the policy on the prompts' rewards; returns the run dir (the trained model is final/)."""
    check_config(cfg)
    rewards = load_rewards(cfg.rewards, cfg.reward_weights)
    model, tokenizer = base_model(cfg.model, "grpo")
    train_items, val_items = load_prompts(cfg.data)
    ctx = init_distributed(cfg.train.device)
    try:
        tc = cfg.train
        check_batch_split(tc.batch_size, ctx.world_size)
        reference = frozen_copy(model).to(ctx.device) if cfg.beta > 0 else None
        torch.manual_seed(tc.seed)
        if cfg.peft.method != "none":
            from lmforge.peft.files import wrap_base

            model = wrap_base(model, cfg.peft, cfg.model, tokenizer=tokenizer)
        model.to(ctx.device)
        block_size = model.config.block_size
        if cfg.max_new_tokens >= block_size:
            raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {block_size}")
        prompts, dropped = tokenize_prompts(train_items, tokenizer, cfg.data.system_prompt,
                                            block_size - cfg.max_new_tokens)
        val_prompts, _ = tokenize_prompts(val_items, tokenizer, cfg.data.system_prompt,
                                          block_size - cfg.max_new_tokens)
        if not prompts:
            raise DataError(f"every training prompt is longer than {block_size - cfg.max_new_tokens} tokens (the "
                            f"context {block_size} less max_new_tokens {cfg.max_new_tokens})")
        half = autocast_dtype(ctx.device, tc.dtype)
        generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, top_k=cfg.top_k)
        source = RolloutSource(model, prompts, tokenizer, rewards, generation, cfg.group_size, cfg.scale_rewards,
                               cfg.iterations, tc.grad_accum, tc.seed, reference,
                               precision=lambda: precision_context(ctx.device, half))
        val_prompts = val_prompts[:tc.eval_batches * tc.batch_size]
        val_batches = validation_batches(source, val_prompts, tc.batch_size, ctx.rank, ctx.world_size, ctx.device)
        start: dict[str, float] = {}
        if val_prompts:
            model.eval()
            with precision_context(ctx.device, half):
                start = held_out_rewards(model, val_prompts, tokenizer, rewards, cfg.max_new_tokens)
        model.train()
        if ctx.rank == 0:
            print(f"grpo: {len(prompts):,} training and {len(val_prompts):,} validation prompts; {cfg.group_size} "
                  f"completions each, rewards {', '.join(cfg.rewards)}; loss {cfg.loss_type}, beta {cfg.beta} "
                  f"(reference: {'the starting model' if reference is not None else 'none'})")
            if start:
                print(f"grpo: held-out greedy reward of the starting policy {start['reward']:.4f}", flush=True)
        warnings = [f"{dropped} training prompts left out: longer than {block_size - cfg.max_new_tokens} tokens"] \
            if dropped else []
        if not val_prompts:
            warnings.append("no validation prompts: val_loss and val_reward will be null")
        objective = functools.partial(grpo_objective, epsilon_low=cfg.epsilon,
                                      epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high,
                                      beta=cfg.beta, loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens)
        inputs = tuple(f for f in [cfg.model, *cfg.data.train, *cfg.data.val] if f and f != "builtin")
        stage = Stage(
            name="grpo", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
            objective=functools.partial(objective, sync=False),
            eval_objective=functools.partial(validation_objective, objective=objective, prompts=val_prompts,
                                             tokenizer=tokenizer, rewards=rewards, max_new_tokens=cfg.max_new_tokens),
            batches=source, val_batches=val_batches,
            tokens_per_sample=cfg.group_size * (max(len(p.ids) for p in prompts) + cfg.max_new_tokens),
            tokenizer_dir=tokenizer_source(cfg.model, tokenizer), inputs=inputs,
            model_files={"training.json": {"stage": "grpo", "chat": True, "base_model": str(cfg.model),
                                           "rewards": list(cfg.rewards), "group_size": cfg.group_size,
                                           "loss_type": cfg.loss_type, "beta": cfg.beta, "peft": cfg.peft.method}},
            warnings=warnings, count_terms=functools.partial(loss_terms, loss_type=cfg.loss_type),
            summary={"train_prompts": len(prompts), "val_prompts": len(val_prompts), "dropped_prompts": dropped,
                     "reference_model": reference is not None, **{f"start_val_{k}": v for k, v in start.items()}})
        return train(stage, ctx)
    finally:
        close_distributed(ctx)

"""`lmforge ppo`: InstructGPT's RL step. The policy (usually the SFT model) samples responses to prompts, a reward
model (lmforge reward) and optional verifiable rewards score them, and PPO with a value head and GAE raises the
score under a per-token KL penalty to the starting policy; PPO-ptx mixes the LM loss on pretraining text in.

    maximize  E_(x,y ~ pi) [ r(x, y) - beta log(pi(y|x) / pi_ref(y|x)) ]  +  gamma_ptx E_(x ~ D_pretrain) [log pi(x)]

The parts: the policy with its value head (lmforge.model.value.PolicyWithValue, one trunk pass for both), the
losses (lmforge.objectives.ppo: KL-penalized rewards, GAE, whitening, the clipped policy and value losses) and the
batch source (lmforge.stages.ppo_rollouts: rollout batches through the KV-cached engine, served as minibatches
for ppo_epochs epochs, early stop on target_kl, exact resume). The one loop trains it; it does not know it is RL.

Prompts: JSONL files of {"prompt": text or messages, "answer": text (optional)}, or `builtin`: the questions of
the built-in preference sets (data.builtin_tasks, default all of them) with their right answers, which verifiable
rewards can check. The reference is a frozen copy of the starting model, loaded only when kl_coef > 0.

Figures: a train record's reward is the mean score of its rollouts, kl their mean summed log-ratio to the reference
(0 at the start), with approx_kl, clipfrac, policy_loss, value_loss and ptx_loss. Validation scores the greedy
responses of the held-out prompts (the first eval_batches * batch_size): val_reward (the total), val_reward_model
and val_reward_<name> (each part), val_kl (their summed log-ratio to the reference); val_loss is
-(val_reward - kl_coef * val_kl), the KL-regularized objective negated. The starting policy's are start_val_* in
summary.json. The final dir is the policy (a model dir, or an adapter dir with PEFT) that chats like any other; the
value head rides along in value_head.* files that loaders ignore.

FSDP is refused: sampling needs the full weights in every process. DDP is fine (each process samples its prompts).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, DataError, TokenizerMismatchError
from lmforge.infer.config import GenerationConfig
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.model.value import PolicyWithValue
from lmforge.objectives.ppo import ppo_objective
from lmforge.objectives.rewards import load_rewards, score
from lmforge.stages.common import base_model, check_batch_split, tokenizer_source
from lmforge.stages.config import PPOConfig, PromptDataSection
from lmforge.stages.ppo_rollouts import PPORollouts, PPOSettings
from lmforge.stages.rollouts import (Prompt, Rewards, collate_rollouts, frozen_copy, load_prompts, token_logps,
                                     tokenize_prompts)
from lmforge.tokenizer import Tokenizer, model_dir_tokenizer
from lmforge.train.distributed import close_distributed, init_distributed
from lmforge.train.loop import Stage, autocast_dtype, precision_context, train
from lmforge.train.packing import rank_batches

__all__ = ["PPOConfig", "ppo"]


def check_config(cfg: PPOConfig) -> None:
    from lmforge.tasks.spec import TASKS

    if not cfg.reward_model and not cfg.rewards:
        raise ConfigError("ppo needs a reward: --reward_model DIR (a reward model from lmforge reward) and/or "
                          "--rewards NAME (a built-in reward or module:function)")
    checks = [("max_new_tokens", cfg.max_new_tokens >= 1, "at least 1"),
              ("temperature", cfg.temperature > 0, "> 0 (rollouts are sampled)"),
              ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"), ("top_k", cfg.top_k >= 0, ">= 0"),
              ("kl_coef", cfg.kl_coef >= 0, ">= 0"), ("gamma", 0 <= cfg.gamma <= 1, "in [0, 1]"),
              ("lam", 0 <= cfg.lam <= 1, "in [0, 1]"), ("cliprange", cfg.cliprange > 0, "> 0"),
              ("cliprange_value", cfg.cliprange_value > 0, "> 0"), ("vf_coef", cfg.vf_coef >= 0, ">= 0"),
              ("ppo_epochs", cfg.ppo_epochs >= 1, "at least 1"),
              ("num_minibatches", cfg.num_minibatches >= 1, "at least 1"),
              ("target_kl", cfg.target_kl >= 0, ">= 0 (0 = never stop early)"), ("ptx_coef", cfg.ptx_coef >= 0, ">= 0")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: expected {expected}")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ConfigError(f"ptx_coef={cfg.ptx_coef} needs --ptx_data DIR (a dataset dir from lmforge data prepare "
                          "of the pretraining text)")
    if cfg.reward_weights and not cfg.rewards:
        raise ConfigError("reward_weights are the weights of --rewards, and none are given")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction!r}: expected a value in [0, 1)")
    unknown = [name for name in cfg.data.builtin_tasks if name not in TASKS]
    if unknown:
        raise ConfigError(f"data.builtin_tasks: unknown task {unknown[0]!r} (lmforge tasks list names them)")
    if cfg.train.parallel == "fsdp":
        raise ConfigError("ppo: train.parallel=fsdp is not supported (sampling rollouts needs the full weights in "
                          "every process); use ddp")


# ---- prompts --------------------------------------------------------------------------------------------------

def preference_prompts(data: PromptDataSection, split: str, limit: Optional[int] = None) -> list[Prompt]:
    """The questions of the built-in tasks (default: the preference sets) of `split`, with their right answers (what
    `builtin` means in data.train)."""
    from lmforge.tasks.builtin import load_task
    from lmforge.tasks.spec import PREFERENCE_TASKS

    return [Prompt(f"builtin {name} {split} #{i}", [{"role": "user", "content": example.prompt}],
                   example.answers[0] if example.answers else "")
            for name in data.builtin_tasks or PREFERENCE_TASKS
            for i, example in enumerate(load_task(name, split, data.cache_dir, limit))]


# ---- rewards --------------------------------------------------------------------------------------------------

class Scorer:
    """The score of a response: the reward model's (weight 1) plus the weighted verifiable rewards."""

    def __init__(self, reward_model: Optional[nn.Module], tokenizer: Tokenizer, rewards: Rewards,
                 batch_size: int) -> None:
        self.reward_model, self.tokenizer, self.rewards, self.batch_size = reward_model, tokenizer, rewards, batch_size

    def each(self, prompts: Sequence[Prompt], texts: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(the total score of each response, each part's scores by name: 'model' for the reward model)."""
        from lmforge.stages.reward import reward_scores

        totals, parts = [0.0] * len(texts), {}
        if self.reward_model is not None:
            parts["model"] = reward_scores(self.reward_model, self.tokenizer, [p.messages for p in prompts], texts,
                                           self.batch_size)
            totals = list(parts["model"])
        if self.rewards:
            verifiable, each = score(self.rewards, [p.text for p in prompts], texts, [p.answer for p in prompts])
            totals = [t + v for t, v in zip(totals, verifiable)]
            parts.update(each)
        return totals, parts

    def __call__(self, prompts: Sequence[Prompt], texts: list[str]) -> list[float]:
        return self.each(prompts, texts)[0]


def check_reward_model(reward_model: str, model_dir: str, tokenizer: Tokenizer) -> None:
    """Refuse a reward model that reads text with another tokenizer than the policy's (before loading it)."""
    theirs = model_dir_tokenizer(reward_model) if Path(reward_model).is_dir() else None
    if theirs is not None and theirs.fingerprint != tokenizer.fingerprint:
        raise TokenizerMismatchError(f"reward_model {reward_model} was trained with another tokenizer "
                                     f"({theirs.fingerprint[:12]}) than the policy {model_dir} "
                                     f"({tokenizer.fingerprint[:12]}); train the reward model from the policy's "
                                     "model dir")


def ptx_sampler(cfg: PPOConfig, tokenizer: Tokenizer, seq_len: int, seed: int) -> Any:
    """The pretraining windows of PPO-ptx: the train split of cfg.ptx_data, whose tokenizer must be the policy's."""
    from lmforge.data.shards import TokenShards, read_meta
    from lmforge.train.data import WindowSampler, num_windows

    meta = read_meta(cfg.ptx_data)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise TokenizerMismatchError(f"ptx_data {cfg.ptx_data} was tokenized with another tokenizer "
                                     f"({str(meta.get('tokenizer_fingerprint'))[:12]}) than the policy {cfg.model} "
                                     f"({tokenizer.fingerprint[:12]}); prepare it with lmforge data prepare "
                                     f"--tokenizer {cfg.model}")
    tokens = TokenShards(cfg.ptx_data, "train")
    if num_windows(len(tokens), seq_len) == 0:
        raise DataError(f"ptx_data {cfg.ptx_data}: its train split has {len(tokens)} tokens, fewer than one window "
                        f"of {seq_len + 1}")
    return WindowSampler(tokens, seq_len, seed)


# ---- validation -----------------------------------------------------------------------------------------------

def held_out_figures(policy: nn.Module, prompts: Sequence[Prompt], tokenizer: Tokenizer, scorer: Scorer,
                     reference: Optional[nn.Module], max_new_tokens: int) -> dict[str, float]:
    """The policy's greedy responses to `prompts`: reward (mean total score), reward_<part> (mean of each part) and,
    with a reference, kl (the mean over responses of sum_t log pi(y_t) - log pi_ref(y_t))."""
    from lmforge.infer.generate import generate

    completions = generate(policy, [p.ids for p in prompts], GenerationConfig(max_new_tokens=max_new_tokens,
                                                                               temperature=0.0),
                           tokenizer, eos_id=tokenizer.chat_stop_ids)
    totals, parts = scorer.each(prompts, [c.text or "" for c in completions])
    figures = {"reward": sum(totals) / len(totals)}
    figures.update({f"reward_{name}": sum(values) / len(values) for name, values in parts.items()})
    if reference is not None:
        device = next(policy.parameters()).device
        batch = {k: v.to(device) for k, v in collate_rollouts(prompts, [c.token_ids for c in completions], 1,
                                                               tokenizer.pad_id).items()}
        mask = batch["targets"] != IGNORE_INDEX
        kl = ((token_logps(policy, batch) - token_logps(reference, batch)) * mask).sum(dim=1)
        figures["kl"] = float(kl.mean())
    return figures


def validation_objective(model: nn.Module, batch: dict[str, Tensor], prompts: Sequence[Prompt],
                         tokenizer: Tokenizer, scorer: Scorer, reference: Optional[nn.Module], kl_coef: float,
                         max_new_tokens: int) -> tuple[Tensor, dict[str, Any]]:
    """The held-out figures of the batch's prompts; loss = -(reward - kl_coef * kl); weighted by the prompts."""
    policy = getattr(model, "_orig_mod", model).lm  # decode with the eager model, not a torch.compile wrapper
    chosen = [prompts[i] for i in batch["prompt_index"].tolist()]
    figures = held_out_figures(policy, chosen, tokenizer, scorer, reference, max_new_tokens)
    loss = -(figures["reward"] - kl_coef * figures.get("kl", 0.0))
    return torch.tensor(loss), {"loss": loss, "tokens": float(len(chosen)), **figures}


# ---- the stage ------------------------------------------------------------------------------------------------

def ppo(cfg: PPOConfig) -> Path:
    """Train the policy against the rewards; returns the run dir (the trained policy is final/)."""
    from lmforge.stages.reward import load_reward_model

    check_config(cfg)
    rewards = load_rewards(cfg.rewards, cfg.reward_weights) if cfg.rewards else []
    lm, tokenizer = base_model(cfg.model, "ppo")
    if cfg.reward_model:
        check_reward_model(cfg.reward_model, cfg.model, tokenizer)
    train_items, val_items = load_prompts(cfg.data, builtin=preference_prompts)
    ctx = init_distributed(cfg.train.device)
    try:
        tc = cfg.train
        check_batch_split(tc.batch_size, ctx.world_size)
        reward_model = load_reward_model(cfg.reward_model, ctx.device)[0] if cfg.reward_model else None
        scorer = Scorer(reward_model, tokenizer, rewards, tc.batch_size)
        reference = frozen_copy(lm).to(ctx.device) if cfg.kl_coef > 0 else None
        torch.manual_seed(tc.seed)
        if cfg.peft.method != "none":
            from lmforge.peft.files import wrap_base

            lm = wrap_base(lm, cfg.peft, cfg.model, tokenizer=tokenizer)
        model = PolicyWithValue(lm).to(ctx.device)
        block_size = model.config.block_size
        if cfg.max_new_tokens >= block_size:
            raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {block_size}")
        prompt_room = block_size - cfg.max_new_tokens
        prompts, dropped = tokenize_prompts(train_items, tokenizer, cfg.data.system_prompt, prompt_room)
        val_prompts, _ = tokenize_prompts(val_items, tokenizer, cfg.data.system_prompt, prompt_room)
        if not prompts:
            raise DataError(f"every training prompt is longer than {prompt_room} tokens (the context {block_size} "
                            f"less max_new_tokens {cfg.max_new_tokens})")
        ptx = ptx_sampler(cfg, tokenizer, block_size, tc.seed) if cfg.ptx_coef > 0 else None
        half = autocast_dtype(ctx.device, tc.dtype)
        generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, top_k=cfg.top_k)
        settings = PPOSettings(cfg.kl_coef, cfg.gamma, cfg.lam, cfg.whiten_advantages, cfg.ppo_epochs,
                               cfg.num_minibatches, cfg.target_kl)
        source = PPORollouts(model, prompts, tokenizer, scorer, generation, settings, tc.grad_accum, tc.seed,
                             reference, ptx, precision=lambda: precision_context(ctx.device, half))
        val_prompts = val_prompts[:tc.eval_batches * tc.batch_size]
        val_batches = rank_batches(list(range(len(val_prompts))), tc.batch_size, ctx.rank, ctx.world_size,
                                   lambda mine: {"prompt_index": torch.tensor(mine, device=ctx.device)})
        start: dict[str, float] = {}
        if val_prompts:
            model.eval()
            with torch.no_grad(), precision_context(ctx.device, half):
                start = held_out_figures(model.lm, val_prompts, tokenizer, scorer, reference, cfg.max_new_tokens)
        model.train()
        rollout_size = tc.batch_size * tc.grad_accum * cfg.num_minibatches
        if ctx.rank == 0:
            parts = ([f"reward model {cfg.reward_model}"] if cfg.reward_model else []) + list(cfg.rewards)
            print(f"ppo: {len(prompts):,} training and {len(val_prompts):,} validation prompts; rollout batches of "
                  f"{rollout_size} prompts, {cfg.ppo_epochs} epochs of {cfg.num_minibatches} minibatches; rewards: "
                  f"{', '.join(parts)}; kl_coef {cfg.kl_coef} (reference: "
                  f"{'the starting model' if reference is not None else 'none'}); ptx_coef {cfg.ptx_coef}")
            if start:
                print(f"ppo: held-out greedy reward of the starting policy {start['reward']:.4f}", flush=True)
        warnings = [f"{dropped} training prompts left out: longer than {prompt_room} tokens"] if dropped else []
        if not val_prompts:
            warnings.append("no validation prompts: val_loss and val_reward will be null")
        if cfg.ptx_data and cfg.ptx_coef == 0:
            warnings.append(f"ptx_data {cfg.ptx_data} is not used: ptx_coef is 0")
        objective = functools.partial(ppo_objective, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                                      vf_coef=cfg.vf_coef, ptx_coef=cfg.ptx_coef)
        inputs = tuple(f for f in [cfg.model, cfg.reward_model, cfg.ptx_data, *cfg.data.train, *cfg.data.val]
                       if f and f != "builtin")
        stage = Stage(
            name="ppo", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
            objective=functools.partial(objective, sync=False),
            eval_objective=functools.partial(validation_objective, prompts=val_prompts, tokenizer=tokenizer,
                                             scorer=scorer, reference=reference, kl_coef=cfg.kl_coef,
                                             max_new_tokens=cfg.max_new_tokens),
            batches=source, val_batches=val_batches,
            tokens_per_sample=max(len(p.ids) for p in prompts) + cfg.max_new_tokens,
            tokenizer_dir=tokenizer_source(cfg.model, tokenizer), inputs=inputs,
            model_files={"training.json": {"stage": "ppo", "chat": True, "base_model": str(cfg.model),
                                           "reward_model": cfg.reward_model, "rewards": list(cfg.rewards),
                                           "kl_coef": cfg.kl_coef, "ptx_coef": cfg.ptx_coef,
                                           "peft": cfg.peft.method}},
            warnings=warnings,
            summary={"train_prompts": len(prompts), "val_prompts": len(val_prompts), "dropped_prompts": dropped,
                     "rollout_batch_prompts": rollout_size, "reference_model": reference is not None,
                     **{f"start_val_{k}": v for k, v in start.items()}})
        return train(stage, ctx)
    finally:
        close_distributed(ctx)

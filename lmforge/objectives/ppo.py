"""Proximal Policy Optimization for RLHF (Schulman et al. 2017; Ouyang et al. 2022, InstructGPT's RL step), with a
value head on the policy and generalized advantage estimation (Schulman et al. 2016).

A rollout batch holds N responses y_i sampled from the policy pi_old for prompts x_i, each scored once (s_i: the
reward model's score plus any verifiable rewards). Tensors are (N, T); `mask` marks each row's response tokens, one
contiguous run per row with nothing but padding after it. Per response token t:

    r_t     = -beta (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] s_i           the KL-penalized reward
    delta_t = r_t + gamma V(t + 1) - V(t),   V(last + 1) = 0                         (no bootstrap after the end)
    A_t     = delta_t + gamma lambda A_{t+1},   R_t = A_t + V(t)                    GAE advantages and returns

and the loss on a minibatch, means over its response tokens, with rho_t = pi(y_t) / pi_old(y_t):

    L_pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    L_vf = 0.5 mean_t max((v_t - R_t)^2, (clip(v_t, V(t) - eps_v, V(t) + eps_v) - R_t)^2)
    loss = L_pg + c_vf L_vf                              (+ gamma_ptx * LM loss on pretraining text: PPO-ptx)

These are the formulas of TRL's PPOTrainer (trl/trainer/ppo_trainer.py up to TRL 0.2x; TRL 1.x dropped it), with
its whitening (Bessel-corrected variance, 1e-8 inside the square root); tests/test_ppo.py checks them on worked
numbers and against a transcription of TRL's loop. `ppo_objective` runs the policy with its value head
(lmforge.model.value.PolicyWithValue) on a minibatch of lmforge.stages.ppo_rollouts for the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmforge.model.fused_loss import IGNORE_INDEX

WHITEN_EPS = 1e-8


def last_token_index(mask: Tensor) -> Tensor:
    """(N,) the position of each row's last True in mask (N, T); every row must have one."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def kl_penalized_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (N, T): r_t = -kl_coef * (logps - ref_logps) on every response token (the k1 estimate of
    the KL to the reference, as InstructGPT and TRL), plus scores[i] (N,) on row i's last response token; 0 off the
    responses."""
    mask_f = mask.to(torch.float32)
    rewards = -kl_coef * (logps.float() - ref_logps.float()) * mask_f
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last_token_index(mask)), scores.float(), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (N, T) and 0 off the responses:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

    rewards and values are taken as 0 off the mask, so the value after a response's last token is 0 (the episode
    ends there) whatever the padding holds."""
    mask_f = mask.to(torch.float32)
    rewards, values = rewards.float() * mask_f, values.float() * mask_f
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask_f  # a row's prompt positions (before its response) carry nothing
    return advantages, (advantages + values) * mask_f


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / sum(mask) (0 when the mask is empty)."""
    mask_f = mask.to(x.dtype)
    return (x * mask_f).sum() / mask_f.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, 0 elsewhere; var has Bessel's correction
    n / (n - 1), as TRL's masked_whiten."""
    x = x.float()
    mean = masked_mean(x, mask)
    count = mask.to(torch.float32).sum()
    var = masked_mean((x - mean) ** 2, mask) * count / (count - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + WHITEN_EPS) * mask.to(torch.float32)


def approx_kl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """The approximate KL of the policy to the rollout policy: mean_t 0.5 (log pi - log pi_old)^2 over the response
    tokens (TRL's approxkl; the k2 estimator, >= 0, second-order accurate)."""
    return masked_mean(0.5 * (logps.float() - old_logps.float()) ** 2, mask)


def ppo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, mask: Tensor, cliprange: float = 0.2, cliprange_value: float = 0.2,
             vf_coef: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of the module docstring: L_pg + vf_coef * L_vf, both means over the response tokens (mask).
    All tensors (N, T). Metrics (detached): policy_loss, value_loss, approx_kl (see approx_kl), clipfrac (share of
    tokens whose clipped policy term binds), value_clipfrac (the same for the value), ratio (mean rho)."""
    mask = mask.bool()
    ratio = torch.exp(logps - old_logps)
    pg_losses = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(pg_losses, pg_clipped), mask)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_clipped), mask)
    loss = policy_loss + vf_coef * value_loss
    with torch.no_grad():
        metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                   "approx_kl": approx_kl(logps, old_logps, mask),
                   "clipfrac": masked_mean((pg_clipped > pg_losses).float(), mask),
                   "value_clipfrac": masked_mean((vf_clipped > vf_losses).float(), mask),
                   "ratio": masked_mean(ratio.detach(), mask)}
    return loss, metrics


def ppo_objective(model: nn.Module, batch: dict[str, Tensor], cliprange: float = 0.2, cliprange_value: float = 0.2,
                  vf_coef: float = 0.1, ptx_coef: float = 0.0, sync: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The PPO(-ptx) loss of a minibatch share: input_ids, targets (N, T) (-100 off the responses), old_logps,
    old_values, advantages, returns (N, T), scores and seq_kl (N,) (for the metrics), and optionally loss_scale
    (a scalar multiplying the PPO terms, see lmforge.stages.ppo_rollouts) and ptx_input_ids, ptx_targets (windows of
    pretraining text, whose LM loss enters times ptx_coef). model: a PolicyWithValue (or its DDP wrapper).

    Metrics: loss, tokens, reward (the rollouts' mean score), kl (their mean summed log-ratio to the reference at
    rollout time), response_length, ppo_loss's figures, ptx_loss with pretraining windows, ppo_epoch if given."""
    targets = batch["targets"]
    mask = targets != IGNORE_INDEX
    logps, values, ptx_loss = model(batch["input_ids"], targets=targets, lm_ids=batch.get("ptx_input_ids"),
                                    lm_targets=batch.get("ptx_targets"))
    loss, figures = ppo_loss(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                             batch["returns"], mask, cliprange, cliprange_value, vf_coef)
    if "loss_scale" in batch:
        loss = loss * batch["loss_scale"]
    if ptx_loss is not None:
        loss = loss + ptx_coef * ptx_loss
        figures["ptx_loss"] = ptx_loss.detach()
    metrics: dict[str, Any] = {"loss": loss.detach(), "tokens": mask.sum().float(),
                               "reward": batch["scores"].float().mean(), "kl": batch["seq_kl"].float().mean(),
                               "response_length": mask.sum(dim=1).float().mean(), **figures}
    if "ppo_epoch" in batch:
        metrics["ppo_epoch"] = batch["ppo_epoch"].float()
    if sync:
        metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics

"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with verifiable rewards.

Each prompt q gets a group of G sampled completions o_1..o_G with rewards r_1..r_G. The advantage of every token of
o_i is its reward relative to the group:

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)      std with Bessel's correction, as TRL
    A_i =  r_i - mean(r)                         scale=False (Dr. GRPO, Liu et al. 2025: no std bias)

With the token ratio rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t) (pi_old: the policy that sampled the group),
the per-token loss is PPO's clipped surrogate plus an optional KL penalty towards a reference policy:

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        Schulman's k3 estimator of KL(pi || pi_ref), >= 0

and the loss aggregates l_t over the completion tokens (mask) of the N = B*G sequences:

    grpo:     1/N sum_i (1/|o_i| sum_t l_t)      each sequence's token mean, then the mean over sequences
    bnpo:     sum_i sum_t l_t / sum_i |o_i|      the mean over all tokens
    dr_grpo:  sum_i sum_t l_t / (N * L)          L = max_completion_length: no length bias at all

These equal TRL's GRPOTrainer losses of the same names (tests/test_grpo.py runs TRL's code on the same inputs).
`grpo_objective` computes the policy's log-probabilities of a rollout batch (lmforge.stages.grpo) for the loop.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lmforge.model.fused_loss import IGNORE_INDEX

LossType = Literal["grpo", "bnpo", "dr_grpo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """Advantages (B*G,) of rewards (B*G,) laid out group by group (the G samples of a prompt adjacent):
    r - the group's mean, divided by (the group's std + 1e-4) when `scale`."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centered[:, :1])
        centered = centered / (std + STD_EPS)
    return centered.reshape(-1)


def grpo_loss(logps: Tensor, old_logps: Tensor, ref_logps: Optional[Tensor], advantages: Tensor, mask: Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              loss_type: LossType = "grpo", max_completion_length: Optional[int] = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of the module docstring. logps, old_logps, ref_logps, mask: (N, T), the per-token
    log-probabilities of the completion tokens under the policy, the sampling policy and the reference (ref_logps
    is needed only when beta > 0); advantages (N,). Metrics (detached): clip_ratio (share of completion tokens
    whose ratio left the clip range in the direction the clip binds), clip_ratio_low, clip_ratio_high, ratio (mean
    rho), and kl (mean KL_t) when beta > 0."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    advantage = advantages.to(logps.dtype).unsqueeze(1)  # (N, 1): every token of a sequence shares it
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens.clamp(min=1.0)
    else:
        if not max_completion_length:
            raise ValueError("grpo_loss: loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (logps.shape[0] * max_completion_length)

    def token_mean(values: Tensor) -> Tensor:
        return ((values * mask).sum() / tokens.clamp(min=1.0)).detach()

    low = (ratio < 1 - epsilon_low) & (advantage < 0)
    high = (ratio > 1 + epsilon_high) & (advantage > 0)
    metrics = {"clip_ratio": token_mean((low | high).to(mask.dtype)), "clip_ratio_low": token_mean(low.to(mask.dtype)),
               "clip_ratio_high": token_mean(high.to(mask.dtype)), "ratio": token_mean(ratio)}
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    return loss, metrics


def loss_terms(batch: dict[str, Tensor], loss_type: LossType) -> int:
    """What a batch's loss is a mean over: its tokens for bnpo, else its sequences (the weight of a micro-batch, so
    that any split into micro-batches and processes gives the same step)."""
    if loss_type == "bnpo":
        return int((batch["targets"] != IGNORE_INDEX).sum())
    return int(batch["targets"].shape[0])


def grpo_objective(model: nn.Module, batch: dict[str, Tensor], epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                   beta: float = 0.0, loss_type: LossType = "grpo", max_completion_length: Optional[int] = None,
                   sync: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The GRPO loss of a rollout batch: input_ids, targets (N, T) (-100 outside the completions), old_logps (N, T),
    advantages (N,), rewards (N,), ref_logps (N, T) when beta > 0. Metrics: loss, tokens (the weight: loss_terms),
    reward (the rollouts' mean reward), completion_length, and grpo_loss's figures."""
    targets = batch["targets"]
    logps = model(batch["input_ids"], targets=targets, per_token=True)  # (N, T), 0 off the completions
    mask = targets != IGNORE_INDEX
    loss, figures = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                              epsilon_low, epsilon_high, beta, loss_type, max_completion_length)
    metrics: dict[str, Any] = {"loss": loss.detach(), "tokens": torch.tensor(float(loss_terms(batch, loss_type))),
                               "reward": batch["rewards"].float().mean(),
                               "completion_length": mask.sum(dim=1).float().mean(), **figures}
    if sync:
        metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics

"""Reward modelling: the Bradley-Terry pairwise loss on a scalar head (InstructGPT's reward model).

For a prompt x with responses ranked y_1 > y_2 > ... > y_K, every ordered pair (w, l) with w ranked above l
is a comparison; with r = the reward model's score of (x, y) (a linear head on the final token's state):

    loss = 1/P * sum_pairs -log sigmoid(r_w - r_l) + c * 1/P * sum_pairs (r_w + r_l)^2

P = K(K-1)/2 per prompt (K = 9 gives 36 pairs), each response forwarded once however many pairs it is in. The
second term (reward centering, coefficient c, off by default) pulls the rewards towards zero mean, the
`center_rewards_coefficient` of TRL's RewardTrainer, whose loss this equals on pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bradley_terry_loss(rewards_better: Tensor, rewards_worse: Tensor, center_coefficient: float = 0.0) -> Tensor:
    """The mean pairwise loss of the module docstring over pairs (P,) of scores."""
    loss = -F.logsigmoid(rewards_better - rewards_worse).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((rewards_better + rewards_worse) ** 2).mean()
    return loss


def reward_objective(model: nn.Module, batch: dict[str, Tensor], center_coefficient: float = 0.0,
                     sync: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The reward model's loss on a batch of responses (rows full_ids; `extract` the final token of each) and the pairs
    pair_better / pair_worse that index them. Metrics per pair (weight `tokens` = pairs): loss, accuracy
    (r_w > r_l), margin (r_w - r_l), reward (the mean score of the batch's responses)."""
    scores, _ = model(batch["full_ids"], extract=batch["extract"])
    rewards = scores[:, 0].float()
    better, worse = rewards[batch["pair_better"]], rewards[batch["pair_worse"]]
    loss = bradley_terry_loss(better, worse, center_coefficient)
    metrics: dict[str, Any] = {"loss": loss.detach(), "tokens": torch.tensor(float(better.numel())),
                               "accuracy": (better > worse).float().mean().detach(),
                               "margin": (better - worse).mean().detach(), "reward": rewards.mean().detach()}
    if sync:
        metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics

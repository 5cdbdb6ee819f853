"""Direct preference optimization (Rafailov et al. 2023) and its IPO, conservative and robust variants.

With log-ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x) and rho_l = log pi(y_l|x) - log pi_ref(y_l|x), each
the sum over the response's tokens, and Delta = rho_w - rho_l:

    sigmoid (DPO):             -log sigmoid(beta Delta)
    sigmoid, label_smoothing e: -(1 - e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta)   (conservative DPO:
                                the label is wrong with probability e)
    robust (rDPO):             ((1 - e)(-log sigmoid(beta Delta)) - e(-log sigmoid(-beta Delta))) / (1 - 2e)
                                (an unbiased loss under label noise e; Chowdhury et al. 2024)
    ipo:                       (rho_w / n_w - rho_l / n_l - 1 / (2 beta))^2  (Azar et al. 2023; n the response's
                                tokens, the normalization TRL uses, or 1 when the token counts are not given)
    hinge:                     max(0, 1 - beta Delta)  (SLiC)

The implicit rewards are beta rho_w and beta rho_l (detached). `dpo_loss` is a pure function of the four
log-probability vectors; `dpo_objective` computes them from a batch (lmforge.stages.preference) for the loop:
the reference log-probabilities are either in the batch (computed once before training) or computed by a live
reference model under no_grad.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossType = Literal["sigmoid", "ipo", "robust", "hinge"]
LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: LossType = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: Optional[Tensor] = None,
             rejected_tokens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each of shape (P,); see the module docstring.

    chosen_tokens / rejected_tokens: the responses' token counts, used by ipo only."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        if not 0 <= e < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {e}")
        losses = ((1 - e) * -F.logsigmoid(beta * delta) - e * -F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    elif loss_type == "ipo":
        if chosen_tokens is not None and rejected_tokens is not None:
            diff = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        else:
            diff = delta
        losses = (diff - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probabilities of each row's response tokens (targets != -100): (N,)."""
    return model(batch["input_ids"], targets=batch["targets"], per_token=True).sum(dim=-1)


def dpo_objective(model: nn.Module, batch: dict[str, Tensor], beta: float = 0.1, loss_type: LossType = "sigmoid",
                  label_smoothing: float = 0.0, reference: Optional[nn.Module] = None,
                  sync: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The mean DPO loss over the batch's pairs. The batch holds the responses as rows (input_ids, targets:
    -100 outside the response), pair_better / pair_worse (P,) indexing the rows, response_tokens (N,), and
    ref_logps (N,) unless a live `reference` model is given. Metrics (per pair, weighted by the pair count
    `tokens`): loss, accuracy (chosen reward above rejected), margin, chosen_reward, rejected_reward."""
    logps = sequence_logps(model, batch)
    if reference is not None:
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
    else:
        ref = batch["ref_logps"]
    better, worse = batch["pair_better"], batch["pair_worse"]
    counts = batch["response_tokens"].float()
    losses, chosen_r, rejected_r = dpo_loss(logps[better], logps[worse], ref[better], ref[worse], beta, loss_type,
                                            label_smoothing, counts[better], counts[worse])
    loss = losses.mean()
    metrics: dict[str, Any] = {"loss": loss.detach(), "tokens": torch.tensor(float(better.numel())),
                               "accuracy": (chosen_r > rejected_r).float().mean(),
                               "margin": (chosen_r - rejected_r).mean(), "chosen_reward": chosen_r.mean(),
                               "rejected_reward": rejected_r.mean()}
    if sync:
        metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics

"""The Medusa-1 loss (Cai et al. 2024): K heads on a frozen model's hidden states, head k predicting k tokens further.

With y_t the token after position t (the batch's `targets`, -100 where no loss is taken), the base LM head predicts
y_t; Medusa head k (k = 1..K) at position t predicts y_{t+k}, the token t + k + 1:

    CE_k = -1/N_k * sum_{b,t : y[b,t+k] != -100} log softmax(z_k[b,t])[y[b,t+k]]
    loss = sum_{k=1..K} lambda^(k-1) * CE_k                      (lambda = `decay`, 0.8 by default)

N_k counts head k's targets; positions whose target t + k falls past the row's end have none. Later heads predict
further and are less certain, so their losses weigh less (the paper's lambda_k = 0.8^k, up to a constant factor).
Metrics per head: loss, top-1 and top-5 accuracy (the target among the head's 1 or 5 largest logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.objectives.cross_entropy import IGNORE_INDEX


def head_targets(targets: Tensor, k: int) -> Tensor:
    """Head k's targets (B, T): targets[b, t + k], -100 for the last k positions (their target is past the row)."""
    if k == 0:
        return targets
    pad = torch.full_like(targets[:, :k], IGNORE_INDEX)
    return torch.cat([targets[:, k:], pad], dim=1)


def medusa_loss(head_logits: Tensor, targets: Tensor, decay: float = 0.8) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of the module docstring. head_logits (K, B, T, V) from the heads; targets (B, T) the batch's
    next tokens. Metrics (detached tensors): loss, tokens (N_1, the weight of the means), and for each head k
    head{k}_loss, head{k}_top1, head{k}_top5 (a head with no target reports 0)."""
    num_heads, vocab = head_logits.shape[0], head_logits.shape[-1]
    loss = head_logits.new_zeros((), dtype=torch.float32)
    metrics: dict[str, Tensor] = {}
    for index in range(num_heads):
        k = index + 1
        target = head_targets(targets, k).reshape(-1)  # (B*T,)
        logits = head_logits[index].reshape(-1, vocab).float()  # (B*T, V)
        counted = target != IGNORE_INDEX
        count = counted.sum()
        if int(count) == 0:
            head_loss = logits.sum() * 0.0  # keeps the graph (and DDP's gradients) without a 0/0
            top1 = top5 = torch.zeros(())
        else:
            head_loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            top = logits[counted].topk(min(5, vocab), dim=-1).indices  # (N_k, 5)
            hits = top == target[counted][:, None]
            top1, top5 = hits[:, 0].float().mean(), hits.any(dim=-1).float().mean()
        loss = loss + decay ** index * head_loss
        metrics.update({f"head{k}_loss": head_loss.detach(), f"head{k}_top1": top1.detach(),
                        f"head{k}_top5": top5.detach()})
    metrics["loss"] = loss.detach()
    metrics["tokens"] = (head_targets(targets, 1) != IGNORE_INDEX).sum().float()
    return loss, metrics


def medusa_objective(model: nn.Module, batch: dict[str, Tensor], decay: float = 0.8,
                     sync: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The loop's objective: `model` (a MedusaModel, or DDP around one) maps input_ids (B, T) to the heads' logits
    (K, B, T, V); the loss is `medusa_loss` against batch["targets"]. Metrics are Python floats, or with sync=False
    detached tensors."""
    loss, metrics = medusa_loss(model(batch["input_ids"]), batch["targets"], decay)
    if sync:
        return loss, {k: float(v) for k, v in metrics.items()}
    return loss, metrics

"""GPT-1's fine-tuning objective for a task head (Radford et al. 2018, section 3.2):

    L3 = L2 + lambda * L1,    L2 = -1/n * sum_items log softmax(logits_item)[label_item],
                              L1 = the language-modelling loss of the same input sequences

logits come from lmforge.model.heads.TaskHeadModel (one row of classes per item, or one score per choice of a
multiple-choice item, the softmax taken over the choices); lambda 0 leaves the auxiliary objective out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def task_head_loss(model: nn.Module, batch: dict[str, torch.Tensor], lm_weight: float = 0.5,
                   sync: bool = True) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """L3 of the batch (see the module docstring); metrics: loss (L3), task_loss (L2), lm_loss (L1 or 0),
    accuracy and tokens (the number of items, which weights validation)."""
    lm_targets = batch["lm_targets"] if lm_weight else None
    logits, lm_loss = model(batch["input_ids"], batch["extract"], lm_targets, int(batch["choices"]))
    task_loss = F.cross_entropy(logits.float(), batch["labels"])
    loss = task_loss + lm_weight * lm_loss if lm_loss is not None else task_loss
    correct = (logits.argmax(dim=-1) == batch["labels"]).float().mean()
    metrics = {"loss": loss.detach(), "task_loss": task_loss.detach(),
               "lm_loss": lm_loss.detach() if lm_loss is not None else torch.zeros(()),
               "accuracy": correct, "tokens": torch.tensor(float(batch["labels"].numel()))}
    if sync:
        metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics

"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (padding, prompt tokens)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy, computed in fp32.

        loss = -1/N * sum_{b,t : y[b,t] != -100} log softmax(z[b,t])[y[b,t]]

    where z = model(input_ids) are the logits (B, T, V), y = batch["targets"] (B, T) (already shifted: y[b,t] is
    the token after input_ids[b,t]) and N is the number of counted targets.
    Returns the loss tensor (for backward) and metrics {"loss": nats/token, "tokens": N}.
    """
    logits = model(batch["input_ids"])  # (B, T, V)
    targets = batch["targets"]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    tokens = int((targets != IGNORE_INDEX).sum())
    return loss, {"loss": loss.item(), "tokens": float(tokens)}

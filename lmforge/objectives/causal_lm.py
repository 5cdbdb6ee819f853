"""Causal language modelling: predict token t+1 from tokens <= t."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.cross_entropy import IGNORE_INDEX  # targets equal to this are left out of the loss

FORWARD_KEYS = ("position_ids", "document_ids", "attention_mask")  # optional batch entries the model takes


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   sync: bool = True) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Mean next-token cross-entropy, computed in fp32.

        loss = -1/N * sum_{b,t : y[b,t] != -100} log softmax(z[b,t])[y[b,t]]

    where z = model(input_ids) are the logits (B, T, V), y = batch["targets"] (B, T) (already shifted: y[b,t] is
    the token after input_ids[b,t]) and N is the number of counted targets. The model computes it itself from
    `targets` (Transformer.forward fuses the LM head into the loss, without materializing z). The batch's
    position_ids, document_ids (packed sequences) and attention_mask go to the model when present.
    Returns the loss tensor (for backward) and metrics {"loss": nats/token, "tokens": N}: Python floats, or with
    sync=False detached 0-d tensors, so that a GPU training loop waits for the device once per optimizer step
    rather than once per micro-batch.
    """
    targets = batch["targets"]
    loss = model(batch["input_ids"], targets=targets, **{k: batch[k] for k in FORWARD_KEYS if k in batch})
    tokens = (targets != IGNORE_INDEX).sum()
    if not sync:
        return loss, {"loss": loss.detach(), "tokens": tokens}
    return loss, {"loss": loss.item(), "tokens": float(tokens)}

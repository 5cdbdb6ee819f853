"""Supervised fine-tuning (instruction tuning): the causal LM loss on the response tokens only.

    loss = -1/|A| * sum_{(b,t) in A} log p(y[b,t] | x[b, <=t])

A is the set of target positions whose token belongs to an assistant turn (its content and the token that ends
it), across every assistant turn of a multi-turn conversation, or every position with train_on='all'; the other
targets are -100 in the batch (lmforge.train.packing builds them from the tokenizer's assistant mask). Packed rows
carry document_ids and per-document position_ids, so conversations never attend to one another.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.causal_lm import causal_lm_loss


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor],
             sync: bool = True) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
    """Mean cross-entropy over the batch's kept targets (see the module docstring); metrics as causal_lm_loss."""
    return causal_lm_loss(model, batch, sync=sync)

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.objectives import causal_lm_loss


class FixedLogits(nn.Module):
    """Returns the same logits for every call, whatever the input ids."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_causal_lm_loss_worked_example():
    # one position with logits [0, ln 3] and target 1: p = 3/4, loss = -ln(3/4)
    model = FixedLogits(torch.tensor([[[0.0, math.log(3.0)]]]))
    loss, metrics = causal_lm_loss(model, {"input_ids": torch.zeros(1, 1, dtype=torch.long),
                                           "targets": torch.tensor([[1]])})
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-7)
    assert metrics == {"loss": pytest.approx(-math.log(0.75), abs=1e-7), "tokens": 1.0}


def test_causal_lm_loss_equals_cross_entropy_and_skips_ignored_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 5))
    targets[1, 3:] = -100
    model = FixedLogits(logits)
    loss, metrics = causal_lm_loss(model, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "targets": targets})
    kept = targets != -100
    expected = F.cross_entropy(logits.float()[kept], targets[kept])
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics["tokens"] == 8.0
    loss.backward()
    assert model.logits.grad is not None

"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after the attention and after the MLP of each
block, the rest of the model frozen.

    sublayer'(x) = h + U act(D h),   h = sublayer(x),   D (m, d), U (d, m), m << d

applied to the sublayer's output before the residual connection (the attention's output projection and the MLP's
down projection are wrapped). U starts at zero, so training starts from the base model exactly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError


class Adapter(nn.Module):
    """A projection `base` followed by a residual bottleneck of `size` hidden units."""

    def __init__(self, base: nn.Module, size: int) -> None:
        super().__init__()
        d = base.out_features
        if not 0 < size <= d:
            raise ConfigError(f"peft.adapter_size={size}: must be in 1..{d} (the model width)")
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        for param in base.parameters():
            param.requires_grad_(False)
        self.down = nn.Linear(d, size)
        self.up = nn.Linear(size, d)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)
        return h + self.up(F.gelu(self.down(h)))


def apply_adapters(model: nn.Module, size: int) -> list[Adapter]:
    """Wrap every block's attention output and MLP down projection in an Adapter."""
    added = []
    for block in model.blocks:
        block.attn.proj = Adapter(block.attn.proj, size)
        block.mlp.down = Adapter(block.mlp.down, size)
        added += [block.attn.proj, block.mlp.down]
    return added

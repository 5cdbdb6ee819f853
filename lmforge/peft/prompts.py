"""Virtual tokens before the input: prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021).

prefix tuning: learned keys and values for P positions in every layer, which every real token attends to, the model
    itself frozen. They are stored as PEFT stores them, one (P, n_layer * 2 * n_kv_head * head_dim) table whose
    row t holds, for layer l, the key at [2l] and the value at [2l + 1] of the (n_layer * 2, n_kv_head, head_dim)
    view; optionally trained through an MLP (embedding (P, d) -> Linear -> tanh -> Linear), which is folded into a
    plain table when saved. Real tokens take positions P, P + 1, ... as in PEFT and transformers.
prompt tuning: P learned input embeddings (a soft prompt) before the token embeddings, at positions 0..P-1;
    optionally initialized from the embeddings of a text's tokens. The prompt's tokens attend only to one another,
    so its keys and values are computed once per forward pass (RecordingCache) and serve as a prefix: the same
    result as prepending the embeddings, and every conversation of a packed row sees the prompt.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lmforge.model.config import ModelConfig


class PrefixEncoder(nn.Module):
    """The learned prefix: (P, n_layer * 2 * kv_dim), directly or through an MLP (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, virtual_tokens: int, projection: bool = False, hidden: int = 128) -> None:
        super().__init__()
        self.virtual_tokens, self.n_layer = virtual_tokens, cfg.n_layer
        self.n_kv_head, self.head_dim = cfg.n_kv_head, cfg.head_dim
        width = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim
        self.projection = None
        if projection:
            self.embedding = nn.Parameter(torch.randn(virtual_tokens, cfg.d_model) * cfg.init_std)
            self.projection = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Parameter(torch.randn(virtual_tokens, width) * cfg.init_std)

    def table(self) -> Tensor:
        """(P, n_layer * 2 * kv_dim): the prefix in PEFT's layout."""
        return self.projection(self.embedding) if self.projection is not None else self.embedding

    def keys_values(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> list[tuple[Tensor, Tensor]]:
        """Per layer (key, value), each (B, n_kv_head, P, head_dim)."""
        table = self.table().view(self.virtual_tokens, 2 * self.n_layer, self.n_kv_head, self.head_dim)
        table = table.permute(1, 2, 0, 3)  # (2L, n_kv_head, P, head_dim)
        if dtype is not None:
            table = table.to(dtype)
        return [(table[2 * i].expand(batch_size, -1, -1, -1), table[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(self.n_layer)]


class PrefixCache:
    """A read-only KV cache holding a prefix: `update` returns the prefix followed by the new keys and values,
    storing nothing, so a training forward pass attends to the prefix and gradients reach it."""

    def __init__(self, keys_values: list[tuple[Tensor, Tensor]]) -> None:
        self.keys_values = keys_values
        self.length = keys_values[0][0].shape[2]
        self.batch_size = keys_values[0][0].shape[0]
        self.max_len = 1 << 30

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        prefix_k, prefix_v = self.keys_values[layer]
        return torch.cat([prefix_k.to(k.dtype), k], dim=2), torch.cat([prefix_v.to(v.dtype), v], dim=2)

    def advance(self, n: int) -> None:
        """Nothing is stored: the cache always holds the prefix only."""


class RecordingCache:
    """A KV cache that keeps each layer's keys and values of one forward pass (no in-place writes, so gradients
    flow): how the soft prompt's keys and values are computed."""

    def __init__(self) -> None:
        self.layers: list[tuple[Tensor, Tensor]] = []
        self.length, self.batch_size, self.max_len = 0, 1, 1 << 30

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.layers.append((k, v))
        return k, v

    def advance(self, n: int) -> None:
        """The recorded pass is complete; the cache is read through `layers`."""


class SoftPrompt(nn.Module):
    """P learned input embeddings (P, d_model)."""

    def __init__(self, cfg: ModelConfig, virtual_tokens: int, init: Optional[Tensor] = None) -> None:
        super().__init__()
        weight = torch.randn(virtual_tokens, cfg.d_model) * cfg.init_std if init is None else init.detach().clone()
        self.embedding = nn.Parameter(weight)

    def expand(self, batch_size: int) -> Tensor:
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)


def text_init(token_embeddings: Tensor, ids: list[int], virtual_tokens: int) -> Tensor:
    """The embeddings of `ids`, repeated or cut to `virtual_tokens` rows (PEFT's TEXT initialization)."""
    if not ids:
        raise ValueError("the initialization text has no tokens")
    repeated = (ids * (virtual_tokens // len(ids) + 1))[:virtual_tokens]
    return token_embeddings[torch.tensor(repeated)].detach().float()

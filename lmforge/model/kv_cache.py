"""KVCache: a static, preallocated key/value cache for incremental decoding.

One tensor per kind holds every layer, so the cache is allocated once and never grows:

    k, v: (n_layer, batch_size, n_kv_head, max_len, head_dim)

`length` counts the positions already filled (the same for every row of the batch; left padding plus an
attention mask handles prompts of different lengths). `Transformer.forward` writes the new keys/values of each
layer at [length, length + T) through `update` and calls `advance(T)` once at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at [length, length + T) of `layer`; return all keys/values so far.

        The returned views have shape (B, n_kv_head, length + T, head_dim). `length` is not advanced here.
        """
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward, after every layer has written)."""
        self.length += n

    def repeat_rows(self, repeats: int) -> None:
        """Repeat every row `repeats` times along the batch, in place: row b becomes rows b * repeats ..
        (b + 1) * repeats - 1. A prompt prefilled once then serves several continuations (a group of samples)."""
        self.k = self.k.repeat_interleave(repeats, dim=1)
        self.v = self.v.repeat_interleave(repeats, dim=1)

    def reset(self) -> None:
        """Forget every position; the memory is kept for reuse."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions (e.g. to drop rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length must be in [0, {self.length}], got {length}")
        self.length = length

"""Training samples from a dataset dir's token shards: a deterministic, resumable window sampler and validation set.

A sample is a window of seq_len + 1 consecutive tokens w; the model reads w[:-1] and predicts w[1:]. Window i starts
at token i * seq_len, so consecutive windows share one token and every token is a target exactly once per epoch:

    num_windows = (num_tokens - 1) // seq_len

The training stream is an infinite sequence of samples; sample k is window perm_e[k mod n] with e = k // n,
n = num_windows and perm_e a permutation drawn from numpy's PCG64 seeded with (seed, e). The sampler's whole state is
(epoch, index) = divmod(k, n), so resuming is exact and does not depend on the number of processes: a global batch
is samples [k, k + B), and rank r of W processes takes its contiguous share [k + r*B/W, k + (r+1)*B/W).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import DataError


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens starting every seq_len tokens."""
    return max(0, (num_tokens - 1) // seq_len)


def windows_to_batch(tokens: TokenShards, starts: list[int], seq_len: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Stack windows into {"input_ids", "targets"}, both (len(starts), seq_len) int64 on `device`."""
    rows = np.stack([tokens.read(s, seq_len + 1) for s in starts]) if starts else np.zeros((0, seq_len + 1), np.int64)
    data = torch.from_numpy(rows)
    if device.type == "cuda":
        data = data.pin_memory().to(device, non_blocking=True)
    return {"input_ids": data[:, :-1], "targets": data[:, 1:]}


class WindowSampler:
    """Shuffled training windows as an infinite, seekable stream (see the module docstring)."""

    def __init__(self, tokens: TokenShards, seq_len: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = num_windows(len(tokens), seq_len)
        self.sample = 0  # global index k of the next sample
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)  # perm_e of self._epoch

    def window(self, k: int) -> int:
        """Window index of sample k: perm_e[k mod n], e = k // n."""
        epoch, index = divmod(k, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._order[index])

    def next_batch(self, global_batch: int, rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's share of the next `global_batch` samples; advances the stream by `global_batch`."""
        share = global_batch // world
        ks = range(self.sample + rank * share, self.sample + (rank + 1) * share)
        starts = [self.window(k) * self.seq_len for k in ks]
        self.sample += global_batch
        return windows_to_batch(self.tokens, starts, self.seq_len, device)

    def state_dict(self) -> dict[str, int]:
        epoch, index = divmod(self.sample, self.num_windows)
        return {"epoch": epoch, "index": index, "num_windows": self.num_windows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_windows"] != self.num_windows:
            raise DataError(f"checkpoint was written for {state['num_windows']} training windows, the dataset now has "
                            f"{self.num_windows} (same dataset dir and data.seq_len are needed to resume)")
        self.seed, self._epoch = state["seed"], -1
        self.sample = state["epoch"] * self.num_windows + state["index"]


def validation_batches(tokens: TokenShards, seq_len: int, batch_size: int, max_batches: int, rank: int,
                       world: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """A fixed set of up to max_batches * batch_size validation windows, spread evenly over the split.

    Batch b holds windows [b*B, (b+1)*B) of that set and rank r keeps its share; a rank's share of the last,
    partial batch may be empty and is then left out.
    """
    n = num_windows(len(tokens), seq_len)
    count = min(n, max_batches * batch_size)
    chosen = [(i * n) // count for i in range(count)]
    batches = []
    for b in range(0, count, batch_size):
        group = chosen[b: b + batch_size]
        share = -(-len(group) // world)
        mine = group[rank * share: (rank + 1) * share]
        if mine:
            batches.append(windows_to_batch(tokens, [w * seq_len for w in mine], seq_len, device))
    return batches

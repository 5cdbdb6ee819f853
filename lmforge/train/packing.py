"""Training rows from variable-length examples (conversations, preference responses): packed or padded, and a
resumable shuffled sampler over them.

An example is a token sequence `ids` with a boolean `mask` (True = a token the model learns to produce). It trains
as the pairs (ids[t], ids[t+1]) for t < n - 1, the target kept where mask[t+1] and -100 (ignored) elsewhere.

- packed: examples are laid end to end in rows of exactly `seq_len` inputs (first fit over the rows still open,
  in a seeded order); `document_ids` number the examples of a row and `position_ids` restart at 0 for each, so with
  the model's document mask every example is computed exactly as it would be alone (tests check the logits). The
  tail of a row is padding: its own document id, targets -100.
- padded: one example per row; a batch is right-padded to its longest row. Right padding needs no attention mask:
  causal attention never lets a real token see the padding after it, and padding is never a target.

`ShuffledSampler` serves rows (or any items) as an endless stream: epoch e is a permutation of the items drawn from
numpy's PCG64 seeded with (seed, e), a global batch is the next `global_batch` samples, rank r of W takes its
contiguous share, and the whole state is (epoch, index), so a run resumes exactly (with any process count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.model.fused_loss import IGNORE_INDEX

OPEN_ROWS = 16  # rows first-fit packing looks back over (bounds the cost; fills rows to ~99% on chat data)


@dataclass
class Row:
    """One training row: inputs, targets, positions and document ids, all the same length."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    document_ids: list[int]
    used: int = 0  # tokens of examples (the rest is padding)


def example_pairs(ids: Sequence[int], mask: Sequence[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example: ids[:-1] and ids[1:] with -100 where mask[1:] is False."""
    return list(ids[:-1]), [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int,
                  seed: int = 0) -> list[Row]:
    """Pack examples (each at most seq_len + 1 tokens) into rows of seq_len inputs; see the module docstring."""
    order = np.random.Generator(np.random.PCG64([seed, 1 << 20])).permutation(len(examples))
    rows: list[Row] = []
    open_rows: list[int] = []  # indices into rows that may still take an example
    for i in order:
        inputs, targets = example_pairs(*examples[int(i)])
        if len(inputs) > seq_len:
            raise DataError(f"example {int(i)} has {len(inputs) + 1} tokens, more than seq_len + 1 = {seq_len + 1}")
        target = next((r for r in open_rows if len(rows[r].input_ids) + len(inputs) <= seq_len), None)
        if target is None:
            rows.append(Row([], [], [], []))
            target = len(rows) - 1
            open_rows = (open_rows + [target])[-OPEN_ROWS:]
        row = rows[target]
        document = row.document_ids[-1] + 1 if row.document_ids else 0
        row.input_ids += inputs
        row.targets += targets
        row.position_ids += list(range(len(inputs)))
        row.document_ids += [document] * len(inputs)
    for row in rows:
        row.used = len(row.input_ids)
        pad = seq_len - row.used
        document = row.document_ids[-1] + 1 if row.document_ids else 0
        row.input_ids += [pad_id] * pad
        row.targets += [IGNORE_INDEX] * pad
        row.position_ids += list(range(pad))
        row.document_ids += [document] * pad
    return rows


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]]) -> list[Row]:
    """One row per example, unpadded (a batch is padded when it is collated)."""
    rows = []
    for ids, mask in examples:
        inputs, targets = example_pairs(ids, mask)
        rows.append(Row(inputs, targets, list(range(len(inputs))), [0] * len(inputs), len(inputs)))
    return rows


def collate(rows: Sequence[Row], pad_id: int, packed: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of rows as tensors (B, T): input_ids, targets, and for packed rows position_ids and document_ids;
    unpacked rows are right-padded to the longest one."""
    width = max((len(r.input_ids) for r in rows), default=1)
    pad = [width - len(r.input_ids) for r in rows]
    batch = {"input_ids": [r.input_ids + [pad_id] * p for r, p in zip(rows, pad)],
             "targets": [r.targets + [IGNORE_INDEX] * p for r, p in zip(rows, pad)]}
    if packed:
        batch["position_ids"] = [r.position_ids for r in rows]
        batch["document_ids"] = [r.document_ids for r in rows]
    tensors = {k: torch.tensor(v, dtype=torch.long).reshape(len(rows), width) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def trained_tokens(rows: Sequence[Row]) -> int:
    return sum(t != IGNORE_INDEX for r in rows for t in r.targets)


class ShuffledSampler:
    """Items (rows, or whole examples) as an endless, seekable stream (see the module docstring): `collate` turns a
    rank's share of a global batch into tensors."""

    def __init__(self, items: Sequence[Any], collate_items: Callable[[list, torch.device], dict[str, torch.Tensor]],
                 seed: int) -> None:
        if not items:
            raise DataError("no training examples left (every example was dropped or the data is empty)")
        self.items, self.collate_items, self.seed = list(items), collate_items, seed
        self.sample = 0
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def item(self, k: int) -> Any:
        epoch, index = divmod(k, len(self.items))
        if epoch != self._epoch:
            self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.items))
            self._epoch = epoch
        return self.items[int(self._order[index])]

    def next_batch(self, global_batch: int, rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
        share = global_batch // world
        start = self.sample + rank * share
        self.sample += global_batch
        return self.collate_items([self.item(k) for k in range(start, start + share)], device)

    def state_dict(self) -> dict[str, Any]:
        epoch, index = divmod(self.sample, len(self.items))
        return {"epoch": epoch, "index": index, "rows": len(self.items), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != len(self.items):
            raise DataError(f"checkpoint was written for {state['rows']} training rows, the data now gives "
                            f"{len(self.items)} (the same data, seq_len and packing are needed to resume)")
        self.seed, self._epoch = state["seed"], -1
        self.sample = state["epoch"] * len(self.items) + state["index"]


def row_sampler(rows: Sequence[Row], pad_id: int, packed: bool, seed: int) -> ShuffledSampler:
    """The sampler of packed or padded rows."""
    return ShuffledSampler(rows, lambda chosen, device: collate(chosen, pad_id, packed, device), seed)


def fixed_batches(rows: Sequence[Row], batch_size: int, pad_id: int, packed: bool, rank: int, world: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Validation: the rows in order, in batches of batch_size, each split over the ranks (an empty share is left
    out)."""
    return rank_batches(rows, batch_size, rank, world, lambda mine: collate(mine, pad_id, packed, device))


def rank_batches(items: Sequence[Any], batch_size: int, rank: int, world: int,
                 collate_items: Callable[[list], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The items in order, batch_size at a time, each batch's share of this rank collated (an empty share is left
    out): fixed validation batches of any kind of item."""
    batches = []
    for start in range(0, len(items), batch_size):
        group = list(items[start:start + batch_size])
        share = -(-len(group) // world)
        mine = group[rank * share:(rank + 1) * share]
        if mine:
            batches.append(collate_items(mine))
    return batches

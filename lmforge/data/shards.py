"""Token shards of a dataset dir: the writer used by `lmforge data prepare` and the reader used for training.

Format (`lmforge-dataset-v1`): each split is a sequence of shards `{split}_{index:06d}.bin`, each a flat array of
token ids with no header, uint16 when the vocabulary has at most 65535 ids, else uint32 (read with numpy.memmap).
Shards hold `shard_tokens` tokens each except the last; `meta.json` lists them in order and says the dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError
from lmforge.io import atomic_write_bytes

DATASET_FORMAT = "lmforge-dataset-v1"
DEFAULT_SHARD_TOKENS = 10_000_000


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class ShardWriter:
    """Appends token ids to fixed-size shards of one split; each shard is written atomically (temp + rename)."""

    def __init__(self, out_dir: str | Path, split: str, vocab_size: int,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.vocab_size = vocab_size
        self.shards: list[str] = []
        self.tokens = 0
        self._buffer = np.empty(shard_tokens, dtype=shard_dtype(vocab_size))
        self._filled = 0

    def write(self, ids: np.ndarray | list[int]) -> None:
        """Append token ids (each in [0, vocab_size))."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id outside [0, {self.vocab_size}) written to split '{self.split}'")
        start = 0
        while start < ids.size:
            take = min(ids.size - start, self._buffer.size - self._filled)
            self._buffer[self._filled:self._filled + take] = ids[start:start + take]
            self._filled += take
            start += take
            if self._filled == self._buffer.size:
                self._flush()
        self.tokens += int(ids.size)

    def close(self) -> list[str]:
        """Write the last, partial shard; return the shard file names in order."""
        if self._filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = shard_name(self.split, len(self.shards))
        atomic_write_bytes(self.out_dir / name, self._buffer[:self._filled].tobytes())
        self.shards.append(name)
        self._filled = 0


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """Load `meta.json` of a dataset dir, or raise DataError naming the path."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"dataset dir {dataset_dir}: no meta.json (expected a dir written by `lmforge data prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
    if meta.get("format") != DATASET_FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    return meta


class TokenShards:
    """The token stream of one split, read through numpy memmaps across shard boundaries."""

    def __init__(self, dataset_dir: str | Path, split: str) -> None:
        meta = read_meta(dataset_dir)
        if split not in meta["splits"]:
            raise DataError(f"dataset dir {dataset_dir}: no split '{split}' in meta.json")
        dtype = np.dtype(meta["dtype"])
        self.shards: list[np.ndarray] = []
        for name in meta["splits"][split]["shards"]:
            path = Path(dataset_dir) / name
            if not path.is_file():
                raise DataError(f"dataset dir {dataset_dir}: shard {name} listed in meta.json is missing")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds [offsets[i], offsets[i+1])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a new int64 array."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            lo = start + filled - int(self.offsets[shard])
            piece = self.shards[shard][lo:lo + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

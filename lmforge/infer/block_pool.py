"""BlockPool: the paged KV cache's memory manager (no tensors here: the model runner owns the storage).

The cache is cut into `num_blocks` blocks of `block_size` token slots each. A sequence holds a block table (the
list of its blocks, in order), so position p of the sequence lives in slot p % block_size of block
table[p // block_size]. Blocks are handed out from a free list and returned to it when no sequence uses them.

Prefix caching: a block whose slots are all computed is *full*; it is registered under a hash of its tokens and of
every token before it (the hash chains through the previous block's hash), so two sequences with the same first
n * block_size tokens share those n blocks read-only (each shared block counts its users). A freed full block
keeps its contents and its hash and goes to the end of the free list: a later request with the same prefix takes
it back, and allocation reuses the least recently freed blocks first, dropping their hashes then (LRU eviction).

    pool = BlockPool(num_blocks=64, block_size=16)
    hits = pool.lookup(hashes)        # blocks already holding these prefixes (their use counts raised)
    table = hits + pool.allocate(3)   # fresh blocks
    pool.register(table[k], hashes[k])  # block k is now full: shareable
    pool.free(table)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence


class OutOfBlocks(Exception):
    """Raised by BlockPool.allocate when fewer blocks are free than asked for (the scheduler then preempts)."""


def block_hashes(tokens: Sequence[int], block_size: int, salt: str = "", parent: Optional[bytes] = None
                 ) -> list[bytes]:
    """The chained hashes of the full blocks of `tokens`: h_k = H(h_{k-1}, tokens[k*bs:(k+1)*bs]), h_-1 = H(salt)
    (or `parent`, the hash of the block before tokens[0], to continue a chain).

    A block's hash names its whole prefix, so equal hashes mean equal keys/values for the block (with the same
    weights: an engine whose model changes must be made anew)."""
    if parent is None:
        parent = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    hashes = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(b"".join(int(t).to_bytes(4, "little") for t in tokens[start:start + block_size]))
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """A free-list allocator of KV blocks with use counts and a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.users = [0] * num_blocks
        self.hash_of: list[Optional[bytes]] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        self.hits = self.queries = 0  # prefix-cache statistics, in blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (use count 1), taken least recently freed first; a cached one loses its hash."""
        if n > len(self.free_blocks):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self.free_blocks)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_blocks.popitem(last=False)
            if self.hash_of[block] is not None:
                del self.cached[self.hash_of[block]]
                self.hash_of[block] = None
            self.users[block] = 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` found, each now used once more (`count_lookup`
        records the statistics once the sequence is admitted)."""
        found = []
        for digest in hashes:
            block = self.cached.get(digest)
            if block is None:
                break
            if self.users[block] == 0:
                del self.free_blocks[block]
            self.users[block] += 1
            found.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return found

    def count_lookup(self, queried: int, found: int) -> None:
        self.queries += queried
        self.hits += found

    def share(self, blocks: Sequence[int]) -> None:
        """One more user of each (already used) block: a forked sequence reading its parent's full blocks."""
        for block in blocks:
            if self.users[block] < 1:
                raise RuntimeError(f"block {block} is free and cannot be shared")
            self.users[block] += 1

    def register(self, block: int, digest: bytes) -> None:
        """Mark a full block as holding the prefix named by `digest`, so later sequences can share it. A block
        whose prefix is already cached elsewhere (computed twice by sequences admitted together) is left out."""
        if self.hash_of[block] is None and digest not in self.cached:
            self.hash_of[block] = digest
            self.cached[digest] = block

    def free(self, blocks: Sequence[int]) -> None:
        """Give up one use of each block; blocks no one uses go to the end of the free list (kept if cached).
        Freed in reverse so that a sequence's last blocks, the least likely to be shared, are reused first."""
        for block in reversed(blocks):
            self.users[block] -= 1
            if self.users[block] < 0:
                raise RuntimeError(f"block {block} freed more often than it was used")
            if self.users[block] == 0:
                self.free_blocks[block] = None

    def hit_rate(self) -> float:
        """Prefix-cache hits over blocks looked up, since the pool was made."""
        return self.hits / self.queries if self.queries else 0.0

"""The engine's scheduler: which sequences run in the next step and how many of their tokens (no model here).

Continuous batching: every step, the running sequences come first (a decoding one needs one token; one whose
prompt is still being prefilled in chunks takes its next chunk), then waiting sequences are admitted in arrival
order while the step's token budget (`max_batch_tokens`), the sequence limit (`max_seqs`) and free KV blocks
allow. A long prompt is prefilled in chunks of what the budget leaves, alongside the running decodes, so a new
request never stalls the others for a whole prompt.

On admission a sequence takes the cached blocks of its longest computed prefix (the BlockPool's prefix cache) and
starts computing after them; its last token is always computed, since its logits pick the next token.

Preemption by recomputation: when a running sequence needs a block and none is free, the most recently admitted
running sequence is preempted: its blocks are released (full ones stay in the prefix cache) and it goes back to
the front of the waiting queue with all its tokens (prompt + generated) as the prompt to recompute. Its output
continues exactly where it stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.infer.block_pool import BlockPool, OutOfBlocks, block_hashes

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One token sequence the engine generates: the prompt, then its generated tokens.

    num_computed tokens have their keys/values in the cache (in the blocks of block_table); the tokens after them
    are fed in the next steps. `salt` keys the prefix cache (sequences share blocks only under the same salt)."""

    seq_id: int
    tokens: list[int]
    prompt_len: int
    salt: str = ""
    owner: Any = None  # the engine's request
    sample: Any = None  # the engine's per-sample decoding state
    status: str = WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_hashes: int = 0  # how many of the full blocks have been registered in the prefix cache
    last_hash: Optional[bytes] = None  # the hash of the last of those blocks (the chain continues from it)
    preemptions: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class ScheduledChunk:
    """Feed tokens [start, start + length) of `seq` this step; `sample` when they reach its last token."""

    seq: Sequence
    start: int
    length: int

    @property
    def sample(self) -> bool:
        return self.start + self.length == len(self.seq.tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_tokens: int = 512, max_seqs: int = 64) -> None:
        if max_batch_tokens < 1 or max_seqs < 1:
            raise ValueError(f"max_batch_tokens and max_seqs must be >= 1, got {max_batch_tokens}, {max_seqs}")
        self.pool, self.max_batch_tokens, self.max_seqs = pool, max_batch_tokens, max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if len(seq.tokens) < 1:
            raise ValueError("a sequence needs at least one token")
        if self._blocks_for(len(seq.tokens)) > self.pool.num_blocks:
            raise ValueError(f"a sequence of {len(seq.tokens)} tokens needs more blocks than the cache has "
                             f"({self.pool.num_blocks} of {self.pool.block_size} tokens)")
        seq.status = WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks of the next step. Running sequences are never starved by new ones: they are served first, and
        preemption takes the newest running sequences first."""
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        for seq in list(self.running):
            if seq.status != RUNNING or budget == 0:
                continue  # preempted by an older sequence in this loop
            length = min(len(seq.tokens) - seq.num_computed, budget)
            if length == 0:
                continue  # nothing new to feed (its last token has not been sampled yet)
            if not self._reserve(seq, length, chunks):
                continue  # seq itself was preempted
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            budget -= length
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            queried = self._take_cached_prefix(seq)
            length = min(len(seq.tokens) - seq.num_computed, budget)
            try:
                seq.block_table += self.pool.allocate(self._blocks_for(seq.num_computed + length) -
                                                      len(seq.block_table))
            except OutOfBlocks:  # admit it when blocks come free; its cached prefix stays in the cache meanwhile
                self.pool.free(seq.block_table)
                self._reset(seq)
                break
            self.pool.count_lookup(queried, seq.num_cached_hashes)
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, length))
            budget -= length
        return chunks

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_size)

    def _take_cached_prefix(self, seq: Sequence) -> int:
        """Start a new sequence after the blocks of its prompt already in the prefix cache (never all of it);
        returns how many blocks were looked up."""
        hashes = block_hashes(seq.tokens[:len(seq.tokens) - 1], self.pool.block_size, seq.salt)
        seq.block_table = self.pool.lookup(hashes)
        seq.num_cached_hashes = len(seq.block_table)
        seq.num_computed = seq.num_cached_hashes * self.pool.block_size
        seq.last_hash = hashes[seq.num_cached_hashes - 1] if seq.num_cached_hashes else None
        return len(hashes)

    @staticmethod
    def _reset(seq: Sequence) -> None:
        seq.block_table, seq.num_computed, seq.num_cached_hashes, seq.last_hash = [], 0, 0, None

    def _reserve(self, seq: Sequence, length: int, chunks: list[ScheduledChunk]) -> bool:
        """Allocate the blocks `seq` needs for `length` more tokens, preempting the newest running sequences
        (and dropping their chunks already planned this step) until they fit; False if `seq` itself went."""
        needed = self._blocks_for(seq.num_computed + length) - len(seq.block_table)
        while True:
            try:
                seq.block_table += self.pool.allocate(needed)
                return True
            except OutOfBlocks:
                victim = self.running[-1]
                self.preempt(victim)
                chunks[:] = [c for c in chunks if c.seq is not victim]
                if victim is seq:
                    return False

    def preempt(self, seq: Sequence) -> None:
        """Release seq's blocks and queue it first among the waiting, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        self._reset(seq)
        seq.status = WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def computed(self, chunk: ScheduledChunk) -> None:
        """Record that the chunk's keys/values are in the cache; register the blocks it filled for sharing."""
        seq = chunk.seq
        seq.num_computed = chunk.start + chunk.length
        bs = self.pool.block_size
        full = seq.num_computed // bs
        if full > seq.num_cached_hashes:  # hash only the new full blocks, continuing the chain
            hashes = block_hashes(seq.tokens[seq.num_cached_hashes * bs:full * bs], bs, seq.salt, seq.last_hash)
            for k, digest in enumerate(hashes, start=seq.num_cached_hashes):
                self.pool.register(seq.block_table[k], digest)
            seq.num_cached_hashes, seq.last_hash = full, hashes[-1]

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.status = FINISHED

    def kv_usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks


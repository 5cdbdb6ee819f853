"""The engine's model runner: a Transformer's forward pass over a paged KV cache, for many sequences at once.

Storage, one tensor per kind for every layer:

    k, v: (n_layer, num_blocks, block_size, n_kv_head, head_dim)

Token p of a sequence lives at slot p % block_size of block block_table[p // block_size]. A step runs a list of
chunks (a few tokens of one sequence each: a prompt chunk, or the one new token of a decoding sequence), flattened
into one row of N tokens: the embeddings, q/k/v projections, MLPs and norms run once over all N tokens, so the
matmuls see every sequence of the step together. Only attention is per sequence:

- decoding sequences (one query each) are attended together, in groups of similar context lengths: a group's
  blocks are gathered into a (B, n_kv_head, S, head_dim) batch padded to its longest context, keys past a
  sequence's length masked;
- a prompt chunk attends, causally, to its sequence's gathered blocks (the cached prefix and itself).

The new keys/values are written to their slots before attention reads them. The function is the same as
`Transformer.forward` with a KVCache (same modules, same weights), up to float rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import _SDPA_HAS_GQA, apply_rope


@dataclass
class ChunkInput:
    """One sequence's tokens in a step: token ids at positions [start, start + len(tokens)) of the sequence."""

    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]


def runnable_model(model: nn.Module) -> nn.Module:
    """The Transformer the runner walks: the model itself, or the base of a LoRA/adapter PeftModel (their low-rank
    updates live in the base's modules). Prefix and prompt tuning (virtual tokens) are refused."""
    if getattr(model, "virtual", 0):
        raise ConfigError("the engine does not run prefix or prompt tuning (virtual tokens): use generate without "
                          "the engine, or a LoRA adapter")
    base = getattr(model, "base", model)
    if not hasattr(base, "blocks") or not hasattr(base, "tok_emb"):
        raise ConfigError(f"the engine runs lmforge Transformers, not {type(model).__name__}")
    return base


class PagedRunner:
    """Holds the paged KV storage of a model and runs steps over it (see the module docstring)."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.model = runnable_model(model)
        cfg = self.model.config
        weight = self.model.tok_emb.weight
        self.device, self.dtype = weight.device, dtype or weight.dtype
        self.block_size = block_size
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        shape = (cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.pre_norm = cfg.norm_placement == "pre"

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @torch.inference_mode()
    def run(self, chunks: Sequence[ChunkInput], sample_rows: Sequence[int],
            every_position: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Feed every chunk; return the logits (len(sample_rows), V) after the last token of the chunks whose
        indices are listed in sample_rows (the others only fill the cache), and for each chunk index in
        every_position the logits after each of its tokens, (len(chunk), V) (prompt log-probabilities)."""
        m, device = self.model, self.device
        lengths = [len(c.tokens) for c in chunks]
        tokens = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=device)  # (N,)
        positions = torch.tensor([c.start + i for c in chunks for i in range(len(c.tokens))], dtype=torch.long,
                                 device=device)  # (N,)
        bs = self.block_size
        slots = torch.tensor([c.block_table[p // bs] * bs + p % bs
                              for c in chunks for p in range(c.start, c.start + len(c.tokens))],
                             dtype=torch.long, device=device)  # (N,) flat slot of each new token
        plan = _AttentionPlan(chunks, lengths, bs, device)
        offsets = plan.offsets  # where each chunk's tokens start in the flattened row

        x = m.tok_emb(tokens)  # (N, d_model)
        rope = None
        if m.pos_emb is not None:
            x = x + m.pos_emb(positions)
        else:
            rope = (m.rope_cos[positions].unsqueeze(1), m.rope_sin[positions].unsqueeze(1))  # (N, 1, head_dim)
        for layer, block in enumerate(m.blocks):
            if self.pre_norm:
                x = x + self._attention(layer, block.attn, block.attn_norm(x), rope, slots, plan)
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attn_norm(x + self._attention(layer, block.attn, x, rope, slots, plan))
                x = block.mlp_norm(x + block.mlp(x))
        ends = torch.tensor([offsets[i] + lengths[i] - 1 for i in sample_rows], dtype=torch.long, device=device)
        full = {}
        for i in every_position:  # the whole chunk through the head (a few prompts that asked for it)
            start = offsets[i]
            full[i] = m.lm_head(m.norm(x[start:start + lengths[i]]))  # (T_i, V)
        return m.lm_head(m.norm(x.index_select(0, ends))), full  # (R, V)

    def _attention(self, layer: int, attn: nn.Module, x: Tensor, rope: Optional[tuple[Tensor, Tensor]],
                   slots: Tensor, plan: "_AttentionPlan") -> Tensor:
        N = x.shape[0]
        heads = attn.qkv(x).view(N, self.n_head + 2 * self.n_kv_head, self.head_dim)  # rows [q; k; v]
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (N, n_head, hd), (N, n_kv_head, hd)
        k_pool = self.k[layer].view(-1, self.n_kv_head, self.head_dim)  # (num_blocks * block_size, n_kv, hd)
        v_pool = self.v[layer].view(-1, self.n_kv_head, self.head_dim)
        k_pool.index_copy_(0, slots, k.to(self.dtype))
        v_pool.index_copy_(0, slots, v.to(self.dtype))
        out = torch.empty(N, self.n_head, self.head_dim, device=x.device, dtype=q.dtype)
        for rows, tables, mask in plan.decodes:  # one query per sequence, attended together
            keys, values = self._gather(layer, tables)  # (B, n_kv, S, hd)
            query = q.index_select(0, rows).unsqueeze(2)  # (B, n_head, 1, hd)
            out[rows] = self._sdpa(query, keys, values, mask).squeeze(2)
        for rows, table, mask in plan.prefills:  # a prompt chunk: causal over its cached prefix and itself
            keys, values = self._gather(layer, table)  # (1, n_kv, S, hd)
            query = q[rows].transpose(0, 1).unsqueeze(0)  # (1, n_head, T, hd)
            out[rows] = self._sdpa(query, keys, values, mask)[0].transpose(0, 1)
        return attn.proj(out.reshape(N, self.n_head * self.head_dim))

    def _gather(self, layer: int, tables: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the blocks in `tables` (B, n_blocks): (B, n_kv_head, n_blocks * block_size, hd)."""
        B, n = tables.shape
        view = (B, n * self.block_size, self.n_kv_head, self.head_dim)
        keys = self.k[layer].index_select(0, tables.reshape(-1)).view(view)
        values = self.v[layer].index_select(0, tables.reshape(-1)).view(view)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        gqa = {}
        if self.n_kv_head != self.n_head:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask = mask if mask is None or mask.dtype == q.dtype else mask.to(q.dtype)  # bf16 on a GPU
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, **gqa)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy the keys/values of block src into block dst for each (src, dst) (copy-on-write of a shared tail)."""
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


def _additive(visible: Tensor) -> Tensor:
    """A boolean mask as SDPA's additive one (0 where visible, -inf elsewhere), made once per step instead of by
    SDPA in every layer."""
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))


class _AttentionPlan:
    """Which flattened rows attend to which blocks, computed once per step and shared by every layer."""

    def __init__(self, chunks: Sequence[ChunkInput], lengths: list[int], block_size: int,
                 device: torch.device) -> None:
        self.offsets = offsets = [0, *itertools.accumulate(lengths)][:-1]
        # decoding sequences, shortest context first, in groups whose longest context is at most twice their
        # shortest: each group is padded to its own longest, not to the longest of the step
        decode = sorted((i for i, c in enumerate(chunks) if lengths[i] == 1), key=lambda i: chunks[i].start)
        groups: list[list[int]] = []
        for i in decode:
            if groups and chunks[i].start + 1 <= 2 * (chunks[groups[-1][0]].start + 1) + block_size:
                groups[-1].append(i)
            else:
                groups.append([i])
        self.decodes = [self._decode_group(group, chunks, offsets, block_size, device) for group in groups]
        self.prefills = []
        for i, chunk in enumerate(chunks):
            if lengths[i] == 1:
                continue
            context = chunk.start + lengths[i]
            n_blocks = -(-context // block_size)
            table = torch.tensor([list(chunk.block_table[:n_blocks])], dtype=torch.long, device=device)
            query_pos = torch.arange(chunk.start, context, device=device)[:, None]  # (T, 1)
            key_pos = torch.arange(n_blocks * block_size, device=device)[None, :]  # (1, S)
            rows = torch.arange(offsets[i], offsets[i] + lengths[i], device=device)
            self.prefills.append((rows, table, _additive(key_pos <= query_pos)))

    @staticmethod
    def _decode_group(group: list[int], chunks: Sequence[ChunkInput], offsets: list[int], block_size: int,
                      device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(rows (B,), block tables (B, n_blocks) padded with block 0, key mask (B, 1, 1, n_blocks * block_size))."""
        contexts = [chunks[i].start + 1 for i in group]
        n_blocks = -(-max(contexts) // block_size)
        tables = [list(chunks[i].block_table[:n_blocks]) for i in group]
        tables = torch.tensor([t + [0] * (n_blocks - len(t)) for t in tables], dtype=torch.long, device=device)
        columns = torch.arange(n_blocks * block_size, device=device)
        visible = (columns[None, :] < torch.tensor(contexts, device=device)[:, None])[:, None, None, :]
        rows = torch.tensor([offsets[i] for i in group], dtype=torch.long, device=device)
        return rows, tables, _additive(visible)


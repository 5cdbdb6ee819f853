"""Medusa decoding (Cai et al. 2024, Medusa-1): the heads propose a tree of continuations, the model checks them all
in one forward pass, and each row keeps the longest accepted path.

    heads = load_medusa_heads("runs/medusa/final", model)
    completions, stats = medusa_generate(model, heads, ["a dog is"], GenerationConfig(temperature=0), tokenizer)

The tree is a list of paths, each the top-k rank chosen at each depth: (0,) is head 1's best token, (1, 0) head 1's
second token followed by head 2's best. A step, for every row of the batch at once:
  1. the root is the row's newest token (from the model, not yet in the KV cache); node (i_1, .., i_d) holds
     top-(i_d) of head d, the heads read on the hidden state that chose the root;
  2. one forward of root + nodes through the cache, with the tree attention mask (a node sees the row's cached
     prefix and its own ancestors) and position ids prefix length + depth;
  3. a node is accepted when its parent is and the model, read at the parent, agrees with it:
       greedy (temperature 0):  token == argmax p_parent  -> the same ids as greedy `generate` (up to float
                                rounding between a tree pass and one-token passes, which can only matter at a tie)
       typical (temperature > 0): p_parent(token) > min(epsilon, delta * exp(-H(p_parent)))
     with p the model's distribution after temperature, top-k and top-p (lmforge.infer.sampling), epsilon =
     posterior_threshold, delta = posterior_alpha (the Medusa code's names);
  4. the deepest accepted node wins (typical: the likeliest of the deepest); its path is the step's output, then one
     token from the model at that node (argmax, or a sample of p) becomes the next root, and the heads read that
     node's hidden state for the next tree.

Rows accept different numbers of tokens. They share one KV cache in which row b's tokens always fill columns
[0, n_b) (prompts are right-padded): after a step each row moves its accepted nodes' keys and values to
[n_b, n_b + 1 + accepted) and the cache's shared length becomes max_b n_b; the attention mask hides each row's
columns >= n_b. Near the end of the context, nodes deeper than any row can still use are left out of the tree.
Eos, stop strings and max_new_tokens end a row as in `generate` (its helpers); repetition_penalty is not supported,
and `compile` and `use_cache` are ignored (the cache is always used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lmforge.errors import ConfigError, LmforgeError, PromptTooLongError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import Completion, Prompts, _completion, _prompt_rows, _push_row, _TextStream, stop_ids
from lmforge.infer.sampling import sample_next, warp_logits

TreePath = tuple[int, ...]

# 32 nodes, best first: each path's value is the product over its depths of an assumed chance that head d's rank-r
# token is right (top-1: 0.6, 0.45, 0.35, 0.28 for heads 1-4; rank r >= 1 a fraction 0.25, 0.12, 0.08, 0.06, 0.05 of
# that), so every prefix DEFAULT_TREE[:n] is a tree (a child is never worth more than its parent) and the best n-node
# one under that assumption. Expected tokens per step: ~2.1 at n = 4, 2.4 at 8, 2.6 at 16, 2.8 at 32. Where a tree
# pass costs more with every node (a CPU, a large batch) a short prefix pays better; bench/bench_medusa.py measures.
DEFAULT_TREE: tuple[TreePath, ...] = (
    (0,), (0, 0), (1,), (0, 0, 0), (2,), (0, 1), (1, 0), (3,), (4,), (0, 2), (2, 0), (5,), (0, 0, 0, 0), (0, 0, 1),
    (0, 1, 0), (1, 0, 0), (0, 3), (3, 0), (1, 1), (0, 4), (4, 0), (0, 5), (5, 0), (0, 0, 2), (0, 2, 0), (2, 0, 0),
    (1, 2), (2, 1), (0, 0, 3), (0, 3, 0), (3, 0, 0), (0, 0, 0, 1),
)

FEW_ROWS = 32  # up to this many rows a product with the LM head costs about one read of its weight (on a CPU)


@dataclass
class MedusaStats:
    """Counts over every row of a call. A row-step is one row in one tree pass (rows that have ended are not
    counted); it yields its accepted candidates plus one token of the model's own."""

    steps: int = 0  # tree forward passes (after the prefill)
    tokens: int = 0  # tokens in the returned completions
    row_steps: int = 0  # (row, step) pairs of rows still generating
    step_tokens: int = 0  # tokens those row-steps yielded (the prefill's first token of each row is not counted)
    head_proposed: list[int] = field(default_factory=list)  # per head k: row-steps whose tree reached depth k
    head_accepted: list[int] = field(default_factory=list)  # per head k: row-steps that accepted a depth-k node

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per row-step: 1.0 is plain decoding, max depth + 1 the most a step can give."""
        return self.step_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def head_acceptance(self) -> list[float]:
        """Per head k: the fraction of row-steps with a depth-k node whose accepted path reached depth k."""
        return [a / p if p else 0.0 for a, p in zip(self.head_accepted, self.head_proposed)]


@dataclass
class Tree:
    """A validated candidate tree as index tensors. Node 0 is the root; node i >= 1 is paths[i - 1]; parents come
    before their children."""

    paths: tuple[TreePath, ...]
    depth: Tensor  # (N,) long: 0 for the root
    parent: Tensor  # (N,) long: the root is its own parent
    head: Tensor  # (N - 1,) the head (0-based: depth - 1) of each non-root node
    rank: Tensor  # (N - 1,) the top-k rank it takes from that head
    mask: Tensor  # (N, N) bool: node i may attend node j (j is i or an ancestor of i)
    ancestors: Tensor  # (N, D + 1) nodes root .. i along i's path, padded by repeating i
    internal: Tensor  # (M,) nodes with children: where the model's distribution is read
    slot: Tensor  # (N,) row of a node in the internal list (0 for leaves)

    @property
    def size(self) -> int:
        return self.depth.shape[0]

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def top_k(self) -> int:
        return int(self.rank.max()) + 1 if self.rank.numel() else 1

    def levels(self) -> list[Tensor]:
        """Nodes of each depth 1..D."""
        return [torch.nonzero(self.depth == d).flatten() for d in range(1, self.max_depth + 1)]

    def upto(self, depth: int) -> "Tree":
        """The subtree of nodes at most `depth` deep (still a tree: paths are sorted by depth)."""
        return make_tree([p for p in self.paths if len(p) <= depth], self.depth.device)


def make_tree(paths: Sequence[TreePath], device: Any = "cpu") -> Tree:
    """Index tensors of `paths` (already checked by `build_tree`)."""
    paths = tuple(sorted((tuple(p) for p in paths), key=lambda p: (len(p), p)))
    index = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
    size, depth_max = len(paths) + 1, max((len(p) for p in paths), default=0)
    parent = [0] + [index[p[:-1]] for p in paths]
    mask = torch.eye(size, dtype=torch.bool)
    ancestors = torch.zeros(size, depth_max + 1, dtype=torch.long)
    for i, p in enumerate(paths, start=1):
        chain = [index[p[:d]] for d in range(len(p) + 1)]  # root .. node
        mask[i, chain] = True
        ancestors[i] = torch.tensor(chain + [i] * (depth_max + 1 - len(chain)))
    internal = sorted(set(parent[1:])) if paths else [0]
    slot = torch.zeros(size, dtype=torch.long)
    slot[internal] = torch.arange(len(internal))
    return Tree(paths, torch.tensor([0] + [len(p) for p in paths], device=device),
                torch.tensor(parent, device=device), torch.tensor([len(p) - 1 for p in paths], device=device),
                torch.tensor([p[-1] for p in paths], device=device), mask.to(device), ancestors.to(device),
                torch.tensor(internal, device=device), slot.to(device))


def build_tree(paths: Sequence[Sequence[int]], num_heads: int, block_size: int, device: Any = "cpu") -> Tree:
    """Check a user's tree and index it: non-empty paths of ranks >= 0, no repeats, every path's prefixes present,
    depth <= num_heads, and root + nodes no more than the context (block_size). One-line ConfigError otherwise."""
    checked = []
    for path in paths:
        if not isinstance(path, (tuple, list)) or not path or not all(isinstance(r, int) and r >= 0 for r in path):
            raise ConfigError(f"medusa tree: path {path!r} must be a non-empty tuple of top-k ranks >= 0")
        checked.append(tuple(path))
    if not checked:
        raise ConfigError("medusa tree: no paths; give at least one, e.g. [(0,)]")
    known = set(checked)
    if len(known) != len(checked):
        raise ConfigError("medusa tree: a path is given twice")
    for path in checked:
        if len(path) > num_heads:
            raise ConfigError(f"medusa tree: path {path} is {len(path)} deep but the heads are only {num_heads}")
        if len(path) > 1 and path[:-1] not in known:
            raise ConfigError(f"medusa tree: path {path} lacks its prefix {path[:-1]} (every prefix must be a node)")
    if len(checked) + 1 > block_size:
        raise ConfigError(f"medusa tree: {len(checked)} nodes + the root do not fit the model's context "
                          f"(block_size {block_size}); use a smaller tree")
    return make_tree(checked, device)


def _right_padded(prompts: Prompts, tokenizer: Any, block_size: int) -> tuple[Tensor, Tensor]:
    """Prompts as right-padded ids (B, P) and lengths (B,), with `generate`'s checks."""
    left, lengths = _prompt_rows(prompts, tokenizer)
    if left.numel() == 0 or int(lengths.min()) == 0:
        raise LmforgeError("generate: a prompt is empty or none was given; each needs at least one token")
    width = left.shape[1]
    if width >= block_size:
        raise PromptTooLongError(f"prompt has {width} tokens but the model's context (block_size) is "
                                 f"{block_size}; use at most {block_size - 1} prompt tokens")
    right = torch.zeros_like(left)
    for row, length in enumerate(lengths.tolist()):
        right[row, :length] = left[row, width - length:]
    return right, lengths


def _accepted(tree: Tree, tokens: Tensor, logits: Tensor, cfg: GenerationConfig, threshold: float,
              alpha: float) -> tuple[Tensor, Tensor]:
    """(ok (B, N) bool: node accepted with all its ancestors, score (B, N): cumulative log-probability of the path).

    tokens (B, N) the tree's tokens; logits (B, M, V) the model's at the internal nodes."""
    B, N = tokens.shape
    warped = warp_logits(logits.flatten(0, 1), cfg).view(logits.shape).float()  # (B, M, V)
    at_parent = tree.slot[tree.parent]  # (N,) the internal row holding each node's parent
    if cfg.temperature == 0:
        correct = tokens == warped.argmax(dim=-1)[:, at_parent]  # (B, N)
        logp = torch.zeros(B, N, device=tokens.device)
    else:
        logprobs = warped.log_softmax(dim=-1)  # (B, M, V)
        probs = logprobs.exp()
        entropy = -(probs * logprobs.nan_to_num(neginf=0.0)).sum(dim=-1)  # (B, M)
        limit = torch.clamp(alpha * torch.exp(-entropy), max=threshold)  # min(epsilon, delta exp(-H))
        logp = logprobs[:, at_parent].gather(-1, tokens[..., None]).squeeze(-1)  # (B, N)
        correct = logp.exp() > limit[:, at_parent]
    ok = torch.zeros(B, N, dtype=torch.bool, device=tokens.device)
    ok[:, 0] = True
    score = torch.zeros(B, N, device=tokens.device)
    for nodes in tree.levels():  # parents before children
        ok[:, nodes] = correct[:, nodes] & ok[:, tree.parent[nodes]]
        score[:, nodes] = score[:, tree.parent[nodes]] + logp[:, nodes]
    return ok, score


def _move_accepted(cache: Any, src: Tensor, dst: Tensor) -> None:
    """Per row b, copy every layer's keys/values at columns src[b] to columns dst[b] (both (B, A))."""
    rows = torch.arange(src.shape[0], device=src.device)[:, None]  # (B, 1)
    for kv in (cache.k, cache.v):  # (n_layer, B, n_kv_head, S, head_dim)
        kv[:, rows, :, dst] = kv[:, rows, :, src]  # (B, A, n_layer, n_kv_head, head_dim): read before written


class _Rows:
    """The host's side of a call: each row's tokens so far, whether it has ended (eos, a stop string, or
    max_new tokens), and the text streams that find stop strings."""

    def __init__(self, batch_size: int, max_new: int, eos_ids: tuple[int, ...], tokenizer: Any,
                 stop: Sequence[str]) -> None:
        self.max_new, self.eos_ids = max_new, eos_ids
        self.outputs: list[list[int]] = [[] for _ in range(batch_size)]
        self.ended = [False] * batch_size
        self.streams = [_TextStream(tokenizer, stop) for _ in range(batch_size)] if stop else None

    def active(self) -> list[int]:
        return [row for row, ended in enumerate(self.ended) if not ended]

    def room(self, row: int) -> int:
        """Tokens the row may still add."""
        return self.max_new - len(self.outputs[row])

    def emit(self, row: int, tokens: Sequence[int]) -> int:
        """Append tokens to a row until it ends; returns how many were taken."""
        taken = 0
        for token in tokens:
            if self.ended[row]:
                break
            self.outputs[row].append(token)
            taken += 1
            stopped = _push_row(self.streams[row], token, self.eos_ids)[1] if self.streams else token in self.eos_ids
            self.ended[row] = stopped or len(self.outputs[row]) >= self.max_new
        return taken

    def completions(self, tokenizer: Any) -> list[Completion]:
        return [_completion(ids, self.eos_ids, self.streams[row] if self.streams else None, tokenizer)
                for row, ids in enumerate(self.outputs)]


def _tree_inputs(tree: Tree, root: Tensor, top: Tensor, filled: Tensor, past: int,
                 block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (B, N), position ids (B, N), attention mask (B, 1, N, past + N)) of a tree pass. root (B,) the
    rows' newest tokens; top (D, B, top_k) the heads' ranked tokens; filled (B,) each row's cached tokens."""
    B, N = root.shape[0], tree.size
    tokens = torch.cat([root[:, None], top[tree.head, :, tree.rank].T], dim=1)
    positions = (filled[:, None] + tree.depth[None, :]).clamp(max=block_size - 1)  # unused ones past the context
    prefix = torch.arange(past, device=root.device)[None, :] < filled[:, None]  # (B, past): each row's own tokens
    mask = torch.cat([prefix[:, None, None, :].expand(B, 1, N, past), tree.mask.expand(B, 1, N, N)], dim=-1)
    return tokens, positions, mask


def _best_path(tree: Tree, ok: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """(best (B,): each row's deepest accepted node, the likeliest among equals; its depth (B,))."""
    depth = torch.where(ok, tree.depth[None, :], -1)  # (B, N)
    deepest = depth.max(dim=1, keepdim=True).values
    best = torch.where(depth == deepest, score, float("-inf")).argmax(dim=1)
    return best, deepest.squeeze(1)


@torch.inference_mode()
def medusa_generate(model: Any, heads: Any, prompts: Prompts, cfg: Optional[GenerationConfig] = None,
                    tokenizer: Any = None, *, tree: Sequence[Sequence[int]] = DEFAULT_TREE,
                    eos_id: int | Sequence[int] | None = None, posterior_threshold: float = 0.09,
                    posterior_alpha: float = 0.3) -> tuple[list[Completion], MedusaStats]:
    """Continue each prompt with Medusa tree decoding (module docstring); returns one Completion per row, in order,
    as `generate` does, and the call's MedusaStats.

    model: an lmforge Transformer; heads: its MedusaHeads (lmforge.model.medusa.load_medusa_heads), or any module
    with `num_heads` whose heads(hidden, n) maps hidden states (B, d) to the first n heads' logits (n, B, V).
    prompts, cfg, tokenizer and eos_id as for `generate`. tree: the candidate paths (DEFAULT_TREE: 32 nodes).
    posterior_threshold (epsilon) and posterior_alpha (delta): typical acceptance at temperature > 0."""
    cfg = cfg or GenerationConfig()
    if cfg.stop and tokenizer is None:
        raise TypeError("generate: stop strings need a tokenizer")
    if cfg.repetition_penalty != 1.0:
        raise ConfigError(f"medusa: repetition_penalty={cfg.repetition_penalty} is not supported (use 1.0)")
    block_size = model.config.block_size
    device = next(model.parameters()).device
    full_tree = build_tree(tree, heads.num_heads, block_size, device)
    subtrees = {full_tree.max_depth: full_tree}  # near the end of the context: the nodes a row can still use
    ids, lengths = _right_padded(prompts, tokenizer, block_size)
    ids, lengths = ids.to(device), lengths.to(device)
    batch_size, width = ids.shape
    state = _Rows(batch_size, min(cfg.max_new_tokens, block_size - width), stop_ids(eos_id, tokenizer, cfg),
                  tokenizer, cfg.stop)
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
    stats = MedusaStats(head_proposed=[0] * heads.num_heads, head_accepted=[0] * heads.num_heads)

    cache = model.new_kv_cache(batch_size, width + state.max_new + full_tree.size)
    rows = torch.arange(batch_size, device=device)
    hidden = model.hidden_states(ids, kv_cache=cache)[rows, lengths - 1]  # (B, d): right padding is never seen
    root = sample_next(model.lm_head(hidden), cfg, generator)  # (B,)
    for row, token in enumerate(root.tolist()):
        state.emit(row, [token])
    filled = lengths.clone()  # (B,) row b's tokens fill cache columns [0, filled[b]); the root is not cached yet
    while active := state.active():
        room = torch.tensor([state.room(row) for row in range(batch_size)], device=device)  # (B,)
        usable = min(full_tree.max_depth, int(room[active].max()))
        if usable not in subtrees:
            subtrees[usable] = full_tree.upto(usable)
        shape = subtrees[usable]
        top = heads(hidden, shape.max_depth).topk(shape.top_k, dim=-1).indices  # (D, B, top_k)
        past = cache.length
        tokens, positions, mask = _tree_inputs(shape, root, top, filled, past, block_size)
        tree_hidden = model.hidden_states(tokens, position_ids=positions, attention_mask=mask, kv_cache=cache)
        # few rows: one pass over the LM head's weight gives every node's logits, the next root's included
        logits = model.lm_head(tree_hidden) if batch_size * shape.size <= FEW_ROWS else None  # (B, N, V)
        internal = logits[:, shape.internal] if logits is not None else model.lm_head(tree_hidden[:, shape.internal])
        ok, score = _accepted(shape, tokens, internal, cfg, posterior_threshold, posterior_alpha)
        running = torch.zeros(batch_size, dtype=torch.bool, device=device)
        running[active] = True
        ok &= (shape.depth[None, :] <= room[:, None]) & running[:, None]  # within budget; ended rows take none
        ok[:, 0] = True
        best, accepted = _best_path(shape, ok, score)
        path = shape.ancestors[best]  # (B, D + 1) root .. best
        hidden = tree_hidden[rows, best]  # (B, d): the next heads' input
        root = sample_next(logits[rows, best] if logits is not None else model.lm_head(hidden), cfg, generator)
        _move_accepted(cache, past + path, filled[:, None] + torch.arange(path.shape[1], device=device))
        filled = torch.where(running, filled + 1 + accepted, filled)
        cache.crop(int(filled.max()))

        stats.steps += 1
        path_tokens = tokens.gather(1, path).tolist()
        for row, count, bonus in zip(active, accepted[active].tolist(), root[active].tolist()):
            stats.row_steps += 1
            stats.step_tokens += state.emit(row, path_tokens[row][1:count + 1] + [bonus])
            for k in range(1, min(shape.max_depth, int(room[row])) + 1):
                stats.head_proposed[k - 1] += 1
                stats.head_accepted[k - 1] += int(count >= k)
    completions = state.completions(tokenizer)
    stats.tokens = sum(len(c.token_ids) for c in completions)
    return completions, stats

"""Log-likelihood of continuations and of token streams, batched, through the model's hidden states and LM head.

    log p(cont | ctx) = sum_j log softmax(logits(ctx + cont[:j]))[cont[j]]

Only the positions that predict a scored token go through the LM head, so (B, T, V) logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F


@dataclass
class Scored:
    """Summed log-probability (nats) of the scored tokens, whether each was the argmax, and how many there were
    (fewer than the continuation when it had to be cut to fit the context)."""

    logprob: float
    greedy: bool
    tokens: int


def fit_context(ctx: Sequence[int], cont: Sequence[int], block_size: int) -> tuple[list[int], list[int]]:
    """(inputs, targets): the last block_size + 1 tokens of ctx + cont, as the model's inputs (all but the last)
    and the continuation tokens they predict (those of cont that keep a token before them in the window)."""
    whole = (list(ctx) + list(cont))[-(block_size + 1):]
    n_targets = min(len(cont), len(whole) - 1)
    return whole[:-1], whole[len(whole) - n_targets:]


@torch.inference_mode()
def score_targets(model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[Scored]:
    """For rows of (inputs, targets) where targets are the tokens after the last len(targets) inputs:
    inputs[-len(targets):] predict targets[0..]; the scores are returned in input order.

    Rows are sorted by length and right-padded (causal attention: padding after a row's tokens never reaches
    them), batch_size rows per forward pass."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[Scored | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, :len(rows[i][0])] = torch.tensor(rows[i][0], dtype=torch.long)
        hidden = model.hidden_states(ids.to(device))  # (B, W, d_model)
        picked, targets = [], []
        for b, i in enumerate(batch):
            inputs, row_targets = rows[i]
            picked.append(hidden[b, len(inputs) - len(row_targets):len(inputs)])  # (n_targets, d_model)
            targets += row_targets
        logits = model.lm_head(torch.cat(picked)).float()  # (sum of n_targets, V)
        target_ids = torch.tensor(targets, dtype=torch.long, device=device)
        logprobs = F.log_softmax(logits, dim=-1).gather(1, target_ids[:, None])[:, 0]
        greedy = logits.argmax(dim=-1) == target_ids
        offset = 0
        for b, i in enumerate(batch):
            n = len(rows[i][1])
            results[i] = Scored(float(logprobs[offset:offset + n].sum()), bool(greedy[offset:offset + n].all()), n)
            offset += n
    return results  # type: ignore[return-value]


def continuation_logprobs(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 16) -> list[Scored]:
    """log p(cont | ctx) for each (ctx ids, cont ids) request; ctx must not be empty. A pair longer than the
    model's context keeps its last block_size + 1 tokens (the context is cut from the left, as lm-eval does)."""
    block_size = model.config.block_size
    rows = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("continuation_logprobs: every request needs a non-empty context and continuation")
        rows.append(fit_context(ctx, cont, block_size))
    return score_targets(model, rows, batch_size)


def stream_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a stream of n tokens: (begin, end, first_target). The model reads tokens
    [begin, end - 1) and the targets [first_target, end) are scored; every token from 1 to n - 1 is scored
    exactly once, each with at least block_size - stride tokens of context after the first window."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    windows, scored_until = [], 1
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + block_size + 1, n_tokens)
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def stream_nll(model: Any, tokens: Sequence[int], stride: int, batch_size: int = 16) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of a token stream, by `stream_windows`."""
    rows = [(list(tokens[begin:end - 1]), list(tokens[first:end]))
            for begin, end, first in stream_windows(len(tokens), model.config.block_size, stride)]
    scored = score_targets(model, rows, batch_size)
    return -sum(s.logprob for s in scored), sum(s.tokens for s in scored)

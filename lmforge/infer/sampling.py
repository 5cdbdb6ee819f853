"""Next-token selection: pure functions on a batch of logits (B, V), one rule each.

`warp_logits` applies them in the order Hugging Face `generate` does (repetition penalty, temperature, top-k,
top-p) and `sample_next` then draws from the softmax (or takes the argmax when temperature is 0). Every filter
returns new logits with the removed tokens set to -inf, so filters compose and the draw is a plain categorical over
what is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lmforge.infer.generate import GenerationConfig


def token_presence(token_ids: Tensor, vocab_size: int, mask: Optional[Tensor] = None) -> Tensor:
    """A (B, V) bool table: True where token v occurs in row b of `token_ids` (B, T), positions with mask False
    (padding) excluded. One extra column absorbs the excluded positions, so ids are scattered without a loop."""
    if mask is not None:
        token_ids = token_ids.masked_fill(~mask, vocab_size)
    present = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    present.scatter_(1, token_ids, True)
    return present[:, :vocab_size]


def apply_repetition_penalty(logits: Tensor, present: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, the Hugging Face rule) on tokens already in the sequence:

        l'_v = l_v / penalty   if present[v] and l_v > 0
        l'_v = l_v * penalty   if present[v] and l_v <= 0
        l'_v = l_v             otherwise

    so penalty > 1 makes seen tokens less likely whatever the sign of their logit. `present` (B, V) comes from
    `token_presence` over prompt and generated tokens (padding excluded).
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalized, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """softmax(l / T): T < 1 sharpens the distribution, T > 1 flattens it (T must be > 0; T = 0 is greedy)."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), set the rest to -inf; k <= 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    reaches p. Sorting ascending, token i is removed when the cumulative probability up to and including it is
    <= 1 - p (the Hugging Face rule); the most likely token is always kept. p >= 1 is off."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1.0 - p
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row: argmax_v l_v, shape (B,)."""
    return logits.argmax(dim=-1)


def sample(logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One draw per row from softmax(logits), shape (B,); -inf logits have probability 0."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def warp_logits(logits: Tensor, cfg: "GenerationConfig", present: Optional[Tensor] = None) -> Tensor:
    """Apply cfg's rules in Hugging Face's order: repetition penalty (when `present` is given and
    cfg.repetition_penalty != 1), then, unless cfg.temperature == 0 (greedy), temperature, top-k and top-p."""
    if present is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, present, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    return top_p_filter(logits, cfg.top_p)


def sample_next(logits: Tensor, cfg: "GenerationConfig", generator: Optional[torch.Generator] = None,
                present: Optional[Tensor] = None) -> Tensor:
    """The next token (B,) from last-position logits (B, V): `warp_logits`, then argmax if cfg.temperature == 0,
    else a draw using `generator` (seed it for reproducible samples)."""
    logits = warp_logits(logits, cfg, present)
    return greedy(logits) if cfg.temperature == 0 else sample(logits, generator)

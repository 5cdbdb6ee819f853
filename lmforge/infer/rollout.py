"""A group of sampled continuations of one prompt (the rollouts of GRPO and other group-based RL).

The G samples share the prompt, so the prompt is prefilled once, in a KV cache of batch size 1; its last-position
logits serve the first draw of every sample, the cache is then repeated G times along the batch
(`KVCache.repeat_rows`), and the G continuations decode together, one token per step, until every row has produced
a stop token or max_new_tokens are drawn. A row that has ended keeps decoding with the batch and its later tokens
are dropped, so the draws a generator makes depend only on its seed, G and the model: the same seed gives the same
samples. The next-token rule is lmforge.infer.sampling's (temperature, top-k, top-p), as for `generate`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from lmforge.errors import PromptTooLongError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.sampling import sample_next


@torch.inference_mode()
def sample_group(model: Any, prompt_ids: Sequence[int], group_size: int, cfg: GenerationConfig,
                 stop_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """`group_size` continuations of `prompt_ids`, each the list of its generated tokens up to and including the
    first stop token (or max_new_tokens of them, clamped to the model's context).

    model: an lmforge Transformer or PeftModel (.config, .hidden_states, .lm_head, .new_kv_cache), used as it is
    (call eval() first if it has dropout). generator: seeds the draws (on the model's device)."""
    device = next(model.parameters()).device
    prompt_len = len(prompt_ids)
    block_size = model.config.block_size
    if not 0 < prompt_len < block_size:
        raise PromptTooLongError(f"a prompt of {prompt_len} tokens leaves no room to generate in the model's context "
                                 f"of {block_size}")
    max_new = min(cfg.max_new_tokens, block_size - prompt_len)
    cache = model.new_kv_cache(1, prompt_len + max_new)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, P)
    hidden = model.hidden_states(prompt, kv_cache=cache)  # (1, P, d_model): the one prefill
    logits = model.lm_head(hidden[:, -1]).expand(group_size, -1)  # (G, V): every sample's first draw
    cache.repeat_rows(group_size)  # (n_layer, G, n_kv_head, max_len, head_dim)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    tokens = torch.empty(group_size, max_new, dtype=torch.long, device=device)
    ended = torch.zeros(group_size, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new):
        token = sample_next(logits, cfg, generator)  # (G,)
        tokens[:, step] = token
        steps = step + 1
        ended |= torch.isin(token, stop)
        if steps == max_new or bool(ended.all()):
            break
        hidden = model.hidden_states(token[:, None], kv_cache=cache)  # (G, 1, d_model)
        logits = model.lm_head(hidden[:, -1])
    stops = set(int(t) for t in stop_ids)
    rows = tokens[:, :steps].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]

"""Speculative decoding: a cheap drafter proposes k tokens, the target checks all of them in one forward pass.

    completions, stats = speculative_generate(target, ["a dog is"], GenerationConfig(temperature=0), tokenizer,
                                              draft=small_model, num_draft_tokens=4)
    completions, stats = speculative_generate(target, prompts, cfg, tokenizer, prompt_lookup=3)

Each row is decoded alone (batch 1), one row after another. The target prefills the prompt and picks the first
token as `generate` does; then every round
  1. the drafter proposes d_1..d_k: a draft model autoregressively through its own KV cache (distributions q_i),
     or prompt lookup: the k tokens that followed the latest earlier occurrence of the last n tokens (q_i a point
     mass on d_i; no model at all);
  2. the target runs once over [last token, d_1..d_k] through its KV cache: k + 1 next-token distributions p_i;
  3. verification keeps d_1..d_n and appends one token of its own (a correction, or a bonus when all k pass), so a
     round yields n + 1 tokens for one target pass; the rejected positions are cropped from both KV caches.

Verification is the modified rejection sampling of Leviathan et al. 2023 / Chen et al. 2023, on the distributions
after the same repetition penalty, temperature, top-k and top-p as plain sampling (lmforge.infer.sampling):

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), in order, stopping at the first rejection;
    on rejection at i, draw from normalize(max(0, p_i - q_i)); when all k pass, draw the bonus from p_{k+1},

which makes every output token distributed exactly as the target's own sampling. At temperature 0 a draft token
passes when it is the target's argmax, and the correction is that argmax: the ids equal greedy `generate`'s (up to
float rounding between a k+1-token pass and k+1 one-token passes, which can only matter at an exact tie).
Eos, stop strings and max_new_tokens end a row as in `generate`, through its helpers; the caches are always used
and `compile` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lmforge.convert import load_with_tokenizer
from lmforge.errors import ConfigError, TokenizerMismatchError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import Completion, Prompts, _completion, _prepare, _push_row, _TextStream, stop_ids
from lmforge.infer.sampling import sample_next, token_presence, warp_logits


@dataclass
class SpeculativeStats:
    """Counts over every row of a call. Each target pass yields its accepted draft tokens plus one of its own (the
    prefill yields the first token), so new_tokens <= accepted + target_passes (equal unless eos or a stop string
    cut a round short)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target kept
    target_passes: int = 0  # target forward passes: one prefill per row, then one per round
    draft_passes: int = 0  # draft-model forward passes (0 with prompt lookup)
    new_tokens: int = 0  # tokens in the returned completions

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_pass(self) -> float:
        """new_tokens / target_passes: 1.0 is plain decoding, k + 1 the most a round can give."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0


def check_draft(target: Any, draft: Any, target_tokenizer: Any = None, draft_tokenizer: Any = None, *,
                target_dir: Optional[str | Path] = None, draft_dir: Optional[str | Path] = None) -> None:
    """Raise TokenizerMismatchError unless `draft` can propose tokens for `target`: the same vocab_size and, when
    both tokenizers are given, the same tokenizer (equal fingerprints: sha256 of tokenizer.json)."""
    draft_name = f"draft model {draft_dir}" if draft_dir else "draft model"
    target_name = f"target model {target_dir}" if target_dir else "the target model"
    if draft.config.vocab_size != target.config.vocab_size:
        raise TokenizerMismatchError(f"{draft_name}: vocab_size {draft.config.vocab_size}, expected "
                                     f"{target.config.vocab_size} as in {target_name}; a draft must share the "
                                     "target's tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None \
            and draft_tokenizer.fingerprint != target_tokenizer.fingerprint:
        raise TokenizerMismatchError(f"{draft_name}: its tokenizer ({draft_tokenizer.fingerprint[:12]}) is not the "
                                     f"one of {target_name} ({target_tokenizer.fingerprint[:12]}); a draft must "
                                     "share the target's tokenizer")


def load_draft(draft_dir: str | Path, target: Any, target_tokenizer: Any, *, target_dir: Optional[str | Path] = None,
               device: str = "cpu") -> Any:
    """Load a draft model dir (eval mode, on `device`) and check it against the target with `check_draft`."""
    draft, draft_tokenizer = load_with_tokenizer(draft_dir, device)
    check_draft(target, draft, target_tokenizer, draft_tokenizer, target_dir=target_dir, draft_dir=draft_dir)
    return draft


def prompt_lookup_proposal(tokens: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """Prompt-lookup drafting (Saxena 2023): for n = max_ngram down to 1, find the latest earlier occurrence of the
    last n tokens in `tokens` (prompt + output so far) and return up to k tokens that followed it; [] if none."""
    size = len(tokens)
    for n in range(min(max_ngram, size - 1), 0, -1):
        pattern = list(tokens[size - n:])
        last = pattern[-1]
        for start in range(size - n - 1, -1, -1):  # start + n <= size - 1: at least one token follows
            if tokens[start + n - 1] == last and list(tokens[start:start + n]) == pattern:
                return list(tokens[start + n:start + n + k])
    return []


def _draw(probs: Tensor, generator: Optional[torch.Generator]) -> int:
    """One token from probs (V,) (any non-negative weights) by inverting the CDF: a uniform u in [0, total) picks
    the first token whose cumulative weight exceeds it. On CPU about 20x cheaper than torch.multinomial at V = 4096
    (23 us against 460 us), which otherwise costs more than a small draft model's forward pass."""
    cdf = probs.double().cumsum(0)  # (V,)
    u = torch.rand((), dtype=torch.float64, generator=generator, device=probs.device) * cdf[-1]
    return int(torch.searchsorted(cdf[:-1], u[None], right=True))  # in [0, V - 1]


def _with_drafts(present: Optional[Tensor], drafted: Sequence[int]) -> Optional[Tensor]:
    """Token presence (k + 1, V) for each verified position: row i also holds d_1..d_i (repetition penalty)."""
    if present is None:
        return None
    rows = present.repeat(len(drafted) + 1, 1)
    for i, token in enumerate(drafted):
        rows[i + 1:, token] = True
    return rows


class _ModelDrafter:
    """A draft model with its own KV cache, which holds a prefix of the sequence so far minus its last token."""

    def __init__(self, model: Any, limit: int, stats: SpeculativeStats) -> None:
        self.model = model
        self.cache = model.new_kv_cache(1, min(limit, model.config.block_size))
        self.stats = stats

    def propose(self, seq: list[int], k: int, present: Optional[Tensor], cfg: GenerationConfig,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[Tensor]]:
        """Up to k tokens drawn one at a time from the draft (argmax at temperature 0), and their distributions
        q (k, V) (None at temperature 0). The cache must hold position len(seq) + k - 2, the last one fed."""
        k = min(k, self.cache.max_len + 1 - len(seq))
        if k <= 0:
            return [], None
        device = self.cache.k.device
        feed = torch.tensor([seq[self.cache.length:]], device=device)  # (1, T): whatever the cache lacks
        present = None if present is None else present.clone()
        tokens, probs = [], []
        for i in range(k):
            hidden = self.model.hidden_states(feed, kv_cache=self.cache)  # (1, T, d_model)
            logits = warp_logits(self.model.lm_head(hidden[:, -1]), cfg, present)  # (1, V)
            self.stats.draft_passes += 1
            if cfg.temperature == 0:
                token = logits.argmax(dim=-1)  # (1,)
            else:
                q = torch.softmax(logits.float(), dim=-1)  # (1, V)
                token = torch.tensor([_draw(q[0], generator)], device=device)
                probs.append(q[0])
            tokens.append(token)
            if present is not None:
                present.scatter_(1, token[:, None], True)
            feed = token[:, None]  # (1, 1)
        return torch.cat(tokens).tolist(), torch.stack(probs) if probs else None

    def keep(self, length: int) -> None:
        """The sequence now has length + 1 tokens whose first `length` the target has verified: drop the rest."""
        self.cache.crop(min(self.cache.length, length))


class _LookupDrafter:
    """Prompt lookup: proposals copied from the sequence itself, each a point mass (q = None)."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], k: int, present: Optional[Tensor], cfg: GenerationConfig,
                generator: Optional[torch.Generator]) -> tuple[list[int], Optional[Tensor]]:
        return (prompt_lookup_proposal(seq, self.max_ngram, k) if k > 0 else []), None

    def keep(self, length: int) -> None:
        pass


def verify(logits: Tensor, drafted: Sequence[int], draft_probs: Optional[Tensor], cfg: GenerationConfig,
           generator: Optional[torch.Generator] = None, present: Optional[Tensor] = None) -> tuple[int, int]:
    """(n, token): how many of the k drafted tokens the target keeps, and the token it adds after them.

    logits (k + 1, V): the target's raw logits at the k drafted positions and the one after. draft_probs (k, V):
    the distributions the drafts were drawn from; None means each draft was a point mass on d_i (prompt lookup, or
    temperature 0). present (k + 1, V): token presence per position, for the repetition penalty.
    Temperature 0: n = the length of the prefix where d_i = argmax p_i; token = argmax p_{n+1}.
    Otherwise (Leviathan et al. 2023, Algorithm 1): d_i passes when u_i < p_i(d_i) / q_i(d_i), u_i ~ U[0, 1);
    token ~ normalize(max(0, p_{n+1} - q_{n+1})) after a rejection, ~ p_{k+1} when all passed."""
    k = len(drafted)
    logits = warp_logits(logits, cfg, present)
    if cfg.temperature == 0:
        best = logits.argmax(dim=-1).tolist()  # (k + 1,)
        n = next((i for i in range(k) if drafted[i] != best[i]), k)
        return n, best[n]
    p = torch.softmax(logits.float(), dim=-1)  # (k + 1, V)
    n = k
    if k:
        index = torch.tensor(drafted, device=p.device)
        positions = torch.arange(k, device=p.device)
        p_draft = p[positions, index]  # (k,)
        q_draft = draft_probs[positions, index] if draft_probs is not None else torch.ones_like(p_draft)
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u * q_draft >= p_draft).tolist()  # u >= p / q, without dividing
        n = rejected.index(True) if True in rejected else k
    if n == k:
        return n, _draw(p[k], generator)
    if draft_probs is not None:
        residual = (p[n] - draft_probs[n]).clamp(min=0)
    else:
        residual = p[n].clone()
        residual[drafted[n]] = 0.0
    if float(residual.sum()) <= 0:  # p == q up to rounding: a rejection then has probability ~0; draw from p
        residual = p[n]
    return n, _draw(residual, generator)


def _decode_row(target: Any, drafter: Any, prompt: list[int], max_new: int, cfg: GenerationConfig,
                tokenizer: Any, eos_ids: tuple[int, ...], k: int, generator: Optional[torch.Generator],
                stats: SpeculativeStats) -> Completion:
    """One row: prefill, then draft-and-verify rounds until eos, a stop string or max_new tokens."""
    device = next(target.parameters()).device
    prompt_ids = torch.tensor([prompt], device=device)  # (1, T)
    limit = len(prompt) + max_new  # the row's final length at most
    seq = list(prompt)
    cache = target.new_kv_cache(1, limit)  # holds seq[:-1] between rounds
    present = None
    if cfg.repetition_penalty != 1.0:
        present = token_presence(prompt_ids, target.config.vocab_size)  # (1, V)
    stream = _TextStream(tokenizer, cfg.stop) if cfg.stop else None
    new: list[int] = []

    logits = target.lm_head(target.hidden_states(prompt_ids, kv_cache=cache)[:, -1])  # (1, V)
    stats.target_passes += 1
    pending = [int(sample_next(logits, cfg, generator, present))]
    while True:
        ended = False
        for token in pending:
            new.append(token)
            seq.append(token)
            if present is not None:
                present[0, token] = True
            ended = _push_row(stream, token, eos_ids)[1] if stream is not None else token in eos_ids
            if ended:
                break
        if ended or len(seq) >= limit:
            break
        # a round adds at most k + 1 tokens, so k <= tokens left - 1 keeps every position inside the row
        drafted, draft_probs = drafter.propose(seq, min(k, limit - len(seq) - 1), present, cfg, generator)
        stats.drafted += len(drafted)
        tokens = torch.tensor([seq[-1:] + drafted], device=prompt_ids.device)  # (1, k + 1)
        logits = target.lm_head(target.hidden_states(tokens, kv_cache=cache)[0])  # (k + 1, V)
        stats.target_passes += 1
        n, token = verify(logits, drafted, draft_probs, cfg, generator, _with_drafts(present, drafted))
        stats.accepted += n
        cache.crop(len(seq) + n)  # keep seq and the accepted drafts; `token` is fed next round
        drafter.keep(len(seq) + n)
        pending = drafted[:n] + [token]
    completion = _completion(new, eos_ids, stream, tokenizer)
    stats.new_tokens += len(completion.token_ids)
    return completion


@torch.inference_mode()
def speculative_generate(target: Any, prompts: Prompts, cfg: Optional[GenerationConfig] = None,
                         tokenizer: Any = None, *, draft: Any = None, num_draft_tokens: int = 4,
                         prompt_lookup: int = 0, eos_id: int | Sequence[int] | None = None,
                         ) -> tuple[list[Completion], SpeculativeStats]:
    """Continue each prompt as `generate(target, prompts, cfg, tokenizer, eos_id=eos_id)` would, drafting with
    `draft` (a model sharing the target's tokenizer) or, with prompt_lookup = n > 0, with n-gram lookup in the
    row's own tokens; num_draft_tokens (k) tokens are proposed per round. Returns the completions in order, and the
    counts of drafting and verification over all rows. Rows are decoded one after another, each at batch 1; one
    generator seeded with cfg.seed serves every draw. Greedy output equals greedy `generate`'s; sampled output
    follows the same distribution as `generate`'s (not the same draws)."""
    cfg = cfg or GenerationConfig()
    if (draft is None) == (prompt_lookup <= 0):
        raise ConfigError("speculative decoding needs exactly one drafter: a draft model or prompt_lookup > 0 "
                          f"(got draft={'a model' if draft is not None else None}, prompt_lookup={prompt_lookup})")
    if num_draft_tokens < 1:
        raise ConfigError(f"num_draft_tokens={num_draft_tokens}: expected at least 1")
    if cfg.stop and tokenizer is None:
        raise TypeError("speculative_generate: stop strings need a tokenizer")
    if draft is not None:
        check_draft(target, draft)
    # generate's checks and its length rule: max_new_tokens clamped so that the longest prompt fits block_size
    batch = _prepare(target, prompts, cfg, tokenizer)
    padding = [0] * batch.ids.shape[0] if batch.mask is None else (~batch.mask[:, :batch.prompt_len]).sum(1).tolist()
    rows = [row[pad:batch.prompt_len] for row, pad in zip(batch.ids.tolist(), padding)]
    device = batch.ids.device
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
    eos_ids = stop_ids(eos_id, tokenizer, cfg)
    stats = SpeculativeStats()

    completions = []
    for prompt in rows:  # a draft model gets a fresh cache per row, sized to it
        drafter = _LookupDrafter(prompt_lookup) if draft is None else \
            _ModelDrafter(draft, len(prompt) + batch.max_new, stats)
        completions.append(_decode_row(target, drafter, prompt, batch.max_new, cfg, tokenizer, eos_ids,
                                       num_draft_tokens, generator, stats))
    return completions, stats

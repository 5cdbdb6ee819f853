"""Batched text generation: left-padded prompts, one prefill, then one token per step through a static KV cache.

    completions = generate(model, ["a dog is", "the sea"], GenerationConfig(max_new_tokens=20), tokenizer)
    for delta in stream_generate(model, tokenizer, "a dog is", GenerationConfig(temperature=0.8)):
        print(delta, end="", flush=True)

Prompts of different lengths are left-padded (like Hugging Face): every row's last prompt token sits in the same
column, so one forward pass per step serves the whole batch. The padding is excluded by an attention mask, and
position ids count from each row's first real token, so a padded row decodes exactly as it would alone. All buffers
(token ids, positions, mask, KV cache) are allocated once for prompt_len + max_new_tokens positions. A row that
ends (eos or a stop string) keeps decoding with the batch, its tokens discarded, and the loop ends when every row
has ended; the only host sync per step is that check (none when neither eos nor stop strings can end a row).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from lmforge.errors import ConfigError, LmforgeError, PromptTooLongError
from lmforge.infer.config import GenerateConfig, GenerationConfig
from lmforge.infer.sampling import sample_next, token_presence

Prompts = Union[Tensor, Sequence[Sequence[int]], Sequence[str], str]


@dataclass
class Completion:
    """One row's output. token_ids holds every token generated for the row, the eos token or the token that
    completed a stop string included; text (with a tokenizer) leaves out the eos token and is cut before the
    stop string."""

    token_ids: list[int]
    text: Optional[str]
    finish_reason: Literal["eos", "stop", "length"]


@dataclass
class _Batch:
    """Preallocated buffers of width prompt_len + max_new; generated tokens are written into `ids` in place."""

    ids: Tensor  # (B, L) left-padded prompt tokens, then generated tokens
    positions: Tensor  # (B, L) position ids counted from each row's first real token
    mask: Optional[Tensor]  # (B, L) True on real tokens; None when no prompt is padded
    prompt_len: int
    max_new: int


def _prompt_rows(prompts: Prompts, tokenizer: Any) -> tuple[Tensor, Tensor]:
    """Prompts as left-padded token ids (B, T) and each row's length (B,), on the CPU; padding id 0."""
    if isinstance(prompts, Tensor):
        ids = prompts.detach().long().cpu().reshape(-1, prompts.shape[-1])
        return ids, torch.full((ids.shape[0],), ids.shape[1])
    if isinstance(prompts, str):
        prompts = [prompts]
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise TypeError("generate: text prompts need a tokenizer (or pass token ids)")
    rows = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long).reshape(len(rows), width)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def _prepare(model: Any, prompts: Prompts, cfg: GenerationConfig, tokenizer: Any) -> _Batch:
    """Encode and left-pad `prompts`, check they fit the context, and allocate the decoding buffers."""
    prompt_ids, lengths = _prompt_rows(prompts, tokenizer)
    if prompt_ids.numel() == 0 or int(lengths.min()) == 0:
        raise LmforgeError("generate: a prompt is empty or none was given; each needs at least one token")
    batch_size, prompt_len = prompt_ids.shape
    block_size = model.config.block_size
    if prompt_len >= block_size:
        raise PromptTooLongError(f"prompt has {prompt_len} tokens but the model's context (block_size) is "
                                 f"{block_size}; use at most {block_size - 1} prompt tokens")
    max_new = min(cfg.max_new_tokens, block_size - prompt_len)

    device = next(model.parameters()).device
    width = prompt_len + max_new
    ids = torch.zeros(batch_size, width, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    steps = torch.arange(width, device=device).expand(batch_size, width)
    if int(lengths.min()) == prompt_len:
        return _Batch(ids, steps, None, prompt_len, max_new)
    padding = (prompt_len - lengths).to(device)[:, None]  # (B, 1) columns of left padding per row
    positions = (steps - padding).clamp(min=0)  # padding gets position 0; it is masked anyway
    return _Batch(ids, positions, steps >= padding, prompt_len, max_new)


@torch.inference_mode()
def _token_steps(model: Any, batch: _Batch, cfg: GenerationConfig) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), one step at a time, writing it into batch.ids.

    With the cache, the first step is the prefill (the whole prompt) and each later step feeds one token; without
    it, every step runs the model over the whole sequence so far. Only the last position goes through the LM head
    (model.hidden_states then model.lm_head), so a long prompt never materializes (B, T, V) logits."""
    batch_size = batch.ids.shape[0]
    device = batch.ids.device
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
    present = None
    if cfg.repetition_penalty != 1.0:
        prompt_mask = None if batch.mask is None else batch.mask[:, :batch.prompt_len]
        present = token_presence(batch.ids[:, :batch.prompt_len], model.config.vocab_size, prompt_mask)
    compiled = cfg.compile and cfg.use_cache and batch.max_new > 1
    cache_len = batch.prompt_len + batch.max_new
    if compiled:
        from lmforge.infer.compiled import cache_length, compiled_decode_step

        cache_len = cache_length(batch.prompt_len, batch.max_new, model.config.block_size)
        decode_step = compiled_decode_step(model, batch_size, cache_len)
        padding = torch.zeros(batch_size, dtype=torch.long, device=device)
        if batch.mask is not None:
            padding = (~batch.mask[:, :batch.prompt_len]).sum(dim=1)  # (B,) left-padding columns per row
        columns = torch.arange(cache_len, device=device)
    cache = model.new_kv_cache(batch_size, cache_len) if cfg.use_cache else None
    if compiled:  # per-layer views of the cache that the prefill fills: (B, n_kv_head, L, head_dim) each
        layers_k, layers_v = list(cache.k.unbind(0)), list(cache.v.unbind(0))
    start = 0
    for end in range(batch.prompt_len, batch.prompt_len + batch.max_new):
        if compiled and end > batch.prompt_len:  # after the prefill: the compiled step writes the cache itself
            logits = decode_step(batch.ids[:, end - 1], columns[end - 1:end], padding, layers_k, layers_v)
        else:
            mask = None if batch.mask is None else batch.mask[:, :end]
            hidden = model.hidden_states(batch.ids[:, start:end], position_ids=batch.positions[:, start:end],
                                         attention_mask=mask, kv_cache=cache)  # (B, T, d_model)
            logits = model.lm_head(hidden[:, -1])  # (B, V): the head runs on the last position only
        token = sample_next(logits, cfg, generator, present)
        batch.ids[:, end] = token
        if present is not None:
            present.scatter_(1, token[:, None], True)
        if cache is not None:
            start = end
        yield token


class _TextStream:
    """Incremental detokenization of one row, with stop-string detection.

    Each new token re-decodes a short window (the tokens of the previous step plus the new ones) and keeps the
    text beyond the window's old text, as vLLM does: tokenizers that drop a leading space at the start of a decode
    stay correct, and a window that ends inside a UTF-8 character (decoded as U+FFFD) waits for more tokens.
    `push` returns the text that is safe to show: nothing that may be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decode
        self.read_offset = 0  # tokens before this are in self.text
        self.text = ""  # decoded so far (cut before the stop string once stopped)
        self.shown = 0  # characters of self.text already returned
        self.stopped = False

    def _decode_new(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(prefix):]

    def _held_back(self) -> int:
        """Length of the longest tail of self.text that is a proper prefix of a stop string."""
        for size in range(min(len(self.text), self.longest_stop - 1), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0

    def _show(self, upto: int) -> str:
        delta, self.shown = self.text[self.shown:upto], max(self.shown, upto)
        return delta

    def push(self, token_id: int) -> str:
        """Add a token; return the newly printable text (sets self.stopped when a stop string appears)."""
        self.ids.append(token_id)
        new = self._decode_new()
        if not new:
            return ""
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._show(len(self.text))
        return self._show(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Flush what is left at the end of generation (an incomplete character is shown as U+FFFD)."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        return self._show(len(self.text))


def _push_row(stream: _TextStream, token_id: int, stop_ids: tuple[int, ...]) -> tuple[str, bool]:
    """One new token of a row: (the text it makes printable, whether the row has ended: eos or a stop string)."""
    if token_id in stop_ids:
        return "", True
    delta = stream.push(token_id)
    return delta, stream.stopped


def _completion(ids: list[int], stop_ids: tuple[int, ...], stream: Optional[_TextStream],
                tokenizer: Any) -> Completion:
    """Cut a row's tokens after the step that ended it and name why it ended."""
    ended_at = next((i for i, token in enumerate(ids) if token in stop_ids), None)
    if stream is not None and stream.stopped:
        ids, reason = ids[:len(stream.ids)], "stop"
    elif ended_at is not None:
        ids, reason = ids[:ended_at + 1], "eos"
    else:
        reason = "length"
    text = None
    if stream is not None:
        stream.finish()
        text = stream.text
    elif tokenizer is not None:
        text = tokenizer.decode(ids[:-1] if reason == "eos" else ids)
    return Completion(ids, text, reason)


@torch.inference_mode()
def stop_ids(eos_id: int | Sequence[int] | None, tokenizer: Any, cfg: GenerationConfig) -> tuple[int, ...]:
    """The token ids that end a row: `eos_id` (one id or several, e.g. a chat turn's end token and eos), else the
    tokenizer's eos; none when cfg.eos is False."""
    if not cfg.eos:
        return ()
    if eos_id is None:
        return (tokenizer.eos_id,) if tokenizer is not None else ()
    return (int(eos_id),) if isinstance(eos_id, int) else tuple(int(i) for i in eos_id)


@torch.inference_mode()
def generate(model: Any, prompts: Prompts, cfg: Optional[GenerationConfig] = None, tokenizer: Any = None, *,
             eos_id: int | Sequence[int] | None = None) -> list[Completion]:
    """Continue each prompt; return one Completion per row, in order.

    model: an lmforge Transformer (used through .config, .hidden_states, .lm_head and .new_kv_cache).
    prompts: a LongTensor (B, T) or (T,), a list of token-id lists (any lengths), or with a tokenizer a list of
    strings (or one string). eos_id (one id or several) defaults to tokenizer.eos_id; cfg.eos=False disables it.
    Stop strings need a tokenizer. The model is used as it is: call model.eval() first if it has dropout.
    """
    cfg = cfg or GenerationConfig()
    if cfg.stop and tokenizer is None:
        raise TypeError("generate: stop strings need a tokenizer")
    batch = _prepare(model, prompts, cfg, tokenizer)
    batch_size = batch.ids.shape[0]
    eos_ids = stop_ids(eos_id, tokenizer, cfg)
    stop_tensor = torch.tensor(eos_ids, dtype=torch.long, device=batch.ids.device)
    streams = [_TextStream(tokenizer, cfg.stop) for _ in range(batch_size)] if cfg.stop else None
    ended = torch.zeros(batch_size, dtype=torch.bool, device=batch.ids.device)
    ended_rows: set[int] = set()
    steps = 0
    for steps, token in enumerate(_token_steps(model, batch, cfg), start=1):
        if streams is not None:  # text is needed on the host anyway: end rows there
            for row, token_id in enumerate(token.tolist()):
                if row not in ended_rows and _push_row(streams[row], token_id, eos_ids)[1]:
                    ended_rows.add(row)
            if len(ended_rows) == batch_size:
                break
        elif eos_ids:
            ended |= torch.isin(token, stop_tensor)
            if bool(ended.all()):
                break
    new_ids = batch.ids[:, batch.prompt_len:batch.prompt_len + steps].tolist()
    return [_completion(new_ids[row], eos_ids, streams[row] if streams else None, tokenizer)
            for row in range(batch_size)]


@torch.inference_mode()
def stream_generate(model: Any, tokenizer: Any, prompt: str | Sequence[int], cfg: Optional[GenerationConfig] = None,
                    *, eos_id: int | Sequence[int] | None = None) -> Iterator[str]:
    """Continue one prompt (text or token ids), yielding text deltas as they become printable: an incomplete UTF-8
    character or a possible start of a stop string is held back. "".join(deltas) equals generate(...)[0].text."""
    yield from stream_completion(model, tokenizer, prompt, cfg or GenerationConfig(), eos_id=eos_id)


@torch.inference_mode()
def stream_completion(model: Any, tokenizer: Any, prompt: str | Sequence[int], cfg: GenerationConfig, *,
                      eos_id: int | Sequence[int] | None = None) -> Generator[str, None, Completion]:
    """stream_generate's deltas; the generator's return value is the row's Completion (as generate makes it)."""
    batch = _prepare(model, [prompt], cfg, tokenizer)
    eos_ids = stop_ids(eos_id, tokenizer, cfg)
    stream = _TextStream(tokenizer, cfg.stop)
    ids: list[int] = []
    for token in _token_steps(model, batch, cfg):
        ids.append(int(token))
        delta, ended = _push_row(stream, ids[-1], eos_ids)
        if delta:
            yield delta
        if ended:
            break
    tail = stream.finish()  # nothing after a stop string: push showed all that precedes it
    if tail:
        yield tail
    return _completion(ids, eos_ids, stream, tokenizer)


def run_generate(cfg: GenerateConfig) -> list[str]:
    """Load the model and tokenizer from cfg.model (lmforge or Hugging Face dir), continue every prompt and return
    the continuations. Prompts are generated as one batch, or with cfg.stream one after another, printed as the
    text comes. Each row is printed as its prompt followed by the continuation, then a line saying why it ended
    and how many tokens it generated (`[eos, 12 tokens]`, `[stop string ';', 5 tokens]`, `[length, 40 tokens]`);
    with several prompts a line `=== 2/3 ===` comes before each row."""
    from lmforge.convert import load_with_tokenizer

    if not cfg.model:
        raise ConfigError("generate needs a model dir: lmforge generate MODEL_DIR --prompt TEXT")
    if not cfg.prompt:
        raise ConfigError("generate needs at least one prompt: --prompt TEXT")
    if (cfg.draft or cfg.prompt_lookup or cfg.medusa) and (cfg.stream or cfg.compile):
        raise ConfigError("generate: --stream and --compile do not combine with --draft, --prompt_lookup or "
                          "--medusa (they decode on their own loop and print each row when it is done)")
    from lmforge.infer.engine import engine_for

    from lmforge.infer.quant import quantize_as_configured

    model, tokenizer = load_with_tokenizer(cfg.model, cfg.device)
    heads = None
    if cfg.medusa:  # before quantizing: the heads check the weights they were trained for
        from lmforge.model.medusa import load_medusa_heads

        heads = load_medusa_heads(cfg.medusa, model, cfg.model)
    quantize_as_configured(model, cfg)
    rows = len(cfg.prompt)
    if cfg.draft or cfg.prompt_lookup or cfg.medusa:
        return _print_rows(cfg, tokenizer, _accelerated(model, tokenizer, cfg, heads))
    engine = engine_for(model, tokenizer, cfg, max_seqs=min(64, rows))
    if not cfg.stream:
        completions = engine.generate(cfg.prompt, cfg) if engine else generate(model, cfg.prompt, cfg, tokenizer)
        return _print_rows(cfg, tokenizer, completions)
    texts = []
    for row, prompt in enumerate(cfg.prompt):
        _print(_header(row, rows) + prompt, end="")
        deltas = engine.stream(prompt, cfg) if engine else stream_completion(model, tokenizer, prompt, cfg)
        while True:
            try:
                _print(next(deltas), end="")
            except StopIteration as finished:
                completion: Completion = finished.value
                break
        _print("\n" + _ending(completion, cfg, tokenizer))
        texts.append(completion.text or "")
    return texts


def _accelerated(model: Any, tokenizer: Any, cfg: GenerateConfig, heads: Any = None) -> list[Completion]:
    """Speculative decoding (--draft or --prompt_lookup) or Medusa tree decoding (with `heads`, from --medusa) of
    cfg.prompt: the same greedy tokens as plain decoding, fewer passes of the model. Prints what was accepted."""
    if heads is not None:
        from lmforge.infer.medusa import medusa_generate

        completions, stats = medusa_generate(model, heads, cfg.prompt, cfg, tokenizer)
        print(f"[medusa: {stats.tokens} tokens in {stats.steps} passes, {stats.tokens / max(1, stats.steps):.2f} "
              f"per pass]", file=sys.stderr)
        return completions
    from lmforge.infer.speculative import load_draft, speculative_generate

    draft = None
    if cfg.draft:
        from lmforge.infer.quant import quantize_as_configured

        draft = load_draft(cfg.draft, model, tokenizer, target_dir=cfg.model,
                           device=str(next(model.parameters()).device))
        quantize_as_configured(draft, cfg)
    completions, stats = speculative_generate(model, cfg.prompt, cfg, tokenizer, draft=draft,
                                              num_draft_tokens=cfg.num_draft_tokens, prompt_lookup=cfg.prompt_lookup)
    print(f"[speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted ({stats.acceptance_rate:.0%}), "
          f"{stats.tokens_per_target_pass:.2f} tokens per pass of the model]", file=sys.stderr)
    return completions


def _print_rows(cfg: GenerateConfig, tokenizer: Any, completions: list[Completion]) -> list[str]:
    for row, (prompt, completion) in enumerate(zip(cfg.prompt, completions)):
        _print(_header(row, len(cfg.prompt)) + prompt + (completion.text or "") + "\n"
               + _ending(completion, cfg, tokenizer))
    return [completion.text or "" for completion in completions]


def _print(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _header(row: int, rows: int) -> str:
    """The header line before a row when there are several prompts ('=== 2/3 ==='), with its newline."""
    return f"=== {row + 1}/{rows} ===\n" if rows > 1 else ""


def _ending(completion: Completion, cfg: GenerationConfig, tokenizer: Any) -> str:
    """Why a row ended and how many tokens it generated (the eos or stop-completing token included):
    '[eos, 12 tokens]', "[stop string ';', 5 tokens]" or '[length, 40 tokens]'."""
    count = len(completion.token_ids)
    tokens = f"{count} token{'' if count == 1 else 's'}"
    if completion.finish_reason != "stop":
        return f"[{completion.finish_reason}, {tokens}]"
    # The text is cut before the stop string; the stop string follows it in the decoded tokens.
    decoded = tokenizer.decode(completion.token_ids)
    found = [stop for stop in cfg.stop if (completion.text or "") + stop in decoded]
    return f"[stop string {max(found, key=len)!r}, {tokens}]" if found else f"[stop string, {tokens}]"

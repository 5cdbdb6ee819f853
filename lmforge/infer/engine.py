"""The inference engine: requests added at any time, stepped together over a paged KV cache.

    engine = Engine(model, tokenizer)
    completions = engine.generate(["a dog is", "the sea"], GenerationConfig(max_new_tokens=40))

    rid = engine.add_request("a dog is", GenerationConfig(temperature=0.8, seed=1), n=4)
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutputs: new tokens and printable text per sample
            print(out.request_id, out.index, out.text, out.finish_reason)

Three parts with small interfaces, as vLLM splits them: the BlockPool (block allocation and the prefix cache,
lmforge.infer.block_pool), the Scheduler (continuous batching, chunked prefill, preemption by recomputation,
lmforge.infer.scheduler) and the PagedRunner (the model over the paged cache, lmforge.infer.paged). This module ties
them to requests: sampling parameters, stop conditions, streaming text, `n` samples and abort.

`n > 1` samples of a prompt: the prompt is prefilled once; when it is done, the other samples fork from it: they
share its full blocks (read-only, counted) and get a copy of its last, partly filled block, then draw their own
first token from the same logits (seeded with seed + i when a seed is given). Greedy outputs equal `generate`'s for
the same prompt alone, whatever else is in the batch (tested), up to float rounding in near-ties.

Structured output: a request with a `constraint` (a lmforge.infer.constrain Grammar: a JSON schema, any JSON object,
a regex) gives each of its samples a grammar state; their logits are masked to the tokens the grammar allows before
the pick, and a sample whose grammar is complete ends there with finish_reason "stop".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator, Optional, Sequence as Seq

import torch
from torch import nn

from lmforge.errors import ConfigError, LmforgeError, PromptTooLongError
from lmforge.infer.block_pool import BlockPool
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import Completion, _completion, _push_row, _TextStream, stop_ids
from lmforge.infer.paged import ChunkInput, PagedRunner, runnable_model
from lmforge.infer.sampling import sample_next
from lmforge.infer.scheduler import RUNNING, Scheduler, Sequence

if TYPE_CHECKING:
    from lmforge.infer.constrain import Grammar, GrammarState

DEFAULT_BLOCK_SIZE = 16


@dataclass
class RequestOutput:
    """What one step produced for one sample of a request."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # tokens generated this step
    text: str  # text that became printable this step ('' without a tokenizer)
    finished: bool = False
    finish_reason: Optional[str] = None  # eos | stop | length | abort | error (see _Sample.error)
    logprobs: Optional[list["TokenLogprob"]] = None  # with add_request(logprobs=k): one per token of token_ids


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of its raw logits, before any sampling filter) and
    the `k` most likely tokens at its position with theirs."""

    token: int
    logprob: float
    top: dict[int, float]


def token_logprobs(logits: torch.Tensor, tokens: Seq[int], k: int) -> list[TokenLogprob]:
    """TokenLogprobs of `tokens` (T,) read from `logits` (T, V) row by row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [TokenLogprob(int(t), c, dict(zip(ids, values)))
            for t, c, ids, values in zip(tokens, chosen, top_ids.tolist(), top_values.tolist())]


@dataclass(eq=False)
class _Sample:
    """Per-sample decoding state beside its Sequence."""

    seq: Sequence
    generator: Optional[torch.Generator]
    stream: Optional[_TextStream]
    present: Optional[torch.Tensor] = None  # (1, V) tokens seen, for the repetition penalty
    finish_reason: Optional[str] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the generated tokens, when asked for
    constraint: Optional["GrammarState"] = None  # where the sample is in its request's grammar
    error: Optional[str] = None  # why the sample failed (its grammar could not be applied): finish_reason "error"

    @property
    def generated(self) -> list[int]:
        return self.seq.tokens[self.seq.prompt_len:]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    cfg: GenerationConfig
    eos_ids: tuple[int, ...]
    max_new: int
    n: int
    samples: list[_Sample] = field(default_factory=list)
    forked: bool = False
    logprobs: Optional[int] = None  # top-k log-probabilities of each generated token (0: the token's own only)
    prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.., when asked for
    constraint: Optional["Grammar"] = None  # structured output: every sample's tokens follow this grammar

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.n and all(s.finish_reason for s in self.samples)


class Engine:
    """See the module docstring.

    block_size: tokens per KV block. num_blocks: blocks in the cache; by default enough for max_seqs sequences of
    half the model's context each, and at least one whole context, within kv_cache_mb (default 1024 MiB: a model
    with a long context does not get a cache for max_seqs full contexts); longer sequences are served by
    preempting. max_batch_tokens: tokens fed per step (decodes + prompt chunks). max_seqs: sequences running at
    once. prefix_caching: share the blocks of common prompt prefixes across requests (samples of one request
    always share their prompt). The cache is keyed by tokens only: an engine whose model's weights change must be
    made anew.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 num_blocks: Optional[int] = None, max_batch_tokens: int = 512, max_seqs: int = 64,
                 prefix_caching: bool = True, kv_cache_mb: float = 1024.0) -> None:
        for name, value in (("block_size", block_size), ("max_batch_tokens", max_batch_tokens),
                            ("max_seqs", max_seqs), ("num_blocks", num_blocks or 1)):
            if int(value) < 1:
                raise ConfigError(f"engine {name}={value!r}: expected an integer >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.block_size
        if num_blocks is None:
            cfg, weight = model.config, runnable_model(model).tok_emb.weight
            block_bytes = 2 * cfg.n_layer * block_size * cfg.n_kv_head * cfg.head_dim * weight.element_size()
            wanted = max(-(-self.context // block_size), max_seqs * -(-self.context // (2 * block_size)))
            num_blocks = max(1, min(wanted, int(kv_cache_mb * 2**20 // block_bytes)))
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_batch_tokens, max_seqs)
        self.runner = PagedRunner(runnable_model(model), num_blocks, block_size)
        self.vocab_size = model.config.vocab_size
        self.prefix_caching = prefix_caching
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.steps = self.tokens_fed = self.tokens_generated = 0

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], cfg: Optional[GenerationConfig] = None, *, n: int = 1,
                    request_id: Optional[str] = None, eos_id: int | Seq[int] | None = None,
                    logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None,
                    constraint: Optional["Grammar"] = None) -> str:
        """Queue a prompt (text with a tokenizer, or token ids) for `n` samples; return its request id.

        logprobs=k: each RequestOutput carries its tokens' log-probabilities and the k most likely tokens' (0: the
        token's own only); prompt_logprobs=k: the same for the prompt's tokens after the first, in
        `Request.prompt_scores` (such a prompt is computed in full: it takes no blocks from the prefix cache).
        constraint: a Grammar (lmforge.infer.constrain) every sample follows: tokens it forbids are never picked,
        the request's eos ids only once the output is complete, and a sample whose grammar can take nothing more
        ends with finish_reason "stop" (without an eos token). Log-probabilities still report the model's own,
        unmasked distribution."""
        cfg = cfg or GenerationConfig()
        if cfg.stop and self.tokenizer is None:
            raise TypeError("engine: stop strings need a tokenizer")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("engine: text prompts need a tokenizer (or pass token ids)")
            prompt = self.tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LmforgeError("engine: the prompt is empty; it needs at least one token")
        if len(prompt) >= self.context:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens but the model's context (block_size) is "
                                     f"{self.context}; use at most {self.context - 1} prompt tokens")
        if n < 1:
            raise ConfigError(f"engine n={n}: expected at least 1 sample")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ConfigError(f"engine: prompt token ids must be in [0, {self.vocab_size}) (the model's vocabulary)")
        if cfg.seed is not None and not -2**63 <= cfg.seed <= 2**64 - 1 - n:  # torch.Generator's range, per sample
            raise ConfigError(f"engine seed={cfg.seed}: expected an integer in [-2**63, 2**64 - 1 - n]")
        if constraint is not None and constraint.vocab_size != self.vocab_size:
            raise ConfigError(f"engine constraint: built for vocab_size {constraint.vocab_size}, but the model has "
                              f"{self.vocab_size}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise LmforgeError(f"engine: request id {request_id!r} is already in use")
        max_new = min(cfg.max_new_tokens, self.context - len(prompt))
        if -(-(len(prompt) + max_new) // self.pool.block_size) > self.pool.num_blocks:
            raise ConfigError(f"engine: a sequence of {len(prompt) + max_new} tokens needs more than the cache's "
                              f"{self.pool.num_blocks} blocks of {self.pool.block_size}: raise num_blocks")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and not 0 <= k <= min(20, self.vocab_size):
                raise ConfigError(f"engine {name}={k}: expected 0-{min(20, self.vocab_size)}")
        request = Request(request_id, prompt, cfg, stop_ids(eos_id, self.tokenizer, cfg), max_new, n,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint)
        self.requests[request_id] = request
        self._new_sample(request, list(prompt), queue=True)
        return request_id

    def _new_sample(self, request: Request, tokens: list[int], queue: bool) -> _Sample:
        index = len(request.samples)
        salt = "" if self.prefix_caching and request.prompt_logprobs is None else request.request_id
        seq = Sequence(next(self._ids), tokens, len(request.prompt), salt=salt, owner=request)
        cfg = request.cfg
        generator = None
        if cfg.seed is not None:
            generator = torch.Generator(self.runner.device).manual_seed(cfg.seed + index)
        stream = _TextStream(self.tokenizer, cfg.stop) if self.tokenizer is not None else None
        sample = _Sample(seq, generator, stream)
        if cfg.repetition_penalty != 1.0:
            sample.present = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.runner.device)
            sample.present[0, torch.tensor(request.prompt, device=self.runner.device)] = True
        if request.constraint is not None:  # a preempted sample keeps its state: recomputing feeds it nothing
            sample.constraint = request.constraint.new_state(request.eos_ids)
        request.samples.append(sample)
        seq.sample = sample
        if queue:
            self.scheduler.add(seq)
        return sample

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now: its sequences leave the batch and free their blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        outputs = []
        for index, sample in enumerate(request.samples):
            if sample.finish_reason is None:
                self.scheduler.finish(sample.seq)
                sample.finish_reason = "abort"
                outputs.append(RequestOutput(request_id, index, [], "", True, "abort"))
        # samples not forked yet (the prompt was still being prefilled) end too
        outputs += [RequestOutput(request_id, index, [], "", True, "abort")
                    for index in range(len(request.samples), request.n)]
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step of every scheduled sequence; return what each sample that produced a token got."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        sampled = [i for i, c in enumerate(chunks) if c.sample]
        scored = [i for i, c in enumerate(chunks) if c.seq.owner.prompt_logprobs is not None and
                  c.seq is c.seq.owner.samples[0].seq and c.start < c.seq.prompt_len and
                  len(c.seq.owner.prompt_scores) == c.start]  # the leader's prompt, once (not on a recompute)
        logits, full = self.runner.run([ChunkInput(c.seq.tokens[c.start:c.start + c.length], c.start,
                                                   c.seq.block_table) for c in chunks], sampled, scored)
        self.steps += 1
        self.tokens_fed += sum(c.length for c in chunks)
        for i in scored:  # logits after token p score token p + 1, within the prompt
            chunk, request = chunks[i], chunks[i].seq.owner
            end = min(chunk.start + chunk.length, chunk.seq.prompt_len - 1)
            if end > chunk.start:
                request.prompt_scores += token_logprobs(full[i][:end - chunk.start],
                                                        chunk.seq.tokens[chunk.start + 1:end + 1],
                                                        request.prompt_logprobs)
        for chunk in chunks:
            self.scheduler.computed(chunk)
        outputs = []
        seqs = [chunks[i].seq for i in sampled]
        for row, token in enumerate(self._sample(seqs, logits)):
            request, forks = seqs[row].owner, []
            if not request.forked and request.n > 1:  # before the leader's token: it may end the leader
                forks = self._fork(request, logits[row:row + 1])
            outputs.append(self._append(seqs[row].sample, token, logits[row:row + 1]))
            outputs += forks
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each sequence: greedy rows together, sampled rows with their own generator; a
        constrained row picks from a masked copy of its logits (`logits` stay the model's, for logprobs)."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            sample, cfg = seq.sample, seq.owner.cfg
            row_logits = logits[row:row + 1]
            if sample.constraint is not None and sample.error is None:
                try:
                    row_logits = sample.constraint.mask_logits(row_logits.clone())
                except LmforgeError as exc:  # this request's grammar, not the batch: only its sample fails
                    sample.error = str(exc)
            if cfg.temperature != 0 or sample.present is not None:
                tokens[row] = int(sample_next(row_logits, cfg, sample.generator, sample.present)[0])
            elif sample.constraint is not None:
                tokens[row] = int(row_logits.argmax(dim=-1)[0])
        return tokens

    def _append(self, sample: _Sample, token: int, logits: torch.Tensor) -> RequestOutput:
        """Add a sampled token to its sequence, decide whether the sample is done, and say what it produced."""
        seq, request = sample.seq, sample.seq.owner
        seq.tokens.append(token)
        self.tokens_generated += 1
        scores = None
        if request.logprobs is not None:
            scores = token_logprobs(logits, [token], request.logprobs)
            sample.logprobs += scores
        if sample.present is not None:
            sample.present[0, token] = True
        text, ended = "", False
        if sample.stream is not None:
            text, ended = _push_row(sample.stream, token, request.eos_ids)
        elif token in request.eos_ids:
            ended = True
        complete = False  # the grammar can take nothing more: the sample ends without an eos token
        if sample.constraint is not None and sample.error is None:
            try:
                sample.constraint.accept(token)
            except LmforgeError as exc:
                sample.error = str(exc)
            complete = not ended and sample.constraint.finished
        index = request.samples.index(sample)
        if sample.error is not None:
            sample.finish_reason = "error"
            self.scheduler.finish(seq)
        elif ended or complete or seq.num_generated >= request.max_new:
            if sample.stream is not None:
                text += sample.stream.finish() if not sample.stream.stopped else ""
            stopped = complete or (sample.stream is not None and sample.stream.stopped)
            sample.finish_reason = "stop" if stopped else "eos" if ended else "length"
            self.scheduler.finish(seq)
        return RequestOutput(request.request_id, index, [token], text, sample.finish_reason is not None,
                             sample.finish_reason, scores)

    def _fork(self, request: Request, logits: torch.Tensor) -> list[RequestOutput]:
        """The other n - 1 samples of a request whose prompt was just prefilled (the leader still holds its
        blocks): each shares the prompt's full blocks, copies its partly filled last block, and draws its first
        token from the same logits. When max_seqs are running or no block is free for the copy, a sample queues
        instead (and finds the full blocks in the prefix cache)."""
        request.forked = True
        leader = request.samples[0].seq
        full = len(request.prompt) // self.pool.block_size
        outputs = []
        tail = len(request.prompt) % self.pool.block_size
        for _ in range(request.n - 1):
            sample = self._new_sample(request, list(request.prompt), queue=False)
            seq = sample.seq
            if len(self.scheduler.running) >= self.scheduler.max_seqs or (tail and not self.pool.num_free):
                self.scheduler.add(seq)
                continue
            fresh = self.pool.allocate(1) if tail else []
            self.pool.share(leader.block_table[:full])
            if fresh:
                self.runner.copy_blocks([(leader.block_table[full], fresh[0])])
            seq.block_table = leader.block_table[:full] + fresh
            seq.num_computed, seq.num_cached_hashes = len(request.prompt), full
            seq.last_hash = leader.last_hash
            seq.status = RUNNING
            self.scheduler.running.append(seq)
            outputs.append(self._append(sample, self._sample([seq], logits)[0], logits))
        return outputs

    # ---- convenience ----------------------------------------------------------------------------------------

    def run_until_done(self, request_ids: Seq[str]) -> None:
        while any(not self.requests[r].finished for r in request_ids if r in self.requests):
            self.step()

    def completions(self, request_id: str) -> list[Completion]:
        """A request's samples as Completions (as generate makes them); removes a finished request."""
        request = self.requests[request_id]
        out = [_completion(s.generated, request.eos_ids, s.stream, self.tokenizer) for s in request.samples]
        for completion, sample in zip(out, request.samples):
            if sample.finish_reason in ("stop", "error"):  # a complete grammar or a failed one: not in the tokens
                completion.finish_reason = sample.finish_reason
        if request.finished:
            del self.requests[request_id]
        return out

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]], cfg: Optional[GenerationConfig] = None, *,
                 eos_id: int | Seq[int] | None = None, constraint: Optional["Grammar"] = None) -> list[Completion]:
        """Every prompt through the engine at once; one Completion per prompt, in order (like generate());
        `constraint`: every prompt's output follows this grammar (see add_request)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.add_request(p, cfg, eos_id=eos_id, constraint=constraint) for p in prompts]
        self.run_until_done(ids)
        return [self.completions(r)[0] for r in ids]

    def stream(self, prompt: str | Seq[int], cfg: Optional[GenerationConfig] = None, *,
               eos_id: int | Seq[int] | None = None) -> Generator[str, None, Completion]:
        """Text deltas of one prompt as they become printable, stepping the engine; returns the Completion.
        Closing the generator early aborts the request. Other requests in the engine advance too, but this
        generator consumes the steps' outputs: their results are still in `completions()`, their deltas are not
        streamed (a server that streams many requests reads `step()` itself)."""
        request_id = self.add_request(prompt, cfg, eos_id=eos_id)
        request = self.requests[request_id]
        try:
            while not request.finished:
                for out in self.step():
                    if out.request_id == request_id and out.text:
                        yield out.text
        finally:
            if request_id in self.requests and not request.finished:
                self.abort(request_id)
        if request_id in self.requests:
            return self.completions(request_id)[0]
        sample = request.samples[0]  # aborted by another caller
        return _completion(sample.generated, request.eos_ids, sample.stream, self.tokenizer)

    def stats(self) -> dict[str, Any]:
        """KV memory allocated and used (now and at peak), prefix-cache hit rate, preemptions, steps, tokens fed
        and generated, sequences waiting and running."""
        per_block = self.runner.bytes_per_block
        return {"kv_blocks": self.pool.num_blocks, "block_size": self.pool.block_size,
                "kv_bytes_allocated": self.pool.num_blocks * per_block,
                "kv_blocks_used": self.pool.num_used, "kv_blocks_peak": self.pool.peak_used,
                "kv_bytes_peak": self.pool.peak_used * per_block, "prefix_cache_hit_rate": self.pool.hit_rate(),
                "preemptions": self.scheduler.preemptions, "steps": self.steps, "tokens_fed": self.tokens_fed,
                "generated": self.tokens_generated, "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.running)}


def engine_for(model: nn.Module, tokenizer: Any = None, cfg: Optional[GenerationConfig] = None,
               **options: Any) -> Optional[Engine]:
    """An Engine for `model`, or None where plain `generate` must serve instead: the compiled decode step
    (cfg.compile), the cache-less reference (cfg.use_cache False), or a model the paged runner does not run
    (prefix or prompt tuning, a non-Transformer)."""
    if cfg is not None and (cfg.compile or not cfg.use_cache):
        return None
    try:
        runnable_model(model)
    except ConfigError:
        return None
    return Engine(model, tokenizer, **options)


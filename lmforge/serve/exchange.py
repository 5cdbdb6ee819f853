"""One generation request's bookkeeping beside the engine: the guardrails' verdict on its input, the response
cache (exact, then semantic), its timing, and the line it leaves in the request log.

    exchange = Exchange(parts, model, route, body, client, http_request)
    await exchange.check_input(messages)         # raises ApiError 400 (code prompt_injection) when blocked
    cached = await exchange.lookup()             # a response dict, or None
    ...generate...
    await exchange.store(response)
    exchange.done(200, outputs, prompt_tokens, completion_tokens)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.serve.metrics import Metrics, TokenClock
from lmforge.serve.protocol import ApiError

LOGGED_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stop",
                 "response_format", "stream", "logprobs", "echo")


@dataclass
class ServedModel:
    name: str
    engine: Any  # its EngineThread
    tokenizer: Any
    context: int
    created: int
    lm: Any = None  # the model itself (embeddings run beside the engine)
    fingerprint: str = ""  # of its files (what the response cache keys on)


@dataclass
class ServerParts:
    """What a server was configured with beyond its models; each part is optional."""

    metrics: Metrics = field(default_factory=Metrics)
    max_tokens_limit: int = 4096
    cache: Any = None  # a cache.ResponseCache
    semantic: dict[str, Any] = field(default_factory=dict)  # model name -> its semantic_cache.SemanticCache
    log: Any = None  # a request_log.RequestLog
    guardrails: Any = None  # a guardrails.Guardrails
    guardrails_id: str = ""  # a hash of the guardrails file: part of the cache key (a hit must have passed them)
    guard_grammars: dict[str, Any] = field(default_factory=dict)  # model name -> its validators' grammar or None

    def close(self) -> None:
        for part in (self.cache, *self.semantic.values(), self.log):
            if part is not None:
                part.close()


class Exchange:
    def __init__(self, parts: ServerParts, model: ServedModel, route: str, body: Any, client: str,
                 http: Any = None) -> None:
        from lmforge.serve.cache import cacheable, request_key
        from lmforge.serve.semantic_cache import semantic_parts

        self.parts, self.model, self.route = parts, model, route
        self.body = body.model_dump(exclude_none=True)
        self.started = time.perf_counter()
        self.clock = TokenClock(parts.metrics, model.name, self.started)
        # a stream can be answered from the cache (replayed as chunks); only whole responses are stored
        self.cacheable = (parts.cache is not None or model.name in parts.semantic) and \
            cacheable({k: v for k, v in self.body.items() if k != "stream"})
        self.cache_status = "miss" if self.cacheable else "off"
        # where the request lives in the caches (the weights and the guardrails a cached answer passed), once
        identity = model.fingerprint + parts.guardrails_id
        self.key = request_key(identity, route, self.body) if self.cacheable and parts.cache is not None else None
        self.semantic = parts.semantic.get(model.name) if self.cacheable else None
        self.semantic_where = semantic_parts(identity, route, self.body) if self.semantic is not None else None
        self.guard: dict[str, Any] = {}
        self.client, self.http = client, http  # http: the starlette Request (to see a client leave)
        self.record_id = uuid.uuid4().hex
        self.logged = False

    # ---- guardrails -----------------------------------------------------------------------------------------

    async def check_input(self, messages: list[dict[str, Any]]) -> None:
        """The prompt-injection detector on every turn of the request (a completion's prompts count as user turns):
        flags (the log and /metrics say so) or blocks."""
        guardrails = self.parts.guardrails
        if guardrails is None or not messages:
            return
        detection = await asyncio.to_thread(guardrails.check_messages, messages)  # a classifier may run
        if not detection.flagged:
            return
        self.guard.update(injection=round(detection.score, 4), flagged=True, blocked=detection.blocked,
                          reasons=detection.reasons[:5])
        self.parts.metrics.guard["flagged"] += 1
        if detection.blocked:
            self.parts.metrics.guard["blocked"] += 1
            error = ApiError(400, "the request was blocked by the prompt-injection guard "
                             f"({'; '.join(detection.reasons[:3]) or 'score %.2f' % detection.score})",
                             "messages" if "chat" in self.route else "prompt", "prompt_injection")
            self.done(400, error=error.message)
            raise error

    def output_verdict(self, problems: list[str], retries: int, refused: bool) -> None:
        """Record what the output validators said of one choice as finally given (re-asks or regenerations done,
        the problems left, whether it was refused)."""
        if not problems and not retries:
            return
        self.guard["reasks"] = self.guard.get("reasks", 0) + retries
        self.guard["problems"] = (self.guard.get("problems", []) + problems)[:5]
        self.guard["valid"] = self.guard.get("valid", True) and not problems
        self.guard["refused"] = self.guard.get("refused", False) or refused
        self.parts.metrics.guard["reasks"] += retries
        if problems:
            self.parts.metrics.guard["refused" if refused else "invalid"] += 1

    # ---- cache ----------------------------------------------------------------------------------------------

    async def lookup(self) -> Optional[dict[str, Any]]:
        """A cached response to this request (exact match first, then semantic), made fresh; None on a miss."""
        from lmforge.serve.cache import replayed

        if not self.cacheable:
            return None
        found = None
        if self.key is not None:
            found = await asyncio.to_thread(self.parts.cache.get, self.key)
            if found is not None:
                self.cache_status = "hit"
        if found is None and self.semantic_where:
            near = await asyncio.to_thread(self.semantic.lookup, *self.semantic_where)
            if near is not None:
                found, similarity = near
                self.cache_status = f"semantic {similarity:.4f}"
        self.parts.metrics.cache[(self.model.name, self.cache_status.split()[0])] += 1
        return replayed(found, self.model.name) if found is not None else None

    async def store(self, response: dict[str, Any]) -> None:
        """Keep a generated response for later identical (or, with the semantic cache, similar) requests."""
        if not self.cacheable or self.guard.get("problems"):
            return
        if self.key is not None:
            await asyncio.to_thread(self.parts.cache.put, self.key, response)
        if self.semantic_where:
            await asyncio.to_thread(self.semantic.add, *self.semantic_where, response)

    def headers(self) -> dict[str, str]:
        from lmforge.serve.cache import CACHE_HEADER

        return {CACHE_HEADER: self.cache_status}

    # ---- the log --------------------------------------------------------------------------------------------

    def done(self, status: int, outputs: Optional[list[str]] = None, prompt_tokens: int = 0,
             completion_tokens: int = 0, error: Optional[str] = None) -> None:
        """Write the request's line in the request log (when there is one), once."""
        log = self.parts.log
        if log is None or self.logged:
            return
        self.logged = True
        from lmforge.serve.request_log import utc_now

        body = self.body
        prompt = body.get("messages", body.get("prompt"))
        log.write({"time": utc_now(), "id": self.record_id, "route": self.route, "model": self.model.name,
                   "status": status, "client": self.client,
                   "params": {k: body[k] for k in LOGGED_PARAMS if k in body},
                   "prompt": prompt, "output": outputs or [], "prompt_tokens": prompt_tokens,
                   "completion_tokens": completion_tokens, "latency_s": round(time.perf_counter() - self.started, 6),
                   "ttft_s": round(self.clock.first, 6) if self.clock.first is not None else None,
                   "cache": self.cache_status.split()[0], "guard": self.guard or None, "error": error})

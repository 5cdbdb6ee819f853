"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent
events or not), /v1/embeddings, /tokenize, /detokenize, /tokenizer_info, /health. Every generation goes through its
model's engine (continuous batching), under the request's `response_format` grammar when it has one.

Around the engine (exchange.py): the prompt-injection guard on the input, the response cache (a hit is marked in
the `x-lmforge-cache` header), the output validators (re-ask, constrained regeneration, refusal or a flag), the
/metrics histograms and the request log.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with status 400 for a malformed or
impossible request (bad JSON, unknown or mistyped fields, a prompt longer than the context), 404 for an unknown
model; never a traceback. A streaming client that disconnects has its request aborted (its sequences leave the
batch and free their blocks).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from lmforge.errors import LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.serve.exchange import Exchange, ServedModel, ServerParts
from lmforge.serve.protocol import (FINISH, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                    EmbeddingRequest, TokenizeRequest, _Sampling, chat_logprobs, completion_logprobs,
                                    error, prompt_ids)

__all__ = ["ServedModel", "ServerParts", "build_app"]


def build_app(models: dict[str, ServedModel], max_tokens_limit: int = 4096,
              parts: Optional[ServerParts] = None) -> FastAPI:
    parts = parts or ServerParts(max_tokens_limit=max_tokens_limit)
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    app.state.models, app.state.metrics, app.state.parts = models, parts.metrics, parts

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                            "owned_by": "lmforge", "max_model_len": m.context}
                                           for m in models.values()]}

    def served(name: str) -> ServedModel:
        if name not in models:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(sorted(models))}", "model")
        return models[name]

    def served_or_only(name: Optional[str]) -> ServedModel:
        if name is None and len(models) == 1:
            return next(iter(models.values()))
        return served(name or "")

    def exchange(http: Request, route: str, body: Any, model: ServedModel) -> Exchange:
        from lmforge.serve.request_log import client_id

        key = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return Exchange(parts, model, route, body, client_id(key or (http.client.host if http.client else "")))

    def generation(body: _Sampling, model: ServedModel, default_max: int) -> GenerationConfig:
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max
        if max_tokens > parts.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit {parts.max_tokens_limit}",
                           "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop: every stop string must be non-empty", "stop")
        return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=stop, seed=body.seed)

    def grammar(model: ServedModel, response_format: Optional[dict[str, Any]]) -> Any:
        from lmforge.infer.constrain import response_format_grammar

        try:
            return response_format_grammar(model.tokenizer, model.lm.config.vocab_size, response_format)
        except LmforgeError as exc:
            raise ApiError(400, str(exc), "response_format") from None

    async def submit(model: ServedModel, prompt: list[int], cfg: GenerationConfig, n: int,
                     eos_id: Optional[list[int]], **options: Any) -> tuple[str, Any]:
        try:
            return await model.engine.submit(prompt, cfg, n=n, eos_id=eos_id, **options)
        except (LmforgeError, TypeError) as exc:
            raise ApiError(400, str(exc), "prompt") from None

    async def run(model: ServedModel, ex: Exchange, prompt: list[int], cfg: GenerationConfig, n: int,
                  eos_id: Optional[list[int]], **options: Any) -> tuple[list[Any], Any]:
        request_id, queue = await submit(model, prompt, cfg, n, eos_id, **options)
        return await _collect(model, request_id, queue, ex)

    # ---- tokenizer and embeddings ---------------------------------------------------------------------------

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: Optional[str] = None) -> dict[str, Any]:
        """What lm-evaluation-harness's tokenizer_backend=remote reads (vLLM's fields)."""
        chosen = served_or_only(model)
        special = chosen.tokenizer.special_tokens
        return {"tokenizer_class": "lmforge", "eos_token": special.get("eos"), "bos_token": special.get("bos"),
                "pad_token": special.get("pad"), "chat_template": chosen.tokenizer.chat_template,
                "model_max_length": chosen.context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        chosen = served_or_only(body.model)
        tokens = chosen.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens and "bos" in
                                         chosen.tokenizer.special_tokens, allow_special=True)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": chosen.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        chosen = served_or_only(body.model)
        vocab = chosen.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"tokens: every id must be in [0, {vocab})", "tokens")
        return {"prompt": chosen.tokenizer.decode(body.tokens)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        """The mean of the last layer's hidden states over each input's tokens, L2-normalized."""
        model = served(body.model)
        inputs = prompt_ids(body.input, model.tokenizer)
        if any(not ids or len(ids) > model.context for ids in inputs):
            raise ApiError(400, f"input: each needs 1 to {model.context} tokens (the model's context)", "input")
        vectors = await asyncio.get_running_loop().run_in_executor(None, embed, model.lm, inputs)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return {"object": "list", "model": model.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(map(len, inputs)), "total_tokens": sum(map(len, inputs))}}

    # ---- completions ----------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Any:
        model = served(body.model)
        cfg = generation(body, model, 16)
        prompts = prompt_ids(body.prompt, model.tokenizer)
        if len(prompts) != 1 and body.stream:
            raise ApiError(400, "stream takes one prompt", "prompt")
        if body.stream and body.echo:
            raise ApiError(400, "echo is not streamed: ask without stream", "echo")
        constraint = grammar(model, body.response_format.model_dump(exclude_none=True)
                             if body.response_format else None)
        ex = exchange(http, "/v1/completions", body, model)
        await ex.check_input([{"role": "user", "content": p} for p in
                              ([body.prompt] if isinstance(body.prompt, str) else body.prompt) if isinstance(p, str)])
        scores = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None,
                  "constraint": constraint}
        cached = await ex.lookup()
        if body.stream:
            if cached is not None:
                return _replay_stream(ex, cached, _usage_asked(body))
            request_id, queue = await submit(model, prompts[0], cfg, body.n, None, **scores)
            return _sse(_stream_chunks(model, request_id, queue, "text_completion", body.n, ex, len(prompts[0]),
                                       _usage_asked(body)), ex.headers())
        if cached is not None:
            ex.done(200, [c["text"] for c in cached["choices"]], **_usage_counts(cached))
            return JSONResponse(cached, headers=ex.headers())
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for prompt in prompts:
            done, request = await run(model, ex, prompt, cfg, body.n, None, **scores)
            usage["prompt_tokens"] += len(prompt)
            head = model.tokenizer.decode(prompt) if body.echo else ""
            for sample, completion in zip(request.samples, done):
                usage["completion_tokens"] += len(completion.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(model.tokenizer, prompt if body.echo else [],
                                                   request.prompt_scores, sample.logprobs[:len(completion.token_ids)])
                choices.append({"index": len(choices), "text": head + (completion.text or ""), "logprobs": logprobs,
                                "finish_reason": FINISH[completion.finish_reason]})
        if parts.guardrails is not None:
            usage["completion_tokens"] += await _guard_completions(model, ex, choices, prompts, cfg, body, run)
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": model.name, "choices": choices,
                    "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}
        await ex.store(response)
        ex.done(200, [c["text"] for c in choices], **_usage_counts(response))
        return JSONResponse(response, headers=ex.headers())

    # ---- chat -----------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request) -> Any:
        model = served(body.model)
        tokenizer = model.tokenizer
        if tokenizer.chat_template is None:
            raise ApiError(400, f"model {model.name!r} has no chat template: use /v1/completions", "model")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        cfg = generation(body, model, max(1, model.context - len(prompt)))
        constraint = grammar(model, body.response_format.model_dump(exclude_none=True)
                             if body.response_format else None)
        ex = exchange(http, "/v1/chat/completions", body, model)
        await ex.check_input(messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        stop_ids = list(tokenizer.chat_stop_ids)
        cached = await ex.lookup()
        if body.stream:
            if cached is not None:
                return _replay_stream(ex, cached, _usage_asked(body))
            request_id, queue = await submit(model, prompt, cfg, body.n, stop_ids, logprobs=top,
                                             constraint=constraint)
            return _sse(_stream_chunks(model, request_id, queue, "chat.completion.chunk", body.n, ex, len(prompt),
                                       _usage_asked(body)), ex.headers())
        if cached is not None:
            ex.done(200, [c["message"]["content"] for c in cached["choices"]], **_usage_counts(cached))
            return JSONResponse(cached, headers=ex.headers())
        done, request = await run(model, ex, prompt, cfg, body.n, stop_ids, logprobs=top, constraint=constraint)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text or ""},
                    "logprobs": chat_logprobs(tokenizer, sample.logprobs[:len(c.token_ids)]) if body.logprobs
                    else None, "finish_reason": FINISH[c.finish_reason]}
                   for i, (sample, c) in enumerate(zip(request.samples, done))]
        generated = sum(len(c.token_ids) for c in done)
        if parts.guardrails is not None:
            generated += await _guard_chat(model, ex, choices, messages, cfg, run)
        response = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": model.name, "choices": choices,
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                              "total_tokens": len(prompt) + generated}}
        await ex.store(response)
        ex.done(200, [c["message"]["content"] for c in choices], len(prompt), generated)
        return JSONResponse(response, headers=ex.headers())

    return app


def embed(lm: Any, inputs: list[list[int]]) -> list[list[float]]:
    """Each input's mean last-layer hidden state, L2-normalized (the /v1/embeddings and semantic-cache vectors)."""
    import torch

    device = next(lm.parameters()).device
    with torch.inference_mode():
        vectors = [lm.hidden_states(torch.tensor([ids], device=device))[0].float().mean(dim=0) for ids in inputs]
        return [torch.nn.functional.normalize(v, dim=0).tolist() for v in vectors]


def _usage_counts(response: dict[str, Any]) -> dict[str, int]:
    usage = response.get("usage") or {}
    return {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0)}


def _guard_grammar(guardrails: Any, model: ServedModel) -> Any:
    """The grammar of the validator constrained decoding can enforce (json_schema, else regex), or None."""
    from lmforge.infer.constrain import json_schema_grammar, regex_grammar

    found = guardrails.constraint()
    if found is None:
        return None
    kind, value = found
    build = json_schema_grammar if kind == "json_schema" else regex_grammar
    return build(model.tokenizer, model.lm.config.vocab_size, value)


async def _guarded(ex: Exchange, text: str, regenerate: Any) -> tuple[str, Optional[str], int]:
    """Apply the output validators to one choice's text: while it fails, do what the guardrails say next — re-ask
    or regenerate under the validators' grammar (`regenerate(action, text, problems)` -> (text, finish, tokens);
    an action it cannot do returns None), refuse, or flag. Returns (text, finish_reason or None when unchanged,
    tokens generated by the retries)."""
    guardrails, retries, extra, finish, refused = ex.parts.guardrails, 0, 0, None, False
    problems = guardrails.check_output(text)
    while problems:
        action = guardrails.next_action(retries)
        again = await regenerate(action, text, problems) if action in ("reask", "constrain") else None
        if again is None:
            if action in ("reask", "constrain"):  # not possible here (no conversation, no grammar)
                action = guardrails.then
            if action == "refuse":
                text, finish, refused = guardrails.refusal, "content_filter", True
            break
        text, finish, tokens = again
        retries, extra = retries + 1, extra + tokens
        problems = guardrails.check_output(text)
    ex.output_verdict(problems, retries, refused)
    return text, finish, extra


async def _guard_chat(model: ServedModel, ex: Exchange, choices: list[dict[str, Any]],
                      messages: list[dict[str, str]], cfg: GenerationConfig, run: Any) -> int:
    """The output validators on each chat choice (see _guarded); returns the tokens generated by the retries."""
    stop_ids, extra = list(model.tokenizer.chat_stop_ids), 0

    async def regenerate(action: str, text: str, problems: list[str]) -> Any:
        constraint = _guard_grammar(ex.parts.guardrails, model) if action == "constrain" else None
        conversation = ex.parts.guardrails.reask_messages(messages, text, problems) if action == "reask" \
            else messages
        prompt = model.tokenizer.encode_chat(conversation, add_generation_prompt=True)
        if len(prompt) >= model.context:
            return None
        retry = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": min(cfg.max_new_tokens,
                                                                         model.context - len(prompt))})
        done, _ = await run(model, ex, prompt, retry, 1, stop_ids, constraint=constraint)
        return done[0].text or "", FINISH[done[0].finish_reason], len(done[0].token_ids)

    for choice in choices:
        text, finish, tokens = await _guarded(ex, choice["message"]["content"], regenerate)
        choice["message"]["content"], extra = text, extra + tokens
        choice["finish_reason"] = finish or choice["finish_reason"]
    return extra


async def _guard_completions(model: ServedModel, ex: Exchange, choices: list[dict[str, Any]],
                             prompts: list[list[int]], cfg: GenerationConfig, body: CompletionRequest,
                             run: Any) -> int:
    """The output validators on completions: without a conversation to re-ask in, a failing choice is regenerated
    under the validators' grammar when they have one (reask or constrain), then refused or flagged. Returns the
    tokens generated by the retries."""
    per_prompt, extra = len(choices) // len(prompts), 0
    for i, choice in enumerate(choices):
        async def regenerate(action: str, text: str, problems: list[str]) -> Any:
            constraint = _guard_grammar(ex.parts.guardrails, model)
            if constraint is None or body.echo:
                return None
            done, _ = await run(model, ex, prompts[i // per_prompt], cfg, 1, None, constraint=constraint)
            return done[0].text or "", FINISH[done[0].finish_reason], len(done[0].token_ids)

        text, finish, tokens = await _guarded(ex, choice["text"], regenerate)
        choice["text"], extra = text, extra + tokens
        choice["finish_reason"] = finish or choice["finish_reason"]
    return extra


async def _collect(model: ServedModel, request_id: str, queue: Any, ex: Exchange) -> tuple[list[Any], Any]:
    """Wait for a request's Completions and its engine Request (log-probabilities); a client that goes away
    meanwhile has its request aborted."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                return item
            ex.clock.tick(item.index, len(item.token_ids))
    except BaseException:
        model.engine.abort(request_id)
        raise


def _usage_asked(body: _Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream_chunks(model: ServedModel, request_id: str, queue: Any, kind: str, n: int, ex: Exchange,
                         prompt_tokens: int, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed response: text deltas per choice, then each choice's finish_reason, then (when
    asked: stream_options.include_usage) a chunk with no choices and the usage. The output validators only look
    at a stream once it is sent: they flag it in the log, they cannot take it back."""
    created, ident = int(time.time()), f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    chat = kind.startswith("chat")
    texts, generated = [""] * n, 0

    def chunk(index: int, text: Optional[str], finish: Optional[str], first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": kind, "created": created, "model": model.name, "choices": [choice]}

    finished = False
    try:
        if chat:
            for index in range(n):
                yield chunk(index, None, None, first=True)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                finished = True
                if ex.parts.guardrails is not None:
                    ex.output_verdict(sum((ex.parts.guardrails.check_output(t) for t in texts), []), 0, False)
                ex.done(200, texts, prompt_tokens, generated)
                if include_usage:
                    yield {"id": ident, "object": kind, "created": created, "model": model.name, "choices": [],
                           "usage": _usage(prompt_tokens, generated)}
                return
            ex.clock.tick(item.index, len(item.token_ids))
            generated += len(item.token_ids)
            texts[item.index] += item.text or ""
            if item.text or item.finished:
                yield chunk(item.index, item.text, FINISH[item.finish_reason] if item.finished else None)
    finally:
        if not finished:  # the client went away (or the engine failed): free the sequences
            model.engine.abort(request_id)
            ex.done(499, texts, prompt_tokens, generated, error="the client went away before the end")


def _replay_stream(ex: Exchange, cached: dict[str, Any], include_usage: bool) -> StreamingResponse:
    from lmforge.serve.cache import stream_chunks

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        items = stream_chunks(cached)
        for item in items:
            yield item
        if include_usage:
            yield {**items[-1], "choices": [], "usage": cached["usage"]}
        outputs = [c["message"]["content"] if "message" in c else c["text"] for c in cached["choices"]]
        ex.done(200, outputs, **_usage_counts(cached))

    return _sse(chunks(), ex.headers())


def _sse(chunks: AsyncIterator[dict[str, Any]], headers: Optional[dict[str, str]] = None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield f"data: {json.dumps(item)}\n\n"
        except LmforgeError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

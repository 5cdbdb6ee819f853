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
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.serve.exchange import Exchange, ServedModel, ServerParts
from lmforge.serve.protocol import (FINISH, ApiError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                    EmbeddingRequest, TokenizeRequest, _Sampling, chat_logprobs, completion_logprobs,
                                    error, prompt_ids)

__all__ = ["ServedModel", "ServerParts", "build_app"]

MAX_GRAMMAR_CHARS = 100_000  # a response_format's JSON at most (compiling a grammar costs time in its size)
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def build_app(models: dict[str, ServedModel], parts: Optional[ServerParts] = None) -> FastAPI:
    """The app serving `models`, with the caches, log, guardrails and limits of `parts` (none: ServerParts())."""
    parts = parts or ServerParts()
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404 path, 405 method
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

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
        key = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
        client = key or (http.client.host if http.client else "")
        return Exchange(parts, model, route, body, parts.log.client_id(client) if parts.log else "", http)

    def generation(body: _Sampling, model: ServedModel, default_max: int) -> GenerationConfig:
        """The engine's settings for a request; without max_tokens, `default_max` within the server's limit."""
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > parts.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit {parts.max_tokens_limit}",
                           "max_tokens")
        max_tokens = max_tokens or min(default_max, parts.max_tokens_limit)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop: every stop string must be non-empty", "stop")
        return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=stop, seed=body.seed)

    async def grammar(model: ServedModel, response_format: Optional[dict[str, Any]]) -> Any:
        """The request's grammar, compiled off the event loop (a large schema takes seconds); any failure is the
        request's fault: a 400 naming response_format."""
        from lmforge.infer.constrain import response_format_grammar

        if response_format is None or response_format.get("type") == "text":
            return None
        if len(json.dumps(response_format)) > MAX_GRAMMAR_CHARS:
            raise ApiError(400, f"response_format: at most {MAX_GRAMMAR_CHARS} characters of JSON",
                           "response_format")
        try:
            return await asyncio.to_thread(response_format_grammar, model.tokenizer, model.lm.config.vocab_size,
                                           response_format)
        except Exception as exc:  # llguidance's and jsonschema's own errors too
            raise ApiError(400, _one_line(str(exc)), "response_format") from None

    async def submit(model: ServedModel, prompt: list[int], cfg: GenerationConfig, n: int,
                     eos_id: Optional[list[int]], **options: Any) -> tuple[str, Any]:
        try:
            return await model.engine.submit(prompt, cfg, n=n, eos_id=eos_id, **options)
        except (LmforgeError, TypeError, ValueError, OverflowError) as exc:
            raise ApiError(400, _one_line(str(exc)), "prompt") from None

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
        inputs = prompt_ids(body.input, model.tokenizer, model.lm.config.vocab_size, "input")
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
        prompts = prompt_ids(body.prompt, model.tokenizer, model.lm.config.vocab_size)
        if len(prompts) != 1 and body.stream:
            raise ApiError(400, "stream takes one prompt", "prompt")
        if body.stream and (body.echo or body.logprobs is not None):
            raise ApiError(400, "echo and logprobs are not streamed: ask without stream", "stream")
        constraint = await grammar(model, body.response_format.model_dump(exclude_none=True)
                                   if body.response_format else None)
        ex = exchange(http, "/v1/completions", body, model)
        await ex.check_input([{"role": "user", "content": model.tokenizer.decode(ids)} for ids in prompts])
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
        submitted = []  # every prompt into the engine at once (batched), then collected in order
        try:
            for prompt in prompts:
                submitted.append(await submit(model, prompt, cfg, body.n, None, **scores))
        except ApiError:
            for request_id, _ in submitted:
                model.engine.abort(request_id)
            raise
        results = await asyncio.gather(*(_collect(model, request_id, queue, ex) for request_id, queue in submitted))
        for prompt, (done, request) in zip(prompts, results):
            usage["prompt_tokens"] += len(prompt)
            for sample, completion in zip(request.samples, done):
                usage["completion_tokens"] += len(completion.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(model.tokenizer, prompt if body.echo else [],
                                                   request.prompt_scores, sample.logprobs[:len(completion.token_ids)])
                choices.append({"index": len(choices), "text": completion.text or "", "logprobs": logprobs,
                                "finish_reason": FINISH[completion.finish_reason]})
        if parts.guardrails is not None:  # on the completions themselves, not an echoed prompt
            usage["completion_tokens"] += await _guard_completions(model, ex, choices, prompts, cfg, body, run)
        if body.echo:
            per_prompt = len(choices) // len(prompts)
            for i, choice in enumerate(choices):
                choice["text"] = model.tokenizer.decode(prompts[i // per_prompt]) + choice["text"]
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
        messages = [m.as_turn() for m in body.messages]
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        cfg = generation(body, model, max(1, model.context - len(prompt)))
        if body.stream and body.logprobs:
            raise ApiError(400, "logprobs are not streamed: ask without stream", "stream")
        constraint = await grammar(model, body.response_format.model_dump(exclude_none=True)
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


def _guard_grammar(parts: ServerParts, model: ServedModel) -> Any:
    """The grammar of the validator constrained decoding can enforce (json_schema, else regex), compiled once per
    model; None when there is none or llguidance cannot enforce it (a Python-only regex, an unsupported keyword):
    then a failing output goes to the guardrails' `then`."""
    from lmforge.infer.constrain import json_schema_grammar, regex_grammar

    if model.name not in parts.guard_grammars:
        found, built = parts.guardrails.constraint(), None
        if found is not None:
            kind, value = found
            try:
                built = (json_schema_grammar if kind == "json_schema" else regex_grammar)(
                    model.tokenizer, model.lm.config.vocab_size, value)
            except LmforgeError:
                built = None
        parts.guard_grammars[model.name] = built
    return parts.guard_grammars[model.name]


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
        constraint = _guard_grammar(ex.parts, model) if action == "constrain" else None
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
            constraint = _guard_grammar(ex.parts, model)
            if constraint is None or body.echo:
                return None
            done, _ = await run(model, ex, prompts[i // per_prompt], cfg, 1, None, constraint=constraint)
            return done[0].text or "", FINISH[done[0].finish_reason], len(done[0].token_ids)

        text, finish, tokens = await _guarded(ex, choice["text"], regenerate)
        choice["text"], extra = text, extra + tokens
        choice["finish_reason"] = finish or choice["finish_reason"]
    return extra


async def _collect(model: ServedModel, request_id: str, queue: Any, ex: Exchange) -> tuple[list[Any], Any]:
    """Wait for a request's Completions and its engine Request (log-probabilities). A client that goes away
    meanwhile (checked every DISCONNECT_POLL_S) has its request aborted; a sample whose grammar failed fails the
    request with a 400."""
    gone = getattr(ex.http.state, "client_gone", None) if ex.http is not None else None
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if gone is not None and gone.is_set():
                raise ApiError(499, "the client went away before the end")
            if item is None:
                continue
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                failed = [s.error for s in item[1].samples if s.error]
                if failed:
                    raise ApiError(400, f"the output's grammar could not be applied: {_one_line(failed[0])}",
                                   "response_format")
                return item
            ex.clock.tick(item.index, len(item.token_ids))
    except BaseException as exc:
        model.engine.abort(request_id)
        if isinstance(exc, ApiError):
            ex.done(exc.status, error=exc.message)
        raise


def _one_line(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."


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

    finished, failure = False, "the client went away before the end"
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
            if item.finish_reason == "error":
                raise LmforgeError("the output's grammar could not be applied; the request was stopped")
            ex.clock.tick(item.index, len(item.token_ids))
            generated += len(item.token_ids)
            texts[item.index] += item.text or ""
            if item.text or item.finished:
                yield chunk(item.index, item.text, FINISH[item.finish_reason] if item.finished else None)
    except Exception as exc:
        failure = _one_line(str(exc))
        raise
    finally:
        if not finished:  # the client went away (or the engine failed): free the sequences
            model.engine.abort(request_id)
            status = 499 if failure.startswith("the client went away") else 500
            ex.done(status, texts, prompt_tokens, generated, error=failure)


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
        except Exception as exc:  # the engine failed mid-stream: the client gets an error event, then [DONE]
            kind = "invalid_request_error" if isinstance(exc, LmforgeError) else "server_error"
            yield f"data: {json.dumps({'error': {'message': _one_line(str(exc)), 'type': kind}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent
events or not), /health. Every request goes through its model's engine (continuous batching).

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
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.serve.engine_thread import EngineThread

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class ServedModel:
    name: str
    engine: EngineThread
    tokenizer: Any
    context: int
    created: int
    lm: Any = None  # the model itself (embeddings run beside the engine)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False  # the prompt before the completion (with its log-probabilities when logprobs is set)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # top-k log-probabilities per token


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes (what openai asks)
    user: Optional[str] = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None
          ) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def build_app(models: dict[str, ServedModel], max_tokens_limit: int = 4096) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    app.state.models = models

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, "not_found_error" if exc.status == 404 else "invalid_request_error",
                     exc.param)

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

    def generation(body: _Sampling, default_max: int) -> GenerationConfig:
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit {max_tokens_limit}",
                           "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop: every stop string must be non-empty", "stop")
        return GenerationConfig(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=stop, seed=body.seed)

    async def run(model: ServedModel, prompt: list[int], cfg: GenerationConfig, n: int,
                  eos_id: Optional[list[int]], **scores: Optional[int]) -> tuple[str, Any]:
        try:
            return model.engine.submit(prompt, cfg, n=n, eos_id=eos_id, **scores)
        except (LmforgeError, TypeError) as exc:
            raise ApiError(400, str(exc), "prompt") from None

    def served_or_only(name: Optional[str]) -> ServedModel:
        if name is None and len(models) == 1:
            return next(iter(models.values()))
        return served(name or "")

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
        inputs = _prompt_list(body.input, model.tokenizer)
        if any(not ids or len(ids) > model.context for ids in inputs):
            raise ApiError(400, f"input: each needs 1 to {model.context} tokens (the model's context)", "input")
        vectors = await asyncio.get_running_loop().run_in_executor(None, _embed, model.lm, inputs)
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return {"object": "list", "model": model.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(map(len, inputs)), "total_tokens": sum(map(len, inputs))}}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        model = served(body.model)
        cfg = generation(body, 16)
        prompts = _prompt_list(body.prompt, model.tokenizer)
        if len(prompts) != 1 and body.stream:
            raise ApiError(400, "stream takes one prompt", "prompt")
        scores = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}
        if body.stream:
            if body.echo:
                raise ApiError(400, "echo is not streamed: ask without stream", "echo")
            request_id, queue = await run(model, prompts[0], cfg, body.n, None, **scores)
            return _sse(_stream_chunks(model, request_id, queue, "text_completion", body.n, prompts[0]))
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for prompt in prompts:
            request_id, queue = await run(model, prompt, cfg, body.n, None, **scores)
            done, request = await _collect(model, request_id, queue)
            usage["prompt_tokens"] += len(prompt)
            head = model.tokenizer.decode(prompt) if body.echo else ""
            for sample, completion in zip(request.samples, done):
                usage["completion_tokens"] += len(completion.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(model.tokenizer, prompt if body.echo else [],
                                                    request.prompt_scores, sample.logprobs[:len(completion.token_ids)])
                choices.append({"index": len(choices), "text": head + (completion.text or ""), "logprobs": logprobs,
                                "finish_reason": FINISH[completion.finish_reason]})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model.name, "choices": choices,
                "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        model = served(body.model)
        tokenizer = model.tokenizer
        if tokenizer.chat_template is None:
            raise ApiError(400, f"model {model.name!r} has no chat template: use /v1/completions", "model")
        prompt = tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in body.messages],
                                       add_generation_prompt=True)
        cfg = generation(body, max(1, model.context - len(prompt)))
        top = (body.top_logprobs or 0) if body.logprobs else None
        request_id, queue = await run(model, prompt, cfg, body.n, list(tokenizer.chat_stop_ids), logprobs=top)
        if body.stream:
            return _sse(_stream_chunks(model, request_id, queue, "chat.completion.chunk", body.n, prompt))
        done, request = await _collect(model, request_id, queue)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text or ""},
                    "logprobs": _chat_logprobs(tokenizer, sample.logprobs[:len(c.token_ids)]) if body.logprobs
                    else None, "finish_reason": FINISH[c.finish_reason]}
                   for i, (sample, c) in enumerate(zip(request.samples, done))]
        generated = sum(len(c.token_ids) for c in done)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                          "total_tokens": len(prompt) + generated}}

    return app


def _embed(lm: Any, inputs: list[list[int]]) -> list[list[float]]:
    import torch

    device = next(lm.parameters()).device
    with torch.inference_mode():
        vectors = [lm.hidden_states(torch.tensor([ids], device=device))[0].float().mean(dim=0) for ids in inputs]
        return [torch.nn.functional.normalize(v, dim=0).tolist() for v in vectors]


def _prompt_list(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """The prompts of a completions request as token ids: a string, a list of strings, token ids, or lists of ids."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


async def _collect(model: ServedModel, request_id: str, queue: Any) -> tuple[list[Any], Any]:
    """Wait for a request's Completions and its engine Request (log-probabilities); a client that goes away
    meanwhile has its request aborted."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                return item
    except BaseException:
        model.engine.abort(request_id)
        raise


def _completion_logprobs(tokenizer: Any, echoed: list[int], prompt_scores: list[Any],
                         scores: list[Any]) -> dict[str, Any]:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs and text_offset, the echoed
    prompt's first (whose first token has no log-probability: None) and then the generated tokens'."""
    tokens, values, tops = [], [], []
    for position, token in enumerate(echoed):
        score = prompt_scores[position - 1] if position else None
        tokens.append(token)
        values.append(score.logprob if score else None)
        tops.append({tokenizer.decode([t]): v for t, v in score.top.items()} if score else None)
    for score in scores:
        tokens.append(score.token)
        values.append(score.logprob)
        tops.append({tokenizer.decode([t]): v for t, v in score.top.items()})
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(tokenizer: Any, scores: list[Any]) -> dict[str, Any]:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top.items()]}
                        for s in scores]}


async def _stream_chunks(model: ServedModel, request_id: str, queue: Any, kind: str, n: int,
                         prompt: list[int]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed response: text deltas per choice, then each choice's finish_reason."""
    created, ident = int(time.time()), f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    chat = kind.startswith("chat")

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
                return
            if item.text or item.finished:
                yield chunk(item.index, item.text, FINISH[item.finish_reason] if item.finished else None)
    finally:
        if not finished:  # the client went away (or the engine failed): free the sequences
            model.engine.abort(request_id)


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for item in chunks:
                yield f"data: {json.dumps(item)}\n\n"
        except LmforgeError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

"""The server's front door: API keys, a per-key rate limit, a request size limit, CORS, and the /metrics route.

A request to any path but /health, /metrics and the chat page's files must carry `Authorization: Bearer KEY` with
an accepted key when keys are configured (401 otherwise). The rate limit is a token bucket per key (per client
address when the server has no keys: a made-up key must not buy a fresh bucket): `rate` requests a minute, bursts
up to the same number; an empty bucket is 429. A body over `max_bytes` is 413, whether its length is declared or
it comes in chunks. An error the handlers did not expect is a 500 in OpenAI's shape, never a traceback; every
error has OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lmforge.serve.protocol import error
from lmforge.serve.webchat import PAGE_PATHS

OPEN_PATHS = {"/health", "/metrics"} | PAGE_PATHS  # the chat page carries no secret: it asks for the key
MAX_BUCKETS = 10_000  # rate-limit buckets kept before the full ones are forgotten
logger = logging.getLogger("lmforge.serve")


def install(app: FastAPI, keys: set[str], rate_per_minute: float, max_bytes: int,
            cors_origins: list[str]) -> None:
    """Add the checks and the /metrics route to `app` (whose app.state.metrics counts every request)."""
    metrics = app.state.metrics
    buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def allowed(client: str) -> bool:
        now = time.monotonic()
        if len(buckets) > MAX_BUCKETS:  # forget the clients whose bucket has refilled: they start full anyway
            for known, (tokens, last) in list(buckets.items()):
                if tokens + (now - last) * rate_per_minute / 60.0 >= rate_per_minute:
                    del buckets[known]
        tokens, last = buckets.get(client, (rate_per_minute, now))
        tokens = min(rate_per_minute, tokens + (now - last) * rate_per_minute / 60.0)
        if tokens < 1.0:
            buckets[client] = (tokens, now)
            return False
        buckets[client] = (tokens - 1.0, now)
        return True

    @app.middleware("http")
    async def front_door(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await _checked(request, call_next)
        except Exception as exc:  # a bug: the client gets OpenAI's shape and /metrics counts it
            response = error(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                             "server_error")
            logger.exception("%s %s failed", request.method, request.url.path)
        body = getattr(response, "body_iterator", None)
        if body is None:
            metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
            return response

        async def observed() -> AsyncIterator[Any]:  # a streamed response is timed to its last byte
            try:
                async for part in body:
                    yield part
            finally:
                metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)

        response.body_iterator = observed()
        return response

    async def _checked(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        key = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if keys and key not in keys:
            return error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        client = key if keys else (request.client.host if request.client else "unknown")
        if rate_per_minute and not allowed(client):
            return error(429, f"rate limit of {rate_per_minute:g} requests a minute reached; retry later",
                          "rate_limit_exceeded")
        return await call_next(request)

    app.add_middleware(BodyGate, max_bytes=max_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    @app.get("/metrics")
    async def prometheus() -> Response:
        parts = app.state.parts
        caches = tuple(c for c in (parts.cache, *parts.semantic.values()) if c is not None)
        return Response(metrics.render(app.state.models, caches), media_type="text/plain; version=0.0.4")


class BodyGate:
    """ASGI middleware that reads each request's body before the app runs, and then watches for the client to
    leave. A body over max_bytes is refused with 413, by its declared length or once the chunks read add up to
    more. After the body, the only message left is http.disconnect: a task waits for it and sets the request's
    `state.client_gone` event, which a handler waiting for a whole (not streamed) response checks, so that a
    client that gave up frees its sequences (starlette's own check does not see through the http middleware)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        gone = asyncio.Event()
        scope.setdefault("state", {})["client_gone"] = gone
        if messages[-1]["type"] == "http.disconnect":
            gone.set()

        async def watch() -> None:
            while not gone.is_set():
                if (await receive())["type"] == "http.disconnect":
                    gone.set()

        async def replay() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any, size: int) -> None:
        response = error(413, f"the request body is at least {size} bytes; this server takes at most "
                              f"{self.max_bytes}", "invalid_request_error")
        await response(scope, receive, send)

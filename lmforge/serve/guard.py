"""The server's front door: API keys, a per-key rate limit, a request size limit, CORS, and the /metrics route.

A request to any path but /health, /metrics and the chat page's files must carry `Authorization: Bearer KEY` with an accepted key when
keys are configured (401 otherwise). The rate limit is a token bucket per key (or per client address): `rate`
requests a minute, bursts up to the same number; an empty bucket is 429. A body over `max_bytes` is 413. Errors
have OpenAI's JSON shape.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lmforge.serve.protocol import error
from lmforge.serve.webchat import PAGE_PATHS

OPEN_PATHS = {"/health", "/metrics"} | PAGE_PATHS  # the chat page carries no secret: it asks for the key


def install(app: FastAPI, keys: set[str], rate_per_minute: float, max_bytes: int,
            cors_origins: list[str]) -> None:
    """Add the checks and the /metrics route to `app` (whose app.state.metrics counts every request)."""
    metrics = app.state.metrics
    buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def allowed(client: str) -> bool:
        now = time.monotonic()
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
        response = await _checked(request, call_next)
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
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_bytes:
            return error(413, f"the request body is {size} bytes; this server takes at most {max_bytes}",
                          "invalid_request_error")
        client = key or (request.client.host if request.client else "unknown")
        if rate_per_minute and not allowed(client):
            return error(429, f"rate limit of {rate_per_minute:g} requests a minute reached; retry later",
                          "rate_limit_exceeded")
        return await call_next(request)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(app.state.models), media_type="text/plain; version=0.0.4")

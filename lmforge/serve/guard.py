"""The server's front door: API keys, a per-key rate limit, a request size limit, CORS, and the /metrics counters.

A request to any path but /health and /metrics must carry `Authorization: Bearer KEY` with an accepted key when
keys are configured (401 otherwise). The rate limit is a token bucket per key (or per client address): `rate`
requests a minute, bursts up to the same number; an empty bucket is 429. A body over `max_bytes` is 413. Errors
have OpenAI's JSON shape.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lmforge.serve.openai_api import error

OPEN_PATHS = {"/health", "/metrics"}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters and histograms in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = {"count": 0, "sum": 0.0, "buckets": [0] * len(LATENCY_BUCKETS)}

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency["count"] += 1
        self.latency["sum"] += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency["buckets"][i] += 1

    def render(self, models: dict[str, Any]) -> str:
        lines = ["# HELP lmforge_requests_total HTTP requests by path and status.",
                 "# TYPE lmforge_requests_total counter"]
        lines += [f'lmforge_requests_total{{path="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.requests.items())]
        lines += ["# HELP lmforge_request_seconds Time from a request's arrival to its response's last byte.",
                  "# TYPE lmforge_request_seconds histogram"]
        lines += [f'lmforge_request_seconds_bucket{{le="{bound}"}} {count}'
                  for bound, count in zip(LATENCY_BUCKETS, self.latency["buckets"])]
        lines += [f'lmforge_request_seconds_bucket{{le="+Inf"}} {self.latency["count"]}',
                  f"lmforge_request_seconds_sum {self.latency['sum']:.6f}",
                  f"lmforge_request_seconds_count {self.latency['count']}"]
        gauges = {  # name: (type, help, the engine stats' key, or "kv_usage" derived from two of them)
            "lmforge_prompt_tokens_total": ("counter", "Prompt tokens fed to the model.", "tokens_fed"),
            "lmforge_generation_tokens_total": ("counter", "Tokens generated.", "generated"),
            "lmforge_engine_steps_total": ("counter", "Engine steps run.", "steps"),
            "lmforge_preemptions_total": ("counter", "Sequences preempted for want of KV blocks.", "preemptions"),
            "lmforge_kv_cache_usage": ("gauge", "Fraction of the KV cache's blocks in use.", "kv_usage"),
            "lmforge_prefix_cache_hit_rate": ("gauge", "Prefix-cache hits over blocks looked up.",
                                              "prefix_cache_hit_rate"),
            "lmforge_queue_depth": ("gauge", "Sequences waiting to be admitted.", "waiting"),
            "lmforge_running_sequences": ("gauge", "Sequences in the running batch.", "running")}
        stats_of = {}
        for model_name, model in models.items():
            stats = model.engine.stats()
            stats_of[model_name] = {**stats, "kv_usage": stats["kv_blocks_used"] / stats["kv_blocks"]}
        for name, (kind, text, key) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{model="{model_name}"}} {stats[key]}' for model_name, stats in stats_of.items()]
        return "\n".join(lines) + "\n"


def install(app: FastAPI, keys: set[str], rate_per_minute: float, max_bytes: int,
            cors_origins: list[str]) -> Metrics:
    """Add the checks and the /metrics route to `app`; returns its Metrics."""
    metrics = Metrics()
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
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
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

    return metrics

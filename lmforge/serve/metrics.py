"""The server's counters and histograms, rendered in Prometheus' text format at /metrics.

Requests by path and status; histograms of the whole request's latency, the time to the first token and the time
between tokens; response-cache hits and misses; guardrail flags and blocks; and, read from each model's engine at
render time, tokens fed and generated, steps, preemptions, the KV cache's use, the prefix cache's hit rate and the
queue depth. Everything is updated from the event loop's thread only (the middleware and the handlers).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Optional

REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, name: str, text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.text, self.bounds = name, text, buckets
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * len(buckets))
        self.sums: dict[str, float] = defaultdict(float)
        self.totals: dict[str, int] = defaultdict(int)

    def observe(self, seconds: float, model: str = "") -> None:
        counts = self.counts[model]
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                counts[i] += 1
        self.sums[model] += seconds
        self.totals[model] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.text}", f"# TYPE {self.name} histogram"]
        for model, counts in sorted(self.counts.items()):
            label = f'model="{model}",' if model else ""
            lines += [f'{self.name}_bucket{{{label}le="{bound}"}} {count}' for bound, count in zip(self.bounds, counts)]
            lines += [f'{self.name}_bucket{{{label}le="+Inf"}} {self.totals[model]}']
            tail = f"{{{label[:-1]}}}" if label else ""
            lines += [f"{self.name}_sum{tail} {self.sums[model]:.6f}", f"{self.name}_count{tail} {self.totals[model]}"]
        return lines


ENGINE_SERIES = {  # name: (type, help, the engine stats' key, or "kv_usage" derived from two of them)
    "lmforge_prompt_tokens_total": ("counter", "Prompt tokens fed to the model.", "tokens_fed"),
    "lmforge_generation_tokens_total": ("counter", "Tokens generated.", "generated"),
    "lmforge_engine_steps_total": ("counter", "Engine steps run.", "steps"),
    "lmforge_preemptions_total": ("counter", "Sequences preempted for want of KV blocks.", "preemptions"),
    "lmforge_kv_cache_usage": ("gauge", "Fraction of the KV cache's blocks in use.", "kv_usage"),
    "lmforge_prefix_cache_hit_rate": ("gauge", "Prefix-cache hits over blocks looked up.", "prefix_cache_hit_rate"),
    "lmforge_queue_depth": ("gauge", "Sequences waiting to be admitted.", "waiting"),
    "lmforge_running_sequences": ("gauge", "Sequences in the running batch.", "running")}


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency = Histogram("lmforge_request_seconds", "Time from a request's arrival to its response's last "
                                 "byte.", REQUEST_BUCKETS)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from a generation request's arrival to "
                              "its first generated token.", REQUEST_BUCKETS)
        self.itl = Histogram("lmforge_inter_token_seconds", "Time between two tokens of one sample.", TOKEN_BUCKETS)
        self.cache: dict[tuple[str, str], int] = defaultdict(int)  # (model, hit | semantic | miss) -> requests
        self.guard: dict[str, int] = defaultdict(int)  # flagged | blocked | reasks | invalid -> requests

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency.observe(seconds)

    def render(self, models: dict[str, Any], caches: tuple[Any, ...] = ()) -> str:
        """The text of /metrics; `caches`: the response caches, whose hits, misses, errors and entries are added."""
        lines = ["# HELP lmforge_requests_total HTTP requests by path and status.",
                 "# TYPE lmforge_requests_total counter"]
        lines += [f'lmforge_requests_total{{path="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.requests.items())]
        for histogram in (self.latency, self.ttft, self.itl):
            lines += histogram.render()
        lines += ["# HELP lmforge_response_cache_total Cacheable requests by model and outcome (hit, semantic, miss).",
                  "# TYPE lmforge_response_cache_total counter"]
        lines += [f'lmforge_response_cache_total{{model="{model}",outcome="{outcome}"}} {count}'
                  for (model, outcome), count in sorted(self.cache.items())]
        lines += ["# HELP lmforge_response_cache_hit_rate Cache hits (exact and semantic) over cacheable requests.",
                  "# TYPE lmforge_response_cache_hit_rate gauge"]
        for model in sorted({m for m, _ in self.cache}):
            looked = sum(count for (m, _), count in self.cache.items() if m == model)
            hits = looked - self.cache.get((model, "miss"), 0)
            lines.append(f'lmforge_response_cache_hit_rate{{model="{model}"}} {hits / looked if looked else 0.0}')
        lines += ["# HELP lmforge_guardrail_events_total Requests flagged, blocked, re-asked or left invalid by the "
                  "guardrails.", "# TYPE lmforge_guardrail_events_total counter"]
        lines += [f'lmforge_guardrail_events_total{{event="{event}"}} {count}'
                  for event, count in sorted(self.guard.items())]
        if caches:
            from lmforge.serve.cache import metric_lines

            lines += metric_lines(list(caches))
        stats_of = {}
        for model_name, model in models.items():
            stats = model.engine.stats()
            stats_of[model_name] = {**stats, "kv_usage": stats["kv_blocks_used"] / stats["kv_blocks"]}
        for name, (kind, text, key) in ENGINE_SERIES.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{model="{model_name}"}} {stats[key]}' for model_name, stats in stats_of.items()]
        return "\n".join(lines) + "\n"


class TokenClock:
    """Times one request's tokens as its outputs arrive: the first token of any sample gives the time to first
    token; each later token of a sample, the gap since that sample's previous one."""

    def __init__(self, metrics: Metrics, model: str, started: float) -> None:
        self.metrics, self.model, self.started = metrics, model, started
        self.first: Optional[float] = None  # seconds to the first token
        self.last: dict[int, float] = {}

    def tick(self, index: int, tokens: int) -> None:
        if not tokens:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.started
            self.metrics.ttft.observe(self.first, self.model)
        elif index in self.last:
            self.metrics.itl.observe((now - self.last[index]) / tokens, self.model)
        self.last[index] = now

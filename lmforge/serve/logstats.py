"""`lmforge logs stats LOG [LOG ...]`: a summary of the server's request logs (JSONL or SQLite, with their rotated
siblings LOG.N ... LOG.1 read first): requests by route, model and status, errors, cache hit rate, tokens,
latency and time-to-first-token percentiles, guard counts and requests a minute.

This module does not import torch (nor the server), so the command answers at once.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.request_log import read_log, rotated_paths

NUMERIC_FIELDS = ("status", "prompt_tokens", "completion_tokens", "latency_s", "ttft_s")


def parse_time(text: str, where: str) -> datetime.datetime:
    """An ISO-8601 time as an aware UTC datetime (a time without an offset is taken as UTC); `where` names the
    input in the error."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise LmforgeError(f"{where}: {text!r} is not an ISO-8601 time (e.g. 2025-01-31T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc)


@dataclass
class LogsStatsConfig:
    """Summarize request logs written by `lmforge serve`."""

    log: list[str] = field(default_factory=list)  # request logs (.jsonl, .sqlite, .db); FILE.1, FILE.2 ... read too
    since: str = ""  # only requests at or after this ISO-8601 time (UTC unless an offset is given)
    until: str = ""  # only requests before this ISO-8601 time
    model: str = ""  # only requests to this model
    json: bool = False  # print a JSON object instead of a table

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            if getattr(self, name):
                try:
                    parse_time(getattr(self, name), f"logs stats {name}")
                except LmforgeError as exc:
                    raise ConfigError(str(exc)) from None


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) by linear interpolation between closest ranks (numpy's default): with the values
    sorted as v_0 <= ... <= v_{n-1}, position p = q (n - 1) gives v_floor(p) + (p - floor(p)) (v_ceil(p) -
    v_floor(p)). None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The summary of request records (every key optional): counts by route/model/status, `errors` (an `error`
    text or a status >= 400), cache counts and hit rate (hit + semantic over hit + semantic + miss), token totals
    and means (over records that have the count), latency p50/p90/p99 and TTFT p50/p99 in seconds, guard counts,
    and requests a minute: requests over the minutes between the first and the last (None when that is 0)."""
    records = list(records)
    times = [r["_when"] for r in records if r.get("_when") is not None]
    first, last = (min(times), max(times)) if times else (None, None)
    span_minutes = (last - first).total_seconds() / 60.0 if times else 0.0
    cache = Counter(str(r["cache"]) for r in records if r.get("cache") is not None)
    looked_up = cache["hit"] + cache["semantic"] + cache["miss"]
    guards = [r["guard"] for r in records if isinstance(r.get("guard"), dict)]

    def tokens(key: str) -> dict[str, Any]:
        counts = [r[key] for r in records if _number(r.get(key))]
        return {"total": sum(counts), "mean": sum(counts) / len(counts) if counts else None}

    def by(key: str) -> dict[str, int]:
        return dict(Counter(str(r.get(key)) for r in records).most_common())

    latency = [float(r["latency_s"]) for r in records if _number(r.get("latency_s"))]
    ttft = [float(r["ttft_s"]) for r in records if _number(r.get("ttft_s"))]
    return {
        "requests": len(records),
        "first": first.isoformat() if first else None,
        "last": last.isoformat() if last else None,
        "requests_per_minute": len(records) / span_minutes if span_minutes > 0 else None,
        "by_route": by("route"),
        "by_model": by("model"),
        "by_status": by("status"),
        "errors": sum(1 for r in records if r.get("error") or (_number(r.get("status")) and r["status"] >= 400)),
        "cache": {**{kind: cache[kind] for kind in ("hit", "semantic", "miss", "off")},
                  "hit_rate": (cache["hit"] + cache["semantic"]) / looked_up if looked_up else None},
        "prompt_tokens": tokens("prompt_tokens"),
        "completion_tokens": tokens("completion_tokens"),
        "latency_s": {f"p{q}": percentile(latency, q / 100) for q in (50, 90, 99)},
        "ttft_s": {f"p{q}": percentile(ttft, q / 100) for q in (50, 99)},
        "guard": {"checked": len(guards), "flagged": sum(1 for g in guards if g.get("flagged")),
                  "blocked": sum(1 for g in guards if g.get("blocked")),
                  "reasks": sum(g["reasks"] for g in guards if _number(g.get("reasks")))},
    }


def log_files(logs: list[str]) -> list[Path]:
    """Every file to read, each log's rotated siblings (oldest first) before it, each file once."""
    files, seen = [], set()
    for log in logs:
        path = Path(log)
        if not path.is_file():
            raise LmforgeError(f"log {path}: not found")
        for file in [*rotated_paths(path), path]:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    return files


def load_records(cfg: LogsStatsConfig) -> tuple[list[Path], list[dict[str, Any]]]:
    """The files read and the records that pass cfg's filters, each with `_when` (its time as a datetime, or None).
    A field of the wrong type (a time that is not ISO-8601, a count that is not a number) is a LmforgeError naming
    the file and line."""
    if not cfg.log:
        raise ConfigError("logs stats needs a log file: lmforge logs stats FILE [FILE ...]")
    since = parse_time(cfg.since, "logs stats since") if cfg.since else None
    until = parse_time(cfg.until, "logs stats until") if cfg.until else None
    files, records = log_files(cfg.log), []
    for file in files:
        for number, record in read_log(file):
            where = f"log {file}:{number}"
            for key in NUMERIC_FIELDS:
                if record.get(key) is not None and not _number(record[key]):
                    raise LmforgeError(f"{where}: {key} {record[key]!r} is not a number")
            when = parse_time(record["time"], f"{where}: time") if record.get("time") is not None else None
            if (since or until) and when is None:
                continue  # a record without a time cannot be placed in the window
            if (since and when < since) or (until and when >= until) or (cfg.model and record.get("model") !=
                                                                             cfg.model):
                continue
            records.append({**record, "_when": when})
    return files, records


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def format_table(stats: dict[str, Any]) -> str:
    """The summary as aligned lines of text."""
    n = stats["requests"]
    rate = stats["requests_per_minute"]
    period = f"{stats['first']} .. {stats['last']}" if stats["first"] else "no times"
    cache = stats["cache"]
    hit_rate = "-" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
    guard = stats["guard"]

    def tokens(key: str) -> str:
        mean = stats[key]["mean"]
        return f"total {stats[key]['total']}, mean {'-' if mean is None else f'{mean:.1f}'}"

    rows = [
        ("files", ", ".join(stats["files"])),
        ("requests", f"{n}  ({period}; {'-' if rate is None else f'{rate:.2f}'} a minute)"),
        ("by route", _counts(stats["by_route"])),
        ("by model", _counts(stats["by_model"])),
        ("by status", _counts(stats["by_status"])),
        ("errors", f"{stats['errors']}" + (f" ({100 * stats['errors'] / n:.1f}%)" if n else "")),
        ("cache", f"hit {cache['hit']}, semantic {cache['semantic']}, miss {cache['miss']}, off {cache['off']}; "
                  f"hit rate {hit_rate}"),
        ("prompt tokens", tokens("prompt_tokens")),
        ("completion tokens", tokens("completion_tokens")),
        ("latency s", "  ".join(f"{k} {_seconds(v)}" for k, v in stats["latency_s"].items())),
        ("ttft s", "  ".join(f"{k} {_seconds(v)}" for k, v in stats["ttft_s"].items())),
        ("guard", f"checked {guard['checked']}, flagged {guard['flagged']}, blocked {guard['blocked']}, "
                  f"re-asks {guard['reasks']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def logs_stats(cfg: LogsStatsConfig) -> dict[str, Any]:
    """Read cfg's logs (and their rotated siblings), print the summary (a table, or JSON with --json) and return
    it. A missing file or a malformed line is a LmforgeError naming the file and line."""
    files, records = load_records(cfg)
    stats = {"files": [str(f) for f in files], **summarize(records)}
    print(json.dumps(stats, indent=2) if cfg.json else format_table(stats))
    return stats

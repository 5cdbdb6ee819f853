"""The server's response cache: exact matches of deterministic requests, in SQLite or Redis.

A request is cached only when its output is a function of its body: temperature 0 (greedy), or a fixed seed
(`cacheable`). Its key is the sha256 of the served weights' fingerprint, the route and the body with the fields
that do not change the output removed and the defaults normalised (`request_key`), so two servers of the same
files share entries and a retrained model never reads an older model's answers.

    cache = open_cache("sqlite", default_dir)          # or "sqlite:PATH", "x.db", "redis://HOST:PORT/0", "off"
    key = request_key(model_fingerprint(model_dir), "/v1/chat/completions", body)
    response = cache.get(key) if cacheable(body) else None   # then cache.put(key, response) after generating

A failing backend (a full disk, Redis gone away) reads as a miss and counts in `errors`: the cache never turns a
request that would succeed into an error. `semantic_cache.SemanticCache` answers a prompt with the response to an
earlier prompt whose embedding is within a cosine threshold; read its caveat before turning it on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from lmforge.errors import ConfigError, LmforgeError

CACHE_HEADER = "x-lmforge-cache"  # the response header: "hit", "semantic <similarity>" or "miss"
KEY_VERSION = "lmforge-cache-v1"  # part of every key: a change to the key's recipe starts an empty cache
LARGE_FILE = 1 << 30  # weight files above this are fingerprinted by size, head and tail
EDGE_BYTES = 16 << 20
MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".txt", ".tiktoken", ".jinja"}
# fields that leave the output as it is: the framing (a replay can stream), the end user, the name the weights are
# served under (the fingerprint names the weights)
OUTPUT_FREE_FIELDS = {"stream", "stream_options", "user", "model"}
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "n": 1, "echo": False, "logprobs": False}


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A sha256 hex id of what a model dir serves: the name, size and bytes of each top-level config, tokenizer and
    weight file (MODEL_SUFFIXES), streamed. A file over 1 GiB counts by its size and its first and last 16 MiB
    (a change confined to its middle goes unseen: the price of not reading 100 GB at every start). An lmforge adapter
    dir adds its base model dir's fingerprint. Equal files -> equal fingerprints, wherever the dirs are."""
    root = Path(model_dir)
    if not root.is_dir():
        raise LmforgeError(f"model dir {root}: not found (the response cache fingerprints its files)")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix in MODEL_SUFFIXES)
    if not files:
        raise LmforgeError(f"model dir {root}: no config, tokenizer or weight files to fingerprint")
    digest = hashlib.sha256(KEY_VERSION.encode())
    for path in files:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= LARGE_FILE:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            else:
                digest.update(f.read(EDGE_BYTES))
                f.seek(size - EDGE_BYTES)
                digest.update(f.read(EDGE_BYTES))
    base = _adapter_base(root)
    if base is not None:
        digest.update(f"\0base\0{model_fingerprint(base)}".encode())
    return digest.hexdigest()


def _adapter_base(root: Path) -> Optional[Path]:
    """The base model dir an lmforge adapter dir records, when there is one (the served model is base + adapter)."""
    from lmforge.peft.files import ADAPTER_CONFIG  # a higher layer's file name; peft imports nothing of serve

    try:
        base = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(base) if isinstance(base, str) and base and Path(base).is_dir() else None


def cacheable(body: dict[str, Any]) -> bool:
    """Whether a request's output is fixed by its body: temperature 0, or a seed given; never a stream (the
    server may still answer a stream from the cache with `stream_chunks`)."""
    if body.get("stream"):
        return False
    temperature = body.get("temperature", DEFAULTS["temperature"])
    return temperature == 0 or body.get("seed") is not None


def request_key(fingerprint: str, route: str, body: dict[str, Any]) -> str:
    """sha256 hex of a canonical JSON of (KEY_VERSION, fingerprint, route, normalised body); see `_normalised`."""
    canonical = json.dumps([KEY_VERSION, fingerprint, route, _normalised(body)], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _normalised(body: dict[str, Any]) -> dict[str, Any]:
    """The body as the engine sees it: output-free fields and None dropped, defaults dropped, max_completion_tokens
    read as max_tokens (the server takes the first given), a lone stop string as a list, a one-prompt list as
    its prompt, None message fields dropped, and greedy requests without top_p and seed (argmax ignores them)."""
    out = {k: v for k, v in body.items() if k not in OUTPUT_FREE_FIELDS and v is not None}
    max_tokens = out.pop("max_completion_tokens", None) or out.pop("max_tokens", None)
    out.pop("max_tokens", None)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p"):  # 0 and 0.0 are one temperature
        if isinstance(out.get(name), (int, float)):
            out[name] = float(out[name])
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if not out.get("stop"):
        out.pop("stop", None)
    prompt = out.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        out["prompt"] = prompt[0]
    if isinstance(out.get("messages"), list):
        out["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                           for m in out["messages"]]
    if "messages" in out:  # chat: top_logprobs counts only with logprobs on, and None there means 0
        if out.get("logprobs") is True:
            out["top_logprobs"] = out.get("top_logprobs") or 0
        else:
            out.pop("top_logprobs", None)
    # a default given is a default left out; by type too, since logprobs=0 (completions) is not logprobs=False
    out = {k: v for k, v in out.items() if not (k in DEFAULTS and type(v) is type(DEFAULTS[k]) and v == DEFAULTS[k])}
    if out.get("temperature", DEFAULTS["temperature"]) == 0:
        out.pop("top_p", None)
        out.pop("seed", None)
    return out


def replayed(response: dict[str, Any], model: str) -> dict[str, Any]:
    """A cached response made fresh for a new request: a new id (same prefix), created now, the asking model's
    name (two names may serve the same files)."""
    prefix = str(response.get("id", "cmpl-")).split("-", 1)[0]
    return {**response, "id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def stream_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A (replayed) chat or text completion as the chunks the server streams: for chat, each choice's role
    chunk and then its whole text with its finish_reason; for text, each choice's text with its finish_reason."""
    chat = response.get("object") == "chat.completion"
    head = {"id": response["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": response["created"], "model": response["model"]}
    chunks = []
    if chat:
        chunks += [{**head, "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]} for c in response["choices"]]
    for c in response["choices"]:
        if chat:
            choice = {"index": c["index"], "delta": {"content": c["message"]["content"]}, "logprobs": None,
                      "finish_reason": c["finish_reason"]}
        else:
            choice = {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
        chunks.append({**head, "choices": [choice]})
    return chunks


class ResponseCache:
    """key -> response dict. `hits`, `misses` and `errors` count this process's lookups and failed writes;
    `entries` is the store's size now. Backends implement `_get`, `_put`, `_count` and `close`, and name the
    exceptions of their store in `backend_errors` (those read as a miss, never as a failed request)."""

    kind = "exact"
    backend_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self) -> None:
        self.hits = self.misses = self.errors = 0
        self._counter_lock = threading.Lock()

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The cached response for `key` (a new dict: the caller may change it), or None."""
        try:
            text = self._get(key)
            response = None if text is None else json.loads(text)
        except (*self.backend_errors, ValueError):
            response = None
            self._add(errors=1)
        self._add(hits=int(response is not None), misses=int(response is None))
        return response

    def put(self, key: str, response: dict[str, Any]) -> None:
        """Store `response` (JSON-serialisable) under `key`, replacing any earlier one."""
        try:
            self._put(key, json.dumps(response, separators=(",", ":"), ensure_ascii=False))
        except self.backend_errors:
            self._add(errors=1)

    @property
    def entries(self) -> int:
        try:
            return self._count()
        except self.backend_errors:
            return 0

    def _add(self, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._counter_lock:
            self.hits, self.misses, self.errors = self.hits + hits, self.misses + misses, self.errors + errors

    def _get(self, key: str) -> Optional[str]:
        raise NotImplementedError

    def _put(self, key: str, text: str) -> None:
        raise NotImplementedError

    def _count(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SqliteCache(ResponseCache):
    """Entries in one SQLite file (WAL; each put one transaction, so a crash loses at most the put in flight and a
    restart finds the rest). Above `max_entries` the least recently used entries go. One connection behind a lock:
    safe from asyncio handlers and threads; several processes may share the file (SQLite's own locking)."""

    backend_errors = (sqlite3.Error, OSError)

    def __init__(self, path: str | os.PathLike, max_entries: int = 100_000) -> None:
        super().__init__()
        if max_entries < 1:
            raise ConfigError(f"cache max_entries={max_entries}: expected >= 1")
        self.path, self.max_entries = Path(path), max_entries
        self._lock = threading.Lock()
        self._clock = 0  # last `used` stamp: strictly increasing within this process, so LRU order has no ties
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=5, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a crash of the process
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, "
                             "used INTEGER NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_used ON responses (used)")
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cache sqlite:{self.path}: cannot open it as a SQLite file ({exc})") from None

    def _stamp(self) -> int:
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    def _get(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._db.execute("UPDATE responses SET used = ? WHERE key = ?", (self._stamp(), key))
        return None if row is None else row[0]

    def _put(self, key: str, text: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO responses (key, response, used) VALUES (?, ?, ?)",
                                 (key, text, self._stamp()))
                extra = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] - self.max_entries
                if extra > 0:
                    self._db.execute("DELETE FROM responses WHERE key IN (SELECT key FROM responses ORDER BY used "
                                     "LIMIT ?)", (extra,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisCache(ResponseCache):
    """Entries in Redis under `lmforge:cache:KEY`, each expiring `ttl_s` seconds after its last read or write
    (0: never). Redis itself bounds memory (its maxmemory-policy, allkeys-lru for an LRU cache)."""

    PREFIX = "lmforge:cache:"

    def __init__(self, url: str, ttl_s: float = 7 * 86400) -> None:
        super().__init__()
        import redis

        if ttl_s < 0:
            raise ConfigError(f"cache ttl_s={ttl_s}: expected >= 0 (0: entries never expire)")
        self.url, self.ttl_ms = url, int(ttl_s * 1000) or None
        self.backend_errors = (redis.RedisError, OSError)
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
            self._redis.ping()
        except (redis.RedisError, ValueError, OSError) as exc:
            raise ConfigError(f"cache {_shown(url)!r}: cannot reach Redis ({str(exc).splitlines()[0]})") from None

    def _get(self, key: str) -> Optional[str]:
        name = self.PREFIX + key
        value = self._redis.getex(name, px=self.ttl_ms) if self.ttl_ms else self._redis.get(name)
        return None if value is None else value.decode("utf-8")

    def _put(self, key: str, text: str) -> None:
        self._redis.set(self.PREFIX + key, text.encode("utf-8"), px=self.ttl_ms)

    def _count(self) -> int:
        return sum(1 for _ in self._redis.scan_iter(match=self.PREFIX + "*", count=1000))

    def close(self) -> None:
        self._redis.close()


def open_cache(spec: str, default_dir: str | os.PathLike, max_entries: int = 100_000,
               ttl_s: float = 7 * 86400) -> Optional[ResponseCache]:
    """The cache a `--cache SPEC` names: "" or "off" -> None; "sqlite" -> DEFAULT_DIR/responses.sqlite;
    "sqlite:PATH" or a PATH ending .sqlite or .db -> that file; "redis://HOST:PORT[/DB]" (or rediss://) -> Redis.
    Anything else, or a Redis that does not answer, is a ConfigError naming the spec."""
    spec = spec.strip()
    if spec in ("", "off"):
        return None
    if spec == "sqlite":
        return SqliteCache(Path(default_dir) / "responses.sqlite", max_entries)
    if spec.startswith("sqlite:") and spec[len("sqlite:"):]:
        return SqliteCache(spec[len("sqlite:"):], max_entries)
    if spec.endswith((".sqlite", ".db")) and "://" not in spec:
        return SqliteCache(spec, max_entries)
    if spec.startswith(("redis://", "rediss://")):
        parts = urlsplit(spec)
        try:
            port_ok = parts.port is not None
        except ValueError:
            port_ok = False
        db = parts.path.strip("/")
        if not parts.hostname or not port_ok or (db and not db.isdigit()) or parts.query or parts.fragment:
            raise ConfigError(f"cache {_shown(spec)!r}: expected redis://HOST:PORT or redis://HOST:PORT/DB (DB a "
                              "number)")
        return RedisCache(spec, ttl_s)
    raise ConfigError(f"cache {spec!r}: expected off, sqlite, sqlite:PATH, a PATH ending .sqlite or .db, or "
                      "redis://HOST:PORT[/DB]")


def _shown(url: str) -> str:
    """`url` fit for a message: a password in it (redis://:PASSWORD@HOST) becomes ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@", 1)).geturl()


def metric_lines(caches: list[Any]) -> list[str]:
    """Prometheus lines for /metrics: hits, misses, errors and entries of each cache (ResponseCache or
    SemanticCache), labelled by its kind (exact or semantic)."""
    lines = []
    for name, kind, text, field in (
            ("lmforge_cache_hits_total", "counter", "Responses served from a cache.", "hits"),
            ("lmforge_cache_misses_total", "counter", "Cache lookups that found nothing.", "misses"),
            ("lmforge_cache_errors_total", "counter", "Cache reads or writes that failed (served as misses).",
             "errors"),
            ("lmforge_cache_entries", "gauge", "Entries held by a cache.", "entries")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{kind="{cache.kind}"}} {getattr(cache, field)}' for cache in caches]
    return lines

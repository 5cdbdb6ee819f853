"""The semantic cache: a request answered with the response to an earlier prompt whose embedding is within a cosine
threshold of its own (same model, same parameters, only the prompt's text differs).

Caveat: a hit answers a different question — "what is the capital of France" and "what is the capital of
Germany" may embed within 0.95 of each other. The threshold is high by default for that reason, and a hit is marked
in the response header and the request log.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.cache import request_key

def semantic_parts(fingerprint: str, route: str, body: dict[str, Any]) -> Optional[tuple[str, str]]:
    """(scope, text) of a request for `SemanticCache`: the text is a completion's one string prompt or a chat's
    last message when the user sent it; the scope keys everything else (the weights, the route, every parameter,
    the earlier messages), so only requests that differ in that text alone can match. None for a request it does
    not fit: token-id or several prompts, a chat ending with another role, echo (the answer would show another
    prompt). Meant, like the exact cache, for the requests `cacheable` accepts."""
    if body.get("echo"):
        return None
    messages, prompt = body.get("messages"), body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") != "user" or not isinstance(last.get("content"), str):
            return None
        text, rest = last["content"], {**body, "messages": [*messages[:-1], {**last, "content": ""}]}
    elif isinstance(prompt, str) and "messages" not in body:
        text, rest = prompt, {k: v for k, v in body.items() if k != "prompt"}
    else:
        return None
    return request_key(fingerprint, route + "#semantic", rest), text


class SemanticCache:
    """The response to the most similar earlier prompt of the same scope (`semantic_parts`), when the cosine
    similarity of the two prompts' embeddings is at least `threshold`.

    A semantic hit answers a *different* question: "what is 12 * 13?" and "what is 12 * 14?", or a question and
    its negation, can embed above 0.9. Hence a high default threshold (0.95), scopes that must agree on every other
    parameter, and the cache off unless asked for.

    `embed(texts) -> (N, D)` array (rows are normalised again here). Entries live in memory, one (N, D) float32
    matrix scanned linearly; above `max_entries` the least recently used go. `path`: a SQLite file keeping them
    across restarts, read back only for rows written under the same `embedder` id (vectors of another embedding
    model mean nothing). Thread-safe; `embed` runs outside the lock."""

    kind = "semantic"
    FIELDS = ("scopes", "texts", "responses", "used", "rows")  # per entry, in step with the rows of `vectors`

    def __init__(self, embed: Callable[[list[str]], Any], threshold: float = 0.95, max_entries: int = 10_000,
                 path: Optional[str | os.PathLike] = None, embedder: str = "") -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"semantic cache threshold={threshold}: expected a cosine similarity in (0, 1]")
        if max_entries < 1:
            raise ConfigError(f"semantic cache max_entries={max_entries}: expected >= 1")
        self.embed, self.threshold, self.max_entries, self.embedder = embed, threshold, max_entries, embedder
        self.hits = self.misses = self.errors = 0
        self._lock = threading.Lock()
        self._clock = 0
        self.vectors: Optional[np.ndarray] = None  # (N, D) unit rows
        self.entry: dict[str, list] = {name: [] for name in self.FIELDS}  # responses as JSON: each hit a new dict
        self._db: Optional[sqlite3.Connection] = None
        if path is not None:
            self._open(Path(path))

    @property
    def entries(self) -> int:
        return len(self.entry["texts"])

    def lookup(self, scope: str, text: str) -> Optional[tuple[dict[str, Any], float]]:
        """(the response, its similarity) of the nearest earlier prompt of `scope` at or above the threshold."""
        with self._lock:
            known = scope in self.entry["scopes"]
        query = self._vector(text) if known else None  # an empty scope needs no embedding
        with self._lock:
            rows = [i for i, s in enumerate(self.entry["scopes"]) if s == scope]
            similarity = self.vectors[rows] @ query if rows and query is not None else np.zeros(0)  # (len(rows),)
            if not rows or similarity.max() < self.threshold - 1e-6:  # float32: a text's own cosine is 1 - 6e-8
                self.misses += 1
                return None
            best = rows[int(np.argmax(similarity))]
            self.hits += 1
            self.entry["used"][best] = self._stamp()
            self._write("UPDATE semantic SET used = ? WHERE id = ?", (self.entry["used"][best],
                                                                     self.entry["rows"][best]))
            return json.loads(self.entry["responses"][best]), float(similarity.max())

    def add(self, scope: str, text: str, response: dict[str, Any]) -> None:
        """Remember `response` as the answer to `text` in `scope` (replacing one to the very same text)."""
        vector = self._vector(text)
        with self._lock:
            self._insert(scope, text, vector, json.dumps(response, separators=(",", ":"), ensure_ascii=False),
                         self._stamp(), None)
            self._evict()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _vector(self, text: str) -> np.ndarray:
        vectors = np.asarray(self.embed([text]), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != 1:
            raise LmforgeError(f"semantic cache: embed gave shape {vectors.shape} for one text; expected (1, D)")
        norm = float(np.linalg.norm(vectors[0]))
        return vectors[0] / norm if norm > 0 else vectors[0]

    def _stamp(self) -> int:
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    def _insert(self, scope: str, text: str, vector: np.ndarray, response: str, used: int,
                row: Optional[int]) -> None:
        if self.vectors is not None and self.vectors.shape[1] != vector.shape[0]:
            raise LmforgeError(f"semantic cache: embed gave {vector.shape[0]}-dimensional vectors, earlier ones "
                               f"were {self.vectors.shape[1]}-dimensional (one embedder per cache)")
        same = [i for i, (s, t) in enumerate(zip(self.entry["scopes"], self.entry["texts"])) if (s, t) == (scope, text)]
        if same:
            self.entry["responses"][same[0]], self.entry["used"][same[0]] = response, used
            self._write("UPDATE semantic SET response = ?, used = ? WHERE id = ?",
                        (response, used, self.entry["rows"][same[0]]))
            return
        if row is None:
            row = self._write("INSERT INTO semantic (embedder, scope, text, vector, response, used) VALUES "
                              "(?, ?, ?, ?, ?, ?)", (self.embedder, scope, text, vector.tobytes(), response, used))
        self.vectors = vector[None] if self.vectors is None else np.concatenate([self.vectors, vector[None]])
        for name, value in zip(self.FIELDS, (scope, text, response, used, row)):
            self.entry[name].append(value)

    def _evict(self) -> None:
        while self.entries > self.max_entries:
            oldest = int(np.argmin(self.entry["used"]))
            self._write("DELETE FROM semantic WHERE id = ?", (self.entry["rows"][oldest],))
            self.vectors = np.delete(self.vectors, oldest, axis=0)
            for name in self.FIELDS:
                del self.entry[name][oldest]

    def _open(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS semantic (id INTEGER PRIMARY KEY, embedder TEXT NOT NULL, "
                             "scope TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL, response TEXT NOT NULL, "
                             "used INTEGER NOT NULL)")
            rows = self._db.execute("SELECT id, scope, text, vector, response, used FROM semantic WHERE embedder = ? "
                                    "ORDER BY used", (self.embedder,)).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"semantic cache {path}: cannot open it as a SQLite file ({exc})") from None
        for row, scope, text, blob, response, used in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            if self.vectors is None or vector.shape[0] == self.vectors.shape[1]:  # another width: another embedder
                self._insert(scope, text, vector, response, used, row)
            self._clock = max(self._clock, used)
        self._evict()

    def _write(self, sql: str, args: tuple) -> Optional[int]:
        """Run one statement on the persistence file (if any); a failure counts in `errors`, memory stays as is."""
        if self._db is None:
            return None
        try:
            return self._db.execute(sql, args).lastrowid
        except sqlite3.Error:
            self.errors += 1
            return None

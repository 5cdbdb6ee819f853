"""The server's request log: one record per request, appended to a JSONL or SQLite file, rotated, PII redacted.

    log = RequestLog("requests.jsonl", max_bytes=50_000_000, backups=5, redact=True)
    log.write({"id": "chatcmpl-1", "route": "/v1/chat/completions", "model": "m", "status": 200,
               "client": log.client_id(api_key_or_address), ...})
    log.close()  # at shutdown: flushes what is queued

A record is a dict (keys in RECORD_KEYS; any may be missing). `write` only queues it: a background thread formats,
redacts and appends, so a request handler on the event loop never waits for the disk. This module imports no
torch and no server code, so `lmforge logs stats` reads logs without loading either.

Rotation follows logging's RotatingFileHandler: when a write would take the file past `max_bytes` it is renamed
path -> path.1 -> ... -> path.N (the oldest dropped) and a fresh file begins; with `max_bytes` or `backups` 0 the
file grows forever. A SQLite log (WAL journal) rotates by the same rule on its size (database plus WAL), checked
after each committed batch, so it rotates after the batch that takes it past `max_bytes`.

Crash safety: a JSONL record is one `write` of a whole line followed by a flush, so a crash can tear only the last
line; a torn last line (no newline, not JSON) is skipped by the reader and cut off when the log is reopened. A
SQLite batch is one transaction.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from lmforge.errors import ConfigError, LmforgeError

RECORD_KEYS = ("time", "id", "route", "model", "status", "client", "params", "prompt", "output", "prompt_tokens",
               "completion_tokens", "latency_s", "ttft_s", "cache", "guard", "error")
SQLITE_COLUMNS = {  # queryable copies of some fields; the `record` column holds the whole record as JSON
    "time": "TEXT", "id": "TEXT", "route": "TEXT", "model": "TEXT", "status": "INTEGER", "client": "TEXT",
    "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "latency_s": "REAL", "ttft_s": "REAL",
    "cache": "TEXT", "error": "TEXT"}
MAX_QUEUED = 100_000  # records waiting for the writer; past this a record is dropped rather than stall a request
_log = logging.getLogger(__name__)

# --- PII redaction ------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d.,])(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![ -]?\d)(?![.,]\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_H16 = r"[0-9A-Fa-f]{1,4}"
_V4 = r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV6_FORMS = (  # RFC 4291 text forms, longest first so that alternation never stops at a prefix
    rf"(?:{_H16}:){{6}}{_V4}", rf"::(?:[fF]{{4}}(?::0{{1,4}})?:)?{_V4}", rf"(?:{_H16}:){{1,4}}:{_V4}",
    rf"(?:{_H16}:){{7}}{_H16}", rf"(?:{_H16}:){{1,6}}:{_H16}", rf"(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}",
    rf"(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}", rf"(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}",
    rf"(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}", rf"{_H16}:(?::{_H16}){{1,6}}", rf"(?:{_H16}:){{1,7}}:",
    rf":(?::{_H16}){{1,7}}")
# An address holds a digit: code such as `a::b` or `dead::beef`-like identifiers stays.
_IPV6 = re.compile(rf"(?<![\w:.])(?=[0-9A-Fa-f:.]*\d)(?:{'|'.join(_IPV6_FORMS)})(?![\w:]|\.\d)")
_IPV4 = re.compile(rf"(?<![\w.]){_V4}(?!\.?\d)")
_SEP = r"[ .-]"
# US: optional +1, area code (NANP: starts 2-9, may be parenthesised), 3 + 4 digits. International: + country code
# and groups; the digit count (8-15, E.164) is checked after matching. Neither may start or end inside a digit run.
_US_PHONE = re.compile(rf"(?<![\w+])(?<!\d{_SEP})(?:\+?1{_SEP}?)?(?:\([2-9]\d\d\)|[2-9]\d\d){_SEP}?\d{{3}}{_SEP}?"
                       rf"\d{{4}}(?!{_SEP}?\d)")
_INTL_PHONE = re.compile(rf"(?<![\w+])\+\d{{1,3}}(?:{_SEP}?(?:\(\d{{1,4}}\)|\d{{1,4}})){{2,6}}(?!{_SEP}?\d)")


def _luhn_ok(digits: str) -> bool:
    """The Luhn checksum of payment card numbers: double every second digit from the right; the sum is 0 mod 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_ok(compact: str) -> bool:
    """ISO 13616: 15-34 characters; moving the first four to the end and reading letters as 10-35 gives 1 mod 97."""
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _redact_iban(match: re.Match) -> str:
    # The pattern may have swallowed a following upper-case word ("... 3000 THEN"): try shorter runs of groups.
    groups = match.group(0).split(" ")
    for end in range(len(groups), 0, -1):
        if _iban_ok("".join(groups[:end])):
            rest = " ".join(groups[end:])
            return "[IBAN]" + (" " + rest if rest else "")
    return match.group(0)


def _redact_card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


def _redact_intl_phone(match: re.Match) -> str:
    return "[PHONE]" if 8 <= len(re.sub(r"\D", "", match.group(0))) <= 15 else match.group(0)


def redact_pii(text: str) -> str:
    """`text` with e-mail addresses, IBANs, payment card numbers (13-19 digits passing Luhn, spaces or dashes
    allowed), US SSNs, IPv6 and IPv4 addresses and phone numbers (international +CC forms and US forms) replaced
    by [EMAIL], [IBAN], [CARD], [SSN], [IP] and [PHONE]. Checksums (Luhn, IBAN mod 97) and digit-run boundaries
    keep dates, prices, version strings and other numbers as they are."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub(_redact_iban, text)
    text = _CARD.sub(_redact_card, text)
    text = _SSN.sub("[SSN]", text)
    text = _IPV6.sub("[IP]", text)
    text = _IPV4.sub("[IP]", text)
    text = _INTL_PHONE.sub(_redact_intl_phone, text)
    return _US_PHONE.sub("[PHONE]", text)


def _redact_content(content: Any) -> Any:
    """A message content: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return redact_pii(content)
    if isinstance(content, list):
        return [{**part, "text": redact_pii(part["text"])} if isinstance(part, dict)
                and isinstance(part.get("text"), str) else _redact_content(part) for part in content]
    return content


def _redact_strings(value: Any) -> Any:
    """`value` with every string in it redacted, through lists, tuples and the values of dicts."""
    if isinstance(value, str):
        return redact_pii(value)
    if isinstance(value, (list, tuple)):
        return [_redact_strings(item) for item in value]
    if isinstance(value, dict):
        return {key: _redact_strings(item) for key, item in value.items()}
    return value


def redact_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of `record` whose prompt (text, or chat messages' contents), outputs, error text and every string in
    `guard` (its reasons quote the input, its problems the output) are redacted."""
    out = dict(record)
    prompt = out.get("prompt")
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        out["prompt"] = [{**m, "content": _redact_content(m.get("content"))} if "content" in m else m
                         for m in prompt]
    else:
        out["prompt"] = _redact_content(prompt)
    if isinstance(out.get("output"), list):
        out["output"] = [redact_pii(o) if isinstance(o, str) else o for o in out["output"]]
    elif isinstance(out.get("output"), str):
        out["output"] = redact_pii(out["output"])
    if isinstance(out.get("error"), str):
        out["error"] = redact_pii(out["error"])
    if "guard" in out:
        out["guard"] = _redact_strings(out["guard"])
    return out


def client_id(value: str, salt: bytes) -> str:
    """A short pseudonym for an API key or a client address, for the `client` field: the first 12 hex digits of
    HMAC-SHA256(key=salt, value). Requests of one client share it while the salt stays the same; without the salt
    nobody can recover the value by hashing guesses (an unsalted hash of an IPv4 address falls to trying all 2^32).
    An empty salt is a ValueError."""
    if not salt:
        raise ValueError("client_id: the salt must be non-empty bytes")
    return hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds, the `time` field's format."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# --- the writer ---------------------------------------------------------------------------------------------------

def log_format(path: str | os.PathLike) -> str:
    """"jsonl" or "sqlite" from the file's suffix, ignoring a rotation suffix (requests.jsonl.3 is JSONL)."""
    name = re.sub(r"(\.\d+)$", "", Path(path).name)
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".sqlite", ".sqlite3", ".db"):
        return "sqlite"
    raise ConfigError(f"request log {path}: expected a .jsonl, .sqlite or .db file name")


def rotated_paths(path: str | os.PathLike) -> list[Path]:
    """`path`'s rotated siblings that exist, oldest first (path.N ... path.1); `path` itself not included."""
    path = Path(path)
    numbered = [(int(p.name[len(path.name) + 1:]), p) for p in path.parent.glob(f"{glob.escape(path.name)}.*")
                if p.name[len(path.name) + 1:].isdigit()]
    return [p for _, p in sorted(numbered, reverse=True)]


class RequestLog:
    """Appends request records to `path` (.jsonl, or .sqlite/.sqlite3/.db) from a background thread.

    `write` is thread-safe and returns at once; `close` writes everything queued, then closes the file. With
    `redact`, prompts, outputs, errors and the guard's strings pass through `redact_pii` before they reach the disk
    (`redact_record`). `dropped` counts records refused because MAX_QUEUED were waiting, `failed` those the disk
    refused (both logged as warnings). `client_id` pseudonymises keys and addresses with a salt made per log."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 100_000_000, backups: int = 5,
                 redact: bool = False) -> None:
        self.path = Path(path)
        self.format = log_format(self.path)
        if max_bytes < 0 or backups < 0:
            raise ConfigError(f"request log {path}: max_bytes and backups must be >= 0")
        self.max_bytes, self.backups, self.redact = max_bytes, backups, redact
        self._rotates = bool(max_bytes and backups)  # as RotatingFileHandler: either one 0 means never rotate
        self.dropped = self.failed = 0
        self._client_salt = secrets.token_bytes(16)  # kept in memory only: the log alone cannot undo a pseudonym
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(MAX_QUEUED)
        self._closed = False
        self._lock = threading.Lock()  # orders close() against write() so nothing is queued after the sentinel
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"request log {path}: cannot open it ({exc})") from None
        self._thread = threading.Thread(target=self._run, name="lmforge-request-log", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (a missing `time` is set to now). The dict must not be changed after this call."""
        if "time" not in record:
            record = {**record, "time": utc_now()}
        with self._lock:
            if self._closed:
                raise RuntimeError(f"request log {self.path} is closed")
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1:
                    _log.warning("request log %s: writer behind by %d records; dropping", self.path, MAX_QUEUED)

    def client_id(self, value: str) -> str:
        """`client_id(value, salt)` with this log's random salt: one client keeps one pseudonym for as long as this
        RequestLog lives (a server run); after a restart it gets another."""
        return client_id(value, self._client_salt)

    def flush(self) -> None:
        """Wait until every record queued so far is written (and flushed or committed)."""
        self._queue.join()

    def close(self) -> None:
        """Write every queued record, then close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # The methods below run on the writer thread only (and _open once in __init__, before it starts).

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while len(batch) < 512:  # take what else is waiting: one flush or transaction per batch
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            taken = len(batch)
            if None in batch:
                done = True
                batch = [r for r in batch if r is not None]
            try:
                if batch:  # the sentinel alone: nothing to write (and no reason to rotate)
                    self._append(batch)
            except (OSError, sqlite3.Error, TypeError, ValueError) as exc:
                self.failed += len(batch)
                _log.warning("request log %s: %d records not written (%s)", self.path, len(batch), exc)
            finally:
                for _ in range(taken):
                    self._queue.task_done()
        self._close_file()

    def _prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        return redact_record(record) if self.redact else record

    def _open(self) -> None:
        if self.format == "jsonl":
            self._file = open(self.path, "ab")
            self._cut_torn_line()
        else:
            # check_same_thread off: opened here, then used only by the writer thread.
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last batch
            columns = ", ".join(f"{name} {kind}" for name, kind in SQLITE_COLUMNS.items())
            self._db.execute(f"CREATE TABLE IF NOT EXISTS requests (row INTEGER PRIMARY KEY, {columns}, record TEXT)")

    def _cut_torn_line(self) -> None:
        """Drop a last line without its newline (a crash mid-write), so the next record starts on a line of its own."""
        size = self._file.seek(0, os.SEEK_END)
        keep, end = 0, size
        with open(self.path, "rb") as f:
            while end > 0:  # back from the end, a chunk at a time, to the last newline
                start = max(0, end - 65536)
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                end = start
        if keep == size:
            return
        self._file.truncate(keep)
        self._file.seek(0, os.SEEK_END)  # tell() measures the file for rotation

    def _append(self, batch: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            for record in batch:
                line = (json.dumps(self._prepare(record), ensure_ascii=False, default=str) + "\n").encode("utf-8")
                size = self._file.tell()
                if self._rotates and size > 0 and size + len(line) > self.max_bytes:
                    self._rotate()
                self._file.write(line)  # the whole line in one call: a crash tears at most this line
            self._file.flush()
        else:
            rows = []
            for record in batch:
                record = self._prepare(record)
                rows.append([_sql_value(record.get(c)) for c in SQLITE_COLUMNS]
                            + [json.dumps(record, ensure_ascii=False, default=str)])
            marks = ", ".join("?" * (len(SQLITE_COLUMNS) + 1))
            with self._db:  # one transaction per batch
                self._db.executemany(f"INSERT INTO requests ({', '.join(SQLITE_COLUMNS)}, record) VALUES ({marks})",
                                     rows)
            if self._rotates and self._sqlite_size() > self.max_bytes:
                self._rotate()

    def _sqlite_size(self) -> int:
        wal = Path(f"{self.path}-wal")
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    def _rotate(self) -> None:
        self._close_file()  # for SQLite, closing checkpoints the WAL into the database file
        for i in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()

    def _close_file(self) -> None:
        if self.format == "jsonl":
            self._file.close()
        else:
            self._db.close()


def _sql_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


# --- reading ------------------------------------------------------------------------------------------------------

def read_log(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record of one log file (JSONL, or SQLite where the number is the row id).

    A missing or unreadable file, a line that is not a JSON object, or a SQLite file without a requests table is a
    LmforgeError naming the file (and line). A torn last line, left by a crash mid-write, is skipped."""
    path = Path(path)
    fmt = log_format(path)
    if not path.is_file():
        raise LmforgeError(f"log {path}: not found")
    if fmt == "jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_sqlite(path)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    if not raw.endswith(b"\n"):  # only the last line can lack it: torn by a crash
                        return
                    raise LmforgeError(f"log {path}:{number}: not a JSON record ({exc})") from None
                if not isinstance(record, dict):
                    raise LmforgeError(f"log {path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except OSError as exc:
        raise LmforgeError(f"log {path}: cannot read it ({exc.strerror})") from None


def _read_sqlite(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        # Not mode=ro: a read-only connection leaves -wal and -shm files behind; query_only keeps it a reader.
        db = sqlite3.connect(path)
        db.execute("PRAGMA query_only=1")
    except sqlite3.Error as exc:
        raise LmforgeError(f"log {path}: cannot open it as SQLite ({exc})") from None
    try:
        try:
            rows = db.execute("SELECT row, record FROM requests ORDER BY row").fetchall()
        except sqlite3.Error as exc:
            raise LmforgeError(f"log {path}: not a request log database ({exc})") from None
        for row, text in rows:
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, TypeError) as exc:
                raise LmforgeError(f"log {path}: row {row}: not a JSON record ({exc})") from None
            if not isinstance(record, dict):
                raise LmforgeError(f"log {path}: row {row}: expected a JSON object, got {type(record).__name__}")
            yield row, record
    finally:
        db.close()

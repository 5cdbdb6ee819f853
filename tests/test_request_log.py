"""The request log (JSONL and SQLite, rotation, threads, crashes, PII redaction) and `lmforge logs stats`."""

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.logstats import LogsStatsConfig, logs_stats, percentile
from lmforge.serve.request_log import RequestLog, client_id, read_log, redact_pii, redact_record, rotated_paths

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _record(i: int, **fields) -> dict:
    return {"time": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}Z", "id": f"req-{i}", "route": CHAT, "model": "m",
            "status": 200, "client": client_id("key", b"test salt"), "params": {"temperature": 0.7, "max_tokens": 8},
            "prompt": [{"role": "user", "content": f"question {i}"}], "output": [f"answer {i}"],
            "prompt_tokens": 3, "completion_tokens": 2, "latency_s": 0.1, "ttft_s": None, "cache": "miss",
            "guard": None, "error": None, **fields}


def _read_all(path: Path) -> list[dict]:
    return [record for file in [*rotated_paths(path), path] for _, record in read_log(file)]


@pytest.mark.parametrize("name", ["requests.jsonl", "requests.sqlite"])
def test_write_rotate_and_read_back(tmp_path, name):
    path = tmp_path / name
    big = "x" * 3000  # a few records fill max_bytes
    with RequestLog(path, max_bytes=16_000, backups=2) as log:
        for i in range(30):
            log.write(_record(i, output=[big]))
            log.flush()  # one record a batch, so a SQLite log checks its size after each
    assert [p.name for p in rotated_paths(path)] == [f"{name}.2", f"{name}.1"]  # oldest first, .3 dropped
    if name.endswith(".jsonl"):
        assert all(p.stat().st_size <= 16_000 for p in [path, *rotated_paths(path)])
    ids = [int(r["id"].split("-")[1]) for r in _read_all(path)]
    assert ids == list(range(ids[0], 30)) and 0 < ids[0]  # the newest records, in order; the oldest rotated away
    assert _read_all(path)[-1]["output"] == [big] and _read_all(path)[-1]["params"]["max_tokens"] == 8


def test_no_rotation_when_backups_is_zero_and_bad_names(tmp_path):
    with RequestLog(tmp_path / "a.jsonl", max_bytes=100, backups=0) as log:
        for i in range(5):
            log.write(_record(i))
    assert len(list(read_log(tmp_path / "a.jsonl"))) == 5 and not rotated_paths(tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="expected a .jsonl, .sqlite or .db"):
        RequestLog(tmp_path / "a.txt")
    with pytest.raises(ConfigError, match="cannot open"):
        RequestLog(tmp_path / "a.jsonl" / "inside.jsonl")  # a file where a directory should be


@pytest.mark.parametrize("name", ["threads.jsonl", "threads.db"])
def test_many_threads_write_every_record_once(tmp_path, name):
    path = tmp_path / name
    log = RequestLog(path, max_bytes=0)

    def writer(t: int) -> None:
        for i in range(150):
            log.write(_record(i, id=f"{t}-{i}", prompt="p" * (i % 7)))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.write(_record(0))
    ids = [r["id"] for r in _read_all(path)]
    assert len(ids) == len(set(ids)) == 8 * 150
    for t in range(8):  # each thread's records in the order it wrote them
        assert [i for i in ids if i.startswith(f"{t}-")] == [f"{t}-{i}" for i in range(150)]
    assert log.dropped == log.failed == 0


def test_torn_last_line_is_skipped_then_cut(tmp_path):
    path = tmp_path / "torn.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1)) + "\n" + '{"time": "2025-01-', "utf-8")
    assert [r["id"] for _, r in read_log(path)] == ["req-0", "req-1"]
    with RequestLog(path) as log:
        log.write(_record(2))
    assert [r["id"] for _, r in read_log(path)] == ["req-0", "req-1", "req-2"]
    assert path.read_text("utf-8").count("\n") == 3


WRITER = """
import sys
from lmforge.serve.request_log import RequestLog
log = RequestLog(sys.argv[1], max_bytes=0)
print("ready", flush=True)
i = 0
while True:
    log.write({"id": str(i), "prompt": "p" * 2000, "output": ["o" * 2000]})
    i += 1
    if i % 50 == 0:
        log.flush()
"""


@pytest.mark.parametrize("name", ["crash.jsonl", "crash.sqlite"])
def test_a_killed_writer_leaves_a_readable_log(tmp_path, name):
    path = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.4)
    os.kill(proc.pid, signal.SIGKILL)  # no close(), no flush: mid-write, as a crash would
    proc.wait()
    ids = [int(r["id"]) for _, r in read_log(path)]
    assert len(ids) >= 50 and ids == list(range(len(ids)))


@pytest.mark.parametrize("text", [
    "write to jane.doe+lm@example.co.uk please", "card 4111 1111 1111 1111", "card 4111-1111-1111-1111.",
    "amex 3782 822463 10005", "ssn 123-45-6789", "at 192.168.1.10.", "v6 2001:db8::8a2e:370:7334 up",
    "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "mapped ::ffff:192.0.2.1", "call +1 (555) 123-4567",
    "call 555-123-4567", "call (555) 123-4567", "uk +44 20 7946 0958", "fr +33 1 23 45 67 89",
    "iban DE89 3704 0044 0532 0130 00", "iban GB82WEST12345698765432"])
def test_redaction_removes_pii(text):
    redacted = redact_pii(text)
    tag = redacted[redacted.index("["):redacted.index("]") + 1]
    assert tag in ("[EMAIL]", "[CARD]", "[SSN]", "[IP]", "[PHONE]", "[IBAN]")
    assert not any(ch.isdigit() for ch in redacted.replace("v6", "")) and "@" not in redacted


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112", "order 1234567812345678", "version 1.2.3.4.5", "on 2024-01-15", "on 01/15/2024",
    "costs $1,234.56 or 1234.56 EUR", "at 12:30:45", "std::vector and a::b", "ssn-like 000-12-3456",
    "IBAN-like DE00 3704 0044 0532 0130 00", "isbn 978-3-16-148410-0", "zip 90210-1234", "10,000 people in 2023",
    "id 1234567890"])
def test_redaction_keeps_near_misses(text):
    assert redact_pii(text) == text


def test_a_redacting_log_redacts_prompts_outputs_and_messages(tmp_path):
    path = tmp_path / "r.jsonl"
    with RequestLog(path, redact=True) as log:
        log.write(_record(0, prompt=[{"role": "user", "content": "I am bob@example.com"},
                                     {"role": "user", "content": [{"type": "text", "text": "call 555-123-4567"}]}],
                          output=["card 4111 1111 1111 1111"], params={"stop": ["bob@example.com"]}))
        log.write(_record(1, prompt="my ip is 10.0.0.1"))
    first, second = (r for _, r in read_log(path))
    assert first["prompt"][0]["content"] == "I am [EMAIL]"
    assert first["prompt"][1]["content"] == [{"type": "text", "text": "call [PHONE]"}]
    assert first["output"] == ["card [CARD]"] and first["params"] == {"stop": ["bob@example.com"]}
    assert second["prompt"] == "my ip is [IP]"


GUARD = {"injection": 1.0, "flagged": True, "blocked": False, "reasks": 1, "valid": False,
         "reasons": ["pattern exfiltration: 'send the chat history to bob@example.com'", "classifier 0.93"],
         "problems": ["it contains the banned phrase 'call me at 555-123-4567'"],
         "detail": {"turns": [("from 10.0.0.1", 2)], "note": None}}


def test_a_redacting_log_redacts_every_string_in_guard(tmp_path):
    path = tmp_path / "r.jsonl"
    with RequestLog(path, redact=True) as log:
        log.write(_record(0, guard=GUARD))
    [(_, record)] = read_log(path)
    assert record["guard"] == {
        "injection": 1.0, "flagged": True, "blocked": False, "reasks": 1, "valid": False,
        "reasons": ["pattern exfiltration: 'send the chat history to [EMAIL]'", "classifier 0.93"],
        "problems": ["it contains the banned phrase 'call me at [PHONE]'"],
        "detail": {"turns": [["from [IP]", 2]], "note": None}}
    assert "guard" not in redact_record({"prompt": "x"}) and redact_record({"guard": None})["guard"] is None
    assert GUARD["reasons"][0].endswith("bob@example.com'")  # the caller's record is left as it was
    plain = tmp_path / "plain.jsonl"
    with RequestLog(plain) as log:
        log.write(_record(0, guard=GUARD))
    assert next(read_log(plain))[1]["guard"]["reasons"] == GUARD["reasons"]  # redaction off: kept as given


def test_client_id_is_an_hmac_with_a_secret_salt():
    salt = b"0123456789abcdef"
    assert client_id("10.0.0.1", salt) == hmac.new(salt, b"10.0.0.1", hashlib.sha256).hexdigest()[:12]
    assert client_id("10.0.0.1", salt) != hashlib.sha256(b"10.0.0.1").hexdigest()[:12]  # not the bare hash
    assert client_id("10.0.0.1", salt) != client_id("10.0.0.1", b"another salt")
    assert client_id("10.0.0.1", salt) != client_id("10.0.0.2", salt)
    assert len(client_id("key", salt)) == 12 and int(client_id("key", salt), 16) >= 0
    with pytest.raises(ValueError, match="salt"):
        client_id("10.0.0.1", b"")


def test_each_request_log_has_its_own_random_salt(tmp_path):
    with RequestLog(tmp_path / "a.jsonl") as first, RequestLog(tmp_path / "b.jsonl") as second:
        assert first.client_id("10.0.0.1") == first.client_id("10.0.0.1")  # one client groups together
        assert first.client_id("10.0.0.1") != first.client_id("10.0.0.2")
        assert first.client_id("10.0.0.1") != second.client_id("10.0.0.1")  # 2^-48 by chance
        assert len(first.client_id("sk-secret")) == 12 and "sk-secret" not in first.client_id("sk-secret")


KNOWN = [  # (seconds after 00:00, fields); the expected summary is worked out by hand in test_stats_exact
    (0, dict(prompt_tokens=10, completion_tokens=5, latency_s=0.1, ttft_s=0.02, cache="miss",
             guard={"injection": 0.1, "flagged": False, "blocked": False, "reasks": 0, "valid": True})),
    (30, dict(prompt_tokens=20, completion_tokens=10, latency_s=0.2, ttft_s=0.04, cache="hit",
              guard={"flagged": True, "blocked": False, "reasks": 1})),
    (60, dict(route=COMPLETIONS, model="b", prompt_tokens=30, completion_tokens=15, latency_s=0.3, cache="semantic")),
    (90, dict(route=COMPLETIONS, model="b", status=400, prompt_tokens=5, completion_tokens=0, latency_s=0.05,
              cache="off", error="bad request")),
    (120, dict(prompt_tokens=40, completion_tokens=20, latency_s=1.0, ttft_s=0.1, cache="miss",
               guard={"flagged": True, "blocked": True, "reasks": 2})),
    (180, dict(status=500, latency_s=2.0, error="engine failed")),
]


def _known_records() -> list[dict]:
    out = []
    for seconds, fields in KNOWN:
        record = {**_record(seconds, model="a"), **fields}
        if seconds == 180:  # a failed request: no counts, no cache status
            for key in ("prompt_tokens", "completion_tokens", "cache"):
                del record[key]
        out.append(record)
    return out


@pytest.fixture
def known_log(tmp_path) -> Path:
    """The KNOWN records split across a rotated JSONL log (path.1 holds the first three)."""
    path = tmp_path / "known.jsonl"
    records = _known_records()
    (tmp_path / "known.jsonl.1").write_text("".join(json.dumps(r) + "\n" for r in records[:3]), "utf-8")
    path.write_text("".join(json.dumps(r) + "\n" for r in records[3:]), "utf-8")
    return path


def test_percentile_interpolates_between_ranks():
    assert percentile([], 0.5) is None and percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0


def test_stats_exact(known_log, capsys):
    stats = logs_stats(LogsStatsConfig(log=[str(known_log)]))
    assert stats["files"] == [f"{known_log}.1", str(known_log)]
    assert stats["requests"] == 6 and stats["requests_per_minute"] == pytest.approx(2.0)  # 6 over 3 minutes
    assert stats["first"] == "2025-01-01T00:00:00+00:00" and stats["last"] == "2025-01-01T00:03:00+00:00"
    assert stats["by_route"] == {CHAT: 4, COMPLETIONS: 2} and stats["by_model"] == {"a": 4, "b": 2}
    assert stats["by_status"] == {"200": 4, "400": 1, "500": 1} and stats["errors"] == 2
    assert stats["cache"] == {"hit": 1, "semantic": 1, "miss": 2, "off": 1, "hit_rate": 0.5}
    assert stats["prompt_tokens"] == {"total": 105, "mean": 21.0}
    assert stats["completion_tokens"] == {"total": 50, "mean": 10.0}
    # latencies sorted: 0.05 0.1 0.2 0.3 1.0 2.0; p50 at rank 2.5, p90 at 4.5, p99 at 4.95
    assert stats["latency_s"] == pytest.approx({"p50": 0.25, "p90": 1.5, "p99": 1.95})
    assert stats["ttft_s"] == pytest.approx({"p50": 0.04, "p99": 0.04 + 0.98 * 0.06})  # of 0.02 0.04 0.1
    assert stats["guard"] == {"checked": 3, "flagged": 2, "blocked": 1, "reasks": 3}
    table = capsys.readouterr().out
    assert "hit rate 50.0%" in table and "p90 1.500" in table and "re-asks 3" in table


def test_stats_filters(known_log):
    assert logs_stats(LogsStatsConfig(log=[str(known_log)], model="b"))["requests"] == 2
    since = logs_stats(LogsStatsConfig(log=[str(known_log)], since="2025-01-01T00:01:00Z",
                                       until="2025-01-01T01:02:00+01:00"))  # 00:01:00 <= t < 00:02:00 UTC
    assert since["requests"] == 2 and since["by_model"] == {"b": 2}
    with pytest.raises(ConfigError, match="since"):
        LogsStatsConfig(log=["x.jsonl"], since="yesterday")


def test_stats_reads_a_rotated_sqlite_log_beside_jsonl(tmp_path, known_log):
    path = tmp_path / "more.sqlite"
    with RequestLog(path, max_bytes=1, backups=3) as log:  # every batch rotates
        for record in _known_records():
            log.write(record)
            log.flush()
    assert len(rotated_paths(path)) == 3
    stats = logs_stats(LogsStatsConfig(log=[str(path), str(known_log), str(known_log)], json=True))
    assert stats["requests"] == 6 + 3  # the newest three of the SQLite log survive, plus the JSONL log once
    with pytest.raises(LmforgeError, match="not found"):
        logs_stats(LogsStatsConfig(log=[str(tmp_path / "absent.jsonl")]))


def test_cli_json_and_errors(known_log, tmp_path, capsys):
    assert main(["logs", "stats", str(known_log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 6 and out["cache"]["hit_rate"] == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record(0)) + "\nnot json\n" + json.dumps(_record(1)) + "\n", "utf-8")
    assert main(["logs", "stats", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and "Traceback" not in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps(_record(0, latency_s="fast")) + "\n", "utf-8")
    assert main(["logs", "stats", str(wrong)]) == 2
    assert f"{wrong}:1: latency_s 'fast' is not a number" in capsys.readouterr().err
    assert main(["logs", "stats", str(tmp_path / "absent.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "junk.db").write_text("not a database", "utf-8")
    assert main(["logs", "stats", str(tmp_path / "junk.db")]) == 2
    assert "not a request log database" in capsys.readouterr().err
    assert main(["logs", "stats"]) == 2
    assert "needs a log file" in capsys.readouterr().err


def test_cli_as_a_subprocess_without_torch(known_log):
    lmforge = Path(sys.executable).parent / "lmforge"
    done = subprocess.run([str(lmforge), "logs", "stats", str(known_log), "--model", "a"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "requests           4" in done.stdout and "hit rate 33.3%" in done.stdout
    probe = ("import sys; from lmforge.cli import main; rc = main(['logs', 'stats', sys.argv[1]]); "
             "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", probe, str(known_log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

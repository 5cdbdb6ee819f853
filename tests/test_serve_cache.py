"""The server's response cache: keys, the cacheable rule, SQLite and a real Redis, fingerprints, the semantic cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import ConfigError
from lmforge.serve import cache as cache_module
from lmforge.serve.cache import (RedisCache, SqliteCache, cacheable, metric_lines, model_fingerprint, open_cache,
                                 replayed, request_key, stream_chunks)
from lmforge.serve.semantic_cache import SemanticCache, semantic_parts

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "the cat"}], "temperature": 0, "max_tokens": 8}
RESPONSE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "sat on the mat"},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


def key(body: dict, fingerprint: str = "f" * 64, route: str = CHAT) -> str:
    return request_key(fingerprint, route, body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_key_ignores_what_does_not_change_the_output():
    base = key(BODY)
    assert key(dict(reversed(list(BODY.items())))) == base  # field order
    assert key({**BODY, "stream": True, "user": "alice", "model": "other-name"}) == base
    assert key({**BODY, "temperature": 0.0, "top_p": 0.5, "seed": 3}) == base  # greedy ignores top_p and seed
    assert key({**BODY, "n": 1, "stop": None, "logprobs": False, "top_logprobs": 5}) == base  # defaults, unused
    del_max = {k: v for k, v in BODY.items() if k != "max_tokens"}
    assert key({**del_max, "max_completion_tokens": 8}) == base
    assert key({**BODY, "messages": [{"role": "user", "content": "the cat", "name": None}]}) == base
    dumped = {"model": "tiny", "messages": [{"role": "user", "content": "the cat", "name": None}],  # model_dump()
              "max_tokens": 8, "max_completion_tokens": None, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": None,
              "seed": None, "stream": False, "user": None, "logprobs": False, "top_logprobs": None}
    assert key(dumped) == base
    prompt = {"model": "tiny", "prompt": "the cat", "seed": 1, "stop": "x"}
    assert key({**prompt, "prompt": ["the cat"], "stop": ["x"]}, route="/v1/completions") == \
        key(prompt, route="/v1/completions")


def test_key_changes_with_what_changes_the_output():
    base = key(BODY)
    changed = [{**BODY, "temperature": 0.5}, {**BODY, "max_tokens": 9}, {**BODY, "n": 2}, {**BODY, "stop": ["."]},
               {**BODY, "messages": [{"role": "user", "content": "the dog"}]}, {**BODY, "logprobs": True},
               {**BODY, "logprobs": True, "top_logprobs": 2}]
    keys = {key(body) for body in changed}
    assert base not in keys and len(keys) == len(changed)
    assert key(BODY, fingerprint="e" * 64) != base and key(BODY, route="/v1/completions") != base
    sampled = {**BODY, "temperature": 0.7, "seed": 1}
    assert key({**sampled, "seed": 2}) != key(sampled) and key({**sampled, "top_p": 0.9}) != key(sampled)
    prompt = {"model": "tiny", "prompt": "the cat", "temperature": 0}
    assert key({**prompt, "logprobs": 0}, route="/v1/completions") != key(prompt, route="/v1/completions")
    assert key({**prompt, "echo": True}, route="/v1/completions") != key(prompt, route="/v1/completions")


def test_cacheable_only_deterministic_unstreamed_requests():
    assert cacheable({"temperature": 0}) and cacheable({"temperature": 0.0, "n": 3})
    assert cacheable({"temperature": 0.9, "seed": 0}) and cacheable({"seed": 5})
    assert not cacheable({}) and not cacheable({"temperature": 0.5}) and not cacheable({"seed": None})
    assert not cacheable({"temperature": 0, "stream": True}) and not cacheable({"seed": 1, "stream": True})


def test_sqlite_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "sub" / "responses.sqlite"
    cache = SqliteCache(path)
    assert cache.get("k") is None and (cache.hits, cache.misses, cache.entries) == (0, 1, 0)
    cache.put("k", RESPONSE)
    got = cache.get("k")
    assert got == RESPONSE and cache.hits == 1
    got["model"] = "changed"  # the caller's copy: the cache keeps its own
    assert cache.get("k") == RESPONSE
    cache.put("k", {**RESPONSE, "id": "chatcmpl-2"})  # replaces
    cache.close()
    reopened = SqliteCache(path)
    assert reopened.get("k")["id"] == "chatcmpl-2" and reopened.entries == 1
    reopened.close()
    assert reopened.get("k") is None and reopened.errors == 1  # a failing store is a miss, not an exception


def test_sqlite_evicts_the_least_recently_used(tmp_path):
    cache = SqliteCache(tmp_path / "c.db", max_entries=3)
    for name in "abc":
        cache.put(name, {"v": name})
    assert cache.get("a") == {"v": "a"}  # a is now more recent than b and c
    cache.put("d", {"v": "d"})
    assert cache.entries == 3 and cache.get("b") is None
    assert [cache.get(name) for name in "acd"] == [{"v": "a"}, {"v": "c"}, {"v": "d"}]
    cache.put("e", {"v": "e"})
    assert cache.get("a") is None and cache.entries == 3  # a was read before c and d: now the oldest
    cache.close()


def test_sqlite_from_threads(tmp_path):
    cache = SqliteCache(tmp_path / "c.sqlite", max_entries=10_000)
    failures: list[str] = []

    def worker(thread: int) -> None:
        for i in range(40):
            name = f"{thread}-{i}"
            cache.put(name, {"thread": thread, "i": i})
            got = cache.get(name)
            if got != {"thread": thread, "i": i}:
                failures.append(f"{name}: {got}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and cache.entries == 240 and cache.hits == 240 and cache.errors == 0
    cache.close()


def write_model_dir(root: Path, weights: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"d_model": 32}')
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "model.safetensors").write_bytes(weights)
    (root / ".lock").write_text("ignored")
    return root


def test_fingerprint_follows_the_files_not_the_place(tmp_path):
    weights = bytes(range(256)) * 64
    a = write_model_dir(tmp_path / "a", weights)
    b = write_model_dir(tmp_path / "b", weights)
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(str(a))
    (b / ".lock").write_text("hidden files do not count")
    assert model_fingerprint(b) == model_fingerprint(a)
    changed = bytearray(weights)
    changed[5000] ^= 1
    (b / "model.safetensors").write_bytes(bytes(changed))
    assert model_fingerprint(b) != model_fingerprint(a)
    (b / "model.safetensors").write_bytes(weights)
    (b / "tokenizer.json").write_text('{"model": {"x": 1}}')
    assert model_fingerprint(b) != model_fingerprint(a)
    with pytest.raises(Exception, match="not found"):
        model_fingerprint(tmp_path / "missing")


def test_fingerprint_of_a_large_file_reads_its_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "LARGE_FILE", 1000)
    monkeypatch.setattr(cache_module, "EDGE_BYTES", 100)
    weights = bytes(range(256)) * 8  # 2048 bytes: "large"
    a = write_model_dir(tmp_path / "a", weights)
    first = model_fingerprint(a)
    for position, seen in ((10, True), (2040, True), (1000, False)):  # head, tail, middle
        changed = bytearray(weights)
        changed[position] ^= 1
        (a / "model.safetensors").write_bytes(bytes(changed))
        assert (model_fingerprint(a) != first) == seen, position
    (a / "model.safetensors").write_bytes(weights + b"\0")  # the size counts
    assert model_fingerprint(a) != first


def test_fingerprint_of_an_adapter_covers_its_base(tmp_path):
    base = write_model_dir(tmp_path / "base", b"base weights")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "lmforge_adapter.json").write_text(json.dumps({"format": 1, "base_model": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    first = model_fingerprint(adapter)
    (base / "model.safetensors").write_bytes(b"base weights, retrained")
    assert model_fingerprint(adapter) != first


def test_open_cache_specs(tmp_path):
    assert open_cache("", tmp_path) is None and open_cache("off", tmp_path) is None
    default = open_cache("sqlite", tmp_path / "cache")
    assert isinstance(default, SqliteCache) and default.path == tmp_path / "cache" / "responses.sqlite"
    named = open_cache(f"sqlite:{tmp_path / 'x.any'}", tmp_path)
    bare = open_cache(str(tmp_path / "y.db"), tmp_path)
    assert named.path.name == "x.any" and bare.path.name == "y.db"
    for opened in (default, named, bare):
        opened.close()
    for spec in ("memcached://h:1", "sqlite:", "cache.json", "redis://", "redis://host", "redis://h:x",
                 "redis://h:1/db", "redis://h:99999"):
        with pytest.raises(ConfigError, match="cache '"):
            open_cache(spec, tmp_path)
    with pytest.raises(ConfigError, match="cannot open"):
        open_cache(f"sqlite:{tmp_path}", tmp_path)  # a directory
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cache 'redis://127\.0\.0\.1:\d+': cannot reach Redis"):
        open_cache(f"redis://127.0.0.1:{free_port()}", tmp_path)
    assert time.monotonic() - started < 5


def start_redis() -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server on a free local port (no persistence); skips when the package is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"redis://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited with code {process.returncode}")
            time.sleep(0.05)
    process.kill()
    pytest.fail("redis-server did not listen within 10 s")


def stop_redis(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def redis_url():
    process, url = start_redis()
    yield url
    stop_redis(process)


def test_redis_round_trip_namespace_and_ttl(redis_url, tmp_path):
    import redis

    cache = open_cache(redis_url + "/1", tmp_path, ttl_s=60)
    assert isinstance(cache, RedisCache) and cache.get("k") is None
    cache.put("k", RESPONSE)
    assert cache.get("k") == RESPONSE and (cache.hits, cache.misses, cache.entries) == (1, 1, 1)
    raw = redis.Redis.from_url(redis_url + "/1")
    assert raw.keys("*") == [b"lmforge:cache:k"] and 0 < raw.ttl("lmforge:cache:k") <= 60
    raw.set("other:app:key", "x")  # another application's key is not an entry
    again = RedisCache(redis_url + "/1", ttl_s=0)  # a second server process sees the same entries
    assert again.get("k") == RESPONSE and again.entries == 1
    again.put("forever", {"x": 1})
    assert raw.ttl("lmforge:cache:forever") == -1  # ttl 0: no expiry
    assert RedisCache(redis_url + "/2").get("k") is None  # another DB, another cache
    for opened in (cache, again):
        opened.close()
    raw.flushdb()
    raw.close()


def test_redis_going_away_reads_as_a_miss():
    process, url = start_redis()
    try:
        cache = RedisCache(url)
        cache.put("k", {"x": 1})
        assert cache.get("k") == {"x": 1}
    finally:
        stop_redis(process)
    assert cache.get("k") is None and cache.errors == 1 and cache.misses == 1
    cache.put("k", {"x": 2})
    assert cache.errors == 2 and cache.entries == 0
    cache.close()


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A hashed bag-of-words embedding (64 dims): prompts sharing most words are close."""
    vectors = np.zeros((len(texts), 64), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def test_semantic_hit_above_and_miss_below_the_threshold():
    semantic = SemanticCache(bag_of_words)  # threshold 0.95
    question = "what is the capital city of france today please tell me"
    semantic.add("scope", question, RESPONSE)
    near = "please tell me what is the capital city of france today"  # the same words: cosine 1
    response, similarity = semantic.lookup("scope", near)
    assert response == RESPONSE and similarity == pytest.approx(1.0, abs=1e-5)
    partly = "what is the capital city of spain today please tell me"  # one word of eleven differs
    cosine = float(bag_of_words([question])[0] @ bag_of_words([partly])[0])
    assert 0.8 < cosine < 0.95
    assert semantic.lookup("scope", partly) is None
    assert SemanticCache(bag_of_words, threshold=cosine - 1e-4).lookup("scope", partly) is None  # empty cache
    loose = SemanticCache(bag_of_words, threshold=cosine - 1e-4)
    loose.add("scope", question, RESPONSE)
    assert loose.lookup("scope", partly)[1] == pytest.approx(cosine, abs=1e-5)
    assert (semantic.hits, semantic.misses, semantic.entries) == (1, 1, 1)


def test_semantic_scopes_are_isolated_and_entries_bounded():
    semantic = SemanticCache(bag_of_words, threshold=0.95, max_entries=2)
    semantic.add("model-a temperature 0", "the cat sat", {"answer": "a"})
    assert semantic.lookup("model-b temperature 0", "the cat sat") is None
    semantic.add("model-b temperature 0", "the cat sat", {"answer": "b"})
    semantic.add("model-b temperature 0", "the cat sat", {"answer": "b2"})  # the same text: replaced
    assert semantic.entries == 2
    assert semantic.lookup("model-a temperature 0", "the cat sat")[0] == {"answer": "a"}
    semantic.add("model-c temperature 0", "a dog ran", {"answer": "c"})  # evicts model-b's, the least recent
    assert semantic.entries == 2 and semantic.lookup("model-b temperature 0", "the cat sat") is None
    with pytest.raises(ConfigError, match="threshold"):
        SemanticCache(bag_of_words, threshold=1.5)
    exact = SemanticCache(bag_of_words, threshold=1.0)  # a text's own float32 cosine may fall a hair short of 1
    exact.add("s", "the quick brown fox jumps over the lazy dog", {"answer": "fox"})
    assert exact.lookup("s", "the quick brown fox jumps over the lazy dog")[0] == {"answer": "fox"}


def test_semantic_persistence_across_restarts(tmp_path):
    path = tmp_path / "semantic.sqlite"
    semantic = SemanticCache(bag_of_words, path=path, embedder="bow-64")
    semantic.add("s", "the cat sat on the mat", {"answer": 1})
    semantic.add("s", "a dog is a friend", {"answer": 2})
    semantic.close()
    reopened = SemanticCache(bag_of_words, path=path, embedder="bow-64", max_entries=1)
    assert reopened.entries == 1  # the most recent one kept
    assert reopened.lookup("s", "a friend is a dog")[0] == {"answer": 2}
    reopened.close()
    assert SemanticCache(bag_of_words, path=path, embedder="another-model").entries == 0


def test_semantic_parts_split_prompt_from_scope():
    chat = {**BODY, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    scope, text = semantic_parts("f", CHAT, chat)
    assert text == "hi"
    other = {**chat, "messages": [chat["messages"][0], {"role": "user", "content": "hello there"}]}
    assert semantic_parts("f", CHAT, other) == (scope, "hello there")  # only the last user text differs
    assert semantic_parts("f", CHAT, {**other, "max_tokens": 9})[0] != scope
    assert semantic_parts("g", CHAT, chat)[0] != scope
    assert semantic_parts("f", CHAT, {**chat, "messages": [{"role": "assistant", "content": "x"}]}) is None
    completion = {"model": "tiny", "prompt": ["the cat"], "temperature": 0}
    assert semantic_parts("f", "/v1/completions", completion)[1] == "the cat"
    assert semantic_parts("f", "/v1/completions", {**completion, "prompt": [1, 2]}) is None
    assert semantic_parts("f", "/v1/completions", {**completion, "echo": True}) is None


def test_replay_stream_and_metrics():
    fresh = replayed(RESPONSE, "alias")
    assert fresh["id"].startswith("chatcmpl-") and fresh["id"] != RESPONSE["id"] and fresh["model"] == "alias"
    assert fresh["choices"] == RESPONSE["choices"] and RESPONSE["model"] == "tiny"
    chunks = stream_chunks(fresh)
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""},
                                                          {"content": "sat on the mat"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[0]["object"] == "chat.completion.chunk"
    text = {**RESPONSE, "object": "text_completion",
            "choices": [{"index": 0, "text": "sat", "logprobs": None, "finish_reason": "length"}]}
    assert [c["choices"][0]["text"] for c in stream_chunks(text)] == ["sat"]
    semantic = SemanticCache(bag_of_words)
    semantic.lookup("s", "x")
    lines = metric_lines([semantic])
    assert 'lmforge_cache_misses_total{kind="semantic"} 1' in lines
    assert "# TYPE lmforge_cache_entries gauge" in lines


def test_a_redis_password_stays_out_of_messages(tmp_path):
    with pytest.raises(ConfigError) as caught:
        open_cache(f"redis://:hunter2@127.0.0.1:{free_port()}", tmp_path)
    assert "hunter2" not in str(caught.value) and ":***@127.0.0.1" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        open_cache("redis://:hunter2@127.0.0.1:1/x", tmp_path)
    assert "hunter2" not in str(caught.value)

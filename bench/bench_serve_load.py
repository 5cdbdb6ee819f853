"""Serving under load and faults: C concurrent streaming clients against `lmforge serve` for D seconds, then the
same requests one at a time, then checks that the server went back to idle and that SIGTERM drains what is in flight.

    python bench/bench_serve_load.py [--clients 64] [--duration 60] [--size small] [--no_record]

The model is bench_engine's `--size` shape (small: 6.5M parameters) with RANDOM weights and a BPE tokenizer
(vocabulary 4,096, chat template) trained on the standard library's docstrings, built once into `--cache_dir`.
Random weights are fine for speed: a request generates max_tokens tokens unless it samples the stop token
(about 1 in 4,096 per token). The server is a subprocess (`python -m lmforge serve`) with `--threads` torch threads.

Each client loops until the deadline: a streamed /v1/chat/completions (or /v1/completions) request whose prompt is a
docstring passage of log-normal length (median 40 words) and whose max_tokens is uniform in [--min_tokens,
--max_tokens], temperature 0.8, a per-request seed; request i is the same in every run (seeded). Every
--disconnect_every-th request reads a few tokens and closes its connection on purpose (counted apart, not a failure).
A failure is a non-200 status, an exception, an error event, or a stream without a finish_reason and [DONE].
TTFT = from sending to the first non-empty content delta; ITL = the gaps between content deltas. Throughput =
tokens generated (the server's lmforge_generation_tokens_total) / wall time, concurrent against sequential.
Every second the server's RSS and /metrics (running sequences, KV-cache usage, queue depth) are sampled; memory is
flat when the RSS at the end of the load exceeds the RSS after --warmup seconds of it by at most --rss_tolerance_mib.
The client shares the machine with the server: on few cores its own event loop adds to the latencies it measures.
Exits 1 when a check fails; appends one JSON line with the figures and the conditions to bench/results_serve.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ENGINE_MODELS  # noqa: E402
from common import conditions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_serve.jsonl"
MARKER = "bench_serve.json"  # written last into a cached model dir: the recipe it was built from


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int
    seed: int
    disconnect_after: int = 0  # close the stream after this many content deltas (0: read to the end)


@dataclass
class Record:
    """One request as its client saw it; times are time.perf_counter() seconds."""

    ok: bool = False  # a finish_reason and [DONE] came
    disconnected: bool = False  # the client hung up on purpose
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # when each non-empty content delta came

    @property
    def ttft(self) -> Optional[float]:
        return self.arrivals[0] - self.start if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def build_model(size: str, cache_dir: Path) -> tuple[Path, int]:
    """A model dir of bench_engine's `size` shape with random weights (seed 0) and a chat-ready tokenizer trained
    on the stdlib docstrings, and its parameter count; reused when cache_dir holds one of the same recipe."""
    import torch

    from lmforge.data.corpora import iter_stdlib_docstrings
    from lmforge.io import atomic_write_json
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    directory = cache_dir / f"serve-{size}"
    recipe = {"size": size, "shape": asdict(ENGINE_MODELS[size]), "tokenizer": "stdlib-docstrings/4096", "seed": 0}
    if (directory / MARKER).is_file():
        built = json.loads((directory / MARKER).read_text())
        if built.get("recipe") == recipe:
            return directory, built["params"]
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.train([d.text for d in iter_stdlib_docstrings()], vocab_size=4096)
    torch.manual_seed(0)
    model = Transformer(replace(ENGINE_MODELS[size], vocab_size=tokenizer.vocab_size))
    model.save(directory)
    tokenizer.save(directory)
    atomic_write_json(directory / MARKER, {"recipe": recipe, "params": model.num_parameters()})
    return directory, model.num_parameters()


def prompt_pool(model_dir: Path, n: int = 256, seed: int = 0, max_prompt_tokens: int = 600) -> list[str]:
    """n docstring passages of log-normal word counts (median 40, sigma 0.8, 3 to 400 words), each cut to at most
    max_prompt_tokens tokens so that prompt + output fit the context."""
    from lmforge.data.corpora import iter_stdlib_docstrings
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir)
    words = " ".join(d.text for d in iter_stdlib_docstrings()).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = int(min(400, max(3, round(rng.lognormvariate(3.69, 0.8)))))  # exp(3.69) = 40
        start = rng.randrange(len(words) - length)
        passage = words[start:start + length]
        while len(tokenizer.encode(" ".join(passage))) > max_prompt_tokens:
            passage = passage[: len(passage) * 3 // 4]
        prompts.append(" ".join(passage))
    return prompts


class LoadClient:
    """The benchmark's side of the wire: seeded requests, streamed and timed, and /metrics read back."""

    def __init__(self, client: httpx.AsyncClient, url: str, model: str, prompts: list[str],
                 args: argparse.Namespace) -> None:
        self.client, self.url, self.model, self.prompts, self.args = client, url, model, prompts, args

    def spec(self, i: int, disconnects: bool = True) -> RequestSpec:
        """Request number i of the run: the same prompt, max_tokens and seed in every run of the same --seed."""
        args = self.args
        rng = random.Random(args.seed * 1_000_003 + i)
        spec = RequestSpec(rng.choice(self.prompts), rng.randint(args.min_tokens, args.max_tokens),
                           rng.randrange(2**31))
        if disconnects and args.disconnect_every and i % args.disconnect_every == args.disconnect_every - 1:
            spec.disconnect_after = rng.randint(1, max(1, min(8, spec.max_tokens - 1)))
        return spec

    async def stream(self, spec: RequestSpec, first_token: Optional[asyncio.Event] = None) -> Record:
        """Send one streamed request and time it; `first_token` (if given) is set at its first content delta."""
        chat = self.args.endpoint == "chat"
        body: dict[str, Any] = {"model": self.model, "max_tokens": spec.max_tokens, "seed": spec.seed,
                                "temperature": self.args.temperature, "stream": True}
        body.update({"messages": [{"role": "user", "content": spec.prompt}]} if chat else {"prompt": spec.prompt})
        record, finish, done = Record(start=time.perf_counter()), None, False
        try:
            path = "/v1/chat/completions" if chat else "/v1/completions"
            async with self.client.stream("POST", self.url + path, json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return record
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                        break
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        record.error = f"error event: {event['error']}"
                        return record
                    choice = event["choices"][0]
                    finish = choice.get("finish_reason") or finish
                    if choice["delta"].get("content") if chat else choice.get("text"):
                        record.arrivals.append(time.perf_counter())
                        if first_token is not None:
                            first_token.set()
                        if spec.disconnect_after and len(record.arrivals) >= spec.disconnect_after and not finish:
                            record.disconnected = True  # leaving the block closes the connection mid-stream
                            return record
        except Exception as exc:  # any exception is a failed request: counted, and the client goes on
            record.error = f"{type(exc).__name__}: {exc}"
            return record
        finally:
            record.end = time.perf_counter()
        record.ok = done and finish is not None
        record.error = "" if record.ok else f"stream ended without {'a finish_reason' if done else '[DONE]'}"
        return record

    async def metrics(self) -> dict[str, float]:
        """/metrics as {metric name: value}, summed over label sets (one model is served)."""
        values: dict[str, float] = {}
        for line in (await self.client.get(self.url + "/metrics")).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
        return values

    async def sample(self, pid: int, samples: list[dict[str, float]], origin: float) -> None:
        """Append {t, rss_mib, running, kv_usage, queue} once a second until cancelled."""
        process = psutil.Process(pid)
        while True:
            try:
                m = await self.metrics()
                samples.append({"t": time.perf_counter() - origin, "rss_mib": process.memory_info().rss / 2**20,
                                "running": m["lmforge_running_sequences"], "kv_usage": m["lmforge_kv_cache_usage"],
                                "queue": m["lmforge_queue_depth"]})
            except (httpx.HTTPError, psutil.Error, KeyError):
                pass  # one missed sample; the figures use the others
            await asyncio.sleep(1.0)

    async def load(self) -> tuple[list[Record], float]:
        """--clients loops of streamed requests until --duration has passed (each finishes its last request);
        returns the records and the wall time until the last client finished."""
        counter, records = iter(range(10**9)), []
        start = time.perf_counter()

        async def one_client() -> None:
            while time.perf_counter() - start < self.args.duration:
                records.append(await self.stream(self.spec(next(counter))))

        await asyncio.gather(*(one_client() for _ in range(self.args.clients)))
        return records, time.perf_counter() - start

    async def sequential(self) -> tuple[list[Record], float]:
        """Requests 0, 1, 2, ... of the run served one at a time (no deliberate disconnects), until
        --sequential_requests are done or, when it is 0, --sequential_duration seconds have passed."""
        records: list[Record] = []
        start, wanted = time.perf_counter(), self.args.sequential_requests
        while len(records) < wanted if wanted else time.perf_counter() - start < self.args.sequential_duration:
            records.append(await self.stream(self.spec(len(records), disconnects=False)))
        return records, time.perf_counter() - start

    async def back_to_idle(self, idle_kv: float, timeout: float = 30.0) -> tuple[bool, dict[str, float]]:
        """Whether /metrics shows no running or waiting sequence and the idle KV usage within `timeout` s."""
        deadline = time.perf_counter() + timeout
        while True:
            m = {k: v for k, v in (await self.metrics()).items()
                 if k in ("lmforge_running_sequences", "lmforge_queue_depth", "lmforge_kv_cache_usage")}
            idle = (m["lmforge_running_sequences"] == 0 and m["lmforge_queue_depth"] == 0
                    and m["lmforge_kv_cache_usage"] <= idle_kv)
            if idle or time.perf_counter() > deadline:
                return idle, {k.removeprefix("lmforge_"): v for k, v in m.items()}
            await asyncio.sleep(0.25)

    async def sigterm_drain(self, process: subprocess.Popen) -> dict[str, Any]:
        """Start --drain_requests long streams, SIGTERM the server once each has a token, and check that every
        one ends with [DONE], that tokens still came after the signal, and that the server exits 0 within
        --drain_timeout seconds."""
        args = self.args
        started = [asyncio.Event() for _ in range(args.drain_requests)]
        tasks = [asyncio.create_task(self.stream(RequestSpec(self.prompts[i], args.drain_tokens, 10_000 + i), e))
                 for i, e in enumerate(started)]
        for task, event in zip(tasks, started):  # a request that fails before its first token must not block
            task.add_done_callback(lambda _, e=event: e.set())
        await asyncio.gather(*(e.wait() for e in started))
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        done, pending = await asyncio.wait(tasks, timeout=args.drain_timeout)
        for task in pending:
            task.cancel()
        records = [t.result() if t in done else Record(error="still streaming after --drain_timeout") for t in tasks]
        left = max(1.0, args.drain_timeout - (time.perf_counter() - signalled))
        try:
            code = await asyncio.get_running_loop().run_in_executor(None, process.wait, left)
        except subprocess.TimeoutExpired:
            code = None
        after = [sum(t > signalled for t in r.arrivals) for r in records]  # tokens that came after the signal
        return {"requests": len(records), "completed": sum(r.ok for r in records), "tokens_after_sigterm": after,
                "errors": [r.error for r in records if not r.ok], "exit_code": code,
                "exit_s": time.perf_counter() - signalled,
                "ok": all(r.ok for r in records) and code == 0 and any(a > 0 for a in after)}


def latency_ms(records: list[Record]) -> dict[str, Optional[float]]:
    """TTFT and ITL p50/p99 in milliseconds over the completed requests (linear interpolation between ranks)."""
    out = {}
    for name, values in (("ttft", [r.ttft for r in records if r.ok and r.ttft is not None]),
                         ("itl", [g for r in records if r.ok for g in r.gaps])):
        cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
        out.update({f"{name}_p{q}_ms": cuts[q - 1] * 1000 if cuts else None for q in (50, 99)})
    return out


def start_server(model_dir: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int]:
    """`python -m lmforge serve MODEL_DIR` on a free port with --threads torch threads, its stderr to `log`;
    returns once /health answers (raising with the log's tail if it exits or takes over two minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port),
               "--max_seqs", str(args.max_seqs), "--max_tokens_limit", str(max(args.max_tokens, args.drain_tokens))]
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                   cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, port
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"lmforge serve did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)


async def run(args: argparse.Namespace, model_dir: Path, process: subprocess.Popen, port: int) -> dict[str, Any]:
    """The phases in order: warm-up, concurrent load, back to idle, sequential, SIGTERM; returns the figures."""
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=30.0), limits=limits) as http:
        bench = LoadClient(http, f"http://127.0.0.1:{port}", model_dir.name, prompt_pool(model_dir, seed=args.seed),
                           args)
        for i in range(2):  # one-time costs (first prefill, allocator warm-up) stay out of the figures
            await bench.stream(bench.spec(i, disconnects=False))
        idle_kv = (await bench.metrics())["lmforge_kv_cache_usage"]
        samples: list[dict[str, float]] = []
        origin = time.perf_counter()
        sampler = asyncio.create_task(bench.sample(process.pid, samples, origin))
        await asyncio.sleep(1.1)  # an idle sample before the load
        generated = (await bench.metrics())["lmforge_generation_tokens_total"]
        load_start = time.perf_counter() - origin
        records, load_s = await bench.load()
        load_end = time.perf_counter() - origin
        concurrent_tokens = (await bench.metrics())["lmforge_generation_tokens_total"] - generated
        idle_ok, idle_state = await bench.back_to_idle(idle_kv)
        generated = (await bench.metrics())["lmforge_generation_tokens_total"]
        seq_records, seq_s = await bench.sequential()
        sequential_tokens = (await bench.metrics())["lmforge_generation_tokens_total"] - generated
        sampler.cancel()
        drain = await bench.sigterm_drain(process)

    during = [s for s in samples if load_start <= s["t"] <= load_end] or samples
    rss_start = next((s["rss_mib"] for s in reversed(samples) if s["t"] < load_start), during[0]["rss_mib"])
    warm = next((s["rss_mib"] for s in during if s["t"] >= load_start + args.warmup), during[-1]["rss_mib"])
    ok = [r for r in records if r.ok]
    concurrent_tok_s, sequential_tok_s = concurrent_tokens / load_s, sequential_tokens / seq_s
    result = {
        "bench": "serve_load", "model": args.size, "weights": "random", "endpoint": args.endpoint,
        "clients": args.clients, "duration_s": args.duration, "load_wall_s": load_s, "max_seqs": args.max_seqs,
        "requests": len(records), "ok": len(ok), "failed": sum(not r.ok and not r.disconnected for r in records),
        "disconnected": sum(r.disconnected for r in records),
        "failures": sorted({r.error for r in records if not r.ok and not r.disconnected})[:10],
        **latency_ms(records), "client_tokens": sum(len(r.arrivals) for r in ok),
        "concurrent_tokens": concurrent_tokens, "concurrent_tok_s": concurrent_tok_s,
        "sequential_requests": len(seq_records), "sequential_failed": sum(not r.ok for r in seq_records),
        "sequential_tokens": sequential_tokens, "sequential_wall_s": seq_s, "sequential_tok_s": sequential_tok_s,
        "ratio": concurrent_tok_s / sequential_tok_s if sequential_tok_s else None,
        **{f"sequential_{k}": v for k, v in latency_ms(seq_records).items()},
        "rss_start_mib": rss_start, "rss_after_warmup_mib": warm, "rss_peak_mib": max(s["rss_mib"] for s in during),
        "rss_end_mib": during[-1]["rss_mib"], "rss_growth_mib": during[-1]["rss_mib"] - warm,
        "warmup_s": args.warmup, "samples": len(during), "peak_running": max(s["running"] for s in during),
        "peak_queue": max(s["queue"] for s in during), "peak_kv_usage": max(s["kv_usage"] for s in during),
        "idle_after_load": idle_state, "drain": drain}
    result["checks"] = {"no_failed_requests": result["failed"] == 0 and result["sequential_failed"] == 0,
                        "memory_flat": result["rss_growth_mib"] <= args.rss_tolerance_mib,
                        "idle_after_load": idle_ok, "sigterm_drains": drain["ok"]}
    return result


def print_table(r: dict[str, Any]) -> None:
    def ms(key: str) -> str:
        return " / ".join("n/a" if r[f"{p}{key}_p{q}_ms"] is None else f"{r[f'{p}{key}_p{q}_ms']:,.1f}"
                          for p in ("", "sequential_") for q in (50, 99))

    drain, idle = r["drain"], r["idle_after_load"]
    rows = [
        ("model", f"{r['model']} ({r['params'] / 1e6:.1f}M params, RANDOM weights), {r['endpoint']}, streamed"),
        ("load", f"{r['clients']} clients for {r['duration_s']:g} s ({r['load_wall_s']:.1f} s until the last "
                 f"finished), max_seqs {r['max_seqs']}, server threads {r['conditions']['threads']}"),
        ("requests ok / failed / disconnected", f"{r['ok']} / {r['failed']} / {r['disconnected']}"
         + (f" (failures: {'; '.join(r['failures'])})" if r["failures"] else "")),
        ("TTFT p50 / p99 under load / alone (ms)", ms("ttft")),
        ("ITL p50 / p99 under load / alone (ms)", ms("itl")),
        ("generated tok/s concurrent / sequential",
         f"{r['concurrent_tok_s']:,.1f} ({r['concurrent_tokens']:.0f} tokens) / {r['sequential_tok_s']:,.1f} "
         f"({r['sequential_requests']} requests, {r['sequential_tokens']:.0f} tokens, {r['sequential_wall_s']:.1f} s)"
         f": {r['ratio'] or 0:.2f}x"),
        ("server RSS start / after warm-up / peak / end (MiB)",
         f"{r['rss_start_mib']:.0f} / {r['rss_after_warmup_mib']:.0f} / {r['rss_peak_mib']:.0f} / "
         f"{r['rss_end_mib']:.0f}; growth after {r['warmup_s']:g} s: {r['rss_growth_mib']:+.1f}"),
        ("peak running / queue / KV usage",
         f"{r['peak_running']:.0f} / {r['peak_queue']:.0f} / {r['peak_kv_usage']:.1%} ({r['samples']} samples)"),
        ("after the load", f"running {idle['running_sequences']:.0f}, queue {idle['queue_depth']:.0f}, "
                           f"KV usage {idle['kv_cache_usage']:.1%}"),
        ("SIGTERM with streams in flight", f"{drain['completed']}/{drain['requests']} ended with [DONE] (tokens "
         f"after the signal: {drain['tokens_after_sigterm']}); exit code {drain['exit_code']} after "
         f"{drain['exit_s']:.1f} s" + (f"; {'; '.join(drain['errors'])}" if drain["errors"] else "")),
    ]
    rows += [(f"check: {name}", "PASS" if passed else "FAIL") for name, passed in r["checks"].items()]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--clients", type=int, default=64, help="concurrent streaming clients")
    add("--duration", type=float, default=60.0, help="seconds the clients keep sending")
    add("--size", choices=sorted(ENGINE_MODELS), default="small", help="bench_engine's model shape")
    add("--endpoint", choices=("chat", "completions"), default="chat")
    add("--min_tokens", type=int, default=16, help="each request's max_tokens is drawn from [min, max]")
    add("--max_tokens", type=int, default=128)
    add("--temperature", type=float, default=0.8)
    add("--disconnect_every", type=int, default=16, help="every Nth request hangs up mid-stream (0: none)")
    add("--sequential_requests", type=int, default=0,
        help="requests served one at a time (0: as many as --sequential_duration allows)")
    add("--sequential_duration", type=float, default=20.0)
    add("--warmup", type=float, default=None, help="seconds of load before the RSS baseline (default: duration/4)")
    add("--rss_tolerance_mib", type=float, default=32.0, help="RSS growth after the warm-up that still is flat")
    add("--drain_requests", type=int, default=4, help="streams in flight when SIGTERM is sent")
    add("--drain_tokens", type=int, default=256, help="max_tokens of those streams")
    add("--drain_timeout", type=float, default=60.0, help="seconds for them to end and the server to exit")
    add("--max_seqs", type=int, default=64, help="the server's --max_seqs")
    # the clients need a core too: on 2 cores, torch threads on both made the server 2x slower, in bursts
    add("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
        help="the server's torch threads (default: all cores but one, left to the clients)")
    add("--seed", type=int, default=0)
    add("--cache_dir", default=None, help="where the model dir is built (default: $LMFORGE_CACHE or ~/.cache/lmforge)")
    add("--json", default=str(RESULTS), help="the JSON-lines file the result is appended to")
    add("--no_record", action="store_true", help="print only, append nothing (trial runs)")
    args = parser.parse_args()
    if min(args.clients, args.drain_requests, args.threads, args.max_seqs) < 1 or args.duration <= 0:
        parser.error("--clients, --drain_requests, --threads and --max_seqs must be >= 1, --duration > 0")
    if not 1 <= args.min_tokens <= args.max_tokens or args.disconnect_every < 0:
        parser.error(f"--min_tokens {args.min_tokens}, --max_tokens {args.max_tokens}: expected 1 <= min <= max; "
                     f"--disconnect_every {args.disconnect_every}: expected >= 0")
    args.warmup = args.duration / 4 if args.warmup is None else args.warmup
    cache = Path(args.cache_dir or os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    model_dir, params = build_model(args.size, cache / "bench_serve")
    log = model_dir.parent / "serve.log"
    process, port = start_server(model_dir, args, log)
    print(f"serving {model_dir} (random weights) on port {port}, pid {process.pid}; its log: {log}", flush=True)
    try:
        result = asyncio.run(run(args, model_dir, process, port))
    finally:
        if process.poll() is None:  # only when a phase failed before the SIGTERM one
            process.kill()
            process.wait()
    result["params"] = params
    result["conditions"] = {**conditions(), "threads": args.threads, "clients": "asyncio + httpx in one process",
                            "httpx": httpx.__version__}
    result["passed"] = all(result["checks"].values())
    print_table(result)
    if not args.no_record:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()

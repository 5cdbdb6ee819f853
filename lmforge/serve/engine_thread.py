"""EngineThread: one model's Engine stepped by a thread of its own, with requests coming from an asyncio server.

The engine is not thread-safe, so only this thread touches it. The HTTP handlers never wait for it: they post
commands (add a request, abort one) to an inbox the thread drains between steps, and a new request's id (or the
engine's error for a bad one) comes back through a future the handler awaits. The thread sleeps while the engine
has nothing to do and wakes when a command comes. Each request's outputs are handed to an asyncio.Queue on the loop
that asked for them (call_soon_threadsafe); the last item for a request is (its Completions, the engine's Request),
or the exception that stopped the engine. `stats()` reads a snapshot the thread refreshes after each step, so
/metrics never waits for a step either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue as thread_queue
import threading
from typing import Any, Optional, Sequence

from lmforge.errors import LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.engine import Engine


class EngineThread:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: thread_queue.SimpleQueue = thread_queue.SimpleQueue()
        self.work = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.snapshot = engine.stats()
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.thread.start()

    async def submit(self, prompt: Sequence[int], cfg: GenerationConfig, n: int = 1,
                     eos_id: Optional[Sequence[int]] = None, **options: Any) -> tuple[str, asyncio.Queue]:
        """Add a request (raising the engine's errors for a bad one); return its id and its output queue.
        `options`: the engine's logprobs / prompt_logprobs / constraint options."""
        outputs: asyncio.Queue = asyncio.Queue()
        added: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("add", (list(prompt), cfg, n, eos_id, options, asyncio.get_running_loop(), outputs), added))
        self.work.set()
        try:
            return await asyncio.wrap_future(added), outputs
        except asyncio.CancelledError:  # the client left while the request was being added: abort it once added
            added.add_done_callback(lambda f: f.cancelled() or f.exception() or self.abort(f.result()))
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request (a client that went away): its sequences leave the batch and free their blocks."""
        self.queues.pop(request_id, None)
        self.inbox.put(("abort", request_id, None))
        self.work.set()

    def stop(self) -> None:
        """End the thread; a request still waiting (the server drains them first) gets an error, not a hang."""
        self.stopping = True
        self.work.set()
        self.thread.join(timeout=10)
        self._fail_all(LmforgeError("the server stopped before this request finished"))

    def stats(self) -> dict[str, Any]:
        return self.snapshot

    def _run(self) -> None:
        while not self.stopping:
            self.work.wait()
            self.work.clear()
            try:
                self._drain_inbox()
                while self.engine.has_unfinished() and not self.stopping:
                    self._deliver(self.engine.step())
                    self.snapshot = self.engine.stats()
                    self._drain_inbox()
            except Exception as error:  # a bug, or the device failing: every waiting client gets it, the thread
                self._fail_all(error)    # lives on for the next requests
            self.snapshot = self.engine.stats()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, payload, future = self.inbox.get_nowait()
            except thread_queue.Empty:
                return
            if command == "abort":
                self.engine.abort(payload)
                continue
            prompt, cfg, n, eos_id, options, loop, outputs = payload
            if not future.set_running_or_notify_cancel():  # its client already left
                continue
            try:
                request_id = self.engine.add_request(prompt, cfg, n=n, eos_id=eos_id, **options)
            except Exception as error:  # the request's own fault (too long, bad options): its caller gets it
                future.set_exception(error)
                continue
            self.queues[request_id] = (loop, outputs)
            future.set_result(request_id)

    def _deliver(self, outputs: list[Any]) -> None:
        finished = set()
        for out in outputs:
            self._send(out.request_id, out)
            request = self.engine.requests.get(out.request_id)
            if request is not None and request.finished:
                finished.add(out.request_id)
        for request_id in finished:  # last item: (Completions, the engine's Request)
            request = self.engine.requests[request_id]
            self._send(request_id, (self.engine.completions(request_id), request))
            self.queues.pop(request_id, None)

    def _send(self, request_id: str, item: Any) -> None:
        target = self.queues.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.queues):
            self._send(request_id, error)
            self.engine.abort(request_id)
        self.queues.clear()
        for request_id in list(self.engine.requests):  # requests whose client already left
            self.engine.abort(request_id)


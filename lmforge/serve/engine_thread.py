"""EngineThread: one model's Engine stepped by a thread of its own, with requests coming from an asyncio server.

The engine is not thread-safe, so one lock guards it: the HTTP handlers add and abort requests under the lock,
the thread steps under it. The thread sleeps while the engine has nothing to do and wakes when a request comes.
Each request's outputs are handed to an asyncio.Queue on the loop that asked for them (call_soon_threadsafe); the
last item for a request is (its Completions, the engine's Request), or the exception that stopped the engine.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional, Sequence

from lmforge.infer.config import GenerationConfig
from lmforge.infer.engine import Engine


class EngineThread:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.work = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: Sequence[int], cfg: GenerationConfig, n: int = 1,
               eos_id: Optional[Sequence[int]] = None, **scores: Optional[int]) -> tuple[str, asyncio.Queue]:
        """Add a request (raising the engine's errors for a bad one); return its id and its output queue.
        `scores`: the engine's logprobs / prompt_logprobs options."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            request_id = self.engine.add_request(list(prompt), cfg, n=n, eos_id=eos_id, **scores)
            self.queues[request_id] = (asyncio.get_running_loop(), queue)
        self.work.set()
        return request_id, queue

    def abort(self, request_id: str) -> None:
        """Stop a request (a client that went away): its sequences leave the batch and free their blocks."""
        with self.lock:
            self.queues.pop(request_id, None)
            self.engine.abort(request_id)

    def stop(self) -> None:
        self.stopping = True
        self.work.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping:
            self.work.wait()
            with self.lock:
                if not self.engine.has_unfinished():
                    self.work.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as error:  # a bug, or the device failing: every waiting client gets it
                    self._fail_all(error)
                    continue
                finished = set()
                for out in outputs:
                    self._send(out.request_id, out)
                    if self.engine.requests.get(out.request_id) is not None and \
                            self.engine.requests[out.request_id].finished:
                        finished.add(out.request_id)
                for request_id in finished:  # last item: (Completions, the engine's Request)
                    request = self.engine.requests[request_id]
                    self._send(request_id, (self.engine.completions(request_id), request))
                    self.queues.pop(request_id, None)

    def _send(self, request_id: str, item: Any) -> None:
        target = self.queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.queues):
            self._send(request_id, error)
            self.engine.abort(request_id)
        self.queues.clear()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return self.engine.stats()

"""``AsyncLLMEngine``: one background thread drives an ``LLMEngine``; asyncio code streams its outputs.

Thread-safety model: only the engine thread touches the engine's state. Callers on the event loop validate
and tokenize a request themselves (``LLMEngine.make_request`` is pure), then hand it to the engine thread
through a ``queue.SimpleQueue`` of commands (add / abort). The engine thread drains the commands before
each ``step()`` and pushes every ``RequestOutput`` into the request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. Leaving the ``generate`` iterator early (client disconnect, task cancelled)
sends an abort, which frees the request's KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmforge.infer.engine import EngineStats, LLMEngine
from lmforge.infer.outputs import RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import QueueFullError
from lmforge.infer.sequence import SequenceGroup


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stop = False
        self._pending = 0  # requests handed over but not yet queued by the engine thread
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    # -- caller side (event loop) ----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs until it finishes. Raises ValueError (bad request) or
        QueueFullError (overloaded) before the first output."""
        group = self.make_request(prompt, params, request_id, add_special_tokens)
        async for out in self.stream(group):
            yield out

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> SequenceGroup:
        """Validate and tokenize (ValueError on bad input) and apply the admission limit (QueueFullError)."""
        group = self.engine.make_request(request_id, prompt, params, add_special_tokens)
        with self._lock:
            if len(self.engine.scheduler.waiting) + self._pending >= self.engine.config.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.engine.config.max_waiting} requests)")
            self._pending += 1
        return group

    async def stream(self, group: SequenceGroup) -> AsyncIterator[RequestOutput]:
        """Submit a request made by ``make_request`` and stream its outputs; leaving early aborts it."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[group.request_id] = stream
        self._send("add", group)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(group.request_id, None)
            if not finished:
                self._send("abort", group.request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def stats(self) -> EngineStats:
        """Counters read from the engine without locking (each value is individually consistent)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _send(self, kind: str, payload: object) -> None:
        self._commands.put((kind, payload))
        self._wakeup.set()

    # -- engine thread ------------------------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(payload, SequenceGroup)
                with self._lock:
                    self._pending -= 1
                if payload.request_id in self._streams:
                    try:
                        self.engine.add_request(payload)
                    except QueueFullError as err:
                        self._deliver(err, payload.request_id)
            else:
                self.engine.abort(str(payload))

    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=0.1)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a failed step fails its requests, not the server
                for request_id in list(self._streams):
                    self.engine.abort(request_id)
                    self._deliver(RuntimeError(f"engine step failed: {err}"), request_id)
                continue
            for out in outputs:
                self._deliver(out, out.request_id)

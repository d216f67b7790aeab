"""Drive the synchronous ``LLMEngine`` from asyncio: one engine thread, one output queue per request.

The engine is not thread-safe, so only the engine thread touches it. Request handlers post commands
(add, abort) to that thread and read ``RequestOutput``s from their own asyncio queue. The thread runs
``engine.step()`` while any request is unfinished and sleeps on an event otherwise, so an idle server
costs nothing.

``add_request`` waits until the engine accepted the request, so that a refusal (bad parameters, a full
queue) still becomes an HTTP error before a streaming response has sent its headers. A
:class:`RequestStream` that is closed, cancelled or simply dropped before its request finished aborts the
request in the engine, which frees its KV blocks at once: a client that disconnects costs nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lmforge.infer import EngineStats, LLMEngine, SamplingParams
from lmforge.infer.lora import LoraWeights
from lmforge.infer.outputs import RequestOutput
from lmforge.infer.sequence import SequenceGroup
from lmforge.serve.metrics import ServerMetrics
from lmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the requests it was serving cannot continue."""


class EngineUnavailable(EngineFailure):
    """The engine cannot serve now: its process died (the server restarts it) or the server is stopping.
    The server answers 503 (retrying later can succeed), not 500."""


@dataclass
class _Add:
    group: SequenceGroup
    accepted: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Adapter:
    """Load (``weights`` given) or unload a LoRA adapter on the engine thread."""

    name: str
    weights: LoraWeights | None
    done: asyncio.Future[None]


@dataclass
class _Delivery:
    """Where the engine thread puts one request's outputs (on the event loop's thread)."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput | BaseException]


class RequestStream:
    """The outputs of one engine request, step by step (``async for``), until it finishes."""

    def __init__(
        self, owner: _StreamOwner, request_id: str, outputs: asyncio.Queue, num_prompt_tokens: int
    ) -> None:
        self.request_id = request_id
        self.finished = False
        self._outputs = outputs
        self._metrics = owner.metrics
        self._arrival = time.perf_counter()
        self._first_token_seen = False
        # Runs once: on abort(), or when the stream is garbage-collected unfinished (a response body that
        # was never iterated because the client left first). It must not reference ``self``.
        self._abort = weakref.finalize(self, _abandon, owner, request_id)
        if self._metrics is not None:
            self._metrics.prompt_tokens.inc(num_prompt_tokens)

    def abort(self) -> None:
        """Stop the request if it is still running (idempotent)."""
        self._abort()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._outputs.get()
        except BaseException:
            self.abort()  # cancelled while waiting: nobody will read the rest
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self._abort.detach()  # the engine already dropped it
            raise item
        if item.finished:
            self.finished = True
            self._abort.detach()
        self._observe(item)
        return item

    def _observe(self, output: RequestOutput) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        new_tokens = sum(len(o.new_token_ids) for o in output.outputs)
        metrics.observe_tokens(new_tokens)
        now = time.perf_counter()
        if new_tokens and not self._first_token_seen:
            self._first_token_seen = True
            metrics.time_to_first_token.observe(now - self._arrival)
        if output.finished:
            metrics.e2e_latency.observe(now - self._arrival)
            for completion in output.outputs:
                metrics.completions_finished.labels(completion.finish_reason or "unknown").inc()


class _StreamOwner(Protocol):
    """What a :class:`RequestStream` needs of its engine bridge (``AsyncEngine`` or ``ProcessEngine``)."""

    metrics: ServerMetrics | None

    def _abort(self, request_id: str) -> None: ...


def _abandon(owner: _StreamOwner, request_id: str) -> None:
    if owner.metrics is not None:
        owner.metrics.requests_aborted.inc()
    owner._abort(request_id)


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, metrics: ServerMetrics | None = None, idle_wait_s: float = 1.0
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[_Add | _Abort | _Adapter] = queue.SimpleQueue()
        self._lora_names = list(engine.lora_names)  # read by the event loop; written by the engine thread
        self._wake = threading.Event()
        self._deliveries: dict[str, _Delivery] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._stats = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool holds in all (block 0 is the engine's padding block)."""
        blocks = self.engine.block_manager
        return (blocks.num_blocks - 1) * blocks.block_size

    @property
    def model_config(self) -> Any:
        """The served model's config (what an adapter loader checks an adapter against)."""
        return self.engine.model.cfg

    @property
    def unavailable_reason(self) -> str | None:
        """Why the engine cannot take requests now; None: the engine thread serves as long as the server."""
        return None

    @property
    def num_active(self) -> int:
        """Requests accepted and neither finished nor aborted (what admission control counts)."""
        with self._lock:
            return len(self._deliveries)

    def stats(self) -> EngineStats:
        """The engine's counters after its latest step (or idle check)."""
        return self._stats

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def lora_names(self) -> list[str]:
        return list(self._lora_names)

    async def add_lora(self, name: str, weights: LoraWeights) -> None:
        """Serve adapter ``name`` (applied between engine steps); raises ValueError if the engine refuses it."""
        await self._adapter_command(name, weights)

    async def remove_lora(self, name: str) -> None:
        """Stop serving adapter ``name``; KeyError if unknown, ValueError while requests use it."""
        await self._adapter_command(name, None)

    async def _adapter_command(self, name: str, weights: LoraWeights | None) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(_Adapter(name, weights, done))
        await done

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> RequestStream:
        """Hand a request to the engine; returns once the engine accepted it. Raises ``ValueError`` for
        parameters the engine refuses and ``QueueFullError`` when its waiting queue is full."""
        # make_request validates without touching scheduler state, so it may run on this thread.
        group = self.engine.make_request(request_id, prompt_token_ids, params, lora=lora)
        loop = asyncio.get_running_loop()
        delivery = _Delivery(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._deliveries:
                raise ValueError(f"request id {request_id!r} is already running")
            self._deliveries[request_id] = delivery
        accepted: asyncio.Future[None] = loop.create_future()
        self._post(_Add(group, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self._abort(request_id)
            raise
        return RequestStream(self, request_id, delivery.outputs, len(prompt_token_ids))

    # -- engine thread ---------------------------------------------------------------------------------

    def _post(self, command: _Add | _Abort | _Adapter) -> None:
        self._commands.put(command)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            active = self._deliveries.pop(request_id, None) is not None
        if active:
            self._post(_Abort(request_id))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, last: bool) -> None:
        with self._lock:
            delivery = self._deliveries.pop(request_id, None) if last else self._deliveries.get(request_id)
        if delivery is not None:  # None: the consumer left and its abort is queued
            _call_soon(delivery.loop, delivery.outputs.put_nowait, item)

    @staticmethod
    def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():  # the waiting handler was cancelled
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        _call_soon(future.get_loop(), settle)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                self.engine.abort(command.request_id)
                continue
            if isinstance(command, _Adapter):
                try:
                    if command.weights is not None:
                        self.engine.add_lora(command.name, command.weights)
                    else:
                        self.engine.remove_lora(command.name)
                except Exception as err:
                    self._settle(command.done, err)
                else:
                    self._lora_names = list(self.engine.lora_names)
                    self._settle(command.done, None)
                continue
            request_id = command.group.request_id
            with self._lock:
                wanted = request_id in self._deliveries
            if not wanted:  # cancelled (the future is done) or failed by _fail_all before the engine saw it
                self._settle(command.accepted, EngineFailure("the request was dropped before it started"))
                continue
            try:
                self.engine.add_request(command.group)
            except Exception as err:  # refused (QueueFullError): the handler turns it into a 429
                with self._lock:
                    self._deliveries.pop(request_id, None)
                self._settle(command.accepted, err)
            else:
                self._settle(command.accepted, None)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._iterate()
            except Exception as err:  # a bug in the engine: fail its requests, keep serving new ones
                logger.exception("engine step failed")
                self._fail_all(EngineFailure(f"engine step failed: {type(err).__name__}: {err}"))

    def _iterate(self) -> None:
        self._wake.clear()
        self._apply_commands()
        if not self.engine.has_unfinished():
            self._stats = self._read_stats()
            self._wake.wait(self.idle_wait_s)
            return
        outputs = self.engine.step()
        self._stats = self._read_stats()
        for output in outputs:
            if output.error is not None:  # this request alone broke inside the step; the others go on
                failure = EngineFailure(f"the request failed in the engine: {output.error}")
                self._deliver(output.request_id, failure, last=True)
            else:
                self._deliver(output.request_id, output, last=output.finished)

    def _fail_all(self, error: EngineFailure) -> None:
        with self._lock:
            request_ids = list(self._deliveries)
        for request_id in request_ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already in trouble; the request is failed either way
                logger.exception("aborting %s after an engine failure failed", request_id)
            self._deliver(request_id, error, last=True)

    def _read_stats(self) -> EngineStats:
        return self.engine.stats()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    """Schedule ``callback`` on another thread's event loop; a closed loop has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)

"""The engine in its own process: an engine core that steps ``LLMEngine`` in a busy loop, fed over a pipe.

``lmforge serve`` runs the engine here by default (vLLM v1 splits its server the same way). The HTTP process
only parses requests, renders responses and streams them; the core process owns the model, the KV cache and
the scheduler, so the two never wait on one interpreter lock. :class:`ProcessEngine` is the HTTP side and has
the interface of :class:`~lmforge.serve.async_engine.AsyncEngine` (the engine in a thread of the HTTP
process, kept for ``--engine-in-thread`` and the in-process tests).

The channel is one duplex ``multiprocessing`` pipe (a Unix socket pair) carrying pickled tuples:

* HTTP -> core: ``("add", request_id, prompt_token_ids, params, lora)``, ``("abort", request_id)``,
  ``("lora", op_id, name, weights_or_None)`` and ``("stop",)``.
* core -> HTTP: ``("ready", CoreInfo)`` or ``("failed", message)`` once at start, then one
  ``("batch", acks, lora_acks, outputs, errors, stats)`` message per engine iteration: the verdicts on the
  commands it read, every request's delta of that step, requests that failed, and the engine's counters.

The HTTP side reads the pipe in its event loop (an asyncio transport: no reader thread that would wait for
the GIL at every read while the loop renders responses, and writes that never block the loop).

Outputs travel as deltas (:class:`OutputDelta`): the tokens, text and log-probabilities a completion gained
since its last message, so a message costs what the step produced, not what the requests hold in all;
:class:`_Rebuilder` turns them back into cumulative ``RequestOutput``s on the HTTP side.

The core idles on the pipe (no cost) and exits when told to stop or when its end of the pipe closes (the
HTTP process died). When the core dies (killed, out of memory, a crash in native code), every request in
flight fails with :class:`EngineUnavailable` (a 503 naming the exit code), and the core is started again
with the same construction arguments and the adapters loaded since (before it takes requests); after ``max_restarts`` deaths within
``restart_window_s`` it stays down and every request gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from lmforge.infer import EngineStats, LLMEngine, SamplingParams
from lmforge.infer.lora import LoraWeights
from lmforge.infer.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lmforge.serve.async_engine import EngineFailure, EngineUnavailable, RequestStream, _call_soon
from lmforge.serve.metrics import ServerMetrics
from lmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# (base model config, adapter folder) -> the adapter's tensors; must be picklable (a module-level function).
LoraLoader = Callable[[Any, str], LoraWeights]


@dataclass
class CoreInfo:
    """What the HTTP side needs to know about the engine, sent once the core has loaded it."""

    tokenizer: Tokenizer
    max_model_len: int
    kv_capacity_tokens: int
    lora_names: list[str]
    model_config: Any
    stats: EngineStats


@dataclass
class OutputDelta:
    """One completion's change in one step. ``*_tail`` extend the cumulative ``token_ids``/``text``/
    ``logprobs`` (None: equal to the matching ``new_*``, the usual case); ``reset`` replaces them instead."""

    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    cumulative_logprob: float
    finish_reason: str | None
    stop_reason: str | int | None
    ids_tail: list[int] | None = None
    text_tail: str | None = None
    logprobs_tail: list[TokenLogprob] | None = None
    has_logprobs: bool = False
    reset: bool = False


@dataclass
class RequestDelta:
    """One request's output of one step; ``prompt_token_ids``/``prompt_logprobs`` travel once."""

    request_id: str
    finished: bool
    completions: list[OutputDelta]
    num_cached_tokens: int
    error: str | None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


# -- the core process ----------------------------------------------------------------------------------------


@dataclass
class _Sent:
    """How much of one completion the HTTP side already holds."""

    tokens: int = 0
    chars: int = 0
    logprobs: int = 0


@dataclass
class _Tracker:
    completions: dict[int, _Sent] = field(default_factory=dict)
    prompt_sent: bool = False
    prompt_logprobs_sent: bool = False


def _encode(output: RequestOutput, tracker: _Tracker) -> RequestDelta:
    completions = []
    for c in output.outputs:
        sent = tracker.completions.setdefault(c.index, _Sent())
        logprobs = c.logprobs if c.logprobs is not None else []
        reset = len(c.token_ids) < sent.tokens or len(c.text) < sent.chars or len(logprobs) < sent.logprobs
        if reset:  # not an extension of what was sent (cannot happen for appending sequences): send it all
            sent = tracker.completions[c.index] = _Sent()
        ids_tail = c.token_ids[sent.tokens :]
        text_tail = c.text[sent.chars :]
        logprobs_tail = logprobs[sent.logprobs :]
        new_logprobs = c.new_logprobs if c.new_logprobs is not None else []
        completions.append(
            OutputDelta(
                c.index,
                c.new_token_ids,
                c.new_text,
                c.new_logprobs,
                c.cumulative_logprob,
                c.finish_reason,
                c.stop_reason,
                None if ids_tail == c.new_token_ids else ids_tail,
                None if text_tail == c.new_text else text_tail,
                None if logprobs_tail == new_logprobs else logprobs_tail,
                c.logprobs is not None,
                reset,
            )
        )
        sent.tokens, sent.chars, sent.logprobs = len(c.token_ids), len(c.text), len(logprobs)
    delta = RequestDelta(
        output.request_id, output.finished, completions, output.num_cached_tokens, output.error
    )
    if not tracker.prompt_sent:
        tracker.prompt_sent = True
        delta.prompt_token_ids = output.prompt_token_ids
    if output.prompt_logprobs is not None and not tracker.prompt_logprobs_sent:
        tracker.prompt_logprobs_sent = True
        delta.prompt_logprobs = output.prompt_logprobs
    return delta


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (the engine's ValueError/QueueFullError do), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


class _Core:
    """The loop of the core process: read commands, step, send one message per iteration."""

    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        # Messages leave through a writer thread: a step never waits for the HTTP process to read the last one
        # (it may be descheduled on a busy machine); the thread holds the GIL only around each write.
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.writer = threading.Thread(target=self.write, name="lmforge-core-writer", daemon=True)
        self.writer.start()
        self.trackers: dict[str, _Tracker] = {}
        self.acks: list[tuple[str, BaseException | None]] = []
        self.lora_acks: list[tuple[int, BaseException | None, list[str]]] = []
        self.errors: list[tuple[str, str]] = []
        self.stopping = False

    def send(self, message: tuple) -> None:
        self.outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def write(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:  # the HTTP process went away; the loop sees the closed pipe too
                return

    def run(self) -> None:
        try:
            self.loop()
        finally:
            self.outbox.put(None)  # what was sent before a stop still leaves
            self.writer.join(timeout=10)

    def loop(self) -> None:
        while not self.stopping:
            if not self.engine.has_unfinished():
                self.conn.poll(None)  # idle: sleep until a command comes (or the pipe closes)
            while not self.stopping and self.conn.poll(0):
                self.apply(pickle.loads(self.conn.recv_bytes()))
            if self.stopping:
                return
            outputs: list[RequestDelta] = []
            stepped = self.engine.has_unfinished()
            if stepped:
                try:
                    outputs = self.step()
                except Exception as err:  # a bug in the engine: fail its requests, keep serving new ones
                    logger.exception("engine step failed")
                    self.fail_all(f"engine step failed: {type(err).__name__}: {err}")
            # after every step, even one without outputs (it freed an aborted request's blocks): the stats
            if stepped or self.acks or self.lora_acks:
                message = ("batch", self.acks, self.lora_acks, outputs, self.errors, self.engine.stats())
                self.acks, self.lora_acks, self.errors = [], [], []
                self.send(message)

    def step(self) -> list[RequestDelta]:
        deltas = []
        for output in self.engine.step():
            tracker = self.trackers.get(output.request_id)
            if tracker is None:  # aborted by the HTTP side: nobody reads it
                continue
            deltas.append(_encode(output, tracker))
            if output.finished or output.error is not None:
                del self.trackers[output.request_id]
        return deltas

    def apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_token_ids, params, lora = command
            try:
                group = self.engine.make_request(request_id, prompt_token_ids, params, lora=lora)
                self.engine.add_request(group)
            except Exception as err:  # refused: a 400 (ValueError) or a 429 (QueueFullError)
                self.acks.append((request_id, _portable(err)))
            else:
                self.trackers[request_id] = _Tracker()
                self.acks.append((request_id, None))
        elif kind == "abort":
            if self.trackers.pop(command[1], None) is not None:
                self.engine.abort(command[1])
        elif kind == "lora":
            _, op_id, name, weights = command
            try:
                if weights is not None:
                    self.engine.add_lora(name, weights)
                else:
                    self.engine.remove_lora(name)
            except Exception as err:
                self.lora_acks.append((op_id, _portable(err), self.engine.lora_names))
            else:
                self.lora_acks.append((op_id, None, self.engine.lora_names))
        elif kind == "stop":
            self.stopping = True
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def fail_all(self, message: str) -> None:
        for request_id in list(self.trackers):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine is already in trouble; the request is failed either way
                logger.exception("aborting %s after an engine failure failed", request_id)
            self.errors.append((request_id, message))
        self.trackers.clear()


def _core_main(
    load_engine: Callable[[], LLMEngine],
    loras: dict[str, str],
    load_lora: LoraLoader | None,
    loaded_loras: bytes,
    conn: Connection,
) -> None:
    """Entry point of the core process: build the engine, add the adapters (``loras`` folders read with
    ``load_lora``, then ``loaded_loras``: pickled {name: weights} loaded at run time into a core that
    died), say ready (or why not), then serve commands."""
    # Ctrl-C reaches the whole process group: the HTTP process stops the core itself once its open streams
    # have finished. SIGTERM keeps its default (multiprocessing's exit handler ends daemon children with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="lmforge-engine-core: %(levelname)s %(message)s")

    def send(message: tuple) -> None:
        conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        engine = load_engine()
        for name, folder in loras.items():
            if load_lora is None:
                raise ValueError("LoRA adapters given but no adapter loader")
            try:
                engine.add_lora(name, load_lora(engine.model.cfg, folder))
            except Exception as err:
                raise ValueError(f"the LoRA adapter {name}={folder}: {err}") from err
        for name, weights in pickle.loads(loaded_loras).items():
            engine.add_lora(name, weights)
        blocks = engine.block_manager
        info = CoreInfo(
            engine.tokenizer,
            engine.max_model_len,
            (blocks.num_blocks - 1) * blocks.block_size,  # block 0 is the engine's padding block
            list(engine.lora_names),
            engine.model.cfg,
            engine.stats(),
        )
    except Exception as err:
        logger.exception("loading the engine failed")
        send(("failed", f"{type(err).__name__}: {err}"))
        return
    send(("ready", info))
    with contextlib.suppress(EOFError, OSError):  # the HTTP process went away: nothing left to serve
        _Core(engine, conn).run()
    # Nothing of the core outlives it (the engine holds no files): skip the interpreter's teardown, which
    # takes seconds with torch loaded and would hold the server's shutdown.
    logging.shutdown()
    conn.close()
    os._exit(0)


# -- the HTTP side --------------------------------------------------------------------------------------------


class _Rebuilder:
    """Cumulative ``RequestOutput``s of one request from the deltas the core sends."""

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.completions: dict[int, CompletionOutput] = {}

    def update(self, delta: RequestDelta) -> RequestOutput:
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        outputs = []
        for d in delta.completions:
            before = None if d.reset else self.completions.get(d.index)
            ids_tail = d.new_token_ids if d.ids_tail is None else d.ids_tail
            text_tail = d.new_text if d.text_tail is None else d.text_tail
            logprobs = None
            if d.has_logprobs:
                tail = (d.new_logprobs or []) if d.logprobs_tail is None else d.logprobs_tail
                logprobs = tail if before is None or before.logprobs is None else before.logprobs + tail
            completion = CompletionOutput(
                d.index,
                ids_tail if before is None else before.token_ids + ids_tail,
                text_tail if before is None else before.text + text_tail,
                d.new_token_ids,
                d.new_text,
                logprobs,
                d.new_logprobs,
                d.cumulative_logprob,
                d.finish_reason,
                d.stop_reason,
            )
            self.completions[d.index] = completion
            outputs.append(completion)
        return RequestOutput(
            delta.request_id,
            self.prompt_token_ids,
            outputs,
            delta.finished,
            self.prompt_logprobs,
            delta.num_cached_tokens,
            delta.error,
        )


def _frame(message: tuple) -> bytes:
    """A message as ``Connection.send_bytes`` frames it (what the core's ``recv_bytes`` reads)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(data)) + data
    return struct.pack("!i", len(data)) + data


def _recv_frame(sock: socket.socket) -> tuple:
    """One message, read from a blocking socket (the handshake, before the event loop takes the socket)."""

    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (size,) = struct.unpack("!i", exactly(4))
    if size == -1:
        (size,) = struct.unpack("!Q", exactly(8))
    return pickle.loads(exactly(size))


class _CoreProtocol(asyncio.Protocol):
    """The event loop's end of the pipe: frames the bytes into messages, reports the pipe's end."""

    def __init__(self, owner: ProcessEngine) -> None:
        self.owner = owner
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            (size,) = struct.unpack_from("!i", buffer, start)
            header = 4
            if size == -1:
                if len(buffer) - start < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, start + 4)
                header = 12
            end = start + header + size
            if len(buffer) < end:
                break
            message = pickle.loads(memoryview(buffer)[start + header : end])
            start = end
            try:
                self.owner._dispatch(message)
            except Exception:  # never let a bad message stop the reading: the requests would hang
                logger.exception("dispatching an engine message failed")
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_pipe_closed(self)


@dataclass
class _Request:
    outputs: asyncio.Queue[RequestOutput | BaseException]
    rebuilder: _Rebuilder
    accepted: asyncio.Future[None] | None  # until the core answers the add


class ProcessEngine:
    """The HTTP side of an engine core process; the interface of ``AsyncEngine``.

    ``load_engine`` (picklable: a module-level function or a ``functools.partial`` of one) runs in the core
    process, then ``loras`` (name -> folder) are read there with ``load_lora``. The constructor blocks until
    the engine is loaded and raises ``RuntimeError`` with the core's reason when it cannot load; call it off
    ``loop``, the event loop that serves the requests: the pipe is read there (no reader thread: a thread
    would wait for the GIL at every read while the loop renders responses), and every method but
    ``shutdown`` and the properties runs there.
    """

    def __init__(
        self,
        load_engine: Callable[[], LLMEngine],
        loop: asyncio.AbstractEventLoop,
        metrics: ServerMetrics | None = None,
        loras: dict[str, str] | None = None,
        load_lora: LoraLoader | None = None,
        max_restarts: int = 3,
        restart_window_s: float = 300.0,
    ) -> None:
        self.metrics = metrics
        self.loop = loop
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._load_engine = load_engine
        self._loras = dict(loras or {})  # adapter folders the core reads at start (minus those unloaded)
        self._runtime_loras: dict[str, LoraWeights] = {}  # adapters loaded since: given to a restarted core
        self._load_lora = load_lora
        self._ctx = multiprocessing.get_context("spawn")
        self._requests: dict[str, _Request] = {}  # only the event loop touches these tables
        self._lora_ops: dict[int, asyncio.Future[None]] = {}
        self._next_op = 0
        self._crashes: list[float] = []
        self._closing = False
        self._down: str | None = "the engine process is starting"
        self.restarts = 0
        self._process, sock, info = self._start_core()
        self._apply_info(info)
        try:
            self._transport, self._protocol = self._connect(sock)
        except BaseException:  # the loop is gone (the server stopped while the model loaded)
            self._process.kill()
            sock.close()
            raise
        self._down = None

    # -- AsyncEngine's interface ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self._info.kv_capacity_tokens

    @property
    def model_config(self) -> Any:
        """The served model's config (what an adapter loader checks an adapter against)."""
        return self._info.model_config

    @property
    def lora_names(self) -> list[str]:
        return list(self._lora_names)

    @property
    def num_active(self) -> int:
        return len(self._requests)

    @property
    def unavailable_reason(self) -> str | None:
        """Why the engine cannot take requests now (its process died), or None while it can."""
        return self._down

    @property
    def pid(self) -> int | None:
        """The core process's id."""
        return self._process.pid

    def stats(self) -> EngineStats:
        return self._stats

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> RequestStream:
        """Hand a request to the core; returns once the core accepted it. Raises ``ValueError`` for what the
        engine refuses, ``QueueFullError`` when its queue is full, ``EngineUnavailable`` while it is down."""
        if self._down is not None:
            raise EngineUnavailable(self._down)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        accepted: asyncio.Future[None] = self.loop.create_future()
        request = _Request(asyncio.Queue(), _Rebuilder(list(prompt_token_ids)), accepted)
        self._requests[request_id] = request
        self._transport.write(_frame(("add", request_id, list(prompt_token_ids), params, lora)))
        try:
            await accepted
        except asyncio.CancelledError:
            self._abort(request_id)
            raise
        return RequestStream(self, request_id, request.outputs, len(prompt_token_ids))

    async def add_lora(self, name: str, weights: LoraWeights) -> None:
        """Serve adapter ``name``; raises ValueError if the engine refuses it."""
        await self._lora_command(name, weights)
        self._runtime_loras[name] = weights

    async def remove_lora(self, name: str) -> None:
        """Stop serving adapter ``name``; KeyError if unknown, ValueError while requests use it."""
        await self._lora_command(name, None)
        self._runtime_loras.pop(name, None)
        self._loras.pop(name, None)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (it finishes its step and exits; killed if it does not within ``timeout_s``)."""
        self._closing = True
        self._down = "the server is shutting down"
        self._call_in_loop(self._transport.write, _frame(("stop",)))
        self._process.join(timeout_s)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", timeout_s)
            self._process.kill()
            self._process.join(5)
        self._call_in_loop(self._transport.close)
        self._call_in_loop(self._fail_all, EngineUnavailable("the server is shutting down"))

    # -- internals --------------------------------------------------------------------------------------------

    def _start_core(self) -> tuple[Any, socket.socket, CoreInfo]:
        """Spawn a core process and wait until it has loaded the engine (blocking: not on the loop)."""
        ours, theirs = socket.socketpair()
        child_conn = Connection(theirs.detach())
        process = self._ctx.Process(
            target=_core_main,
            args=(
                self._load_engine,
                dict(self._loras),
                self._load_lora,
                pickle.dumps(dict(self._runtime_loras), protocol=pickle.HIGHEST_PROTOCOL),
                child_conn,
            ),
            name="lmforge-engine-core",
            daemon=True,  # multiprocessing ends it when this process exits, whatever the path
        )
        process.start()
        child_conn.close()  # only the core holds its end: its death reads as the end of the pipe here
        try:
            message = _recv_frame(ours)
        except (EOFError, OSError):
            process.join(5)
            ours.close()
            raise RuntimeError(
                f"the engine process exited while loading (exit code {process.exitcode})"
            ) from None
        if message[0] != "ready":
            process.join(10)
            ours.close()
            raise RuntimeError(message[1])
        logger.info("engine core process %d ready", process.pid)
        return process, ours, message[1]

    def _connect(self, sock: socket.socket) -> tuple[asyncio.Transport, _CoreProtocol]:
        """Hand the socket to the event loop (from another thread: blocks until the loop took it)."""

        async def connect() -> tuple[asyncio.Transport, _CoreProtocol]:
            return await self.loop.connect_accepted_socket(lambda: _CoreProtocol(self), sock)

        return asyncio.run_coroutine_threadsafe(connect(), self.loop).result(timeout=60)

    def _apply_info(self, info: CoreInfo) -> None:
        self._info = info
        self._lora_names = list(info.lora_names)
        self._stats = info.stats

    def _call_in_loop(self, fn: Callable[..., object], *args: object) -> None:
        if _running_loop() is self.loop:
            fn(*args)
        else:
            _call_soon(self.loop, fn, *args)

    async def _lora_command(self, name: str, weights: LoraWeights | None) -> None:
        if self._down is not None:
            raise EngineUnavailable(self._down)
        done: asyncio.Future[None] = self.loop.create_future()
        op_id = self._next_op
        self._next_op += 1
        self._lora_ops[op_id] = done
        # a big adapter is many megabytes to pickle: off the event loop (the write itself is buffered)
        frame = await asyncio.to_thread(_frame, ("lora", op_id, name, weights))
        self._transport.write(frame)
        await done

    def _abort(self, request_id: str) -> None:
        """Drop a request and tell the core; callable from any thread (a stream's finalizer)."""
        if _running_loop() is not self.loop:
            _call_soon(self.loop, self._abort, request_id)
            return
        if self._requests.pop(request_id, None) is not None and self._down is None:
            self._transport.write(_frame(("abort", request_id)))

    def _dispatch(self, message: tuple) -> None:
        """One engine iteration's message: verdicts, outputs, failures and counters (on the loop)."""
        _, acks, lora_acks, outputs, errors, stats = message
        self._stats = stats
        for request_id, error in acks:
            request = self._requests.get(request_id)
            if request is None or request.accepted is None:
                continue  # the handler gave up (its abort is on the way)
            if error is not None:
                del self._requests[request_id]
            _settle(request.accepted, error)
            request.accepted = None
        for op_id, error, names in lora_acks:
            self._lora_names = names
            done = self._lora_ops.pop(op_id, None)
            if done is not None:
                _settle(done, error)
        for delta in outputs:
            request = self._requests.get(delta.request_id)
            if request is None:
                continue
            output = request.rebuilder.update(delta)
            if delta.error is not None:  # this request alone broke inside the step; the others go on
                request.outputs.put_nowait(EngineFailure(f"the request failed in the engine: {delta.error}"))
            else:
                request.outputs.put_nowait(output)
            if delta.finished or delta.error is not None:
                del self._requests[delta.request_id]
        for request_id, error_message in errors:
            request = self._requests.pop(request_id, None)
            if request is not None:
                request.outputs.put_nowait(EngineFailure(error_message))

    def _fail_all(self, error: EngineFailure) -> None:
        requests, self._requests = self._requests, {}
        lora_ops, self._lora_ops = self._lora_ops, {}
        for request in requests.values():
            if request.accepted is not None:
                _settle(request.accepted, error)
            request.outputs.put_nowait(error)
        for done in lora_ops.values():
            _settle(done, error)

    def _on_pipe_closed(self, protocol: _CoreProtocol) -> None:
        """The pipe to the core closed (on the loop). Unless we closed it, the core died: fail what it held,
        then start a new core in a worker thread."""
        if self._closing or protocol is not self._protocol:
            return
        self._process.join(1)
        code = self._process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < self.restart_window_s] + [now]
        restart = len(self._crashes) <= self.max_restarts
        then = (
            "the server is restarting it" if restart else "it died too often; the server will not restart it"
        )
        self._down = f"the engine process died ({how}); {then}"
        logger.error("%s", self._down)
        self._fail_all(EngineUnavailable(f"{self._down}; the request was lost, retry it"))
        if restart:
            threading.Thread(
                target=self._restart, args=(how,), name="lmforge-engine-restart", daemon=True
            ).start()

    def _restart(self, how: str) -> None:
        try:
            process, sock, info = self._start_core()
        except RuntimeError as err:
            self._down = f"the engine process died ({how}) and could not be restarted: {err}"
            logger.error("%s", self._down)
            return
        if self._closing:  # the server stopped while the core was restarting
            with contextlib.suppress(OSError):
                sock.sendall(_frame(("stop",)))
            process.join(10)
            sock.close()
            return
        self._process = process
        try:
            self._transport, self._protocol = self._connect(sock)
        except BaseException:  # the loop is gone: the server has stopped
            process.kill()
            sock.close()
            return
        self._apply_info(info)  # with the adapters loaded at run time: the new core loaded them too
        self.restarts += 1
        self._down = None
        logger.warning("engine process restarted (pid %d)", process.pid)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the waiting handler was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

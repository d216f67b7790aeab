"""Prometheus metrics of the server: engine load, KV-cache occupancy, throughput and latencies.

Each app owns its registry (several servers can live in one process, as in the tests). Engine gauges
read the latest ``EngineStats`` the engine thread took after its last step, so a scrape never touches
the engine itself.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lmforge.infer import EngineStats

PREFIX = "lmforge"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ThroughputMeter:
    """Tokens per second over a sliding window of recent steps."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        with self._lock:
            self._events.append((self.clock(), n_tokens))
            self._trim()

    def rate(self) -> float:
        with self._lock:
            self._trim()
            return sum(n for _, n in self._events) / self.window_s

    def _trim(self) -> None:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class ServerMetrics:
    """``stats`` returns the engine's latest counters, or None while no engine is loaded (gauges read 0)."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.throughput = ThroughputMeter()
        r = self.registry

        def gauge(name: str, doc: str, read: Callable[[EngineStats], float]) -> None:
            def value() -> float:
                current = stats()
                return 0.0 if current is None else float(read(current))

            Gauge(f"{PREFIX}_{name}", doc, registry=r).set_function(value)

        gauge("requests_waiting", "Requests waiting to be scheduled (queue depth).", lambda s: s.num_waiting)
        gauge("requests_running", "Requests the engine is currently running.", lambda s: s.num_running)
        gauge("kv_blocks_used", "KV-cache blocks held by requests.", lambda s: s.kv_blocks_used)
        gauge(
            "kv_blocks_free",
            "KV-cache blocks available (including evictable cached ones).",
            lambda s: s.kv_blocks_free,
        )
        gauge(
            "prefix_cache_hit_rate",
            "Fraction of prompt blocks served from the prefix cache.",
            lambda s: s.prefix_cache_hit_rate,
        )
        tokens_per_s = Gauge(
            f"{PREFIX}_generation_tokens_per_second",
            "Generated tokens per second over the last 10 s.",
            registry=r,
        )
        tokens_per_s.set_function(self.throughput.rate)

        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", registry=r)
        self.completions_finished = Counter(
            f"{PREFIX}_completions_finished",
            "Finished completions (choices) by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.requests_aborted = Counter(
            f"{PREFIX}_requests_aborted", "Requests cancelled before they finished (client gone).", registry=r
        )
        self.requests_rejected = Counter(
            f"{PREFIX}_requests_rejected", "Requests refused because the server was full (429).", registry=r
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a request's admission by the engine to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Seconds from a request's admission by the engine to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observe_tokens(self, n_tokens: int) -> None:
        self.generation_tokens.inc(n_tokens)
        self.throughput.add(n_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

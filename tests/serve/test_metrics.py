from prometheus_client.parser import text_string_to_metric_families

from lmforge.infer import EngineStats
from lmforge.serve.metrics import ServerMetrics, ThroughputMeter


def engine_stats(**values: float) -> EngineStats:
    zeros = dict.fromkeys(
        ["num_running", "num_waiting", "kv_blocks_used", "kv_blocks_free", "prefix_cache_queries",
         "prefix_cache_hits", "prefix_cache_hit_rate", "num_preemptions", "prompt_tokens_total",
         "generation_tokens_total", "requests_finished_total"],
        0,
    )  # fmt: skip
    return EngineStats(**{**zeros, **values})


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throughput_counts_tokens_inside_the_window_only():
    clock = FakeClock()
    meter = ThroughputMeter(window_s=10.0, clock=clock)
    meter.add(50)
    clock.t += 5
    meter.add(30)
    assert meter.rate() == 8.0  # 80 tokens / 10 s
    clock.t += 6  # the first batch is now 11 s old
    assert meter.rate() == 3.0


def samples(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_gauges_read_the_latest_engine_snapshot():
    snapshot: dict[str, EngineStats | None] = {"stats": None}  # no engine loaded yet
    metrics = ServerMetrics(lambda: snapshot["stats"])
    assert samples(metrics)["lmforge_kv_blocks_used"] == 0
    snapshot["stats"] = engine_stats(
        num_waiting=3, num_running=2, kv_blocks_used=7, kv_blocks_free=9, prefix_cache_hit_rate=0.25
    )
    values = samples(metrics)
    assert values["lmforge_requests_waiting"] == 3
    assert values["lmforge_requests_running"] == 2
    assert values["lmforge_kv_blocks_used"] == 7
    assert values["lmforge_kv_blocks_free"] == 9
    assert values["lmforge_prefix_cache_hit_rate"] == 0.25


def test_counters_and_latency_histograms():
    metrics = ServerMetrics(lambda: None)
    metrics.observe_tokens(12)
    metrics.time_to_first_token.observe(0.02)
    metrics.e2e_latency.observe(0.3)
    metrics.completions_finished.labels("stop").inc()
    metrics.requests_aborted.inc()
    values = samples(metrics)
    assert values["lmforge_generation_tokens_total"] == 12
    assert values["lmforge_time_to_first_token_seconds_count"] == 1
    assert values["lmforge_e2e_request_latency_seconds_sum"] == 0.3
    assert values["lmforge_completions_finished_total"] == 1
    assert values["lmforge_requests_aborted_total"] == 1
    assert values["lmforge_generation_tokens_per_second"] > 0


def test_each_server_has_its_own_registry():
    first, second = ServerMetrics(lambda: None), ServerMetrics(lambda: None)
    first.observe_tokens(5)
    assert samples(second)["lmforge_generation_tokens_total"] == 0

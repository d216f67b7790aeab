"""Run-folder metrics: MFU from model FLOPs, held-out validation shards, truncation on resume, plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lmforge.model.flops import flops_per_token
from lmforge.train import train
from lmforge.train.metrics import MetricsLogger, peak_flops, read_jsonl, write_plots
from tests.train.conftest import make_shards, tiny_config


def test_mfu_is_model_flops_over_configured_peak(tmp_path: Path, shards: Path) -> None:
    assert peak_flops(torch.device("cpu")) is None  # no table entry for CPUs: MFU only when configured
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12
    result = train(tiny_config(tmp_path / "run", shards, max_steps=2, **{"log.peak_flops": 1e12}))
    record = result.metrics
    per_token = flops_per_token(result_model_config(result.run_dir), 16)["train"]
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * per_token / 1e12)
    assert record["memory_gib"] > 0


def result_model_config(run_dir: Path):
    from lmforge.config import load_config
    from lmforge.train.config import TrainConfig

    return load_config(TrainConfig, run_dir / "config.yaml").model


def test_validation_on_separate_held_out_shards(tmp_path: Path, shards: Path) -> None:
    held_out = make_shards(tmp_path / "held-out", n_docs=10, seed=7)
    overrides = {"val_shards": [str(held_out)], "log.val_every_steps": 2, "log.val_batches": 100}
    result = train(tiny_config(tmp_path / "run", shards, max_steps=4, **overrides))
    vals = [r["val_loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] and result.val_loss == vals[1]


def test_truncate_forgets_records_after_a_step_and_plots_are_written(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        logger.log({"step": step, "loss": 5.0 - step, "lr": 1e-3, "tokens_per_s": 100.0})
    logger.log({"step": 5, "val_loss": 1.5})
    logger.truncate(3)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    logger.event({"event": "loss_spike", "step": 4})
    assert json.loads((tmp_path / "events.jsonl").read_text())["event"] == "loss_spike"
    paths = write_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    disabled = MetricsLogger(tmp_path / "other-rank", enabled=False)
    disabled.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "other-rank").exists()


def test_a_torn_last_line_is_dropped_and_truncate_still_works(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 4):
        logger.log({"step": step, "loss": 1.0})
    with logger.path.open("a") as f:
        f.write('{"step": 4, "lo')  # the process was killed mid-write
    assert [r["step"] for r in read_jsonl(logger.path)] == [1, 2, 3]
    logger.truncate(2)
    assert logger.path.read_text().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 1.0}']


def test_measured_peak_is_a_cached_matmul_probe() -> None:
    from lmforge.train.metrics import _probe, measured_peak_flops

    _probe.cache_clear()
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    peak = measured_peak_flops(cpu)
    # independent check: no 256-square fp32 matmul on one thread runs faster than the probe's best one
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        start = time.perf_counter()
        a @ a
        one = 2 * 256**3 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert 1e8 < peak < 1e15 and one <= 1.5 * peak / threads
    assert measured_peak_flops(cpu) == peak and _probe.cache_info().hits >= 1  # cached per process
    assert torch.get_num_threads() == threads  # the probe restores the thread count


def test_mfu_uses_the_measured_peak_when_none_is_configured(tmp_path: Path, shards: Path) -> None:
    from lmforge.train.metrics import measured_peak_flops

    result = train(tiny_config(tmp_path / "run", shards, max_steps=2))
    record = result.metrics
    per_token = flops_per_token(result_model_config(result.run_dir), 16)["train"]
    peak = measured_peak_flops(torch.device("cpu"))
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * per_token / peak)

"""LR schedules against transformers' implementations; the batch-size ramp against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import optimization as hf

from lmforge.train.config import BatchConfig, ScheduleConfig
from lmforge.train.schedule import LRSchedule, accumulation_steps

PEAK, STEPS, WARMUP = 1e-3, 100, 10


def hf_lrs(make_scheduler) -> list[float]:
    """LR at steps 0..STEPS-1 of a transformers LambdaLR schedule."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def ours(name: str, **kwargs) -> list[float]:
    schedule = LRSchedule(ScheduleConfig(name=name, warmup_steps=WARMUP, **kwargs), PEAK, STEPS)
    return [schedule(step) for step in range(STEPS)]


def test_warmup_is_linear_and_reaches_the_peak_on_its_last_step() -> None:
    lrs = ours("cosine")
    assert lrs[:WARMUP] == pytest.approx([PEAK * (s + 1) / WARMUP for s in range(WARMUP)])
    assert lrs[WARMUP] == pytest.approx(PEAK)


def test_cosine_to_ten_percent_matches_transformers() -> None:
    expected = hf_lrs(
        lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, WARMUP, STEPS, min_lr_rate=0.1)
    )
    assert ours("cosine")[WARMUP:] == pytest.approx(expected[WARMUP:], rel=1e-9)
    assert ours("cosine")[-1] == pytest.approx(0.1 * PEAK, rel=0.01)


def test_linear_matches_transformers() -> None:
    expected = hf_lrs(lambda o: hf.get_linear_schedule_with_warmup(o, WARMUP, STEPS))
    assert ours("linear", min_lr_ratio=0.0)[WARMUP:] == pytest.approx(expected[WARMUP:], abs=1e-12)


def test_warmup_stable_decay_matches_transformers() -> None:
    decay = 20
    expected = hf_lrs(
        lambda o: hf.get_wsd_schedule(
            o, WARMUP, decay, num_stable_steps=STEPS - WARMUP - decay, decay_type="linear", min_lr_ratio=0.1
        )
    )
    got = ours("wsd", decay_fraction=decay / STEPS)
    assert got[WARMUP:] == pytest.approx(expected[WARMUP:], rel=1e-9)
    assert got[STEPS - decay - 1] == PEAK


def test_constant_and_fractional_warmup() -> None:
    assert ours("constant")[WARMUP:] == [PEAK] * (STEPS - WARMUP)
    schedule = LRSchedule(ScheduleConfig(name="constant", warmup_fraction=0.05), PEAK, STEPS)
    assert schedule.warmup == 5 and schedule(4) == PEAK and schedule(0) == PEAK / 5
    no_warmup = LRSchedule(ScheduleConfig(name="cosine", warmup_steps=0), PEAK, STEPS)
    assert no_warmup(0) == PEAK
    assert no_warmup(STEPS // 2) == pytest.approx(0.1 * PEAK + 0.45 * PEAK * (1 + math.cos(math.pi * 0.5)))


def test_batch_ramp_grows_linearly_in_whole_micro_batches() -> None:
    cfg = BatchConfig(micro_batch_size=4, grad_accum_steps=8, ramp_start_tokens=1000, ramp_tokens=10_000)
    micro = 500  # tokens of one micro-batch over all ranks
    assert accumulation_steps(cfg, 0, micro) == 2
    for seen in (0, 2500, 5000, 7500, 9999):
        expected = round((1000 + (8 * micro - 1000) * seen / 10_000) / micro)
        assert accumulation_steps(cfg, seen, micro) == expected
    assert accumulation_steps(cfg, 10_000, micro) == 8
    assert accumulation_steps(BatchConfig(grad_accum_steps=3), 0, micro) == 3  # no ramp
    tiny_start = BatchConfig(grad_accum_steps=4, ramp_start_tokens=1, ramp_tokens=100)
    assert accumulation_steps(tiny_start, 0, micro) == 1  # never below one micro-batch

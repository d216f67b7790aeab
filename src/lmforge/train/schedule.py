"""Learning-rate schedules and the batch-size ramp, as pure functions of the step / tokens seen.

Being stateless, both resume exactly from the step counter alone. ``lr_at(step)`` is the LR used by the
optimizer update that ends step ``step`` (0-based). Warm-up is linear from peak/warmup to the peak, so the
first update already moves the weights.
"""

from __future__ import annotations

import math

from lmforge.train.config import BatchConfig, ScheduleConfig


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, peak_lr: float, max_steps: int) -> None:
        self.cfg = cfg
        self.peak = peak_lr
        self.max_steps = max_steps
        if cfg.warmup_steps is not None:
            self.warmup = cfg.warmup_steps
        else:
            self.warmup = round(cfg.warmup_fraction * max_steps)
        self.warmup = min(self.warmup, max_steps)
        self.min_lr = cfg.min_lr_ratio * peak_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        name = self.cfg.name
        if name == "constant":
            return self.peak
        decay_steps = max(1, self.max_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        if name == "cosine":
            return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return self.peak - (self.peak - self.min_lr) * progress
        # wsd (warmup-stable-decay, Hu et al. 2024): hold the peak, then decay linearly over the last
        # decay_fraction of the steps down to min_lr.
        decay_start = self.max_steps - max(1, round(self.cfg.decay_fraction * self.max_steps))
        if step < decay_start:
            return self.peak
        progress = min(1.0, (step - decay_start) / max(1, self.max_steps - decay_start))
        return self.peak - (self.peak - self.min_lr) * progress


def accumulation_steps(cfg: BatchConfig, tokens_seen: int, tokens_per_micro_step: int) -> int:
    """Micro-batches to accumulate in the next optimizer step.

    ``tokens_per_micro_step`` is the number of tokens all data-parallel ranks process in one micro-batch.
    The global batch ramps linearly from ``ramp_start_tokens`` to the full batch over ``ramp_tokens``
    tokens seen; rounding is to whole micro-batches, at least one.
    """
    full = cfg.grad_accum_steps
    if cfg.ramp_tokens <= 0 or cfg.ramp_start_tokens <= 0 or tokens_seen >= cfg.ramp_tokens:
        return full
    full_tokens = full * tokens_per_micro_step
    batch_tokens = (
        cfg.ramp_start_tokens + (full_tokens - cfg.ramp_start_tokens) * tokens_seen / cfg.ramp_tokens
    )
    return max(1, min(full, round(batch_tokens / tokens_per_micro_step)))

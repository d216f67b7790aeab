"""Data curricula: an ordered list of stages, each with its own mixture, token budget and sequence length.

E.g. general web text at 2K context, then a code-heavy mixture, then a Python-heavy mixture at 8K context.
A stage may also change the model's position handling from its start on (``max_seq_len``, ``rope_theta``,
``rope_scaling``): multi-stage context extension, e.g. 2K -> 8K -> 32K with position interpolation or YaRN
chosen per stage (the trainer applies :func:`model_overrides` when the stage begins). The trainer asks :meth:`Curriculum.stage_at` with the number of tokens trained so far and tells the loader
to switch (``PackedLoader.set_stage``) when the stage changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.shards.mixture import MixtureConfig


@dataclass
class CurriculumStage:
    name: str = "stage"
    tokens: int = 0  # token budget of the stage; 0 on the last stage means "until training ends"
    seq_len: int = 0  # 0 keeps the loader's seq_len
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    # context extension from this stage on (each 0 / None keeps what the earlier stages or the model had):
    max_seq_len: int = 0  # the model's context length
    rope_theta: float = 0.0  # RoPE base ("base modification")
    # transformers-style scaling, e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 256};
    # {rope_type: default} turns an earlier stage's scaling off
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.seq_len < 0 or self.max_seq_len < 0 or self.rope_theta < 0:
            raise ValueError(f"stage {self.name!r}: tokens, seq_len, max_seq_len and rope_theta must be >= 0")


def model_overrides(stages: Sequence[CurriculumStage]) -> dict[str, Any]:
    """The model fields that ``stages`` (a curriculum's first stages, in order) set, the latest winning:
    ``max_seq_len``, ``rope_theta`` and ``rope_scaling`` (``None`` for ``{rope_type: default}``)."""
    out: dict[str, Any] = {}
    for stage in stages:
        if stage.max_seq_len:
            out["max_seq_len"] = stage.max_seq_len
        if stage.rope_theta:
            out["rope_theta"] = float(stage.rope_theta)
        if stage.rope_scaling is not None:
            scaling = dict(stage.rope_scaling)
            kind = scaling.get("rope_type", scaling.get("type"))
            out["rope_scaling"] = None if kind == "default" and len(scaling) == 1 else scaling
    return out


class Curriculum:
    def __init__(self, stages: Sequence[CurriculumStage]) -> None:
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        for stage in stages[:-1]:
            if stage.tokens <= 0:
                raise ValueError(f"stage {stage.name!r}: every stage but the last needs a token budget > 0")
        self.stages = list(stages)
        # Token count at which each stage starts.
        self.starts = [0]
        for stage in self.stages[:-1]:
            self.starts.append(self.starts[-1] + stage.tokens)

    def __len__(self) -> int:
        return len(self.stages)

    def stage_at(self, tokens_seen: int) -> int:
        """Index of the stage that owns the next token after ``tokens_seen`` trained tokens."""
        if tokens_seen < 0:
            raise ValueError("tokens_seen must be >= 0")
        index = 0
        for i, start in enumerate(self.starts):
            if tokens_seen >= start:
                index = i
        return index

    def stage_at_step(self, step: int, tokens_per_step: Sequence[int] | int) -> int:
        """Stage at optimizer step ``step`` when each step trains ``tokens_per_step`` tokens (one int for
        all stages, or one per stage since batches usually change with the sequence length)."""
        per_stage = (
            [tokens_per_step] * len(self) if isinstance(tokens_per_step, int) else list(tokens_per_step)
        )
        if len(per_stage) != len(self):
            raise ValueError(f"tokens_per_step: need one value per stage ({len(self)})")
        steps_left = step
        for i, stage in enumerate(self.stages):
            if i == len(self) - 1:
                return i
            stage_steps = -(-stage.tokens // per_stage[i])  # a stage runs until its budget is reached
            if steps_left < stage_steps:
                return i
            steps_left -= stage_steps
        return len(self) - 1

    @property
    def total_tokens(self) -> int:
        """Sum of the budgets (the last stage's 0 counts as nothing)."""
        return sum(s.tokens for s in self.stages)

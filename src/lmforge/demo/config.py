"""The demo's settings: one ``--size`` dial that scales corpus, tokenizer, model, steps and exams together.

Every number of a size can still be changed on the command line (``lmforge demo pretrain.steps=100``),
since a size is only the defaults of :class:`DemoConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import check_choice, check_range


@dataclass
class CorpusSettings:
    paths: list[str] = field(default_factory=list)  # the user's corpus; empty: the Python standard library
    max_bytes: int = 3_000_000  # stdlib corpus budget
    html_every: int = 5  # every n-th module with docstrings also becomes an HTML page
    heldout_documents: int = 40  # cleaned documents kept out of pretraining for perplexity


@dataclass
class ModelSettings:
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    d_ff: int = 512
    max_seq_len: int = 256


@dataclass
class TrainSettings:
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50


def _train_counts(addition: int, others: int) -> dict[str, int]:
    return {"addition": addition, "reverse_words": others, "count_letter": others, "read_answer": others}


@dataclass
class InstructSettings:
    # Addition gets the most examples: it is the capability the report card measures against the base model.
    train_counts: dict[str, int] = field(default_factory=lambda: _train_counts(6000, 1500))
    heldout_per_task: int = 100
    seed: int = 0


@dataclass
class AlignSettings:
    """The align stage (:mod:`lmforge.demo.align`): preference rankings of the SFT model's own samples, a
    reward model and DPO on them, then GRPO with engine rollouts."""

    enabled: bool = True
    pair_prompts: int = 600  # prompts sampled for preference pairs
    samples: int = 8  # replies per prompt (pairs) and group size (GRPO)
    max_new_tokens: int = 20
    rl_prompts_per_task: int = 2000
    rm_steps: int = 100
    rm_lr: float = 1e-4
    dpo_steps: int = 100
    dpo_lr: float = 2e-5
    dpo_beta: float = 0.3  # larger than the usual 0.1: keeps this small model nearer its SFT start
    rl_steps: int = 120
    rl_lr: float = 5e-5
    rl_prompts_per_step: int = 8
    kl_coef: float = 0.005  # k3 KL penalty to the SFT model (> 0 also gives the card its KL curve)
    reward_model_weight: float = 0.0  # > 0: GRPO's reward adds the trained reward model's score
    batch_size: int = 16  # preference groups per step (reward model, DPO)

    def __post_init__(self) -> None:
        for name in ("pair_prompts", "max_new_tokens", "rl_prompts_per_task", "rm_steps", "dpo_steps"):
            check_range(f"align.{name}", getattr(self, name), low=1)
        for name in ("rl_steps", "rl_prompts_per_step", "batch_size"):
            check_range(f"align.{name}", getattr(self, name), low=1)
        check_range("align.samples", self.samples, low=2)  # a GRPO group needs two replies to compare
        for name in ("rm_lr", "dpo_lr", "dpo_beta", "rl_lr"):
            check_range(f"align.{name}", getattr(self, name), low=0, low_open=True)
        check_range("align.kl_coef", self.kl_coef, low=0)
        check_range("align.reward_model_weight", self.reward_model_weight, low=0)


@dataclass
class DemoConfig:
    size: str = "tiny"
    run_dir: str = "runs/demo"
    seed: int = 0
    threads: int = 0  # torch threads; 0: all cores
    vocab_size: int = 2048
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    pretrain: TrainSettings = field(default_factory=TrainSettings)
    sft: TrainSettings = field(default_factory=lambda: TrainSettings(steps=600, batch_size=16, lr=2e-3))
    instruct: InstructSettings = field(default_factory=InstructSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    serve: bool = True
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        check_choice("size", self.size, list(SIZES))


# Per size, the values that differ from the DemoConfig defaults (which are the tiny size).
SIZES: dict[str, dict[str, Any]] = {
    "micro": {
        "vocab_size": 384,
        "corpus": {"max_bytes": 150_000, "heldout_documents": 4},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 128},
        "pretrain": {"steps": 4, "batch_size": 4, "seq_len": 64, "warmup_steps": 1},
        "sft": {"steps": 4, "batch_size": 4, "seq_len": 128, "warmup_steps": 1},
        "instruct": {"train_counts": _train_counts(30, 30), "heldout_per_task": 4},
        "align": {
            "pair_prompts": 16,
            "samples": 4,
            "max_new_tokens": 8,
            "rl_prompts_per_task": 16,
            "rm_steps": 2,
            "dpo_steps": 2,
            "rl_steps": 2,
            "rl_prompts_per_step": 2,
            "batch_size": 4,
        },
    },
    "tiny": {},
    "small": {
        "vocab_size": 4096,
        "corpus": {"max_bytes": 8_000_000, "heldout_documents": 80},
        "model": {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 768, "max_seq_len": 512},
        "pretrain": {"steps": 2000, "batch_size": 16, "seq_len": 512},
        "sft": {"steps": 1500, "batch_size": 16, "seq_len": 512},
        "instruct": {"train_counts": _train_counts(7000, 4000), "heldout_per_task": 200},
    },
}


def size_defaults(size: str) -> dict[str, Any]:
    check_choice("size", size, list(SIZES))
    return {"size": size, **SIZES[size]}


class RunLayout:
    """Where a demo run keeps each stage's files: ``RUN/<stage>/...`` (the stages' shared view of a run)."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

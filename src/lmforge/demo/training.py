"""The demo's two training stages: pretraining on the shards, then SFT on the instruction set.

Both run the one trainer (:func:`lmforge.train.train`); SFT goes through :func:`lmforge.tune.finetune.run_sft`.
A killed stage resumes from the trainer's newest checkpoint in its run folder.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import load_config
from lmforge.demo.config import RunLayout
from lmforge.demo.report import StageCard


def model_settings(demo: RunLayout, vocab_size: int) -> dict[str, Any]:
    """The ``model`` section of the pretraining recipe."""
    cfg = demo.cfg.model
    return {
        "vocab_size": vocab_size,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        # Derived fields spelled out: ModelConfig's defaults fill them from its own default shape.
        "n_kv_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "d_ff": cfg.d_ff,
        "max_seq_len": cfg.max_seq_len,
    }


@dataclass
class TrainingEstimate:
    """A training stage's planned tokens and the time they take at the probed throughput."""

    stage: str
    steps: int
    batch_size: int
    seq_len: int
    tokens_per_s: float

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_s


def probe_tokens_per_s(model: dict[str, Any], batch_size: int, seq_len: int, steps: int = 2) -> float:
    """Training throughput of a freshly initialised model of this shape on this machine: tokens/s of full
    steps (forward, backward, the trainer's AdamW), timed after one warm-up step."""
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.config import OptimConfig
    from lmforge.train.objective import lm_loss_sum
    from lmforge.train.optim import build_optimizer

    generator = torch.Generator().manual_seed(0)
    network = Transformer(ModelConfig(**model))
    optimizer = build_optimizer(network, OptimConfig())
    ids = torch.randint(model["vocab_size"], (batch_size, seq_len + 1), generator=generator)

    def step() -> None:
        logits = network(ids[:, :-1]).logits
        (lm_loss_sum(logits, ids[:, 1:]) / ids[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocations and kernel choice happen once
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size * seq_len / (time.perf_counter() - started)


def estimate_training(demo: RunLayout, stages: list[str]) -> list[TrainingEstimate]:
    """Estimates for the training ``stages`` ("pretrain", "sft"): one timing probe per batch shape (the
    tokenizer may not exist yet, so the model has the configured vocabulary size)."""
    import torch

    cfg = demo.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # as the trainer will
    model = model_settings(demo, cfg.vocab_size)
    probed: dict[tuple[int, int], float] = {}
    estimates = []
    for stage in stages:
        settings = getattr(cfg, stage)
        shape = (settings.batch_size, settings.seq_len)
        if shape not in probed:
            probed[shape] = probe_tokens_per_s(model, *shape)
        estimates.append(TrainingEstimate(stage, settings.steps, *shape, probed[shape]))
    return estimates


def _common(demo: RunLayout, stage: str) -> dict[str, Any]:
    cfg = demo.cfg
    settings = getattr(cfg, stage)
    return {
        "run_dir": str(demo.path(stage)),
        "max_steps": settings.steps,
        "seed": cfg.seed,
        "optim": {"lr": settings.lr},
        "schedule": {"warmup_steps": settings.warmup_steps},
        "batch": {"micro_batch_size": settings.batch_size},
        "checkpoint": {"every_steps": max(settings.steps // 4, 25)},
        "log": {"every_steps": max(min(10, settings.steps // 10), 1)},
        "threads": cfg.threads or None,
    }


def _training_numbers(run_dir: Path) -> dict[str, Any]:
    """Key numbers from the trainer's metrics log (complete even when a finished run was resumed)."""
    from lmforge.train.metrics import read_jsonl

    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    if not logged:
        return {}
    last = logged[-1]
    return {
        "steps": last["step"],
        "tokens seen": last["tokens"],
        "final training loss": round(last["loss"], 4),
        "throughput (tokens/s, median of logged windows)": round(
            statistics.median(r["tokens_per_s"] for r in logged)
        ),
    }


def pretrain(demo: RunLayout) -> StageCard:
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train import TrainConfig, train

    cfg = demo.cfg
    tokenizer = load_tokenizer(demo.path("tokenizer"))
    recipe = _common(demo, "pretrain")
    recipe.update(
        model=model_settings(demo, tokenizer.vocab_size),
        data={"shards": [str(demo.path("shards"))], "seq_len": cfg.pretrain.seq_len, "seed": cfg.seed},
        val_shards=[str(demo.path("heldout_shards"))],
        # Checked against the shards' tokenizer hash, and exported next to the weights (chat template included).
        tokenizer=str(demo.path("tokenizer")),
    )
    recipe["log"]["val_every_steps"] = max(cfg.pretrain.steps // 4, 1)
    train_cfg = load_config(TrainConfig, data=recipe)
    result = train(train_cfg)
    from lmforge.model.hf import load_pretrained

    model = load_pretrained(result.model_dir)
    numbers = {
        "architecture": f"llama-style, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, "
        f"{cfg.model.n_heads} heads, RMSNorm, SwiGLU, RoPE",
        "parameters": model.num_parameters(),
        "sequence length": cfg.pretrain.seq_len,
        "batch (sequences)": cfg.pretrain.batch_size,
        **_training_numbers(result.run_dir),
    }
    if result.val_loss is not None:
        numbers["held-out document loss"] = round(result.val_loss, 4)
    return StageCard("pretrain", "Pretraining", numbers=numbers, images=["pretrain/plots/loss.png"])


def finetune(demo: RunLayout) -> StageCard:
    from lmforge.tune.finetune import SFTConfig, run_sft

    cfg = demo.cfg
    recipe = _common(demo, "sft")
    recipe.update(
        init_from=str(demo.path("pretrain", "model")),
        data={"seq_len": cfg.sft.seq_len, "seed": cfg.seed},
        sft={
            "paths": [str(demo.path("instruct", "train.jsonl"))],
            "val_paths": [str(demo.path("instruct", "heldout.jsonl"))],
            "pack": True,
        },
    )
    recipe["log"]["val_every_steps"] = max(cfg.sft.steps // 4, 1)
    sft_cfg = load_config(SFTConfig, data=recipe)
    result, stats = run_sft(sft_cfg)
    numbers = {
        "conversations": stats.examples,
        "tokens (trained: assistant replies + end of turn)": f"{stats.tokens} ({stats.trained_tokens})",
        "rejected records": sum(stats.rejected.values()),
        "packing": f"rows of {cfg.sft.seq_len} tokens, position ids restart per example, no cross-example attention",
        **_training_numbers(result.run_dir),
    }
    if result.val_loss is not None:
        numbers["held-out chat loss"] = round(result.val_loss, 4)
    return StageCard("sft", "Supervised fine-tuning", numbers=numbers, images=["sft/plots/loss.png"])

"""The demo's two training stages: pretraining on the shards, then SFT on the instruction set.

Both run the one trainer (:func:`lmforge.train.train`); SFT goes through :func:`lmforge.tune.finetune.run_sft`.
A killed stage resumes from the trainer's newest checkpoint in its run folder.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.config import load_config
from lmforge.demo.report import StageCard

if TYPE_CHECKING:
    from lmforge.demo.pipeline import Demo


def _common(demo: Demo, stage: str) -> dict[str, Any]:
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


def pretrain(demo: Demo) -> StageCard:
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train import TrainConfig, train

    cfg = demo.cfg
    tokenizer = load_tokenizer(demo.path("tokenizer"))
    recipe = _common(demo, "pretrain")
    recipe.update(
        model={
            "vocab_size": tokenizer.vocab_size,
            "d_model": cfg.model.d_model,
            "n_layers": cfg.model.n_layers,
            "n_heads": cfg.model.n_heads,
            # Derived fields spelled out: ModelConfig's defaults fill them from its own default shape.
            "n_kv_heads": cfg.model.n_heads,
            "head_dim": cfg.model.d_model // cfg.model.n_heads,
            "d_ff": cfg.model.d_ff,
            "max_seq_len": cfg.model.max_seq_len,
        },
        data={"shards": [str(demo.path("shards"))], "seq_len": cfg.pretrain.seq_len, "seed": cfg.seed},
        # Checked against the shards' tokenizer hash, and exported next to the weights (chat template included).
        tokenizer=str(demo.path("tokenizer")),
    )
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
    return StageCard("pretrain", "Pretraining", numbers=numbers, images=["pretrain/plots/loss.png"])


def finetune(demo: Demo) -> StageCard:
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

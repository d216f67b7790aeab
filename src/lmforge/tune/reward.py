"""``lmforge rm``: reward models = a scalar head on the Transformer, trained on preference pairs.

The score of a sequence is ``score(h_T)``, the head applied to the final hidden state of its last token (every
sequence of :mod:`lmforge.tune.preference` ends on its reply's EOS). Training is the one trainer with
:class:`RewardObjective`, the Bradley–Terry loss per pair; the model is exported in Hugging Face
``*ForSequenceClassification`` layout (``RUN/model``), which ``AutoModelForSequenceClassification`` loads with
the same scores, and :func:`lmforge.model.hf.load_reward_model` reads back. The recipe is a
:class:`~lmforge.train.TrainConfig` plus an ``rm`` section:

.. code-block:: yaml

    init_from: runs/sft/model        # the model to start from (its LM head is dropped)
    run_dir: runs/rm
    data: {seq_len: 512, seed: 0}    # longest sequence kept (longer records go to the rejects file)
    batch: {micro_batch_size: 8}     # records (pairs or rankings) per micro-batch
    rm:
      paths: [prefs/train.jsonl]     # {"prompt", "chosen", "rejected"[, "margin"]} or rankings
      val_paths: [prefs/heldout.jsonl]
      center_rewards_coefficient: 0.0
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model import ModelConfig, Transformer
from lmforge.train import TrainConfig
from lmforge.train.objective import Batch, ObjectiveOutput
from lmforge.tune.align_log import AlignMetrics, evaluate, pair_sums
from lmforge.tune.preference import PreferenceDataConfig, load_preference_data
from lmforge.tune.run import run_copy


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per pair: ``-log sigmoid(r_chosen - r_rejected - margin)`` (InstructGPT; Llama 2's margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def center_penalty(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Per pair: ``(r_chosen + r_rejected)^2``, which keeps rewards centred on zero (Eisenstein et al.)."""
    return (r_chosen + r_rejected) ** 2


class RewardModel(nn.Module):
    """A Transformer body (its LM head removed: it returns final hidden states) and a scalar ``score`` head."""

    def __init__(self, backbone: Transformer, score: Tensor | None = None) -> None:
        super().__init__()
        backbone.lm_head = None
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.d_model, 1, bias=False)
        with torch.no_grad():
            if score is None:
                nn.init.normal_(self.score.weight, std=backbone.cfg.init_std)
            else:
                self.score.weight.copy_(score)

    @property
    def cfg(self) -> ModelConfig:  # the trainer reads it
        return self.backbone.cfg

    @property
    def blocks(self) -> nn.ModuleDict:  # the trainer wraps these (FSDP, activation checkpointing)
        return self.backbone.blocks

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Rewards (batch,) in fp32: the head at token ``lengths - 1`` of each right-padded row."""
        hidden = self.backbone(input_ids).logits
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.score(last).squeeze(-1).float()


class RewardObjective:
    """Bradley–Terry over the batch's pairs (+ ``center_rewards_coefficient`` times the centring penalty).

    Units are pairs. Reported sums: ``accuracy`` (chosen scored higher), ``margin`` (r_chosen - r_rejected),
    ``chosen`` and ``rejected`` rewards.
    """

    name = "reward"

    def __init__(self, center_rewards_coefficient: float = 0.0, metrics: AlignMetrics | None = None) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient
        self.metrics = metrics

    def count(self, batch: Batch) -> int:
        return int(batch["chosen_index"].numel())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        rewards = model(batch["input_ids"], batch["lengths"])
        r_chosen, r_rejected = rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]
        loss = bradley_terry_loss(r_chosen, r_rejected, batch["margin"])
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * center_penalty(r_chosen, r_rejected)
        sums = pair_sums(r_chosen.detach(), r_rejected.detach())
        if self.metrics is not None and model.training:
            self.metrics.add(sums, self.count(batch))
        return ObjectiveOutput(loss_sum=loss.sum(), count=self.count(batch), sums=sums)


@dataclass
class RewardDataConfig(PreferenceDataConfig):
    center_rewards_coefficient: float = 0.0


@dataclass
class RewardConfig(TrainConfig):
    rm: RewardDataConfig = field(default_factory=RewardDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rm.paths:
            raise ValueError("rm.paths: at least one file of preference pairs or rankings is required")
        if not self.init_from:
            raise ValueError("init_from: the model folder to start the reward model from is required")


def run_rm(cfg: RewardConfig, progress: bool = True) -> dict[str, Any]:
    """Train a reward model from ``cfg.init_from``; returns a summary (data, held-out accuracy and margin)."""
    from lmforge.model import load_pretrained
    from lmforge.model.hf import save_reward_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.trainer import Trainer

    assert cfg.init_from is not None
    export = cfg.checkpoint.export
    # the trainer exports causal LMs; the reward model is written below
    cfg = run_copy(cfg, progress, checkpoint=dataclasses.replace(cfg.checkpoint, export=False))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    data = load_preference_data(cfg, cfg.rm)
    model = RewardModel(load_pretrained(cfg.init_from))
    metrics = AlignMetrics(Path(cfg.run_dir) / "align_metrics.jsonl", cfg.log.every_steps)
    objective = RewardObjective(cfg.rm.center_rewards_coefficient, metrics)
    val_data = data.val.one_pass if data.val is not None else None
    trainer = Trainer(cfg, model, objective, data.train, val_data, batch_hook=metrics.hook)
    result = trainer.fit()
    metrics.flush(result.step)
    summary: dict[str, Any] = {"run_dir": str(result.run_dir), "step": result.step, "data": data.stats}
    summary["loss"] = result.metrics.get("loss")
    summary["val_loss"] = result.val_loss
    if data.val is not None:
        summary["heldout"] = evaluate(trainer.model, objective, data.val.one_pass())
    if export and trainer.env.is_main:
        out = Path(cfg.run_dir) / "model"
        tokenizer = load_tokenizer(cfg.tokenizer)
        save_reward_model(trainer.model.backbone, trainer.model.score.weight, out, pad_token_id=data.pad_id)
        tokenizer.save(out)
        summary["model_dir"] = str(out)
    (Path(cfg.run_dir) / "rm_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

"""Objectives: what the one training loop minimises, as a loss summed over a batch's units.

An objective returns the *summed* loss and how many units (tokens, pairs, ...) it covers; the trainer
divides by the units of the whole optimizer step across all micro-batches and data-parallel ranks, so
gradient accumulation, a batch-size ramp and data parallelism all keep per-unit semantics. The unit count
must be computable from the batch alone (``count``), before the forward, so each micro-batch can be
scaled in its own backward pass. Pretraining and SFT use :class:`LMObjective` (SFT batches mask prompt
tokens with ``labels=-100``); preference objectives (DPO, reward models) implement the same protocol
over their own batch format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
Batch = dict[str, Tensor]


@dataclass
class ObjectiveOutput:
    loss_sum: Tensor  # scalar, summed over ``count`` units (what backward sees, once divided)
    count: int  # units covered
    sums: dict[str, Tensor] = field(default_factory=dict)  # detached summed metrics, reported per unit


class Objective(Protocol):
    name: str

    def count(self, batch: Batch) -> int:
        """Units in ``batch`` the loss is averaged over (known before the forward pass)."""
        ...

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput: ...


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (in fp32) over positions whose label is not -100."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class LMObjective:
    """Causal language modelling: cross-entropy on ``labels`` plus the model's auxiliary (MoE) loss.

    The auxiliary loss is a per-forward mean; it is weighted by the micro-batch's token count so that, after
    the per-token division, it enters the step loss as the token-weighted mean over micro-batches.
    """

    name = "lm"

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
        )
        labels = batch["labels"]
        count = self.count(batch)
        ce_sum = lm_loss_sum(out.logits, labels)
        aux = out.aux_loss.float() * count
        return ObjectiveOutput(
            loss_sum=ce_sum + aux, count=count, sums={"ce": ce_sum.detach(), "aux": aux.detach()}
        )

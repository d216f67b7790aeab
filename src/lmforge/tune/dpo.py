"""``lmforge dpo``: Direct Preference Optimization as an objective of the one trainer.

For a pair with policy log-probs ``pi_c``, ``pi_r`` of the chosen and rejected replies (summed over the reply's
tokens) and reference log-probs ``ref_c``, ``ref_r``, let ``h = (pi_c - ref_c) - (pi_r - ref_r)``. The losses
(:func:`dpo_loss`, per pair):

* ``sigmoid`` (Rafailov et al.): ``-log σ(β h)``; with ``label_smoothing`` ε > 0 it is conservative DPO
  (cDPO): ``-(1-ε) log σ(β h) - ε log σ(-β h)``;
* ``robust`` (Chowdhury et al., unbiased under preference noise ε): ``((1-ε)(-log σ(β h)) - ε(-log σ(-β h)))
  / (1 - 2ε)``;
* ``hinge`` (SLiC): ``max(0, 1 - β h)``;
* ``ipo`` (Azar et al.): ``(h - 1/(2β))^2``, with ``h`` from per-token *mean* log-probs (as trl does, so β
  means the same whatever the reply lengths).

Reference log-probs are computed once, before training, by one pass of the starting model over the data
(:func:`reference_logps`) and carried in the batches; ``reference_context`` is the seam for PEFT: a context
in which the model computes the reference (the adapters disabled). Metrics (``RUN/align_metrics.jsonl`` and
the held-out summary): the implicit rewards ``β (pi - ref)`` of chosen and rejected, their margin, the
accuracy (chosen reward higher) and ``logps_chosen``. The recipe is a TrainConfig plus a ``dpo`` section:

.. code-block:: yaml

    init_from: runs/sft/model
    run_dir: runs/dpo
    data: {seq_len: 512}
    batch: {micro_batch_size: 8}   # records (pairs or rankings) per micro-batch
    dpo:
      paths: [prefs/train.jsonl]
      val_paths: [prefs/heldout.jsonl]
      beta: 0.1
      loss_type: sigmoid           # sigmoid | robust | hinge | ipo
      label_smoothing: 0.0         # cDPO (sigmoid) or robust noise rate, in [0, 0.5)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import check_choice
from lmforge.train import TrainConfig
from lmforge.train.objective import Batch, ObjectiveOutput
from lmforge.tune.align_log import AlignMetrics, evaluate, pair_sums
from lmforge.tune.preference import (
    PreferenceDataConfig,
    PreferenceDataSource,
    load_preference_data,
    with_ref_logps,
)
from lmforge.tune.run import run_copy

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair DPO loss from sequence log-probs (formulas in the module docstring)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type: one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def sequence_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor, mean: bool = False) -> Tensor:
    """Per row: the sum (or mean) over reply tokens t of ``log p(x_t | x_<t)``, in fp32."""
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
    )  # (rows, seq - 1): log-prob of token t + 1
    mask = response_mask[:, 1:].to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


class DPOObjective:
    """DPO over the batch's pairs; the batch must carry ``ref_logps`` (one per row). Units are pairs."""

    name = "dpo"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        metrics: AlignMetrics | None = None,
    ) -> None:
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.metrics = metrics

    @property
    def mean_logps(self) -> bool:
        return self.loss_type == "ipo"

    def count(self, batch: Batch) -> int:
        return int(batch["chosen_index"].numel())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        logits = model(batch["input_ids"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"], self.mean_logps)
        chosen, rejected = batch["chosen_index"], batch["rejected_index"]
        ref = batch["ref_logps"]
        loss = dpo_loss(
            logps[chosen],
            logps[rejected],
            ref[chosen],
            ref[rejected],
            self.beta,
            self.loss_type,
            self.label_smoothing,
        )
        reward = self.beta * (logps.detach() - ref)
        sums = {**pair_sums(reward[chosen], reward[rejected]), "logps_chosen": logps.detach()[chosen].sum()}
        if self.metrics is not None and model.training:
            self.metrics.add(sums, self.count(batch))
        return ObjectiveOutput(loss_sum=loss.sum(), count=self.count(batch), sums=sums)


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    source: PreferenceDataSource,
    mean: bool = False,
    reference_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Fill in every group's ``ref_logps`` with one eval-mode pass of ``model`` over ``source``.

    ``reference_context`` is entered around the pass: the reference under PEFT is the model with its
    adapters disabled.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values: list[float] = []
    with reference_context():
        for batch in source.one_pass():
            input_ids = batch["input_ids"].to(device)
            logits = model(input_ids).logits
            values += sequence_logps(logits, input_ids, batch["response_mask"].to(device), mean).tolist()
    model.train(was_training)
    offset = 0
    for i, group in enumerate(source.groups):
        n = len(group.sequences)
        source.groups[i] = with_ref_logps(group, values[offset : offset + n])
        offset += n


@dataclass
class DPODataConfig(PreferenceDataConfig):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_choice("dpo.loss_type", self.loss_type, LOSS_TYPES)
        if self.beta <= 0:
            raise ValueError(f"dpo.beta: must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError("dpo.label_smoothing applies to loss_type sigmoid (cDPO) or robust")


@dataclass
class DPOConfig(TrainConfig):
    dpo: DPODataConfig = field(default_factory=DPODataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dpo.paths:
            raise ValueError("dpo.paths: at least one file of preference pairs or rankings is required")
        if not self.init_from:
            raise ValueError("init_from: the model folder to align (also the reference) is required")


def run_dpo(
    cfg: DPOConfig,
    progress: bool = True,
    reference_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Align ``cfg.init_from`` with DPO; the starting model is the reference. Returns a summary (data,
    held-out implicit-reward accuracy and margin, the exported model folder)."""
    from lmforge.model import load_pretrained
    from lmforge.train import train

    assert cfg.init_from is not None
    cfg = run_copy(cfg, progress)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_preference_data(cfg, cfg.dpo)
    model = load_pretrained(cfg.init_from).train()
    objective = DPOObjective(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
    for source in (data.train, data.val):
        if source is not None:
            reference_logps(model, source, objective.mean_logps, reference_context)
    objective.metrics = metrics = AlignMetrics(run_dir / "align_metrics.jsonl", cfg.log.every_steps)
    val_data = data.val.one_pass if data.val is not None else None
    result = train(cfg, model, objective, data.train, val_data, batch_hook=metrics.hook)
    metrics.flush(result.step)
    summary: dict[str, Any] = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "data": data.stats,
        "loss": result.metrics.get("loss"),
        "val_loss": result.val_loss,
        "model_dir": str(result.model_dir) if result.model_dir else None,
    }
    if data.val is not None:
        summary["heldout"] = evaluate(model, objective, data.val.one_pass())
    (run_dir / "dpo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

"""DoReMi with the one trainer: a reference model, then a proxy model trained with Group DRO.

1. The reference model trains with the recipe as written (its ``data.mixture`` = the reference weights).
2. The proxy model (same shape, same initial weights) trains on batches drawn uniformly over the domains
   with :class:`DoReMiObjective`: every training micro-batch updates the domain weights alpha from the
   per-domain clipped excess loss of proxy over reference, and the proxy minimises the alpha-weighted sum
   of per-domain mean losses (:mod:`lmforge.data.doremi` has the update and its formulas).
3. The average of alpha over all updates is written as a mixture weights file.

The proxy's alpha history lives in memory, so the proxy run starts afresh (no resume), and it runs in one
process (its loader is not rank-sharded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.doremi import DoReMiWeights, domain_weighted_loss, per_domain_excess_loss
from lmforge.data.loader import PackedLoader
from lmforge.data.mixture import MixtureConfig
from lmforge.train.config import TrainConfig
from lmforge.train.objective import IGNORE_INDEX, Batch, ObjectiveOutput
from lmforge.train.trainer import Trainer


@dataclass
class DoReMiConfig:
    train: TrainConfig = field(
        default_factory=TrainConfig
    )  # recipe of both models (shape, data, optim, batch)
    run_dir: str = "runs/doremi"
    reference: str | None = None  # a trained reference model folder; None trains one with ``train``
    reference_steps: int = 0  # 0: train.max_steps
    proxy_steps: int = 0  # 0: train.max_steps
    eta: float = 1.0
    smoothing: float = 1e-4
    output: str | None = None  # weights file; default RUN_DIR/domain_weights.json


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-position cross-entropy [B, T] in fp32 (0 where the label is ignored)."""
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.reshape(labels.shape)


class DoReMiObjective:
    """Group DRO over domains against a frozen reference model; needs ``domain_ids`` in the batch."""

    name = "doremi"

    def __init__(self, reference: nn.Module, weights: DoReMiWeights) -> None:
        self.reference = reference.eval().requires_grad_(False)
        self.weights = weights

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def _forward(self, model: nn.Module, batch: Batch) -> Tensor:
        out = model(
            batch["input_ids"], position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids")
        )
        return out.logits

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        domains = batch["domain_ids"]
        proxy_loss = token_losses(self._forward(model, batch), labels)
        if torch.is_grad_enabled():  # a training micro-batch: one DoReMi step (validation leaves alpha alone)
            with torch.no_grad():
                reference_loss = token_losses(self._forward(self.reference, batch), labels)
            excess = per_domain_excess_loss(
                proxy_loss, reference_loss, domains, len(self.weights.domains), mask
            )
            self.weights.update(excess)
        alpha = torch.as_tensor(self.weights.alpha, dtype=torch.float32, device=proxy_loss.device)
        count = self.count(batch)
        weighted = domain_weighted_loss(proxy_loss, domains, alpha, mask)
        # the trainer divides by the step's token count, so the summed form keeps the weighted mean
        return ObjectiveOutput(
            loss_sum=weighted * count, count=count, sums={"ce": (proxy_loss * mask).sum().detach()}
        )


def run_doremi(cfg: DoReMiConfig) -> dict[str, float]:
    """Train (or load) the reference, train the proxy, write and return the averaged domain weights."""
    from lmforge.model.hf import load_pretrained

    run_dir = Path(cfg.run_dir)
    if cfg.reference:
        reference = load_pretrained(cfg.reference)
    else:
        ref_cfg = copy.deepcopy(cfg.train)
        ref_cfg.run_dir = str(run_dir / "reference")
        ref_cfg.max_steps = cfg.reference_steps or cfg.train.max_steps
        trainer = Trainer(ref_cfg)
        trainer.fit()
        reference = trainer.model

    proxy_cfg = copy.deepcopy(cfg.train)
    proxy_cfg.run_dir = str(run_dir / "proxy")
    proxy_cfg.max_steps = cfg.proxy_steps or cfg.train.max_steps
    proxy_cfg.checkpoint.resume = False
    proxy_cfg.checkpoint.export = False
    data = proxy_cfg.data
    domains = PackedLoader(data.shards, data.seq_len, 1).domains
    loader = PackedLoader(
        data.shards,
        seq_len=data.seq_len,
        batch_size=proxy_cfg.batch.micro_batch_size,
        seed=data.seed,
        document_masking=data.document_masking,
        mixture=MixtureConfig("fixed", dict.fromkeys(domains, 1.0)),  # the proxy samples domains uniformly
        return_domain_ids=True,
    )
    weights = DoReMiWeights(loader.domains, cfg.eta, cfg.smoothing)
    proxy = Trainer(proxy_cfg, objective=DoReMiObjective(reference, weights), train_data=loader)
    reference.to(proxy.device)
    proxy.fit()
    output = Path(cfg.output) if cfg.output else run_dir / "domain_weights.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    weights.save(output)
    return weights.as_dict()

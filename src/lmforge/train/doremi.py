"""DoReMi with the one trainer: a reference model, then a proxy model trained with Group DRO.

1. The reference model trains with the recipe as written (its ``data.mixture`` = the reference weights).
2. The proxy model (same shape, same initial weights) trains on batches drawn uniformly over the domains
   with :class:`DoReMiObjective`: every training micro-batch updates the domain weights alpha from the
   per-domain clipped excess loss of proxy over reference, and the proxy minimises the alpha-weighted sum
   of per-domain mean losses (the update and its formulas are below).
3. The average of alpha over all updates is written as a mixture weights file.

The proxy's alpha history lives in memory, so the proxy run starts afresh (no resume), and it runs in one
process (its loader is not rank-sharded).

The update (Xie et al., 2023, "DoReMi: Optimizing Data Mixtures Speeds Up LM Pretraining"): at every step t,
for each domain i of the minibatch:

    excess_i   = sum over tokens of domain i of max(loss_proxy - loss_ref, 0) / (tokens of domain i)
    alpha'     = alpha_{t-1} * exp(eta * excess)                 (exponentiated-gradient ascent)
    alpha_t    = (1 - eps) * alpha' / sum(alpha') + eps / k     (smoothing towards uniform, k domains)

and the proxy takes a gradient step on ``sum_i alpha_t[i] * mean loss of domain i``. The domain weights
DoReMi returns are the average of alpha_t over all steps; :meth:`DoReMiWeights.save` writes them as the
weights file that ``MixtureConfig(strategy="fixed", weights_file=...)`` reads. Defaults follow the paper:
eta = 1.0, eps = 1e-4, alpha_0 uniform.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.shards.format import TokenShards
from lmforge.shards.loader import PackedLoader
from lmforge.shards.mixture import MixtureConfig, write_weights_file
from lmforge.train.config import TrainConfig
from lmforge.train.objective import IGNORE_INDEX, Batch, ObjectiveOutput
from lmforge.train.trainer import Trainer


def per_domain_excess_loss(
    proxy_token_loss: torch.Tensor,
    reference_token_loss: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clipped excess loss averaged over each domain's tokens in the batch ([num_domains]; 0 where a domain
    has no tokens). ``*_token_loss``: [B, T] per-token losses; ``domain_ids``: [B] (one domain per packed
    row) or [B, T]; ``mask``: [B, T], true where a token counts (labels != -100)."""
    excess = (proxy_token_loss.detach() - reference_token_loss.detach()).clamp_min(0).float()
    if domain_ids.dim() == 1:
        domain_ids = domain_ids[:, None].expand_as(excess)
    weight = torch.ones_like(excess) if mask is None else mask.float()
    sums = torch.zeros(num_domains, dtype=excess.dtype, device=excess.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, domain_ids.reshape(-1), (excess * weight).reshape(-1))
    counts.index_add_(0, domain_ids.reshape(-1), weight.reshape(-1))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))


def domain_weighted_loss(
    token_loss: torch.Tensor,
    domain_ids: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The proxy's Group-DRO objective: sum_i weights[i] * (mean loss over domain i's tokens)."""
    if domain_ids.dim() == 1:
        domain_ids = domain_ids[:, None].expand_as(token_loss)
    weight = torch.ones_like(token_loss) if mask is None else mask.to(token_loss.dtype)
    num_domains = len(weights)
    sums = torch.zeros(num_domains, dtype=token_loss.dtype, device=token_loss.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, domain_ids.reshape(-1), (token_loss * weight).reshape(-1))
    counts = counts.index_add(0, domain_ids.reshape(-1), weight.reshape(-1).detach())
    per_domain = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return (weights.to(per_domain) * per_domain).sum()


class DoReMiWeights:
    """The domain weights alpha_t and their running average over update steps."""

    def __init__(self, domains: Sequence[str], eta: float = 1.0, smoothing: float = 1e-4) -> None:
        if not domains:
            raise ValueError("DoReMi needs at least one domain")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        self.domains = list(domains)
        self.eta = eta
        self.smoothing = smoothing
        k = len(self.domains)
        self.alpha = np.full(k, 1.0 / k)
        self._sum = np.zeros(k)
        self.steps = 0

    def update(self, excess: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
        """One exponentiated-gradient step from the per-domain excess losses; returns the new alpha_t."""
        if isinstance(excess, torch.Tensor):
            excess = excess.detach().cpu().double().numpy()
        excess = np.asarray(excess, dtype=np.float64)
        if excess.shape != self.alpha.shape:
            raise ValueError(f"expected {len(self.domains)} excess losses, got shape {excess.shape}")
        # In log space, shifted by the max: exp() of large excess losses must not overflow.
        logits = np.log(self.alpha) + self.eta * excess
        unnormalised = np.exp(logits - logits.max())
        k = len(self.domains)
        self.alpha = (1.0 - self.smoothing) * unnormalised / unnormalised.sum() + self.smoothing / k
        self._sum += self.alpha
        self.steps += 1
        return self.alpha.copy()

    @property
    def average(self) -> np.ndarray:
        """DoReMi's output: the mean of alpha_t over the steps taken (uniform before any step)."""
        if self.steps == 0:
            return np.full(len(self.domains), 1.0 / len(self.domains))
        return self._sum / self.steps

    def as_dict(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.average)}

    def save(self, path: str | Path) -> None:
        """Write the averaged weights as a mixture weights file."""
        write_weights_file(
            path,
            self.as_dict(),
            method="doremi",
            steps=self.steps,
            eta=self.eta,
            smoothing=self.smoothing,
            last_alpha={d: float(w) for d, w in zip(self.domains, self.alpha)},
        )


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
    domains = TokenShards(proxy_cfg.data.shards).domains
    # the proxy samples domains uniformly, one stage (no curriculum), from the whole of each domain
    uniform = MixtureConfig("fixed", dict.fromkeys(domains, 1.0))
    data = dataclasses.replace(proxy_cfg.data, mixture=uniform, curriculum=[], val_fraction=0.0)
    loader = PackedLoader.from_config(data, proxy_cfg.batch.micro_batch_size, return_domain_ids=True)
    weights = DoReMiWeights(loader.domains, cfg.eta, cfg.smoothing)
    proxy = Trainer(proxy_cfg, objective=DoReMiObjective(reference, weights), train_data=loader)
    reference.to(proxy.device)
    proxy.fit()
    output = Path(cfg.output) if cfg.output else run_dir / "domain_weights.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    weights.save(output)
    return weights.as_dict()

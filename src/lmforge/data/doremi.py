"""DoReMi domain weights (Xie et al., 2023, "DoReMi: Optimizing Data Mixtures Speeds Up LM Pretraining").

A small proxy model is trained with Group DRO against a fixed reference model (trained on the natural
mixture). At every step t, for each domain i of the minibatch:

    excess_i   = sum over tokens of domain i of max(loss_proxy - loss_ref, 0) / (tokens of domain i)
    alpha'     = alpha_{t-1} * exp(eta * excess)                 (exponentiated-gradient ascent)
    alpha_t    = (1 - eps) * alpha' / sum(alpha') + eps / k     (smoothing towards uniform, k domains)

and the proxy takes a gradient step on ``sum_i alpha_t[i] * mean loss of domain i``. The domain weights
DoReMi returns are the average of alpha_t over all steps; :meth:`DoReMiWeights.save` writes them as the
weights file that ``MixtureConfig(strategy="fixed", weights_file=...)`` reads. Defaults follow the paper:
eta = 1.0, eps = 1e-4, alpha_0 uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.data.mixture import write_weights_file


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

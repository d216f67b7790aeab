"""Domain mixtures: how often the loader draws each domain (source) of the training data.

Strategies (:data:`MIXTURE_STRATEGIES`):

- ``fixed``: the given weights (or a weights file, e.g. written by DoReMi), normalised;
- ``proportional``: p_i proportional to the domain's token count n_i (natural mixture);
- ``temperature``: p_i proportional to n_i ** (1 / T); T = 1 is proportional, large T tends to uniform,
  which up-samples small domains (as in multilingual pretraining).

Caps (any strategy): ``max_fraction: {domain: f}`` bounds a domain's share of the draws, e.g.
``{dialogue: 0.05}`` so that conversation data (forum threads, OpenAssistant dialogues) stays a small part
of pretraining -- too much of it makes a base model answer instructions as chit-chat. The capped weights
are ``w_i = min(f_i, lambda * p_i)`` with the one ``lambda`` that makes them sum to 1 (water filling):
a capped domain's excess goes to the others in proportion to their weights. A cap that cannot be met
(every domain with weight capped and the caps summing to less than 1) is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import check_choice
from lmforge.data.atomic import atomic_write_json

MIXTURE_STRATEGIES = ("fixed", "proportional", "temperature")


@dataclass
class MixtureConfig:
    strategy: str = "proportional"
    weights: dict[str, float] = field(default_factory=dict)  # fixed: domain -> weight (need not sum to 1)
    weights_file: str | None = None  # fixed: JSON with {"domain_weights": {domain: weight}}
    temperature: float = 1.0
    max_fraction: dict[str, float] = field(default_factory=dict)  # domain -> largest share of the draws

    def __post_init__(self) -> None:
        bad = {d: f for d, f in self.max_fraction.items() if not 0 <= f <= 1}
        if bad:
            raise ValueError(f"max_fraction: shares must be in [0, 1], got {bad}")
        check_choice("strategy", self.strategy, MIXTURE_STRATEGIES)
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights: must be >= 0")


def read_weights_file(path: str | Path) -> dict[str, float]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    weights = data.get("domain_weights") if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'domain_weights' mapping")
    return {str(k): float(v) for k, v in weights.items()}


def write_weights_file(path: str | Path, weights: dict[str, float], **extra: object) -> None:
    payload = {"domain_weights": weights, **extra}
    atomic_write_json(path, payload)


def mixture_weights(cfg: MixtureConfig, domain_tokens: dict[str, int]) -> dict[str, float]:
    """Normalised sampling probabilities for the domains in ``domain_tokens`` (domain -> token count)."""
    if not domain_tokens:
        raise ValueError("no domains to mix")
    if cfg.strategy == "fixed":
        given = read_weights_file(cfg.weights_file) if cfg.weights_file else dict(cfg.weights)
        if not given:
            raise ValueError("mixture strategy 'fixed' needs weights or a weights_file")
        unknown = sorted(set(given) - set(domain_tokens))
        if unknown:
            raise ValueError(
                f"mixture weights name unknown domain(s) {unknown}; known: {sorted(domain_tokens)}"
            )
        raw = {d: given.get(d, 0.0) for d in domain_tokens}
    else:
        exponent = 1.0 if cfg.strategy == "proportional" else 1.0 / cfg.temperature
        raw = {d: float(n) ** exponent if n > 0 else 0.0 for d, n in domain_tokens.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"mixture weights are all zero for domains {sorted(domain_tokens)}")
    weights = {d: w / total for d, w in raw.items()}
    return cap_weights(weights, cfg.max_fraction) if cfg.max_fraction else weights


def cap_weights(weights: dict[str, float], max_fraction: dict[str, float]) -> dict[str, float]:
    """Weights (summing to 1) with each capped domain at most its ``max_fraction``; the excess goes to the
    uncapped domains in proportion to their weights, repeated until no cap is exceeded."""
    unknown = sorted(set(max_fraction) - set(weights))
    if unknown:
        raise ValueError(f"max_fraction names unknown domain(s) {unknown}; known: {sorted(weights)}")
    capped: dict[str, float] = {}
    while True:
        free = {d: w for d, w in weights.items() if d not in capped}
        budget = 1.0 - sum(capped.values())
        free_total = sum(free.values())
        if free_total <= 0:
            if budget > 1e-12:
                raise ValueError(
                    f"max_fraction {max_fraction} cannot be met: the capped domains can take at most "
                    f"{1 - budget:.4g} of the draws and no other domain has weight"
                )
            return {d: capped.get(d, 0.0) for d in weights}
        scale = budget / free_total
        over = {d for d, w in free.items() if d in max_fraction and w * scale > max_fraction[d]}
        if not over:
            return {d: capped[d] if d in capped else w * scale for d, w in weights.items()}
        capped.update({d: max_fraction[d] for d in over})

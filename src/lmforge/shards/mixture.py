"""Domain mixtures: how often the loader draws each domain (source) of the training data.

Strategies (:data:`MIXTURE_STRATEGIES`):

- ``fixed``: the given weights (or a weights file, e.g. written by DoReMi), normalised;
- ``proportional``: p_i proportional to the domain's token count n_i (natural mixture);
- ``temperature``: p_i proportional to n_i ** (1 / T); T = 1 is proportional, large T tends to uniform,
  which up-samples small domains (as in multilingual pretraining).
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

    def __post_init__(self) -> None:
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
    return {d: w / total for d, w in raw.items()}

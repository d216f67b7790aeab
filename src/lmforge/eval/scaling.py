"""Predictable scaling: fit loss curves of a ladder of runs, predict a larger run, plan a compute budget.

Two laws are fitted to the final losses of a ladder of training runs:

- loss vs compute, ``L(C) = a * C^(-b) + c`` (Kaplan et al. 2020, with an irreducible term as in the GPT-4
  report's loss prediction), fitted by least squares on log L;
- Chinchilla's ``L(N, D) = E + A / N^alpha + B / D^beta`` (Hoffmann et al. 2022, approach 3), fitted as in
  the paper: Huber loss (delta 1e-3) between log L and ``LSE(a - alpha log N, b - beta log D, e)``,
  minimised by L-BFGS from a grid of starting points, keeping the best.

A run's point is read from its folder: ``N`` = non-embedding parameters of its model (embeddings dominate
tiny models and do not scale like the rest), ``D`` = tokens trained on (the last ``tokens`` in
``metrics.jsonl``), ``C`` = Kaplan et al.'s non-embedding training compute ``(6 N + 6 n_layer n_ctx d_attn)
D`` (:func:`non_embedding_flops_per_token`: the same ``N`` as the x-axis of ``L(N, D)``, so ``C ~ 6 N D``;
the LM head, whose width is the vocabulary's and not the model's, is left out as the embeddings are), and the
loss = the validation loss logged at the run's last step, else the mean of the last few logged training
losses (each already an average over its logging window).

Compute-optimal allocation under ``C = 6 N D`` (Chinchilla, approach 3):
``N_opt = G (C/6)^(beta/(alpha+beta))``, ``D_opt = G^-1 (C/6)^(alpha/(alpha+beta))`` with
``G = (alpha A / (beta B))^(1/(alpha+beta))``; the rule of thumb is ~20 tokens per parameter
(``D = 20 N``, approach 1's Table 3).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmforge.config import check_range
from lmforge.train.config import TrainConfig

TOKENS_PER_PARAM = 20.0
TAIL_STEPS = 5  # training losses averaged when a run logged no validation loss


@dataclass(frozen=True)
class ScalingPoint:
    run: str
    params: float  # non-embedding parameters N
    tokens: float  # D
    flops: float  # C
    loss: float


@dataclass(frozen=True)
class PowerLaw:
    """``L(C) = a * C^(-b) + c``."""

    a: float
    b: float
    c: float

    def __call__(self, flops: float) -> float:
        return self.a * flops ** (-self.b) + self.c


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A / N^alpha + B / D^beta``."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """Compute-optimal (N, D) for a budget of ``flops`` under ``C = 6 N D``."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a = self.beta / (self.alpha + self.beta)
        b = self.alpha / (self.alpha + self.beta)
        return g * (flops / 6) ** a, (flops / 6) ** b / g

    def optimal_for_params(self, params: float) -> tuple[float, float]:
        """The budget (C, D) for which ``params`` is the compute-optimal size."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        flops = 6 * (params / g) ** ((self.alpha + self.beta) / self.beta)
        return flops, flops / (6 * params)


CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def rule_of_thumb(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with ``D = tokens_per_param * N`` and ``C = 6 N D``."""
    params = math.sqrt(flops / (6 * tokens_per_param))
    return params, tokens_per_param * params


# -- fitting ---------------------------------------------------------------------------------------------------
def _lbfgs(loss_fn: Any, start: Sequence[float], steps: int = 200) -> tuple[list[float], float]:
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss_fn(x)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(loss_fn(x))
    return x.detach().tolist(), value if math.isfinite(value) else math.inf


def fit_power_law(flops: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """Least-squares fit of ``log L = log(a C^-b + c)``; needs at least three points.

    The fit is constrained to the physically meaningful region: ``a > 0``, ``b > 0`` (loss falls with
    compute) and ``0 < c <= min(L)`` (the irreducible loss is no higher than any observed loss), through the
    parametrisation ``a = exp(u)``, ``b = exp(v)``, ``c = min(L) * sigmoid(w)``. Unconstrained, a fit of three
    parameters to four noisy points puts ``c`` above a loss already reached (on losses 5.0, 4.2, 3.9, 4.1 at
    4x compute steps: ``c`` = 4.0) and then predicts that no larger run beats the noisy last point.
    """
    if len(flops) < 3 or len(flops) != len(losses):
        raise ValueError("a power law with an offset needs at least three (compute, loss) points")
    log_c = torch.tensor([math.log(f) for f in flops], dtype=torch.float64)
    log_l = torch.tensor([math.log(v) for v in losses], dtype=torch.float64)
    scale = float(log_c.mean())  # C^-b = exp(-b (log C - scale)) * exp(-b scale): keeps exp() in range
    floor = min(losses)

    # x = (log a', log b, logit(c / floor)) with a' = a exp(-b scale)
    def objective(x: torch.Tensor) -> torch.Tensor:
        pred = torch.exp(x[0] - torch.exp(x[1]) * (log_c - scale)) + floor * torch.sigmoid(x[2])
        return ((torch.log(pred) - log_l) ** 2).mean()

    best, best_value = None, math.inf
    for frac, b in itertools.product((0.01, 0.5, 0.9, 0.99), (0.05, 0.2, 0.5, 1.0)):
        c0 = frac * floor
        a0 = max(float(torch.exp(log_l).mean()) - c0, 1e-6)
        x, value = _lbfgs(objective, [math.log(a0), math.log(b), math.log(frac / (1 - frac))])
        if value < best_value:
            best, best_value = x, value
    assert best is not None
    log_a, log_b, logit_c = best
    b = math.exp(log_b)
    return PowerLaw(a=math.exp(log_a + b * scale), b=b, c=floor / (1 + math.exp(-logit_c)))


def fit_chinchilla(
    params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], delta: float = 1e-3
) -> ChinchillaLaw:
    """Hoffmann et al.'s fit of ``L(N, D)``; needs at least five runs (five parameters)."""
    if not len(params) == len(tokens) == len(losses) or len(params) < 5:
        raise ValueError("the Chinchilla law has five parameters: fit it on at least five runs")
    log_n = torch.tensor([math.log(n) for n in params], dtype=torch.float64)
    log_d = torch.tensor([math.log(d) for d in tokens], dtype=torch.float64)
    log_l = torch.tensor([math.log(v) for v in losses], dtype=torch.float64)

    def objective(x: torch.Tensor) -> torch.Tensor:  # x = (a, b, e, alpha, beta), A = exp(a), ...
        terms = torch.stack(
            [x[0] - x[3] * log_n, x[1] - x[4] * log_d, x[2].expand_as(log_n)],
        )
        residual = torch.logsumexp(terms, dim=0) - log_l
        return torch.nn.functional.huber_loss(
            residual, torch.zeros_like(residual), delta=delta, reduction="sum"
        )

    best, best_value = None, math.inf
    # a coarser grid than the paper's (which has 1500 starts): each start runs L-BFGS to convergence
    grid = itertools.product((2.0, 8.0), (2.0, 8.0), (0.0, 1.0), (0.3,), (0.3,))
    for start in grid:
        x, value = _lbfgs(objective, list(start), steps=500)
        if value < best_value:
            best, best_value = x, value
    assert best is not None
    a, b, e, alpha, beta = best
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


# -- runs ------------------------------------------------------------------------------------------------------
def non_embedding_flops_per_token(cfg: Any, context: int, params: float) -> float:
    """Kaplan et al. (2020, Table 1) training FLOPs per token, ``3 * (2 N + 2 n_layer n_ctx d_attn)``, with
    ``N`` the non-embedding parameters and the attention term as
    :func:`lmforge.model.flops.attention_flops_per_token` counts it (equal to Kaplan's for full causal
    attention: ``2 * 2 n_layer (n_ctx / 2) d_attn``); neither the embeddings nor the LM head."""
    from lmforge.model.flops import attention_flops_per_token

    return 3 * (2 * params + attention_flops_per_token(cfg, context))


def read_run(run_dir: str | Path) -> ScalingPoint:
    """The (N, D, C, loss) point of one finished training run folder.

    The loss is the held-out loss measured at the run's last step; a validation loss logged earlier in the
    run is not the final model's, so it is used only when nothing else exists. Without any validation, the
    mean of the last :data:`TAIL_STEPS` logged training losses is taken (a training loss underestimates the
    held-out loss once data repeat).
    """
    from lmforge.config import load_config
    from lmforge.model.flops import count_parameters
    from lmforge.train.metrics import read_jsonl

    run_dir = Path(run_dir)
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r and "tokens" in r]
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training records")
    last_step = train[-1].get("step")
    val = [r for r in records if "val_loss" in r]
    final_val = [r["val_loss"] for r in val if r.get("step") == last_step]
    if final_val:
        loss = final_val[-1]
    elif val:
        loss = val[-1]["val_loss"]
    else:
        tail = train[-TAIL_STEPS:]
        loss = sum(r["loss"] for r in tail) / len(tail)
    count = count_parameters(cfg.model)
    params = float(count.active - count.embedding)
    tokens = float(train[-1]["tokens"])
    flops = non_embedding_flops_per_token(cfg.model, cfg.data.seq_len, params) * tokens
    return ScalingPoint(str(run_dir), params, tokens, flops, float(loss))


@dataclass
class ScalingReport:
    points: list[ScalingPoint]  # sorted by compute; the last one is held out
    power_law: PowerLaw
    chinchilla: ChinchillaLaw | None  # None with fewer than five fitted runs
    target: ScalingPoint
    predicted_power_law: float
    predicted_chinchilla: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [asdict(p) for p in self.points],
            "power_law": asdict(self.power_law),
            "chinchilla": asdict(self.chinchilla) if self.chinchilla else None,
            "target": asdict(self.target),
            "predicted_power_law": self.predicted_power_law,
            "predicted_chinchilla": self.predicted_chinchilla,
            "error_power_law": self.predicted_power_law - self.target.loss,
            "error_chinchilla": (
                None if self.predicted_chinchilla is None else self.predicted_chinchilla - self.target.loss
            ),
        }


def predict_largest(points: Sequence[ScalingPoint]) -> ScalingReport:
    """Fit both laws to every run but the one with the most compute, and predict that one's loss."""
    ordered = sorted(points, key=lambda p: p.flops)
    fitted, target = ordered[:-1], ordered[-1]
    law = fit_power_law([p.flops for p in fitted], [p.loss for p in fitted])
    chin = None
    if len(fitted) >= 5:
        chin = fit_chinchilla(
            [p.params for p in fitted], [p.tokens for p in fitted], [p.loss for p in fitted]
        )
    return ScalingReport(
        points=ordered,
        power_law=law,
        chinchilla=chin,
        target=target,
        predicted_power_law=law(target.flops),
        predicted_chinchilla=chin(target.params, target.tokens) if chin else None,
    )


# -- planning --------------------------------------------------------------------------------------------------
def shape_for_params(params: float, vocab_size: int = 32000, seq_len: int = 2048) -> Any:
    """A Llama-style ``ModelConfig`` with about ``params`` non-embedding parameters: ``12 L d^2`` with
    ``d = 128 L`` (the depth/width ratio of Chinchilla-70B), ``d`` a multiple of 64, heads of 64."""
    from lmforge.model.config import ModelConfig

    n_layers = max(1, round((params / (12 * 128**2)) ** (1 / 3)))
    d_model = max(64, 64 * round(math.sqrt(params / (12 * n_layers)) / 64))
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=d_model // 64, max_seq_len=seq_len
    )


@dataclass
class Allocation:
    method: str  # "chinchilla" or "20 tokens/param"
    params: float
    tokens: float
    flops: float


def plan(
    flops: float | None = None,
    params: float | None = None,
    law: ChinchillaLaw = CHINCHILLA,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> list[Allocation]:
    """Compute-optimal (N, D) for a FLOP budget, or the budget and data that make a size optimal, by the
    fitted law and by the tokens-per-parameter rule."""
    if (flops is None) == (params is None):
        raise ValueError("give exactly one of flops and params")
    rule = f"{tokens_per_param:g} tokens/param"
    if flops is not None:
        n_law, d_law = law.optimal(flops)
        n_rule, d_rule = rule_of_thumb(flops, tokens_per_param)
        return [Allocation("chinchilla", n_law, d_law, flops), Allocation(rule, n_rule, d_rule, flops)]
    assert params is not None
    c_law, d_law = law.optimal_for_params(params)
    d_rule = tokens_per_param * params
    return [
        Allocation("chinchilla", params, d_law, c_law),
        Allocation(rule, params, d_rule, 6 * params * d_rule),
    ]


# -- ladder ----------------------------------------------------------------------------------------------------
@dataclass
class RungConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int | None = None  # None: derived from d_model as ModelConfig does


@dataclass
class LadderConfig:
    """A base training recipe trained at several sizes, each for ``tokens_per_param`` tokens per
    non-embedding parameter (at least ``min_steps`` steps); the rungs go to ``train.run_dir/rung-<i>``, the
    report to ``train.run_dir/ladder.json``. Each rung's LR schedule (warmup fraction, cosine) runs to that
    rung's own last step, and when the recipe has held-out data (``val_shards`` or ``data.val_fraction``)
    each rung is validated at its last step, the loss the fit uses."""

    train: TrainConfig = field(default_factory=TrainConfig)
    sizes: list[RungConfig] = field(default_factory=list)
    tokens_per_param: float = TOKENS_PER_PARAM
    # Every rung trains at least this many steps: the token budget of the tiniest rungs can be a handful of
    # steps, most of them warmup.
    min_steps: int = 0

    def __post_init__(self) -> None:
        check_range("tokens_per_param", self.tokens_per_param, low=0.0, low_open=True)
        check_range("min_steps", self.min_steps, low=0)


def rung_config(ladder: LadderConfig, index: int) -> TrainConfig:
    """The TrainConfig of rung ``index``: the base recipe at that size, its steps set by the token budget."""
    from lmforge.model.flops import count_parameters

    rung = ladder.sizes[index]
    base = ladder.train
    model = replace(
        base.model,
        d_model=rung.d_model,
        n_layers=rung.n_layers,
        n_heads=rung.n_heads,
        n_kv_heads=None,
        head_dim=None,
        d_ff=rung.d_ff,
    )
    count = count_parameters(model)
    tokens_per_step = base.batch.micro_batch_size * base.batch.grad_accum_steps * base.data.seq_len
    steps = round(ladder.tokens_per_param * (count.active - count.embedding) / tokens_per_step)
    steps = max(1, ladder.min_steps, steps)
    log = base.log
    if base.val_shards or base.data.val_fraction > 0:
        # validate at the rung's last step (and wherever the base recipe asked, if that divides it)
        every = log.val_every_steps
        log = replace(log, val_every_steps=every if every and steps % every == 0 else steps)
    return replace(
        base, run_dir=str(Path(base.run_dir) / f"rung-{index}"), model=model, max_steps=steps, log=log
    )


def run_ladder(ladder: LadderConfig) -> ScalingReport:
    """Train every rung through the trainer (a finished rung resumes to its end at once), then fit the
    laws to all but the largest and predict it; the report is written to ``ladder.json``."""
    from lmforge.train.trainer import train

    if len(ladder.sizes) < 4:
        raise ValueError("a ladder needs at least four sizes: three to fit L(C), one to predict")
    runs = []
    for index in range(len(ladder.sizes)):
        cfg = rung_config(ladder, index)
        train(cfg)
        runs.append(read_run(cfg.run_dir))
    report = predict_largest(runs)
    out = Path(ladder.train.run_dir) / "ladder.json"
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report

"""Mixture-of-experts MLP: a top-k softmax router (fp32), Switch load balancing, router z-loss, capacity.

Routing is a handful of tensor ops over all tokens at once; the only Python loop runs over experts, each
taking its tokens with ``index_select`` and adding its weighted output back with ``index_add_``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig
from lmforge.model.mlp import MLP


def route(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over experts, keep the top k. Returns (weights (N, k), experts (N, k), probs (N, E)), in fp32.

    With ``normalize`` the k kept weights are rescaled to sum to 1 (Mixtral); else they stay softmax masses."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e, with f_e the fraction of tokens whose top-k
    includes expert e (summed over the k slots, as HF Mixtral does) and P_e the mean router probability.
    Equals k when routing is perfectly uniform."""
    n_experts = probs.shape[-1]
    dispatch = F.one_hot(experts, n_experts).float()  # (N, k, E)
    tokens_per_expert = dispatch.mean(dim=0)  # (k, E)
    return n_experts * (tokens_per_expert * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert: capacity_factor * (tokens * k / experts), rounded up (GShard / Switch)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def within_capacity(experts: Tensor, n_experts: int, capacity: int) -> Tensor:
    """(N, k) bool: which assignments fit their expert. Priority goes to every token's first choice before
    any second choice (GShard), then to earlier tokens; assignments past an expert's capacity are dropped."""
    n_tokens, top_k = experts.shape
    by_priority = experts.t().reshape(-1)  # slot-major: all first choices, then all second choices, ...
    one_hot = F.one_hot(by_priority, n_experts)
    rank = (one_hot.cumsum(dim=0) * one_hot).sum(
        dim=-1
    ) - 1  # position of each assignment in its expert's queue
    return (rank < capacity).view(top_k, n_tokens).t()


class MoE(nn.Module):
    """Replaces the dense MLP in MoE layers; ``forward`` returns (output, weighted auxiliary loss).

    With a capacity factor, which assignments are dropped depends on every token of the call, so incremental
    decoding matches a full forward only when dropless (capacity_factor None, the inference setting)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.normalize = cfg.moe_normalize_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_loss_coef, self.z_loss_coef = cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        logits = F.linear(tokens.float(), self.router.weight.float())
        weights, experts, probs = route(logits, self.top_k, self.normalize)
        aux = self.aux_loss_coef * load_balancing_loss(probs, experts) + self.z_loss_coef * router_z_loss(
            logits
        )

        token_index = torch.arange(tokens.shape[0], device=x.device).repeat_interleave(self.top_k)
        expert_index, weights = experts.reshape(-1), weights.reshape(-1)
        if self.capacity_factor is not None:
            capacity = expert_capacity(tokens.shape[0], self.top_k, self.n_experts, self.capacity_factor)
            keep = within_capacity(experts, self.n_experts, capacity).reshape(-1)
            token_index, expert_index, weights = token_index[keep], expert_index[keep], weights[keep]
        order = expert_index.argsort(stable=True)
        token_index, weights = token_index[order], weights[order]
        counts = torch.bincount(expert_index, minlength=self.n_experts).tolist()

        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                chosen = token_index[start : start + count]
                y = expert(tokens.index_select(0, chosen)) * weights[start : start + count, None]
                out.index_add_(0, chosen, y.to(out.dtype))
            start += count
        return out.view_as(x), aux

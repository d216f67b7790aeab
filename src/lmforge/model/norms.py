"""Normalization layers: RMSNorm, LayerNorm (with or without bias), and the factory the blocks use.

DeepNorm is not a different normalizer: it is post-LN LayerNorm plus a residual up-scaling alpha and an
init down-scaling beta (see ``ModelConfig.deepnorm_alpha`` / ``deepnorm_beta`` and ``transformer.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # half precision: normalise in fp32, round, then scale (HF Llama's order), keeping the input's dtype
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The normalizer ``cfg.norm`` selects, over ``dim`` features (default d_model)."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)

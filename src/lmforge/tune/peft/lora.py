"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) around a frozen layer.

A linear layer W gets a low-rank update: y = W x + s * B A dropout(x), with A (r, in) kaiming-uniform,
B (out, r) zeros (so a fresh adapter changes nothing) and s = alpha / r, or alpha / sqrt(r) with rsLoRA.
DoRA rescales each output row of the updated weight to a learned magnitude m (initialised to the row norms
of W): y = m / ||W + s B A||_row * (W + s B A) x, the norm treated as a constant in the backward pass.
An embedding gets y = E[ids] + s * (A^T[ids]) B^T with A zeros and B normal (peft's init). Parameter names
are peft's: ``lora_A.weight``/``lora_B.weight``/``lora_magnitude_vector`` and ``lora_embedding_A``/``_B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.tune.peft.nf4 import NF4Linear


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(nn.Module):
    """LoRA (or DoRA) on a linear layer, plain or NF4 (QLoRA)."""

    def __init__(
        self,
        base_layer: nn.Linear | NF4Linear,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        use_dora: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        kw = dict(bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._updated_weight().norm(dim=1).detach())
        self.merged = False
        self._merged_norm: Tensor | None = None  # DoRA: the row norms the merge divided by (for unmerge)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _updated_weight(self) -> Tensor:
        return self.base_layer.weight + self.delta_weight()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.dropout(x)
        update = self.lora_B(self.lora_A(h)) * self.scaling
        if self.lora_magnitude_vector is None:
            return y + update
        scale = self.lora_magnitude_vector / self._updated_weight().norm(dim=1).detach()
        # y already holds W x (+ bias); W is applied to the dropped-out input as in peft
        return y + (scale - 1) * F.linear(h, self.base_layer.weight) + scale * update

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (in its dtype); the forward is unchanged. An NF4 base is
        dequantized (to its compute dtype) first and stays a plain linear layer."""
        if self.merged:
            return
        if isinstance(self.base_layer, NF4Linear):
            self.base_layer = self.base_layer.dequantized()
        weight = self.base_layer.weight
        updated = self._updated_weight().float()
        if self.lora_magnitude_vector is not None:
            self._merged_norm = updated.norm(dim=1)
            updated = updated * (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
        weight.copy_(updated.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to rounding in the weight's dtype)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        updated = weight.float()
        if self.lora_magnitude_vector is not None:
            updated = updated * (self._merged_norm / self.lora_magnitude_vector.float())[:, None]
        weight.copy_((updated - self.delta_weight().float()).to(weight.dtype))
        self.merged = False


class LoraEmbedding(nn.Module):
    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_scaling(r, alpha, use_rslora)
        weight = base_layer.weight
        vocab, dim = weight.shape
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, vocab, device=weight.device, dtype=weight.dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, device=weight.device, dtype=weight.dtype))
        nn.init.normal_(self.lora_embedding_B)
        self.merged = False

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_embedding_B @ self.lora_embedding_A).T

    def forward(self, ids: Tensor) -> Tensor:
        y = self.base_layer(ids)
        if self.merged:
            return y
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=self.base_layer.padding_idx)
        return y + (after_a @ self.lora_embedding_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

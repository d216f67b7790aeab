"""IA3 (Liu et al. 2022): a learned vector rescales a frozen linear layer's output (keys, values) or, for a
feed-forward target (the MLP's down projection), its input. Initialised to ones, so a fresh adapter changes
nothing. The parameter is peft's ``ia3_l``: shape (out, 1) on outputs, (1, in) on inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IA3Linear(nn.Module):
    def __init__(self, base_layer: nn.Linear, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        weight = base_layer.weight
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(x * self.ia3_l.flatten())
        return self.base_layer(x) * self.ia3_l.flatten()

    @torch.no_grad()
    def merge(self) -> None:
        """Scale the weight's columns (input) or rows and bias (output) by the vector."""
        if self.merged:
            return
        self.base_layer.weight *= self.ia3_l
        if not self.feedforward and self.base_layer.bias is not None:
            self.base_layer.bias *= self.ia3_l.flatten()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight /= self.ia3_l
        if not self.feedforward and self.base_layer.bias is not None:
            self.base_layer.bias /= self.ia3_l.flatten()
        self.merged = False

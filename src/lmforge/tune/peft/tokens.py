"""Trainable tokens (peft's ``trainable_token_indices``): train chosen rows of the embedding and the LM head.

After a vocabulary is extended (``lmforge model resize``), the new tokens' rows must learn while the rest of
the model stays frozen; training the whole embedding would save the whole matrix with every adapter. Here
only the chosen rows train and are saved: ``trainable_tokens_delta`` holds the rows' current *values*
(peft's name, although they start as a copy of the base rows and are not a difference), so a fresh adapter
changes nothing. The layer computes with the base weight whose chosen rows are replaced (``index_copy``).
A head tied to the embedding shares the embedding's rows (one tensor, saved once under the embedding's
name), as peft does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenAdapter(nn.Module):
    """The trained rows of one weight matrix and which rows they are."""

    def __init__(self, weight: Tensor, indices: list[int]) -> None:
        super().__init__()
        self.register_buffer(
            "index", torch.tensor(indices, dtype=torch.long, device=weight.device), persistent=False
        )
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[indices].clone())

    def weight(self, base: Tensor) -> Tensor:
        """``base`` with the chosen rows replaced by the trained ones (a new tensor; ``base`` is untouched)."""
        return base.index_copy(0, self.index, self.trainable_tokens_delta.to(base.dtype))


class TrainableTokensEmbedding(nn.Module):
    def __init__(self, base_layer: nn.Embedding, token_adapter: TokenAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.token_adapter = token_adapter

    def forward(self, ids: Tensor) -> Tensor:
        base = self.base_layer
        weight = self.token_adapter.weight(base.weight)
        return F.embedding(
            ids, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq
        )

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight.copy_(self.token_adapter.weight(self.base_layer.weight))


class TrainableTokensLinear(nn.Module):
    """The LM head with trainable rows (one row per output token)."""

    def __init__(self, base_layer: nn.Linear, token_adapter: TokenAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.token_adapter = token_adapter

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.token_adapter.weight(self.base_layer.weight), self.base_layer.bias)

    @torch.no_grad()
    def merge(self) -> None:
        self.base_layer.weight.copy_(self.token_adapter.weight(self.base_layer.weight))


TokenLayer = TrainableTokensEmbedding | TrainableTokensLinear


def wrap_token_layers(model: nn.Module, indices: dict[str, list[int]], tied: bool) -> dict[str, TokenLayer]:
    """Wrap ``model.embed_tokens`` and/or ``model.lm_head`` (the keys of ``indices``) in place. With ``tied``
    (the head shares the embedding's weight) a wrapped embedding wraps the head too, sharing its rows, unless
    the head has rows of its own listed (then each trains its own rows, untied: peft's rule)."""
    wrapped: dict[str, TokenLayer] = {}
    if "embed_tokens" in indices:
        embed = model.embed_tokens
        adapter = TokenAdapter(embed.weight, indices["embed_tokens"])
        model.embed_tokens = wrapped["embed_tokens"] = TrainableTokensEmbedding(embed, adapter)
        if tied and indices.get("lm_head", indices["embed_tokens"]) == indices["embed_tokens"]:
            model.lm_head = wrapped["lm_head"] = TrainableTokensLinear(model.lm_head, adapter)
    if "lm_head" in indices and "lm_head" not in wrapped:
        head = model.lm_head
        model.lm_head = wrapped["lm_head"] = TrainableTokensLinear(
            head, TokenAdapter(head.weight, indices["lm_head"])
        )
    return wrapped

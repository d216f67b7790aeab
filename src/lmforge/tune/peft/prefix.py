"""Prefix tuning (Li & Liang 2021): learned keys and values for ``num_virtual_tokens`` positions in every layer.

Every query attends to the n virtual keys/values of its layer before the sequence's own; the model is frozen.
The prefix is one tensor (n, n_layers * 2 * kv_dim) (kv_dim = n_kv_heads * head_dim), read as (layer, k|v, head,
head_dim) per virtual token, peft's ``prompt_embeddings`` layout. It is learned directly or, with
``prefix_projection``, produced by an MLP (Linear-Tanh-Linear) from n learned kv_dim-wide inputs; what is saved is
the prefix itself, so a loaded prefix has no MLP.

The prefix goes in through the KV-cache interface, from a hook before the Transformer's forward: the virtual
keys sit at positions 0..n-1 (they get no rotary embedding), the sequence continues at position n. Without a cache
a :class:`PrefixCache` puts them in front of each layer's keys; a cache that is still empty is given them first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmforge.model import KVView, ModelConfig, Transformer
from lmforge.tune.peft.prompt import FORWARD_ARGS


class PrefixEncoder(nn.Module):
    def __init__(
        self, num_virtual_tokens: int, n_layers: int, kv_dim: int, projection: bool, hidden: int | None = None
    ) -> None:
        super().__init__()
        width = n_layers * 2 * kv_dim
        self.transform: nn.Module | None = None
        if projection:
            hidden = hidden or kv_dim
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)

    def forward(self) -> Tensor:
        """The prefix, (n, n_layers * 2 * kv_dim)."""
        prefix = self.embedding.weight
        return prefix if self.transform is None else self.transform(prefix)


class PrefixCache:
    """The virtual keys/values of every layer in front of the current ones (a forward without a KV cache)."""

    def __init__(self, keys: list[Tensor], values: list[Tensor]) -> None:
        self.keys, self.values = keys, values  # per layer (batch, n_kv_heads, n, head_dim)
        batch, _, n, _ = keys[0].shape
        self.positions = torch.arange(n, device=keys[0].device).expand(batch, n)

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        return KVView(
            torch.cat([self.keys[layer].to(keys.dtype), keys], dim=2),
            torch.cat([self.values[layer].to(values.dtype), values], dim=2),
            torch.cat([self.positions, positions], dim=1),
        )

    def lengths(self) -> Tensor:
        return torch.full((self.positions.shape[0],), self.positions.shape[1], dtype=torch.long)


def prefix_keys_values(prefix: Tensor, cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    """peft's prefix tensor (n, n_layers * 2 * kv_dim) as per-layer keys and values (n_kv_heads, n, head_dim)."""
    n = prefix.shape[0]
    if prefix.dim() != 2 or prefix.shape[1] != cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim:
        raise ValueError(
            f"prefix: expected (n, {cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim}) for this model, "
            f"got {tuple(prefix.shape)}"
        )
    # (n, layers * 2, heads, head_dim) -> (layers * 2, heads, n, head_dim)
    kv = prefix.view(n, cfg.n_layers * 2, cfg.n_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)
    return list(kv[0::2]), list(kv[1::2])


def _layer_keys_values(model: Transformer, batch: int) -> tuple[list[Tensor], list[Tensor]]:
    keys, values = prefix_keys_values(model.prefix_encoder(), model.cfg)
    return [k.expand(batch, -1, -1, -1) for k in keys], [v.expand(batch, -1, -1, -1) for v in values]


def _add_prefix(model: Transformer, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    inputs = dict(zip(FORWARD_ARGS, args)) | kwargs
    cache = inputs.get("cache")
    if cache is not None and not hasattr(cache, "lengths"):
        raise ValueError(
            "prefix tuning: the KV cache has no lengths(), so the prefix cannot be put first in it"
        )
    if cache is not None and int(cache.lengths().max()) > 0:
        return (), inputs  # the prefix went into the cache on its first call
    ids = inputs["input_ids"]
    batch = ids.shape[0]
    keys, values = _layer_keys_values(model, batch)
    n = keys[0].shape[2]
    if cache is None:
        inputs["cache"] = PrefixCache(keys, values)
    else:
        positions = torch.arange(n, device=ids.device).expand(batch, n)
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(layer, k, v, positions)
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + n
    segments = inputs.pop("segment_ids", None)
    # one document per row: the segments only keep padding from seeing the document, which does not matter
    if segments is not None and int(segments.max()) > 1:
        raise ValueError(
            "prefix tuning: rows packed with several documents are not supported (sft.pack=false)"
        )
    if inputs.get("prefix_lengths") is not None:
        inputs["prefix_lengths"] = inputs["prefix_lengths"] + n
    return (), inputs


def attach_prefix(model: Transformer, encoder: PrefixEncoder) -> None:
    """Give ``model`` the prefix (as ``model.prefix_encoder``) and the hook that puts it in every layer."""
    model.prefix_encoder = encoder
    model.register_forward_pre_hook(_add_prefix, with_kwargs=True)

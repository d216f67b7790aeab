"""External memory with exact k-nearest-neighbour retrieval (Memorizing Transformer, Wu et al. 2022; the joint
softmax of LongLLaMA / Focused Transformer, Tworkowski et al. 2023).

A long document is processed segment by segment. Selected layers (``ModelConfig.knn_memory.layers``) keep the
keys and values of every earlier segment in a :class:`KNNMemory`; each query of the current segment takes the
``top_k`` memory keys with the largest dot product (exact top-k over the whole memory, no approximate index)
and attends to them besides its local, causal attention inside the segment:

- ``gate: learned`` (Memorizing Transformer): ``y = g * memory_attention + (1 - g) * local_attention`` with
  ``g = sigmoid(b_h)``, one trainable scalar per head (``Attention.memory_gate``, initialised to
  ``gate_value``), so a model fine-tuned with memory learns how much to use it;
- ``gate: fixed``: the same mix with ``g = gate_value`` for every head (no new parameter);
- ``gate: joint`` (LongLLaMA): retrieved and local keys share one softmax. With a memory holding the exact past
  and ``top_k`` covering it all, this is exactly full attention over the document.

Keys enter the memory as attention used them (after RoPE at the positions of their forward), and the memory is
not differentiated through (its tensors are detached), as in the Memorizing Transformer. The memory keeps at
most ``size`` entries per layer, dropping the oldest first. :func:`memory_forward` runs a document through a
model segment by segment, with positions restarting at each segment (the model never sees a position beyond
the segment length) or absolute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class KNNMemoryConfig:
    """The ``knn_memory`` entry of a ModelConfig, with defaults filled in."""

    layers: tuple[int, ...]
    top_k: int = 32
    size: int = 65536
    gate: str = "learned"  # learned | fixed | joint
    gate_value: float = 0.0  # learned: the gate's initial logit; fixed: g itself

    @classmethod
    def from_model(cls, cfg: Any) -> KNNMemoryConfig | None:
        raw = getattr(cfg, "knn_memory", None)
        if raw is None:
            return None
        return cls(
            layers=tuple(int(i) for i in raw["layers"]),
            top_k=int(raw.get("top_k", 32)),
            size=int(raw.get("size", 65536)),
            gate=str(raw.get("gate", "learned")),
            gate_value=float(raw.get("gate_value", 0.0)),
        )


def retrieve(queries: Tensor, keys: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k by dot product: for queries (B, H, S, D) over memory keys/values (B, H, M, D), the scores
    (B, H, S, k') and values (B, H, S, k', D) of the k' = min(k, M) best keys, best first."""
    scores = queries @ keys.transpose(-1, -2)
    top, index = scores.topk(min(k, keys.shape[2]), dim=-1)
    b, h, s, kk = index.shape
    gathered = values[:, :, None].expand(b, h, s, *values.shape[2:])
    picked = gathered.gather(3, index[..., None].expand(b, h, s, kk, values.shape[-1]))
    return top, picked


class KNNMemory:
    """Per memory layer, keys and values of earlier segments: (batch, n_kv_heads, n, head_dim), detached."""

    def __init__(self, config: KNNMemoryConfig) -> None:
        self.config = config
        self.layers = set(config.layers)
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.frozen = False  # True: attend to the memory without adding to it

    @classmethod
    def for_model(cls, cfg: Any) -> KNNMemory:
        config = KNNMemoryConfig.from_model(cfg)
        if config is None:
            raise ValueError("knn_memory: the model config has no knn_memory entry")
        return cls(config)

    def __len__(self) -> int:
        return 0 if not self.keys else next(iter(self.keys.values())).shape[2]

    def add(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Append a segment's keys/values, keeping the newest ``size`` entries."""
        keys, values = keys.detach(), values.detach()
        if layer in self.keys:
            keys = torch.cat((self.keys[layer], keys), dim=2)
            values = torch.cat((self.values[layer], values), dim=2)
        size = self.config.size
        self.keys[layer], self.values[layer] = keys[:, :, -size:], values[:, :, -size:]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gate: Tensor | None
    ) -> Tensor:
        """Attention output (B, H, S, D) of one memory layer: local attention over (k, v) under ``mask`` (bool
        or additive, broadcastable to (B, H, S, n_k); None: causal) combined with the retrieved memory, then
        this segment's keys/values go into the memory."""
        group = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        local_k = k.repeat_interleave(group, dim=1)
        local_v = v.repeat_interleave(group, dim=1)
        scores = (q @ local_k.transpose(-1, -2)) * scale
        if mask is None:
            n_q, n_k = scores.shape[-2:]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        cfg = self.config
        if layer in self.keys:
            mem_k = self.keys[layer].to(q.dtype).repeat_interleave(group, dim=1)
            mem_v = self.values[layer].to(q.dtype).repeat_interleave(group, dim=1)
            top, picked = retrieve(q, mem_k, mem_v, cfg.top_k)
            top = top * scale
            if cfg.gate == "joint":
                probs = torch.cat((scores, top), dim=-1).softmax(dim=-1)
                n_k = scores.shape[-1]
                y = probs[..., :n_k] @ local_v + (probs[..., n_k:, None] * picked).sum(dim=-2)
            else:
                local = scores.softmax(dim=-1) @ local_v
                remote = (top.softmax(dim=-1)[..., None] * picked).sum(dim=-2)
                g = torch.sigmoid(gate).view(1, -1, 1, 1) if cfg.gate == "learned" else cfg.gate_value
                y = g * remote + (1 - g) * local
        else:
            y = scores.softmax(dim=-1) @ local_v  # nothing remembered yet: local attention only
        if not self.frozen:
            self.add(layer, k, v)
        return y


def memory_forward(
    model: nn.Module,
    ids: Sequence[int],
    segment_len: int,
    memory: KNNMemory | None = None,
    absolute_positions: bool = False,
) -> Tensor:
    """Logits (n, vocab) of ``ids`` processed ``segment_len`` tokens at a time, each segment attending locally
    to itself and, in the memory layers, to what the earlier segments left in ``memory`` (a fresh one for the
    model's config if None). Positions restart at 0 in every segment unless ``absolute_positions``."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    memory = memory if memory is not None else KNNMemory.for_model(model.cfg)
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    pieces = []
    for start in range(0, x.shape[1], segment_len):
        segment = x[:, start : start + segment_len]
        offset = start if absolute_positions else 0
        positions = torch.arange(offset, offset + segment.shape[1], device=device)[None]
        pieces.append(model(segment, position_ids=positions, memory=memory).logits[0])
    return torch.cat(pieces)


def memory_nll(
    model: nn.Module, ids: Sequence[int], segment_len: int, absolute_positions: bool = False
) -> Tensor:
    """NLL (nats) of tokens 1..n-1 of ``ids`` (CPU float32) under :func:`memory_forward` with a fresh memory."""
    with torch.no_grad():
        logits = memory_forward(model, ids, segment_len, absolute_positions=absolute_positions)
    targets = torch.tensor(list(ids)[1:], device=logits.device)
    return F.cross_entropy(logits[:-1].float(), targets, reduction="none").cpu()

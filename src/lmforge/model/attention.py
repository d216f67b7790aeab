"""Self-attention: MHA / GQA / MQA projections, optional QK-norm, and the masks and biases built from positions.

``F.scaled_dot_product_attention`` does the arithmetic. A plain causal forward takes its ``is_causal`` fast path
(no mask is materialised); anything else (a KV cache, packed segments, a prefix, a window or sparse pattern,
ALiBi or relative biases, explicit position ids) gets an explicit mask computed from query and key positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.cache import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.fusion import FusedLinear, fusable
from lmforge.model.knn_memory import KNNMemory, KNNMemoryConfig
from lmforge.model.norms import build_norm
from lmforge.model.positions import RelativePositionBias, alibi_bias, alibi_slopes, apply_rope, rope_cos_sin
from lmforge.model.rerope import ReRoPE


def attention_mask(
    cfg: ModelConfig,
    q_pos: Tensor,
    k_pos: Tensor,
    prefix_lengths: Tensor | None = None,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Which keys each query may see, (batch, 1, n_q, n_k) bool, from absolute positions.

    Causal (key position <= query position) or, for a prefix decoder, also every key inside the sequence's
    prefix; restricted by the sliding window, the strided sparse pattern or the Λ shape (window + global_tokens
    first positions); keys at position -1 are empty slots. ``allowed`` (batch, n_q, n_k) bool, when given,
    restricts visibility further (e.g. parallel context windows, :mod:`lmforge.model.pcw`).
    A query that sees nothing (padding) is allowed everything, so its (discarded) output stays finite.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = k <= q
    if prefix_lengths is not None:
        visible = visible | (k < prefix_lengths.to(k.device)[:, None, None])
    distance = (q - k).abs()
    if cfg.attention == "sliding":
        visible = visible & (distance < cfg.sliding_window)
    elif cfg.attention == "lambda":
        visible = visible & ((distance < cfg.sliding_window) | (k < cfg.global_tokens))
    elif cfg.attention == "sparse":
        # Child et al. 2019, strided pattern: the last `block` positions plus every `block`-th one before them
        visible = visible & ((distance < cfg.sparse_block) | (distance % cfg.sparse_block == 0))
    if q_segments is not None:
        visible = visible & (q_segments[:, :, None] == k_segments[:, None, :])
    if allowed is not None:
        visible = visible & allowed.to(device=visible.device, dtype=torch.bool)
    visible = visible & (k >= 0)
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    return visible[:, None]


def _share_kv_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, n_kv, S, D) -> (B, n_heads, S, D), each key/value head repeated for its group of query heads."""
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_heads // n_kv, s, d).reshape(b, n_heads, s, d)


@dataclass
class AttentionContext:
    """Per-forward inputs every attention layer shares; masks are built once per distinct key-position tensor."""

    cfg: ModelConfig
    positions: Tensor
    segment_ids: Tensor | None = None
    prefix_lengths: Tensor | None = None
    cache: KVCache | None = None
    rope: tuple[Tensor, Tensor] | None = None
    rerope: ReRoPE | None = None  # replaces rope: keys are cached unrotated, attention takes two passes
    # (inv_freq, attention factor) when the cache stores keys unrotated (cache.unrotated_keys, e.g. attention
    # sinks): keys are rotated after the cache, at the positions it reports
    key_rope: tuple[Tensor, float] | None = None
    causal_kernel: bool = False  # use SDPA's is_causal path: no mask at all
    allowed: Tensor | None = None  # (batch, n_q, n_k) bool: pairs the caller lets attend (see attention_mask)
    memory: KNNMemory | None = (
        None  # external kNN memory its layers also attend to (lmforge.model.knn_memory)
    )
    _memo: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def base_mask(self, k_pos: Tensor) -> Tensor:
        """Bool visibility mask, or a float additive mask when ALiBi is on, memoised on the key positions
        (layers of a cache usually hold the same positions, so one mask serves them all)."""
        if self._memo is not None:
            seen = self._memo[0]
            if seen is k_pos or (seen.shape == k_pos.shape and torch.equal(seen, k_pos)):
                return self._memo[1]
        k_segments = None
        if self.segment_ids is not None:
            if self.cache is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            k_segments = self.segment_ids
        mask = attention_mask(
            self.cfg, self.positions, k_pos, self.prefix_lengths, self.segment_ids, k_segments, self.allowed
        )
        if self.cfg.position == "alibi":
            bias = alibi_bias(alibi_slopes(self.cfg.n_heads), self.positions, k_pos)
            mask = bias.masked_fill(~mask, float("-inf"))
        self._memo = (k_pos, mask)
        return mask


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads (n_heads: MHA, 1: MQA, else GQA)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index under which this layer's keys/values live in a KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        self.q_norm = build_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.relative_bias = RelativePositionBias(cfg) if cfg.position == "relative" else None
        memory = KNNMemoryConfig.from_model(cfg)
        self.memory_gate = None  # per-head gate logit of a learned-gate memory layer
        self._gate_init = 0.0 if memory is None else memory.gate_value
        if memory is not None and layer in memory.layers and memory.gate == "learned":
            self.memory_gate = nn.Parameter(torch.full((cfg.n_heads,), memory.gate_value))
        self._fused_qkv: FusedLinear | None = None  # set by fuse_for_inference
        self._fused_o: FusedLinear | None = None

    def fuse_for_inference(self, pack: bool = False, pack_dtype: torch.dtype | None = None) -> int:
        """Run q/k/v as one matmul from now on, and with ``pack`` every projection on prepacked weights (see
        :mod:`lmforge.model.fusion`); projections that cannot be (quantized, adapter-wrapped, distributed)
        are left as they are. Returns 1 if q/k/v were fused, else 0."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        self._fused_qkv = FusedLinear(projections, pack, pack_dtype) if fusable(projections) else None
        self._fused_o = (
            FusedLinear([self.o_proj], pack, pack_dtype) if pack and fusable([self.o_proj]) else None
        )
        return int(self._fused_qkv is not None)

    def unfuse(self) -> None:
        """Undo :meth:`fuse_for_inference`: each projection gets its own storage again."""
        for fused in (self._fused_qkv, self._fused_o):
            if fused is not None:
                fused.unfuse()
        self._fused_qkv = self._fused_o = None

    def _out(self, y: Tensor) -> Tensor:
        fused = self._fused_o
        if fused is not None and fused.valid([self.o_proj]):
            return fused(y)[0]
        return self.o_proj(y)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The parameters this module holds itself (its projections are initialised as Linear layers): a
        learned kNN-memory gate starts at knn_memory.gate_value in every head."""
        if self.memory_gate is not None:
            self.memory_gate.fill_(self._gate_init)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        batch, seq, _ = x.shape
        # head counts are inferred (-1) so a tensor-parallel plan may shard the projections by heads
        fused = self._fused_qkv
        if fused is not None and fused.valid([self.q_proj, self.k_proj, self.v_proj]):
            q, k, v = fused(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q = apply_rope(q, *ctx.rope)
            k = k if ctx.key_rope is not None else apply_rope(k, *ctx.rope)
        k_pos = ctx.positions
        if ctx.cache is not None:
            view = ctx.cache.update(self.layer, k, v, ctx.positions)
            k, v, k_pos = view.keys.to(q.dtype), view.values.to(q.dtype), view.positions
        if ctx.key_rope is not None:
            k = apply_rope(k, *(t.to(q.dtype) for t in rope_cos_sin(k_pos, *ctx.key_rope)))
        mask = None if ctx.causal_kernel else self._mask(ctx, k_pos, q.dtype)
        if ctx.memory is not None and self.layer in ctx.memory.layers:
            y = ctx.memory.attend(self.layer, q, k, v, mask, self.memory_gate)
            return self._out(y.transpose(1, 2).reshape(batch, seq, -1))
        if ctx.rerope is not None:
            y = ctx.rerope(q, k, v, ctx.positions, k_pos, mask, self.dropout if self.training else 0.0)
            return self._out(y.transpose(1, 2).reshape(batch, seq, -1))
        grouped = k.shape[1] != q.shape[1]
        if grouped and mask is not None and q.device.type != "cpu":
            # GPU kernels that take a mask do not take grouped heads (SDPA would fall back to the slow
            # math path), so share the key/value heads explicitly there (expand + reshape: no host sync,
            # so a CUDA graph can capture it)
            k, v = _share_kv_heads(k, q.shape[1]), _share_kv_heads(v, q.shape[1])
            grouped = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=ctx.causal_kernel and seq > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=grouped,
        )
        return self._out(y.transpose(1, 2).reshape(batch, seq, -1))

    def _mask(self, ctx: AttentionContext, k_pos: Tensor, dtype: torch.dtype) -> Tensor:
        mask = ctx.base_mask(k_pos)
        if self.relative_bias is not None:
            bias = self.relative_bias(ctx.positions, k_pos).float()
            mask = bias + mask if mask.dtype != torch.bool else bias.masked_fill(~mask, float("-inf"))
        return mask if mask.dtype == torch.bool else mask.to(dtype)

"""Parameter counts, FLOPs per token and the training memory plan of a ``ModelConfig``.

Parameters are counted on a model built on the ``meta`` device, so the count is exact for every
architecture choice and costs no memory. FLOPs follow Kaplan et al. (2020) / PaLM (Chowdhery et al.,
2022): a matmul costs 2 FLOPs per weight per token forward, attention scores and values add
``2 * 2 * n_layers * context * n_heads * head_dim`` forward (halved for causal attention), and training
costs 3x forward (forward + backward). The memory plan uses the mixed-precision accounting of ZeRO
(Rajbhandari et al., 2020): 2 bytes of weights, 2 bytes of gradients and 12 bytes of fp32 copy, momentum
and variance per parameter, partitioned over the data-parallel group by stage; activations are
estimated per layer from the tensors that the backward pass keeps (16-bit), after Korthikanti et al.
(2022), generalised to GQA and gated MLPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lmforge.model.config import ModelConfig

GIB = 1024**3
WEIGHT_BYTES, GRAD_BYTES, OPTIM_BYTES = 2, 2, 12


@dataclass
class ParamCount:
    total: int
    embedding: int  # token (and learned position) embeddings, plus an untied LM head
    active: int  # parameters used per token (MoE: top_k of n_experts experts)


@dataclass
class MemoryPlan:
    """Bytes per GPU for one training step."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in {**asdict(self), "total": self.total}.items()}


def count_parameters(cfg: ModelConfig) -> ParamCount:
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    if model.pos_embed is not None:
        embedding += sum(p.numel() for p in model.pos_embed.parameters())
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    inactive = 0
    if cfg.n_experts:
        for name, p in model.named_parameters():
            if ".experts." in name:
                inactive += p.numel()
        inactive = inactive * (cfg.n_experts - cfg.moe_top_k) // cfg.n_experts
    return ParamCount(total=total, embedding=embedding, active=total - inactive)


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token of QK^T and AV at a given context length."""
    span = min(context, cfg.sliding_window) if cfg.attention == "sliding" and cfg.sliding_window else context
    if cfg.structure == "causal" and span == context:
        span = context / 2  # on average a token sees half the causal context
    return 2 * 2 * cfg.n_layers * span * cfg.n_heads * cfg.head_dim


def flops_per_token(cfg: ModelConfig, context: int, params: ParamCount | None = None) -> dict[str, float]:
    """Forward and training FLOPs per token: 2 per active non-embedding weight plus attention.

    The LM head matmul is a real cost and is counted; the embedding lookup is not.
    """
    params = params or count_parameters(cfg)
    matmul_weights = params.active - params.embedding + cfg.vocab_size * cfg.d_model  # + the LM head
    forward = 2 * matmul_weights + attention_flops_per_token(cfg, context)
    return {"forward": forward, "train": 3 * forward}


def activation_bytes_per_layer(cfg: ModelConfig, tokens: int, context: int, flash: bool = True) -> float:
    """16-bit activations one block keeps for backward for ``tokens`` tokens (micro-batch * context)."""
    h, f = cfg.d_model, cfg.d_ff
    q_width = cfg.n_heads * cfg.head_dim
    kv_width = cfg.n_kv_heads * cfg.head_dim
    elems = 0.0
    elems += 2 * h  # inputs of the two norms
    elems += 2 * h  # inputs of the QKV and MLP projections
    elems += q_width + 2 * kv_width  # q, k, v
    elems += q_width  # attention output (input of o_proj)
    elems += 3 * f if cfg.gated else 2 * f  # MLP pre-activations/products
    if cfg.dropout > 0:
        elems += h  # two 1-byte dropout masks of width h, counted in 2-byte elements
    total = 2 * elems * tokens
    if not flash:
        batch = tokens / context
        total += 2 * cfg.n_heads * context * context * batch * (2.5 if cfg.dropout > 0 else 1.0)
    if cfg.n_experts:
        total += 2 * tokens * (cfg.moe_top_k - 1) * (3 * f if cfg.gated else 2 * f)
    return total


def memory_plan(
    cfg: ModelConfig,
    micro_batch: int,
    context: int,
    dp: int = 1,
    zero_stage: int = 0,
    activation_checkpointing: bool = False,
    flash: bool = True,
    params: ParamCount | None = None,
) -> MemoryPlan:
    """Training memory per GPU with data parallelism over ``dp`` ranks and ZeRO stage 0-3."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1:
        raise ValueError(f"dp: must be >= 1, got {dp}")
    n = (params or count_parameters(cfg)).total
    weights = WEIGHT_BYTES * n / (dp if zero_stage >= 3 else 1)
    gradients = GRAD_BYTES * n / (dp if zero_stage >= 2 else 1)
    optimizer = OPTIM_BYTES * n / (dp if zero_stage >= 1 else 1)
    tokens = micro_batch * context
    per_layer = activation_bytes_per_layer(cfg, tokens, context, flash)
    if activation_checkpointing:
        # block inputs are kept; one block's activations are rebuilt at a time during backward
        activations = cfg.n_layers * 2 * cfg.d_model * tokens + per_layer
    else:
        activations = cfg.n_layers * per_layer
    activations += 4 * tokens * cfg.vocab_size  # fp32 logits for the loss
    return MemoryPlan(weights, gradients, optimizer, activations)

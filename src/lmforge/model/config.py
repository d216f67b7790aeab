"""``ModelConfig``: one dataclass whose fields select every component of the Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.config import check_choice, check_range

STRUCTURES = ("causal", "prefix")
NORMS = ("layernorm", "rmsnorm", "deepnorm")
NORM_POSITIONS = ("pre", "post", "sandwich")
MLPS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
POSITIONS = ("learned", "sinusoidal", "relative", "rope", "alibi", "none")
ATTENTIONS = ("full", "sliding", "sparse", "lambda")
LAYER_TYPES = ("attention", "mamba")
ROPE_SCALINGS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "truncate")
# keys each rope_type cannot do without (the others have defaults, see lmforge.model.rope_scaling)
ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor",),
    "longrope": ("short_factor", "long_factor"),
}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer (see ``lmforge.model.presets`` for named shapes)."""

    # Filled in by __post_init__ from other fields when left None (see lmforge.config.load_config).
    DERIVED_FIELDS: ClassVar[tuple[str, ...]] = ("n_kv_heads", "head_dim", "d_ff", "mamba_dt_rank")

    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    # Key/value heads: n_heads -> multi-head, 1 -> multi-query, anything dividing n_heads -> grouped-query.
    n_kv_heads: int | None = None
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # default 4*d_model (plain MLP) or 8/3*d_model rounded up to ff_multiple_of (GLU)
    ff_multiple_of: int = 256
    max_seq_len: int = 2048

    # structure: causal decoder, or prefix decoder (bidirectional over a per-sequence prefix, causal after it)
    structure: str = "causal"

    # normalization: deepnorm is post-LN LayerNorm with residual up-scaling alpha and init down-scaling beta
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    final_norm: bool = True
    embedding_norm: bool = False

    # MLP / activation
    mlp: str = "swiglu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False

    # positions
    position: str = "rope"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (partial rotary)
    # context extension, as transformers spells it (see lmforge.model.rope_scaling), e.g. Llama 3.1:
    # {rope_type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192};
    # also linear, dynamic, yarn, longrope, and truncate (base truncation)
    rope_scaling: dict[str, Any] | None = None
    # position truncation (lmforge.model.rerope): beyond rerope_window query-key distances clamp (ReRoPE) or
    # grow at 1 / rerope_leak (Leaky ReRoPE); attention then takes two passes over materialised scores
    rerope_window: int | None = None
    rerope_leak: float | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128

    # attention
    attention: str = "full"
    sliding_window: int | None = None
    # attention=lambda, LM-Infinite's Λ-shaped mask (Han et al. 2024): each query sees the keys within
    # sliding_window of it plus the first global_tokens positions; with rerope_window=sliding_window (ReRoPE)
    # distances also stop growing at the window, which is LM-Infinite's distance limit
    global_tokens: int = 0
    # sparse attention, the strided factorized pattern of Child et al. 2019: each query sees the previous
    # sparse_block positions (local) and every sparse_block-th position before them (strided)
    sparse_block: int = 16
    qk_norm: bool = False
    # external memory (lmforge.model.knn_memory, Memorizing Transformer / LongLLaMA): {layers: [i, ...],
    # top_k: 32, size: 65536, gate: learned | fixed | joint, gate_value: 0.0}; the listed layers also attend to
    # the top_k nearest keys of earlier segments, gated (learned per head, or fixed) or in one joint softmax
    knn_memory: dict[str, Any] | None = None

    # mixture of experts (n_experts == 0 -> dense MLP everywhere)
    n_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1  # every N-th layer is MoE (layer index % moe_every == moe_every - 1)
    moe_capacity_factor: float | None = None  # None -> dropless
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    moe_normalize_top_k: bool = True
    router_init_std: float = 0.002

    # sequence mixer per layer (lmforge.model.mamba): None -> attention everywhere; else n_layers entries of
    # "attention" (a Block as above) or "mamba" (norm -> selective state-space mixer -> residual, no MLP, as
    # transformers' MambaBlock); a mix is a hybrid. Mamba layers need pre-LN and a causal structure.
    layer_types: list[str] | None = None
    mamba_d_state: int = 16  # N: state size per channel
    mamba_d_conv: int = 4  # causal depthwise convolution width
    mamba_expand: int = 2  # d_inner = mamba_expand * d_model
    mamba_dt_rank: int | None = None  # default ceil(d_model / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # bias on in_proj / out_proj
    mamba_scan_chunk: int = 64  # time steps per chunk of the training scan (compute/memory knob, not weights)

    # embeddings and init
    tie_embeddings: bool = False
    init_std: float = 0.02
    scaled_residual_init: bool = True  # residual output projections get std / sqrt(2 * n_layers)
    dropout: float = 0.0

    extra: dict[str, str] = field(default_factory=dict)  # free-form provenance (e.g. hf model_type)

    def __post_init__(self) -> None:
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("mlp", self.mlp, MLPS)
        check_choice("position", self.position, POSITIONS)
        check_choice("attention", self.attention, ATTENTIONS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ff_multiple_of"):
            check_range(name, getattr(self, name), low=1)
        for name in ("head_dim", "d_ff", "sliding_window"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low=1)
        for name in ("norm_eps", "rope_theta"):
            check_range(name, getattr(self, name), low=0.0, low_open=True)
        for name in ("init_std", "router_init_std", "moe_aux_loss_coef", "moe_z_loss_coef"):
            check_range(name, getattr(self, name), low=0.0)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        for name in ("relative_buckets", "relative_max_distance", "moe_every"):
            check_range(name, getattr(self, name), low=1)
        check_range("n_experts", self.n_experts, low=0)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            if self.gated:
                hidden = int(8 * self.d_model / 3)
                self.d_ff = self.ff_multiple_of * -(-hidden // self.ff_multiple_of)
            else:
                self.d_ff = 4 * self.d_model
        if self.norm == "deepnorm" and self.norm_position != "post":
            raise ValueError("norm: deepnorm is defined for norm_position=post")
        if self.attention in ("sliding", "lambda") and not self.sliding_window:
            raise ValueError(f"sliding_window: required when attention={self.attention}")
        if self.global_tokens < 0:
            raise ValueError(f"global_tokens: must be >= 0, got {self.global_tokens}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct: must be in (0, 1], got {self.rotary_pct}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            check_choice("rope_scaling.rope_type", kind, ROPE_SCALINGS)
            for key in ROPE_REQUIRED.get(kind, ()):
                if self.rope_scaling.get(key) is None:
                    raise ValueError(f"rope_scaling.{key}: required for rope_type={kind}")
            if kind == "longrope":
                for key in ("short_factor", "long_factor"):
                    if len(self.rope_scaling[key]) != self.rotary_dim // 2:
                        raise ValueError(
                            f"rope_scaling.{key}: needs rotary_dim/2 = {self.rotary_dim // 2} values"
                        )
        if self.rerope_window is not None:
            if self.position != "rope" or self.rerope_window <= 0:
                raise ValueError(
                    f"rerope_window: needs position=rope and a positive window, got {self.rerope_window}"
                )
            if self.rerope_leak is not None and self.rerope_leak < 1:
                raise ValueError(f"rerope_leak: must be >= 1 (1 is plain RoPE), got {self.rerope_leak}")
        elif self.rerope_leak is not None:
            raise ValueError("rerope_leak: needs rerope_window")
        if self.knn_memory is not None:
            mem = self.knn_memory
            layers = mem.get("layers")
            if not layers or any(not 0 <= int(i) < self.n_layers for i in layers):
                raise ValueError(f"knn_memory.layers: layer indices in 0..{self.n_layers - 1}, got {layers}")
            check_choice("knn_memory.gate", mem.get("gate", "learned"), ("learned", "fixed", "joint"))
            for key in ("top_k", "size"):
                if int(mem.get(key, 1)) < 1:
                    raise ValueError(f"knn_memory.{key}: must be >= 1, got {mem[key]}")
        if self.attention == "sparse" and self.sparse_block <= 0:
            raise ValueError(f"sparse_block: must be positive, got {self.sparse_block}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor: must be positive or None, got {self.moe_capacity_factor}")
        if self.n_experts and not 0 < self.moe_top_k <= self.n_experts:
            raise ValueError(f"moe_top_k: {self.moe_top_k} must be in 1..n_experts={self.n_experts}")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        """Validate ``layer_types`` and the Mamba fields (derive mamba_dt_rank)."""
        if self.mamba_dt_rank is None:
            self.mamba_dt_rank = -(-self.d_model // 16)
        for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_scan_chunk"):
            check_range(name, getattr(self, name), low=1)
        if self.layer_types is None:
            return
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types: {len(self.layer_types)} entries for n_layers={self.n_layers}")
        for i, kind in enumerate(self.layer_types):
            check_choice(f"layer_types[{i}]", kind, LAYER_TYPES)
        if self.has_mamba:
            if self.norm_position != "pre" or self.parallel_residual:
                raise ValueError("layer_types: mamba layers need norm_position=pre without parallel_residual")
            if self.structure != "causal":
                raise ValueError("layer_types: mamba layers are causal scans; structure must be causal")

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates (even)."""
        return 2 * int(self.head_dim * self.rotary_pct // 2)

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNet residual up-scaling for a decoder-only model: x_{l+1} = LN(alpha * x_l + f(x_l))."""
        return (2 * self.n_layers) ** 0.25 if self.norm == "deepnorm" else 1.0

    @property
    def deepnorm_beta(self) -> float:
        """DeepNet init down-scaling (gain of v/o/MLP weights) for a decoder-only model."""
        return (8 * self.n_layers) ** -0.25 if self.norm == "deepnorm" else 1.0

    def layer_type(self, layer: int) -> str:
        """``"attention"`` or ``"mamba"``: the sequence mixer of ``layer``."""
        return "attention" if self.layer_types is None else self.layer_types[layer]

    @property
    def has_mamba(self) -> bool:
        return self.layer_types is not None and "mamba" in self.layer_types

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_every - 1

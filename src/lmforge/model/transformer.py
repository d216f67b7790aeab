"""The decoder-only Transformer: embeddings, N blocks, final norm, LM head. Every choice comes from ModelConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.attention import Attention, AttentionContext
from lmforge.model.cache import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.fusion import FusedLinear, fusable
from lmforge.model.knn_memory import KNNMemory
from lmforge.model.mamba import MambaBlock, MambaMixer
from lmforge.model.mlp import MLP
from lmforge.model.moe import MoE
from lmforge.model.norms import build_norm
from lmforge.model.positions import SinusoidalPositions, rope_cos_sin
from lmforge.model.rerope import ReRoPE
from lmforge.model.rope_scaling import LENGTH_DEPENDENT, rope_frequencies, rope_type


@dataclass
class ModelOutput:
    """logits: (batch, seq, vocab), or hidden states when the model has no lm_head (a pipeline stage).
    aux_loss: scalar, the weighted MoE load-balancing + router z-loss summed over MoE layers (0 if dense)."""

    logits: Tensor
    aux_loss: Tensor


def _dropout(p: float) -> nn.Module:
    # an Identity costs nothing per call, where Dropout(0) still dispatches an op (it shows in decoding)
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    """One layer: attention and MLP sub-layers with residuals, normalized pre, post or sandwich.

    pre:      x = x + f(norm(x))
    post:     x = norm(alpha * x + f(x))            (DeepNorm: alpha = (2N)^(1/4), else 1)
    sandwich: x = x + post_norm(f(norm(x)))
    With parallel_residual both sub-layers read the same x and their outputs are summed (GPT-J / NeoX).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm_position, self.parallel = cfg.norm_position, cfg.parallel_residual
        self.alpha = cfg.deepnorm_alpha
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, layer)
        # post-LN with a parallel residual normalizes the single sum once, with attn_norm
        self.mlp_norm = None if self.parallel and self.norm_position == "post" else build_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        sandwich = cfg.norm_position == "sandwich"
        self.attn_post_norm = build_norm(cfg) if sandwich else None
        self.mlp_post_norm = build_norm(cfg) if sandwich else None
        self.dropout = _dropout(cfg.dropout)

    def _feed_forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp(h)
        return self.mlp(h), None

    def forward(self, x: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor | None]:
        """The block's output and, for an MoE block, its weighted auxiliary loss."""
        if self.norm_position == "post":
            attn_out = self.dropout(self.attn(x, ctx))
            if self.parallel:
                mlp_out, aux = self._feed_forward(x)
                return self.attn_norm(self.alpha * x + attn_out + self.dropout(mlp_out)), aux
            x = self.attn_norm(self.alpha * x + attn_out)
            mlp_out, aux = self._feed_forward(x)
            return self.mlp_norm(self.alpha * x + self.dropout(mlp_out)), aux

        attn_out = self.attn(self.attn_norm(x), ctx)
        if self.attn_post_norm is not None:
            attn_out = self.attn_post_norm(attn_out)
        if not self.parallel:
            x = x + self.dropout(attn_out)
        mlp_out, aux = self._feed_forward(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            mlp_out = self.mlp_post_norm(mlp_out)
        if self.parallel:
            return x + self.dropout(attn_out) + self.dropout(mlp_out), aux
        return x + self.dropout(mlp_out), aux


class Transformer(nn.Module):
    """Token embedding (+ absolute positions, + optional norm) -> blocks "0".."N-1" -> final norm -> LM head.

    The module names are a contract (tensor-parallel plans, the HF mapping, activation checkpointing and
    pipeline stages rely on them); a pipeline stage may set embed_tokens/norm/lm_head to None or delete blocks.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Submodules are built on the meta device (PyTorch's own default init would draw random numbers only
        # to be overwritten), then given storage on the current default device and initialised once by
        # reset_parameters: the weights depend on the seed and reset_parameters alone, which is what lets
        # a meta-device model be materialised piece by piece with the same weights.
        device = torch.get_default_device()
        with torch.device("meta"):
            self._build(cfg)
        self.to_empty(device=device)
        self._rope_memo: tuple[tuple, tuple[Tensor, float]] | None = None
        # set by to_inference_dtype: the blocks' dtype when the embeddings/head are kept in fp32
        self._hidden_dtype: torch.dtype | None = None
        self._fused_head: FusedLinear | None = None  # the prepacked LM head (fuse_for_inference(pack=True))
        self.reset_parameters()
        self.tie_weights()

    def _build(self, cfg: ModelConfig) -> None:
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed: nn.Module | None = None
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.position == "sinusoidal":
            self.pos_embed = SinusoidalPositions(cfg.d_model)
        self.embed_norm = build_norm(cfg) if cfg.embedding_norm else None
        self.dropout = _dropout(cfg.dropout)
        # layer_types: attention Blocks, Mamba blocks (lmforge.model.mamba), or a hybrid of both
        self.blocks = nn.ModuleDict(
            {
                str(i): MambaBlock(cfg, i) if cfg.layer_type(i) == "mamba" else Block(cfg, i)
                for i in range(cfg.n_layers)
            }
        )
        self.norm = build_norm(cfg) if cfg.final_norm else None
        self.lm_head: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when the config asks for it (call after loading)."""
        if self.cfg.tie_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) weights, zero biases, unit norms; residual output projections scaled by 1/sqrt(2N)
        (GPT-2); routers at router_init_std. DeepNorm instead uses Xavier init with gain beta on the value,
        output and MLP projections (gain 1 on queries and keys), as in the DeepNet paper."""
        for prefix, piece in self.init_pieces():
            self.init_piece(prefix, piece)

    def init_pieces(self) -> list[tuple[str, nn.Module]]:
        """The model's top-level pieces (embeddings, each block, final norm, head...) in construction order:
        the units it is initialised (and, on the meta device, materialised) in."""
        return [
            (f"{name}.{key}", block) if name == "blocks" else (name, child)
            for name, child in self.named_children()
            for key, block in (child.items() if name == "blocks" else [(None, None)])
        ]

    @torch.no_grad()
    def init_piece(self, prefix: str, piece: nn.Module) -> None:
        """Initialise one piece (``prefix`` its name in this model): every module by :meth:`init_module`,
        then the state-space parameters of its Mamba mixers (which overwrite their dt projection's init)."""
        for name, module in piece.named_modules(prefix=prefix):
            self.init_module(name, module)
        for module in piece.modules():
            if isinstance(module, MambaMixer):
                module.reset_ssm_parameters()  # A_log, D and dt_proj, after the generic Linear init

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise the parameters ``module`` (named ``name`` in this model) holds itself, by the rule of
        :meth:`reset_parameters`. Visiting the modules in ``named_modules`` order draws the random numbers in
        the same order, which is how a model built on the meta device is materialised piece by piece with
        exactly these weights (``lmforge.train.parallel.materialize``, piece by piece: :meth:`init_piece`)."""
        cfg = self.cfg
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            if leaf == "router":
                nn.init.normal_(module.weight, std=cfg.router_init_std)
            elif cfg.norm == "deepnorm" and name.startswith("blocks."):
                gain = 1.0 if leaf in ("q_proj", "k_proj") else cfg.deepnorm_beta
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                residual = leaf in ("o_proj", "down_proj", "out_proj") and cfg.scaled_residual_init
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if residual else cfg.init_std
                nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=cfg.init_std)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()  # norms: unit scale, zero shift; Mamba's conv1d: kaiming uniform

    def _rope_frequencies(self, position_ids: Tensor) -> tuple[Tensor, float]:
        """(inv_freq, attention factor) for this forward, memoised on (device, sequence length); the length
        (max position + 1, one host sync) only matters to the length-dependent rope types. Deliberately not a
        buffer, so meta-device construction and load_state_dict(assign=True) need no special care."""
        seq_len = int(position_ids.max()) + 1 if rope_type(self.cfg) in LENGTH_DEPENDENT else None
        key = (position_ids.device, seq_len)
        if self._rope_memo is None or self._rope_memo[0] != key:
            self._rope_memo = (key, rope_frequencies(self.cfg, seq_len, position_ids.device))
        return self._rope_memo[1]

    def to_inference_dtype(self, dtype: torch.dtype) -> Transformer:
        """Cast the blocks (weights and hidden states) to ``dtype`` for inference, keeping the final norm,
        the LM head and the token embedding (tied to the head or not) in fp32, so logits stay fp32: a bf16 head
        rounds logits to 3 significant digits, enough to swap near-tied greedy choices. Returns the model."""
        keep = [m for m in (self.norm, self.lm_head, self.embed_tokens) if m is not None]
        for child in self.children():
            if all(child is not m for m in keep):
                child.to(dtype)
        for module in keep:
            module.float()
        self._hidden_dtype = None if dtype == torch.float32 else dtype
        return self

    def fuse_for_inference(self, pack: bool = False, pack_dtype: torch.dtype | None = None) -> int:
        """Fuse each attention layer's q/k/v and each gated MLP's gate/up projections into one matmul (done
        once, for decoding: :mod:`lmforge.model.fusion`); with ``pack`` every block projection and the LM head
        also run on oneDNN-prepacked weights (faster on CPU, a second copy of those weights in memory).
        Parameter names and values are unchanged; layers that cannot be fused (quantized, serving LoRA
        adapters, sharded) are left alone, and a layer replaced later falls back to its separate projections
        by itself. Returns how many groups of projections were fused."""
        fused = sum(
            module.fuse_for_inference(pack, pack_dtype)
            for module in self.modules()
            if isinstance(module, (Attention, MLP))
        )
        head = self.lm_head
        self._fused_head = (
            FusedLinear([head], pack) if pack and head is not None and fusable([head]) else None
        )
        return fused

    def unfuse(self) -> None:
        """Undo :meth:`fuse_for_inference`."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.unfuse()
        self._fused_head = None

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without token/position embeddings."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for module in (self.embed_tokens, self.pos_embed):
                for p in module.parameters() if module is not None else ():
                    params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        prefix_lengths: Tensor | None = None,
        cache: KVCache | None = None,
        logits_rows: Tensor | None = None,
        return_hidden: bool = False,
        attention_mask: Tensor | None = None,
        memory: KNNMemory | None = None,
    ) -> ModelOutput:
        """input_ids (batch, seq) token ids, or (batch, seq, d_model) floating point: token embeddings (positions
        and the embedding norm still apply), or hidden states when embed_tokens is None.

        position_ids default to 0..seq-1, continuing each sequence of a cache that has ``lengths()``.
        segment_ids confine attention to tokens of the same packed document. prefix_lengths (batch,) make
        the first n tokens of each sequence attend bidirectionally (prefix decoder; with a cache the whole
        prefix must be in the first call). logits_rows (n,) index the flattened ``batch * seq`` positions whose
        logits are wanted: the result is then (n, vocab), and the LM head runs on those rows only (an inference
        engine needs the last position of each sequence, not a ``seq x vocab`` matmul per prefill).
        return_hidden skips the lm_head: ``logits`` holds the final hidden states, for losses that apply the
        head themselves (the chunked cross-entropy of training).
        attention_mask (batch, seq, n_keys) bool further restricts which keys each token sees, on top of the
        causal-by-position rule (parallel context windows: lmforge.model.pcw).
        memory: the external kNN memory of earlier segments that the config's knn_memory layers query (and add
        this forward's keys to; lmforge.model.knn_memory)."""
        cfg = self.cfg
        if prefix_lengths is not None and cfg.structure != "prefix":
            raise ValueError("prefix_lengths: the model is a causal decoder (structure=causal)")
        if memory is not None and (cache is not None or cfg.rerope_window is not None):
            raise ValueError("memory: the kNN memory works segment by segment, without a KV cache or ReRoPE")
        batch, seq = input_ids.shape[:2]
        device = input_ids.device
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).expand(batch, seq)
            if cache is not None:
                if not hasattr(cache, "lengths"):
                    raise ValueError("position_ids: required with a cache that has no lengths()")
                position_ids = position_ids + cache.lengths().to(device)[:, None]

        if self.embed_tokens is not None:
            # floating-point input is token embeddings already (soft prompts: lmforge.tune.peft.prompt)
            x = input_ids if input_ids.is_floating_point() else self.embed_tokens(input_ids)
            if self.pos_embed is not None:
                if cfg.position == "learned" and int(position_ids.max()) >= cfg.max_seq_len:
                    raise ValueError(
                        f"position {int(position_ids.max())} is beyond the learned positions (max_seq_len="
                        f"{cfg.max_seq_len})"
                    )
                x = x + self.pos_embed(position_ids.clamp(min=0)).to(x.dtype)
            if self.embed_norm is not None:
                x = self.embed_norm(x)
            x = self.dropout(x)
        else:
            x = input_ids
        if self._hidden_dtype is not None and x.is_floating_point():
            x = x.to(self._hidden_dtype)  # fp32 embeddings into reduced-precision blocks (to_inference_dtype)

        rope, rerope, key_rope = None, None, None
        if cfg.position == "rope" and cfg.rerope_window is not None:
            rerope = ReRoPE(*self._rope_frequencies(position_ids), cfg.rerope_window, cfg.rerope_leak)
        elif cfg.position == "rope":
            cos, sin = rope_cos_sin(position_ids, *self._rope_frequencies(position_ids))
            rope = (cos.to(x.dtype), sin.to(x.dtype))
            if getattr(cache, "unrotated_keys", False):
                key_rope = self._rope_frequencies(position_ids)
        needs_mask = (
            explicit_positions
            or cache is not None
            or segment_ids is not None
            or prefix_lengths is not None
            or cfg.attention != "full"
            or cfg.position in ("alibi", "relative")
            or rerope is not None
            or attention_mask is not None
            or memory is not None
        )
        ctx = AttentionContext(
            cfg,
            position_ids,
            segment_ids=segment_ids,
            prefix_lengths=prefix_lengths,
            cache=cache,
            rope=rope,
            rerope=rerope,
            key_rope=key_rope,
            causal_kernel=not needs_mask,
            allowed=attention_mask,
            memory=memory,
        )

        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks.values():
            x, block_aux = block(x, ctx)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
        if logits_rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_rows)
        if self._hidden_dtype is not None:
            x = x.float()  # the final norm and the head stay fp32 (to_inference_dtype)
        if self.norm is not None:
            x = self.norm(x)
        head = self._fused_head
        if return_hidden or self.lm_head is None:
            logits = x
        elif head is not None and head.valid([self.lm_head]):
            logits = head(x)[0]
        else:
            logits = self.lm_head(x)
        return ModelOutput(logits=logits, aux_loss=aux_loss)

"""The T5 encoder-decoder (Raffel et al. 2020; v1.1), its Hugging Face folders, and its greedy / beam decoding.

Built from the decoder-only model's parts: ``RMSNorm`` (T5's LayerNorm: no mean, no bias), ``MLP`` (ReLU for
t5, gated-GELU for t5-v1_1) and T5's bucketed relative positions (``relative_position_bucket``). What is T5's
own: attention logits are not scaled by 1/sqrt(head_dim); the relative position bias is one table per stack
(HF keeps it in the first layer and shares it), bidirectional buckets in the encoder and causal ones in the
decoder, and none on cross-attention; with tied embeddings the decoder output is rescaled by d_model**-0.5
before the LM head (t5), without (v1.1, which also unties the head).

Decoding runs the encoder once, projects every decoder layer's cross-attention keys/values from it once per
request (:class:`T5DecoderCache`), and grows a self-attention KV cache one token at a time; beam search
reorders that cache by beam. ``generate`` follows transformers' ``generate`` (greedy, and its beam search with
length penalty and early stopping semantics), so the same weights give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import check_choice, check_range
from lmforge.model.config import ModelConfig
from lmforge.model.mlp import ACTIVATIONS, MLP
from lmforge.model.norms import RMSNorm
from lmforge.model.positions import relative_position_bucket
from lmforge.model.transformer import ModelOutput

# feed_forward_proj (transformers' spelling) -> (our MLP kind, its nonlinearity). transformers maps
# "gated-gelu" to gelu_new, the tanh approximation; plain "gelu" is the exact one.
FEED_FORWARD = {
    "relu": ("relu", F.relu),
    "gelu": ("gelu", F.gelu),
    "silu": ("silu", F.silu),
    "gated-gelu": ("geglu", ACTIVATIONS["gelu_tanh"]),
    "gated-relu": ("geglu", F.relu),
    "gated-silu": ("swiglu", F.silu),
}


@dataclass
class T5Config:
    """Architecture of a T5 encoder-decoder (field names follow ``ModelConfig`` where they mean the same)."""

    vocab_size: int = 32128
    d_model: int = 512
    head_dim: int = 64  # transformers' d_kv; n_heads * head_dim need not equal d_model
    d_ff: int = 2048
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # default n_layers
    n_heads: int = 8
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (t5), "gated-gelu" (t5-v1_1), see FEED_FORWARD
    tie_embeddings: bool = True  # the LM head shares the token embedding (t5); v1.1 unties it
    # multiply the decoder output by d_model**-0.5 before the LM head; None -> tie_embeddings (as T5 does)
    scale_decoder_outputs: bool | None = None
    dropout: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # the longest sequence training feeds (relative positions themselves have no limit); transformers' n_positions
    max_seq_len: int = 512
    init_factor: float = 1.0

    def __post_init__(self) -> None:
        check_choice("feed_forward_proj", self.feed_forward_proj, tuple(FEED_FORWARD))
        for name in ("vocab_size", "d_model", "head_dim", "d_ff", "n_layers", "n_heads", "max_seq_len"):
            check_range(name, getattr(self, name), low=1)
        # bidirectional buckets halve the table, then half of each half is exact: at least 4
        check_range("relative_buckets", self.relative_buckets, low=4)
        check_range("relative_max_distance", self.relative_max_distance, low=2)
        check_range("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        check_range("n_decoder_layers", self.n_decoder_layers, low=1)
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_embeddings
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}: {getattr(self, name)} is not a token id below vocab_size={self.vocab_size}"
                )

    def component_config(self) -> ModelConfig:
        """The ``ModelConfig`` the shared ``MLP`` is built from (its nonlinearity is then set from
        ``FEED_FORWARD``: transformers' gated-gelu is the tanh approximation, which no ModelConfig kind gates)."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            head_dim=self.head_dim,
            d_ff=self.d_ff,
            mlp=FEED_FORWARD[self.feed_forward_proj][0],
            mlp_bias=False,
            norm="rmsnorm",
            norm_eps=self.norm_eps,
            position="none",
            max_seq_len=self.max_seq_len,
            dropout=self.dropout,
        )


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``keep`` is true, the dtype's most negative finite value elsewhere (as transformers does, so a
    row that sees nothing stays finite)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; keys/values come from ``x`` or are given (cross)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.head_dim, self.dropout = cfg.head_dim, cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (batch, heads, seq, head_dim) of ``x``."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(self, x: Tensor, bias: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``bias``: additive (batch or 1, heads or 1, n_q, n_k), position bias plus mask; ``kv``: the keys
        and values to attend to (default: projected from ``x``)."""
        q = self._heads(self.q_proj(x))
        k, v = self.project_kv(x) if kv is None else kv
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if bias is None else bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class T5Block(nn.Module):
    """Pre-norm self-attention, (decoder) cross-attention and MLP sub-layers, each with a residual."""

    def __init__(self, cfg: T5Config, decoder: bool) -> None:
        super().__init__()
        parts = cfg.component_config()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if decoder else None
        self.cross_attn = T5Attention(cfg) if decoder else None
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(parts)
        self.mlp.act = FEED_FORWARD[cfg.feed_forward_proj][1]
        self.dropout = _dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        bias: Tensor | None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        cross_bias: Tensor | None = None,
        cache: T5DecoderCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """``bias``: self-attention position bias + mask; ``cross_kv``/``cross_bias``: the encoder's keys and
        values and its padding mask (decoder); ``cache``: the decoding state whose ``layer`` this block is."""
        h = self.attn_norm(x)
        self_kv = None
        if cache is not None:
            self_kv = cache.append(layer, *self.attn.project_kv(h))
        x = x + self.dropout(self.attn(h, bias, self_kv))
        if self.cross_attn is not None:
            if cross_kv is None:
                raise ValueError("a decoder block needs the encoder's keys/values (cross_kv)")
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, cross_kv))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class T5Stack(nn.Module):
    """Blocks "0".."N-1", one relative position bias table shared by all of them, and a final norm."""

    def __init__(self, cfg: T5Config, decoder: bool) -> None:
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        n = cfg.n_decoder_layers if decoder else cfg.n_layers
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.n_heads)
        self.blocks = nn.ModuleDict({str(i): T5Block(cfg, decoder) for i in range(n)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.dropout = _dropout(cfg.dropout)

    def position_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(1, heads, n_q, n_k) learned bias of the bucketed offsets key - query: both directions in the
        encoder, only the past (offsets <= 0; the rest share bucket 0) in the decoder. With positions per row
        (q_pos (batch, n_q), k_pos (batch, n_k)) the bias is (batch, heads, n_q, n_k)."""
        buckets = relative_position_bucket(
            k_pos[..., None, :] - q_pos[..., :, None],
            bidirectional=not self.decoder,
            num_buckets=self.cfg.relative_buckets,
            max_distance=self.cfg.relative_max_distance,
        )
        bias = self.relative_bias(buckets)  # (..., n_q, n_k, heads)
        return bias.permute(2, 0, 1)[None] if bias.dim() == 3 else bias.permute(0, 3, 1, 2)


class T5DecoderCache:
    """Decoding state of a batch of requests: per decoder layer the cross-attention keys/values (computed
    once from the encoder output) and the self-attention keys/values of the tokens decoded so far."""

    def __init__(self, cross_kv: list[tuple[Tensor, Tensor]], encoder_mask: Tensor | None) -> None:
        self.cross_kv = cross_kv
        self.encoder_mask = encoder_mask  # (batch, n_src) bool, or None: every source token is real
        self.self_kv: list[tuple[Tensor, Tensor] | None] = [None] * len(cross_kv)
        self.length = 0  # decoder tokens stored

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store a layer's new keys/values; returns all of them."""
        old = self.self_kv[layer]
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        self.self_kv[layer] = (k, v)
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Keep the self-attention state of rows ``index`` (beam search: the beams continued). The rows of
        one request share the same source, so the cross-attention state needs no reordering."""
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.self_kv]


class T5Model(nn.Module):
    """Token embedding shared by encoder and decoder -> encoder stack; decoder stack -> LM head.

    ``forward(input_ids, decoder_input_ids)`` is the training / scoring call (teacher forcing);
    ``encode`` + ``start_decoding`` + ``decode`` the incremental one.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when the config asks for it (call after loading)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's (Mesh TensorFlow's) initialisation: N(0, f) embeddings; queries N(0, f (d_model*head_dim)^-1/2),
        keys/values and MLP inputs N(0, f d_model^-1/2), outputs N(0, f fan_in^-1/2); unit norms; an untied
        LM head N(0, f d_model^-1/2), f = init_factor."""
        cfg, f = self.cfg, self.cfg.init_factor
        nn.init.normal_(self.embed_tokens.weight, std=f)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=f * cfg.d_model**-0.5)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.relative_bias.weight, std=f * cfg.d_model**-0.5)
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, nn.Linear) and name != "lm_head":
                fan_in = module.in_features * (cfg.head_dim if leaf == "q_proj" else 1)
                nn.init.normal_(module.weight, std=f * fan_in**-0.5)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the token embedding."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.embed_tokens.weight), None)
        return sum(p.numel() for p in params.values())

    # -- encoder ----------------------------------------------------------------------------------------------
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (batch, n_src, d_model); ``attention_mask`` (batch, n_src), 0 marking padding."""
        x = self.encoder.dropout(self.embed_tokens(input_ids))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        bias = self.encoder.position_bias(positions, positions).to(x.dtype)
        if attention_mask is not None:
            bias = bias + additive_mask(attention_mask.bool()[:, None, None, :], x.dtype)
        for block in self.encoder.blocks.values():
            x = block(x, bias)
        return self.encoder.dropout(self.encoder.norm(x))

    # -- decoder ----------------------------------------------------------------------------------------------
    def start_decoding(self, encoder_out: Tensor, attention_mask: Tensor | None = None) -> T5DecoderCache:
        """The decoding state of a request batch: each decoder layer's cross-attention keys/values, once."""
        cross = [block.cross_attn.project_kv(encoder_out) for block in self.decoder.blocks.values()]
        return T5DecoderCache(cross, None if attention_mask is None else attention_mask.bool())

    def decode(
        self,
        decoder_input_ids: Tensor,
        cache: T5DecoderCache | None = None,
        encoder_out: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (batch, n_new, vocab) of decoder tokens that continue ``cache`` (which they extend), or,
        without a cache, of a whole decoder sequence attending to ``encoder_out``."""
        incremental = cache is not None
        if cache is None:
            if encoder_out is None:
                raise ValueError("decode: needs a cache or the encoder output")
            cache = self.start_decoding(encoder_out, attention_mask)
        x = self.decoder.dropout(self.embed_tokens(decoder_input_ids))
        n_new, past = decoder_input_ids.shape[1], cache.length
        device = decoder_input_ids.device
        q_pos = torch.arange(past, past + n_new, device=device)
        k_pos = torch.arange(past + n_new, device=device)
        bias = self.decoder.position_bias(q_pos, k_pos).to(x.dtype)
        bias = bias + additive_mask((k_pos[None, :] <= q_pos[:, None])[None, None], x.dtype)
        cross_bias = None
        if cache.encoder_mask is not None:
            cross_bias = additive_mask(cache.encoder_mask[:, None, None, :], x.dtype)
        for i, block in enumerate(self.decoder.blocks.values()):
            x = block(x, bias, cache.cross_kv[i], cross_bias, cache if incremental else None, i)
        if incremental:
            cache.length += n_new
        x = self.decoder.dropout(self.decoder.norm(x))
        if self.cfg.scale_decoder_outputs:
            x = x * self.cfg.d_model**-0.5
        return self.lm_head(x)

    def decode_rows(
        self,
        decoder_input_ids: Tensor,
        positions: Tensor,
        key_positions: Tensor,
        self_kv: Any,
        cross_kv: list[tuple[Tensor, Tensor]],
        encoder_mask: Tensor,
        logits_rows: Tensor | None = None,
    ) -> Tensor:
        """Logits of decoder tokens for rows that each continue their own decoding (an inference engine's
        batch): ``positions`` (batch, n) of the new tokens, ``key_positions`` (batch, n_k) of the keys
        ``self_kv.append(layer, k, v)`` returns for them (-1: padding), the rows' cross-attention keys/values
        per layer (batch, heads, n_src, head_dim) with ``encoder_mask`` (batch, n_src) marking real source
        tokens. ``logits_rows`` selects flattened (batch * n) rows for the LM head, as the Transformer's."""
        x = self.decoder.dropout(self.embed_tokens(decoder_input_ids))
        bias = self.decoder.position_bias(positions, key_positions).to(x.dtype)
        visible = (key_positions[:, None, :] <= positions[:, :, None]) & (key_positions[:, None, :] >= 0)
        visible = visible | ~visible.any(dim=-1, keepdim=True)  # padding queries see everything (discarded)
        bias = bias + additive_mask(visible[:, None], x.dtype)
        cross_bias = additive_mask(encoder_mask[:, None, None, :], x.dtype)
        for i, block in enumerate(self.decoder.blocks.values()):
            x = block(x, bias, cross_kv[i], cross_bias, self_kv, i)
        if logits_rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logits_rows)
        x = self.decoder.norm(x)
        if self.cfg.scale_decoder_outputs:
            x = x * self.cfg.d_model**-0.5
        return self.lm_head(x)

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced logits (batch, n_tgt, vocab) of ``decoder_input_ids`` given the source ``input_ids``
        (``attention_mask``: 0 marks source padding). aux_loss is 0 (no MoE), for the objectives' protocol."""
        encoder_out = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_out=encoder_out, attention_mask=attention_mask)
        return ModelOutput(logits=logits, aux_loss=logits.new_zeros((), dtype=torch.float32))


def shift_right(labels: Tensor, start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs for ``labels``: the start token, then labels[:-1] (-100 replaced by padding)."""
    shifted = labels.new_full(labels.shape, start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


# --------------------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def generate(
    model: T5Model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> Tensor:
    """Greedy (``num_beams=1``) or beam-search decoding; (batch, 1 + n) token ids starting with the decoder
    start token, as transformers' ``generate`` returns them for an encoder-decoder: finished sequences are
    padded with the pad id (greedy) or, for beams, with the pad id or the EOS id when the pad id is 0 (as
    transformers fills them). The encoder runs once per request, and so do the cross-attention projections
    (beams share them)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams: must be >= 1, got {num_beams}")
    was_training = model.training
    model.eval()
    try:
        encoder_out = model.encode(input_ids, attention_mask)
        cache = model.start_decoding(encoder_out, attention_mask)
        if num_beams == 1:
            return _greedy(model, cache, input_ids.shape[0], max_new_tokens)
        return _beam_search(
            model, cache, input_ids.shape[0], max_new_tokens, num_beams, length_penalty, early_stopping
        )
    finally:
        model.train(was_training)


def _greedy(model: T5Model, cache: T5DecoderCache, batch: int, max_new_tokens: int) -> Tensor:
    cfg = model.cfg
    device = cache.cross_kv[0][0].device
    tokens = torch.full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model.decode(tokens[:, -1:], cache)[:, -1].float()
        nxt = logits.argmax(dim=-1)
        nxt = torch.where(unfinished, nxt, cfg.pad_token_id)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        unfinished &= nxt != cfg.eos_token_id
        if not unfinished.any():
            break
    return tokens


def _expand(cache: T5DecoderCache, n: int) -> None:
    """Repeat each request's decoding state for its ``n`` beams (rows b*n .. b*n+n-1)."""
    cache.cross_kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in cache.cross_kv]
    if cache.encoder_mask is not None:
        cache.encoder_mask = cache.encoder_mask.repeat_interleave(n, 0)


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor[b, index[b, j], ...]: pick beams per request."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_search(
    model: T5Model,
    cache: T5DecoderCache,
    batch: int,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> Tensor:
    """Beam search as transformers' (vectorised) ``_beam_search``: each step keeps the 2*num_beams best
    continuations; those ending in EOS (or reaching the length limit) among the best num_beams become finished
    hypotheses scored sum_logprobs / generated_length**length_penalty, the best unfinished num_beams continue.
    A request stops when no running beam can beat its worst finished one (early_stopping=False: judged at the
    current length; True: as soon as num_beams hypotheses are finished; "never": at the best reachable
    length)."""
    cfg = model.cfg
    device = cache.cross_kv[0][0].device
    _expand(cache, num_beams)
    prompt_len, max_length = 1, 1 + max_new_tokens
    keep = 2 * num_beams  # one EOS id: 2 * num_beams candidates always leave num_beams unfinished ones
    top_mask = torch.arange(keep, device=device) < num_beams
    fill = cfg.pad_token_id or cfg.eos_token_id  # transformers' fill value for unused positions
    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = cfg.decoder_start_token_id
    finished_seqs = running.clone()
    running_scores = torch.zeros((batch, num_beams), device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
    finished_scores = torch.full((batch, num_beams), -1e9, device=device)
    is_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_idx = torch.full((batch, num_beams, max_length - 1), -1, dtype=torch.long, device=device)
    finished_idx = running_idx.clone()
    offsets = torch.arange(batch, device=device)[:, None] * num_beams
    cur_len = 1
    while True:
        last = running[:, :, cur_len - 1].reshape(-1, 1)
        logits = model.decode(last, cache)[:, -1].float()
        log_probs = F.log_softmax(logits, dim=-1).view(batch, num_beams, -1) + running_scores[:, :, None]
        vocab = log_probs.shape[-1]
        top_scores, top_flat = torch.topk(log_probs.reshape(batch, -1), k=keep)
        top_beam = top_flat // vocab
        top_seqs = _gather(running, top_beam)
        top_seqs[:, :, cur_len] = top_flat % vocab
        top_idx = _gather(running_idx, top_beam)
        top_idx[:, :, cur_len - prompt_len] = top_beam + offsets
        hits = (top_seqs[:, :, cur_len] == cfg.eos_token_id) | (cur_len + 1 >= max_length)

        # the best unfinished continuations run on
        cont_scores = top_scores + hits.float() * -1e9
        nxt = torch.topk(cont_scores, k=num_beams)[1]
        running, running_scores, running_idx = (_gather(t, nxt) for t in (top_seqs, cont_scores, top_idx))

        # finished hypotheses among the best num_beams enter the finished set if they beat it
        just_finished = hits & top_mask[None, :]
        done_scores = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        done_scores = done_scores + full.float() * -1e9 + (~improvable).float() * -1e9
        done_scores = done_scores + (~just_finished).float() * -1e9
        merged = torch.cat((finished_scores, done_scores), dim=1)
        best = torch.topk(merged, k=num_beams)[1]
        finished_seqs = _gather(torch.cat((finished_seqs, top_seqs), dim=1), best)
        finished_scores = _gather(merged, best)
        finished_idx = _gather(torch.cat((finished_idx, top_idx), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

        cache.reorder(running_idx[:, :, cur_len - prompt_len].reshape(-1))
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_len**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beam = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
    generated = int((finished_idx[:, 0] + 1).bool().sum(dim=1).max())
    return finished_seqs[:, 0, : prompt_len + generated]


# ------------------------------------------------------------------------------------- Hugging Face folders


def config_from_hf(hf: dict[str, Any]) -> T5Config:
    """T5Config of a transformers ``T5Config`` dict (t5 and t5-v1_1; tying is decided by the weights)."""
    tie = hf.get("tie_word_embeddings", True)
    eos = hf.get("eos_token_id", 1)
    pad = hf.get("pad_token_id", 0)
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        head_dim=hf["d_kv"],
        d_ff=hf["d_ff"],
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=hf["num_heads"],
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        tie_embeddings=tie,
        scale_decoder_outputs=hf.get("scale_decoder_outputs", tie),
        pad_token_id=0 if pad is None else pad,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        decoder_start_token_id=hf.get("decoder_start_token_id", pad) or 0,
        max_seq_len=hf.get("n_positions", 512),
    )


def config_to_hf(cfg: T5Config) -> dict[str, Any]:
    """transformers' config.json for ``cfg`` (``scale_decoder_outputs`` is written for transformers >= 5,
    ``tie_word_embeddings`` for older versions, which derive the scaling from it)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": cfg.feed_forward_proj,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "dropout_rate": cfg.dropout,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "n_positions": cfg.max_seq_len,
        "is_encoder_decoder": True,
    }


_ATTN = {"attn": "SelfAttention", "cross_attn": "EncDecAttention"}


def hf_key(name: str, cfg: T5Config) -> str:
    """transformers' T5ForConditionalGeneration key of our parameter ``name``."""
    if name == "embed_tokens.weight":
        return "shared.weight"
    if name == "lm_head.weight":
        return name
    stack, rest = name.split(".", 1)
    if rest == "relative_bias.weight":
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest == "norm.weight":
        return f"{stack}.final_layer_norm.weight"
    _, layer, module, leaf = rest.split(".", 3)
    ff = 2 if stack == "decoder" else 1
    if module in _ATTN:
        sub = 0 if module == "attn" else 1
        return f"{stack}.block.{layer}.layer.{sub}.{_ATTN[module]}.{leaf[0]}.weight"
    if module in ("attn_norm", "cross_norm", "mlp_norm"):
        sub = {"attn_norm": 0, "cross_norm": 1, "mlp_norm": ff}[module]
        return f"{stack}.block.{layer}.layer.{sub}.layer_norm.weight"
    proj = leaf.split(".")[0]
    gated = cfg.feed_forward_proj.startswith("gated")
    wi = {"gate_proj": "wi_0", "up_proj": "wi_1" if gated else "wi", "down_proj": "wo"}[proj]
    return f"{stack}.block.{layer}.layer.{ff}.DenseReluDense.{wi}.weight"

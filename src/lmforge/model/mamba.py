"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") in pure PyTorch.

A Mamba layer replaces attention *and* MLP: ``x + mixer(norm(x))``, where the mixer (the Mamba-1 block, laid out
as transformers' ``MambaMixer`` so checkpoints map by name) is::

    x, z   = in_proj(h).chunk(2)                      (d_model -> 2 * d_inner)
    x      = silu(causal depthwise conv1d(x))         (width d_conv, per channel)
    dt,B,C = x_proj(x).split(dt_rank, N, N)           (input-dependent: the "selective" part)
    dt     = softplus(dt_proj(dt))                    (d_inner step sizes)
    h_t    = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t   per channel d, state n; A = -exp(A_log) (d_inner, N)
    y_t    = C_t . h_t + D * x_t
    out    = out_proj(y * silu(z))

Two forms compute the same function (tests/model/test_mamba.py holds them within 1e-4 of each other and of
transformers' ``MambaForCausalLM``):

* **Chunked parallel scan** (training, prefill): the recurrence is a first-order linear one, h_t = a_t h_{t-1} + u_t,
  whose steps compose associatively: (a1, u1) then (a2, u2) = (a2 a1, a2 u1 + u2). The sequence is cut into chunks
  of ``mamba_scan_chunk`` steps. Inside a chunk the (a, u) pairs, each (batch, T, d_inner, N), are combined by a
  Hillis-Steele inclusive scan: log2(T) rounds, round r combining every step with the one 2^r before it, after
  which a_t is the product of the chunk's decays up to t and u_t the state reached from zero; then
  h_t = a_t h_0 + u_t carries the state h_0 entering the chunk, and its last h is the next chunk's h_0. Only
  products of decays in (0, 1] appear, so unlike a cumulative-log-sum formulation (exp(S_t - S_s)) nothing
  overflows however large dt * |A| grows. The N-expanded tensors exist for one chunk at a time; with gradients on,
  each chunk is activation-checkpointed, so backward keeps only the (batch, d_inner, N) boundary states plus the
  O(L * d_inner) inputs and recomputes a chunk's scan when it reaches it: memory grows with L * d_inner, not
  L * d_inner * N. Work is O(L log T) per channel in L/T sequential chunk steps (the CUDA kernel does the same
  recomputation, fused in SRAM). On CPUs the chunk is instead scanned step by step (same chunking, same
  checkpointing): with no parallel lanes to fill, the scan's log2(T) extra passes over memory cost more than
  the loop's per-op overhead (about 3x slower in a 32-step chunk at d_inner 512 here). Decays are clamped at
  e^-40 (a change below fp32 resolution) so no subnormal floats arise, which otherwise made CPU scans >10x slower.
* **Recurrent step** (decoding): one token updates the conv state (batch, d_inner, d_conv), the last d_conv
  inputs of the convolution, and the SSM state (batch, d_inner, N), in constant time and memory per token.

Why inside the one ``Transformer`` rather than a separate MambaLM class: a Mamba LM is the same embedding ->
N residual blocks -> final norm -> LM head skeleton, and only the block differs. ``ModelConfig.layer_types``
picks the mixer per layer, so pure Mamba (all "mamba"), hybrids (some "attention") and the existing attention
models share one forward, one trainer objective, one checkpoint/export path, activation checkpointing and FSDP
over ``model.blocks``. The edit to ``transformer.py`` is the block choice and the SSM init; the state lives in
:class:`RecurrentCache`, which also serves the attention layers of a hybrid (it is a ``KVCache``).

Positions of -1 mark padding, as in the KV caches: a padded token leaves both states untouched (its dt is 0,
so exp(dt A) = 1 and dt B x = 0; it is not entered into the conv state), so a ragged batch can be left-padded
and idle rows can sit out a step. ``segment_ids`` (packed documents, training) restart the state at each
document: the decay is zeroed at a document's first token and conv taps do not reach across documents.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.cache import ContiguousKVCache, KVView
from lmforge.model.config import ModelConfig
from lmforge.model.norms import build_norm

# transformers' MambaConfig defaults for the dt initialisation (time_step_min / max / floor)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
# a recurrent model has no trained context limit; max_seq_len only bounds what callers allocate or check
MAMBA_MAX_SEQ_LEN = 1 << 20
LOG_DECAY_MIN = -40.0  # decays are kept >= e^-40, so products of two stay normal floats (_scan_chunk)
DECAY_MIN = math.exp(LOG_DECAY_MIN)


# ------------------------------------------------------------------------------------------------- the scan


def _scan_chunk(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    keep: Tensor | None,
    h0: Tensor,
    parallel: bool,
) -> tuple[Tensor, Tensor]:
    """One chunk of the selective scan. x, dt: (b, T, d); A: (d, N); B, C: (b, T, N); keep: (b, T) or None
    (0 where the state restarts); h0: (b, d, N). Returns y (b, T, d) = C_t . h_t and the last state."""
    # decays in [e^-40, 1]: a smaller one changes h by under 5e-18 |h| (below fp32 resolution), and the
    # product of two stays a normal float; subnormal arithmetic runs >10x slower on CPUs
    a = torch.exp((dt[..., None] * A).clamp(min=LOG_DECAY_MIN))  # (b, T, d, N)
    if keep is not None:
        a = a * keep[:, :, None, None]
    u = (dt * x)[..., None] * B[:, :, None, :]  # (b, T, d, N): the state each step adds
    steps = a.shape[1]
    if parallel:  # Hillis-Steele inclusive scan of (a, u) under (a1,u1)*(a2,u2) = (a2 a1, a2 u1 + u2)
        offset = 1
        while offset < steps:
            u = torch.cat([u[:, :offset], a[:, offset:] * u[:, :-offset] + u[:, offset:]], dim=1)
            a = torch.cat([a[:, :offset], (a[:, offset:] * a[:, :-offset]).clamp(min=DECAY_MIN)], dim=1)
            offset *= 2
        h = a * h0[:, None] + u
    else:  # the recurrence itself, one (b, d, N) update per step: the least work, best where ops are cheap
        states, state = [], h0
        for a_t, u_t in zip(a.unbind(1), u.unbind(1)):  # unbind: one backward op, not one per step
            state = a_t * state + u_t
            states.append(state)
        h = torch.stack(states, dim=1)
    return torch.einsum("btdn,btn->btd", h, C), h[:, -1]


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor | None = None,
    keep: Tensor | None = None,
    chunk: int = 64,
    parallel: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t over a whole sequence, chunked (module docstring).

    x, dt: (batch, L, d); A: (d, N); B, C: (batch, L, N); h0: (batch, d, N) state before the first step
    (zeros if None); keep: (batch, L), 0 where the state restarts. parallel: scan each chunk with the
    log-depth Hillis-Steele scan (True) or step by step (False); None picks parallel on accelerators and
    step by step on CPUs, where the scan's extra log2(chunk) passes over memory cost more than the loop's
    per-op overhead. Computed in fp32. Returns y (batch, L, d) and the final state (batch, d, N)."""
    batch, length, d = x.shape
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    h = x.new_zeros(batch, d, A.shape[-1]) if h0 is None else h0.float()
    if parallel is None:
        parallel = x.device.type != "cpu"
    remat = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, h))
    ys = []
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        args = (
            x[:, part],
            dt[:, part],
            A,
            B[:, part],
            C[:, part],
            None if keep is None else keep[:, part],
            h,
        )
        if remat:
            y, h = checkpoint(_scan_chunk, *args, parallel, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args, parallel)
        ys.append(y)
    return torch.cat(ys, dim=1), h


def selective_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step: x, dt (batch, d); B, C (batch, N); h (batch, d, N). Returns y (batch, d), new h."""
    dt = dt.float()
    h = (
        torch.exp((dt[..., None] * A.float()).clamp(min=LOG_DECAY_MIN)) * h.float()
        + (dt * x.float())[..., None] * B.float()[:, None, :]
    )
    return torch.einsum("bdn,bn->bd", h, C.float()), h


# ------------------------------------------------------------------------------------------------ the mixer


class MambaMixer(nn.Module):
    """The Mamba-1 selective SSM mixer (parameter names as transformers' ``MambaMixer``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_inner, n, k = cfg.mamba_d_inner, cfg.mamba_d_state, cfg.mamba_d_conv
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, n, k, cfg.mamba_dt_rank
        self.chunk = cfg.mamba_scan_chunk
        self.parallel_scan: bool | None = None  # selective_scan's ``parallel`` (None: by device)
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, k, groups=d_inner, padding=k - 1, bias=cfg.mamba_conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, n))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.mamba_proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real A (A_log = log(1..N) per channel), D = 1, dt_proj so that softplus(bias) is log-uniform in
        [1e-3, 1e-1] and its weight uniform in +-dt_rank^-0.5 (the Mamba reference / transformers init)."""
        device = self.A_log.device
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=device) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        ).clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def new_state(self, batch: int, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Zero (conv state (batch, d_inner, d_conv), SSM state (batch, d_inner, N) in fp32)."""
        conv = torch.zeros(batch, self.d_inner, self.d_conv, dtype=dtype, device=device)
        return conv, torch.zeros(batch, self.d_inner, self.d_state, dtype=torch.float32, device=device)

    def _ssm_inputs(self, xc: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dt (fp32, 0 on padding), B, C and A from the conv output xc (..., d_inner)."""
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())
        if valid is not None:
            dt = dt * valid[..., None]
        return dt, B, C, -torch.exp(self.A_log.float())

    def _out(self, y: Tensor, xc: Tensor, z: Tensor) -> Tensor:
        y = (y + xc.float() * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(z.dtype))

    def forward(
        self,
        hidden: Tensor,
        valid: Tensor | None = None,
        segment_ids: Tensor | None = None,
        state: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """hidden (batch, L, d_model) -> (output (batch, L, d_model), new state or None when ``state`` is None).

        valid: (batch, L) bool, False on padding; segment_ids: (batch, L) documents (no state then);
        state: (conv, ssm) before the first token. One token with a state takes the recurrent :meth:`step`."""
        if state is not None and hidden.shape[1] == 1:
            out, new = self.step(hidden[:, 0], state, None if valid is None else valid[:, 0])
            return out[:, None], new
        if segment_ids is not None and state is not None:
            raise ValueError(
                "segment_ids: packed documents are for training; not supported with a decoding state"
            )
        batch, length, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        x = x.transpose(1, 2)  # (b, d_inner, L)
        if valid is not None:
            x = x * valid[:, None, :].to(x.dtype)  # padding never enters the convolution
        k = self.d_conv
        prev = state[0].to(x.dtype) if state is not None else x.new_zeros(batch, self.d_inner, k)
        padded = torch.cat([prev[..., 1:], x], dim=-1)  # the k-1 inputs before the first token, then x
        weight = self.conv1d.weight
        if segment_ids is None:
            conv = F.conv1d(padded, weight, self.conv1d.bias, groups=self.d_inner)
        else:  # a tap reaches back only within the token's own document
            segs = F.pad(segment_ids, (k - 1, 0), value=-1)
            conv = sum(
                weight[:, 0, j, None]
                * padded[..., j : j + length]
                * (segs[:, None, j : j + length] == segment_ids[:, None])
                for j in range(k)
            )
            if self.conv1d.bias is not None:
                conv = conv + self.conv1d.bias[:, None]
        xc = F.silu(conv).transpose(1, 2)  # (b, L, d_inner)
        dt, B, C, A = self._ssm_inputs(xc, valid)
        keep = None
        if segment_ids is not None:
            keep = torch.ones_like(dt[..., 0])
            keep[:, 1:] = (segment_ids[:, 1:] == segment_ids[:, :-1]).to(keep.dtype)
        h0 = state[1] if state is not None else None
        y, h = selective_scan(
            xc, dt, A, B, C, h0=h0, keep=keep, chunk=self.chunk, parallel=self.parallel_scan
        )
        out = self._out(y, xc, z)
        if state is None:
            return out, None
        # conv state: the last k inputs that were not padding (the old state's k count as inputs)
        history = torch.cat([state[0].to(x.dtype), x], dim=-1)
        if valid is None:
            conv_state = history[..., -k:]
        else:
            flags = torch.cat([valid.new_ones(batch, k), valid], dim=-1)
            order = torch.arange(history.shape[-1], device=x.device).expand(batch, -1)
            last = torch.where(flags, order, -1).topk(k, dim=-1).values.sort(dim=-1).values
            conv_state = history.gather(2, last[:, None, :].expand(-1, self.d_inner, -1))
        return out, (conv_state.contiguous(), h)

    def step(
        self, hidden: Tensor, state: tuple[Tensor, Tensor], valid: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The recurrent form: one token hidden (batch, d_model) and state (conv, ssm) -> (output, new state).
        A row with valid False keeps its state."""
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d_inner)
        shifted = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
        if valid is not None:
            shifted = torch.where(valid[:, None, None], shifted, conv_state)
        conv = (shifted * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        xc = F.silu(conv.to(x.dtype))
        dt, B, C, A = self._ssm_inputs(xc, valid)
        y, h = selective_step(xc, dt, A, B, C, ssm_state)
        return self._out(y, xc, z), (shifted, h)


class MambaBlock(nn.Module):
    """A Mamba layer: ``x + mixer(norm(x))`` (pre-LN, no MLP), as transformers' ``MambaBlock``. Same call
    signature as the attention ``Block``: ``(x, ctx) -> (x, aux)`` with aux always None."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm = build_norm(cfg)
        self.mixer = MambaMixer(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, ctx) -> tuple[Tensor, None]:  # ctx: lmforge.model.attention.AttentionContext
        cache = ctx.cache
        if cache is not None and not hasattr(cache, "mamba_state"):
            raise ValueError(
                "cache: a model with mamba layers decodes with a RecurrentCache (lmforge.model.mamba), "
                f"not {type(cache).__name__}"
            )
        valid = ctx.positions >= 0
        state = cache.mamba_state(self.layer) if cache is not None else None
        out, new = self.mixer(self.norm(x), valid=valid, segment_ids=ctx.segment_ids, state=state)
        if cache is not None:
            cache.set_mamba_state(self.layer, new, ctx.positions)
        return x + self.dropout(out), None


# --------------------------------------------------------------------------------------------- the state cache


class RecurrentCache:
    """Decoding state of a model whose layers may be Mamba or attention.

    Each Mamba layer holds a conv state (batch, d_inner, d_conv) and an SSM state (batch, d_inner, N, fp32):
    constant in the sequence length. The attention layers of a hybrid share a ``ContiguousKVCache`` sized for
    just those layers (``update`` maps the layer number), so a pure Mamba model allocates no KV at all.
    ``lengths()`` is one past the last position each sequence has consumed (so positions default correctly).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        attention = [i for i in range(cfg.n_layers) if cfg.layer_type(i) == "attention"]
        self.attn_slot = {layer: slot for slot, layer in enumerate(attention)}
        self.kv = (
            ContiguousKVCache(len(attention), batch, cfg.n_kv_heads, cfg.head_dim, max_len, dtype, device)
            if attention
            else None
        )
        d_inner, k, n = cfg.mamba_d_inner, cfg.mamba_d_conv, cfg.mamba_d_state
        self.states: dict[int, tuple[Tensor, Tensor]] = {
            i: (
                torch.zeros(batch, d_inner, k, dtype=dtype, device=device),
                torch.zeros(batch, d_inner, n, dtype=torch.float32, device=device),
            )
            for i in range(cfg.n_layers)
            if cfg.layer_type(i) == "mamba"
        }
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> RecurrentCache:
        return cls(cfg, batch, max_len, dtype=dtype, device=device)

    def _advance(self, positions: Tensor) -> None:
        self.next_position = torch.maximum(
            self.next_position, positions.amax(dim=-1).to(self.next_position) + 1
        )

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        """An attention layer's KV update (``KVCache`` protocol)."""
        self._advance(positions)
        return self.kv.update(self.attn_slot[layer], keys, values, positions)

    def mamba_state(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.states[layer]

    def set_mamba_state(self, layer: int, state: tuple[Tensor, Tensor], positions: Tensor) -> None:
        self.states[layer] = state
        self._advance(positions)

    def lengths(self) -> Tensor:
        return self.next_position

    def nbytes(self) -> int:
        """Bytes of state held (Mamba states plus any KV)."""
        total = sum(c.nbytes + s.nbytes for c, s in self.states.values())
        if self.kv is not None:
            total += self.kv.k.nbytes + self.kv.v.nbytes + self.kv.pos.nbytes
        return total


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    prompt_lengths: Tensor | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy decoding of any ``Transformer`` (attention, Mamba or hybrid) through a :class:`RecurrentCache`:
    the prompt is run once (prefill, chunked scan), then one recurrent step per token.

    input_ids (batch, P); prompt_lengths (batch,) marks left-padded prompts (the real tokens are the last
    prompt_lengths[i]). Returns the new tokens (batch, max_new_tokens); after eos_token_id a row repeats eos."""
    batch, prompt = input_ids.shape
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = RecurrentCache.for_model(model.cfg, batch, prompt + max_new_tokens, dtype=dtype, device=device)
    positions = None
    if prompt_lengths is not None:
        pad = prompt - prompt_lengths.to(device)[:, None]
        positions = torch.arange(prompt, device=device)[None, :] - pad
        positions = positions.masked_fill(positions < 0, -1)
    logits = model(input_ids, position_ids=positions, cache=cache).logits[:, -1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done = done | (token == eos_token_id)
        out.append(token)
        if len(out) == max_new_tokens or bool(done.all()):
            break
        logits = model(token[:, None], cache=cache).logits[:, -1]
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:
        tokens = F.pad(tokens, (0, max_new_tokens - tokens.shape[1]), value=eos_token_id)
    return tokens


# ----------------------------------------------------------------------------- transformers MambaForCausalLM


def config_from_hf_mamba(hf: dict[str, Any], extra: dict[str, str]) -> ModelConfig:
    """The ModelConfig of a transformers ``MambaConfig`` (config.json as a dict): every layer Mamba."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported by Mamba layers (silu)")
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    rank = hf.get("time_step_rank", "auto")
    expand = hf.get("expand", 2)
    if hf.get("intermediate_size", expand * hidden) != expand * hidden or int(expand) != expand:
        raise ValueError(
            f"intermediate_size: must be expand * hidden_size, got {hf.get('intermediate_size')}"
        )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hidden,
        n_layers=layers,
        n_heads=1,  # unused: no attention layer
        max_seq_len=MAMBA_MAX_SEQ_LEN,
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        position="none",
        layer_types=["mamba"] * layers,
        mamba_d_state=hf.get("state_size", 16),
        mamba_d_conv=hf.get("conv_kernel", 4),
        mamba_expand=int(expand),
        mamba_dt_rank=-(-hidden // 16) if rank == "auto" else int(rank),
        mamba_conv_bias=hf.get("use_conv_bias", True),
        mamba_proj_bias=hf.get("use_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        extra=extra,
    )


def mamba_family_problems(cfg: ModelConfig) -> list[str]:
    """Why ``cfg`` cannot be written as a transformers Mamba model (empty: it can)."""
    problems = []
    if cfg.layer_types is None or set(cfg.layer_types) != {"mamba"}:
        problems.append("every layer mamba")
    if cfg.norm != "rmsnorm" or not cfg.final_norm or cfg.embedding_norm:
        problems.append("RMSNorm with a final norm only")
    if cfg.position in ("learned", "sinusoidal"):
        problems.append("no absolute position embeddings")
    return problems


def config_to_hf_mamba(cfg: ModelConfig) -> dict[str, Any]:
    """The ``MambaConfig`` fields of ``cfg`` (which must map: :func:`mamba_family_problems`)."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mamba_d_inner,
        num_hidden_layers=cfg.n_layers,
        state_size=cfg.mamba_d_state,
        conv_kernel=cfg.mamba_d_conv,
        expand=cfg.mamba_expand,
        time_step_rank=cfg.mamba_dt_rank,
        use_bias=cfg.mamba_proj_bias,
        use_conv_bias=cfg.mamba_conv_bias,
        hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps,
        residual_in_fp32=True,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def mamba_hf_key(name: str) -> str:
    """Our parameter name -> the MambaForCausalLM checkpoint name (the block layout is the same)."""
    if name == "embed_tokens.weight":
        return "backbone.embeddings.weight"
    if name.startswith("norm."):
        return "backbone.norm_f." + name.removeprefix("norm.")
    if name.startswith("blocks."):
        return "backbone.layers." + name.removeprefix("blocks.")
    return name

"""``LLMEngine``: continuous-batching inference over a paged KV cache.

How a server drives it
----------------------
The engine is a synchronous state machine and is NOT thread-safe: exactly one thread may call its methods.
An asyncio server runs one engine thread that drives ``step()`` and feeds each request's ``asyncio.Queue``
through ``loop.call_soon_threadsafe``; requests and aborts reach that thread through a command queue (the
server layer's ``AsyncEngine`` does this). ``make_request`` is the one method any thread may call: it
validates and tokenizes without touching scheduler state. The synchronous protocol is::

    group = engine.make_request(request_id, prompt, params)   # validate + tokenize; raises InvalidRequestError
                                                               # (a ValueError -> 400);
                                                               # thread-safe (touches no scheduler state)
    engine.add_request(group)          # or engine.add_request(request_id, prompt, params) in one call;
                                       # raises QueueFullError (-> 429) when max_waiting requests already wait
    while engine.has_unfinished():
        for out in engine.step():      # one scheduler iteration: batched forwards for the decodes and the
            ...                        # prefill chunks it scheduled; returns a RequestOutput for every
                                       # request that produced tokens, finished, or was aborted in this step
    engine.abort(request_id)           # frees the request's blocks at once; its last output (finish_reason
                                       # "abort") comes from the next step()

A ``RequestOutput`` carries ``outputs: list[CompletionOutput]`` (one per completion, ``index`` 0..n-1). Each
``CompletionOutput`` has cumulative ``token_ids``/``text``/``logprobs`` and this step's ``new_token_ids``,
``new_text`` (UTF-8 safe, stop strings removed, a possible stop-string prefix held back) and ``new_logprobs``;
``finish_reason`` is None while running, then "stop" (EOS, a stop token id or a stop string; ``stop_reason``
names which), "length" (max_tokens or the context), "abort", or "error": a request whose processing raised
inside a step is failed alone (``RequestOutput.error`` says why) and the step goes on for the others. ``RequestOutput.prompt_logprobs`` is set on the
first output of a request that asked for it. Log-probabilities are those of the model's raw distribution
(before penalties and temperature). Beam-search requests report only once, when finished, with the
length-penalised beam score as ``cumulative_logprob`` and no per-token logprobs.
``engine.stats()`` gives the counters a metrics endpoint needs.

``engine.generate(prompts, params)`` is the offline convenience: it adds everything, steps until done and
returns the final ``RequestOutput`` of each prompt in order.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.infer.beam import BeamSearch, advance_beams
from lmforge.infer.block_manager import BlockManager
from lmforge.infer.cuda_graphs import DecodeGraphs, supports_graphs
from lmforge.infer.kv_cache import PagedKVCache, num_blocks_for_budget
from lmforge.infer.lora import LoraSet, LoraWeights
from lmforge.infer.model_runner import ChunkLogits, ModelRunner, stack_last
from lmforge.infer.output_builder import final_output, record_prompt_logprobs, step_output
from lmforge.infer.outputs import RequestOutput, TokenLogprob
from lmforge.infer.sampler import Sampler
from lmforge.infer.sampling_params import InvalidRequestError, SamplingParams
from lmforge.infer.scheduler import QueueFullError, ScheduledSeq, Scheduler
from lmforge.infer.seq2seq import CrossAttention
from lmforge.infer.sequence import Sequence, SequenceGroup
from lmforge.infer.state_pool import HybridCache, StatePool
from lmforge.model.t5 import T5Model
from lmforge.model.transformer import Transformer

__all__ = ["EngineConfig", "EngineStats", "InvalidRequestError", "LLMEngine", "QueueFullError"]

logger = logging.getLogger(__name__)

DTYPES = ("model", "auto", "float32", "bfloat16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo's
    flags); without it bf16 matmuls are emulated and slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s blocks compute in (a model cast by ``Transformer.to_inference_dtype`` keeps its
    embeddings and head in fp32)."""
    return getattr(model, "_hidden_dtype", None) or next(model.parameters()).dtype


def auto_bf16_weights(model: nn.Module) -> bool:
    """``dtype="auto"``: whether to run ``model`` (fp32, on a CPU with native bf16) with bf16 weights. It keeps
    fp32 activations and KV cache and packs bf16 copies of the projections: that won both single-stream
    decode (1.5x) and batched throughput (1.2x) here, where bf16 activations and KV cache lost 30% of the
    batched throughput to bf16 attention (docs/benchmarks.md)."""
    param = next(model.parameters())
    native = param.device.type == "cpu" and cpu_has_native_bf16()
    return native and compute_dtype(model) == torch.float32 and isinstance(model, Transformer)


def resolve_dtype(name: str, model: nn.Module) -> torch.dtype:
    """The dtype of the activations and KV cache the engine runs ``model`` with for the :class:`EngineConfig`
    ``dtype`` option ``name`` ("auto" keeps the model's: it changes only the weights' copies)."""
    if name in ("model", "auto"):
        return compute_dtype(model)
    return getattr(torch, name)


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int = 256 * 2**20  # the KV pool: keys + values of all layers
    num_blocks: int | None = None  # overrides kv_cache_memory_bytes when set
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_waiting: int = 1024
    max_model_len: int | None = None  # default: the model's max_seq_len
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    # decoding sequences keep contiguous copies of their keys/values (no per-step gather; at most as much
    # memory again as the KV pool; see decode_mirror.py)
    decode_mirror: bool = True
    seed: int | None = None  # the shared generator of unseeded requests
    # attention sinks (StreamingLLM): with sink_window > 0 a sequence attends to its first sink_tokens and its
    # last sink_window tokens at positions counted inside them; the blocks in between are freed, so a stream
    # runs past the context length in constant KV memory (keys are cached before RoPE, rotated at attention)
    sink_tokens: int = 0
    sink_window: int = 0
    # weights and KV cache: "model" keeps the model's dtype; "float32" / "bfloat16" cast the blocks (the final
    # norm, LM head and embeddings stay fp32, so logits are fp32); "auto": on a CPU that multiplies bf16
    # natively (AVX512-BF16 / AMX) an fp32 model keeps fp32 activations and KV cache and decodes with packed
    # bf16 weights (pack_weights + pack_dtype="bfloat16", the fastest here), elsewhere the model's dtype
    dtype: str = "model"
    # run q/k/v and gate/up as one matmul each (fused once, at load: Transformer.fuse_for_inference)
    fuse_projections: bool = True
    # with fuse_projections: keep the block projections and LM head also prepacked for oneDNN (CPU): faster
    # decode matmuls for a second copy of those weights in memory (see docs/benchmarks.md)
    pack_weights: bool = False
    # with pack_weights: the dtype of the packed copies, "model" (the weights' own) or "bfloat16" (weight-only
    # bf16: an fp32 model keeps fp32 activations and KV cache, its matmuls read bf16 weights)
    pack_dtype: str = "model"
    # on a CUDA device: replay the decode-mirror forward as CUDA graphs captured per batch bucket (one launch
    # per decode step instead of one per kernel; cuda_graphs.py); ignored on a CPU
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.pack_dtype not in ("model", "bfloat16"):
            raise ValueError(f"pack_dtype: model or bfloat16, got {self.pack_dtype!r}")
        for name in (
            "block_size",
            "kv_cache_memory_bytes",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_waiting",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.sink_tokens < 0 or self.sink_window < 0:
            raise ValueError("sink_tokens, sink_window: must be >= 0")
        if self.sink_tokens and not self.sink_window:
            raise ValueError("sink_tokens: attention sinks need a sink_window > 0 as well")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks: need at least 2 (one is the padding block), got {self.num_blocks}")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished_total: int
    decode_mirror_bytes: int = 0  # memory of the contiguous decode copies (0 with decode_mirror off)


class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        config: EngineConfig | None = None,
        eos_token_ids: Seq[int] | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.dtype = self._prepare_model(model, config)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            if eos is None and isinstance(model, T5Model):
                eos = cfg.eos_token_id
            eos_token_ids = [eos] if eos is not None else []
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        param = next(model.parameters())
        # Mamba layers keep a per-sequence recurrent state (state_pool.py): the KV pool holds the attention
        # layers only, and a state cannot be shared between prompts (no prefix cache) or mirrored
        self.has_mamba = bool(getattr(cfg, "has_mamba", False))
        # an encoder-decoder: the engine's sequences are its decoder's (seq2seq.py); sources differ per request,
        # so decoder prefixes are never shared
        self.seq2seq = isinstance(model, T5Model)
        if self.has_mamba or self.seq2seq:
            config = self.config = dataclasses.replace(
                config, enable_prefix_caching=False, decode_mirror=False
            )
        kv_layers = cfg.n_layers
        if self.has_mamba:
            kv_layers = sum(cfg.layer_type(i) == "attention" for i in range(cfg.n_layers))
        if self.seq2seq:
            kv_layers = cfg.n_decoder_layers
        kv_heads = cfg.n_heads if self.seq2seq else cfg.n_kv_heads
        if kv_layers:
            num_blocks = config.num_blocks or num_blocks_for_budget(
                config.kv_cache_memory_bytes,
                kv_layers,
                kv_heads,
                cfg.head_dim,
                config.block_size,
                self.dtype,
            )
        else:  # blocks only count tokens: enough for every sequence at full length
            num_blocks = (
                config.num_blocks or config.max_num_seqs * -(-self.max_model_len // config.block_size) + 2
            )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.cache = PagedKVCache(
            kv_layers,
            num_blocks,
            config.block_size,
            kv_heads,
            cfg.head_dim,
            self.dtype,
            param.device,
        )
        self.sinks = self._check_sinks(config, cfg)
        if self.sinks is not None:  # positions are recomputed every step: no prefix cache, no decode mirror
            config = self.config = dataclasses.replace(
                config, enable_prefix_caching=False, decode_mirror=False
            )
            self.block_manager.enable_prefix_caching = False
            self.cache.unrotated_keys = True
        # A prefix decoder attends bidirectionally over the prompt: a prompt's keys/values depend on all of it,
        # so it is prefilled in one piece, and prefix-cache entries belong to the whole prompt.
        self.prefix_lm = getattr(cfg, "structure", "causal") == "prefix"
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_waiting,
            config.chunked_prefill and not self.prefix_lm,
            self.eos_token_ids,
            None if self.sinks else self.max_model_len,  # a stream behind sinks is not bounded by the context
            None if self.sinks is None else self.max_model_len - sum(self.sinks),
        )
        self.runner = ModelRunner(
            model, self.cache, config.block_size, config.decode_mirror, config.max_num_seqs
        )
        self.runner.sinks = self.sinks
        if config.cuda_graphs and param.device.type == "cuda" and self.runner.mirror is not None:
            why_not = supports_graphs(model)
            if why_not is None:
                self.runner.graphs = DecodeGraphs(model, self.cache)
            else:
                logger.info("CUDA graphs off for this model: %s", why_not)
        self.states: StatePool | None = None
        if self.has_mamba:
            if self.sinks is not None:
                raise ValueError(
                    "sink_window: attention sinks are for attention layers; this model has Mamba layers"
                )
            self.states = StatePool(cfg, config.max_num_seqs, self.dtype, param.device)
            self.runner.state_cache = HybridCache(cfg, self.cache, self.states)
        self.cross: CrossAttention | None = None
        if self.seq2seq:
            self.cross = self.runner.cross = CrossAttention(model)
        self.sampler = Sampler(config.seed)
        self.loras: LoraSet | None = None  # LoRA adapters served next to the base model (add_lora)
        self.num_virtual = 0  # positions of the virtual prefix every request starts with (set_virtual_prefix)
        self._request_ids = itertools.count()
        self._aborted: list[SequenceGroup] = []
        self._failed: list[tuple[SequenceGroup, str]] = []  # requests that broke mid-step, with why
        self._prompt_tokens_total = 0

    @staticmethod
    def _prepare_model(model: nn.Module, config: EngineConfig) -> torch.dtype:
        """Cast the model to the configured dtype and fuse its projections (both in place, once); returns the
        dtype of its blocks, which the KV cache takes."""
        current = compute_dtype(model)
        dtype = resolve_dtype(config.dtype, model)
        if dtype != current:
            if not isinstance(model, Transformer) or getattr(model.cfg, "has_mamba", False):
                raise ValueError(
                    f"dtype: {config.dtype} casts decoder-only attention models; load this model in the "
                    "dtype wanted instead (or leave dtype='model')"
                )
            model.to_inference_dtype(dtype)
        pack, pack_dtype = config.pack_weights, None if config.pack_dtype == "model" else torch.bfloat16
        if config.dtype == "auto" and auto_bf16_weights(model):
            pack, pack_dtype = True, torch.bfloat16
        if config.fuse_projections and isinstance(model, Transformer):
            model.fuse_for_inference(pack=pack, pack_dtype=pack_dtype)
        return compute_dtype(model)

    def _check_sinks(self, config: EngineConfig, cfg: Any) -> tuple[int, int] | None:
        if not config.sink_window:
            return None
        if getattr(cfg, "position", None) != "rope" or getattr(cfg, "rerope_window", None) is not None:
            raise ValueError(
                "sink_window: attention sinks re-position keys, which needs rotary positions (RoPE)"
            )
        if config.sink_tokens + config.sink_window >= self.max_model_len:
            raise ValueError(
                f"sink_tokens + sink_window: {config.sink_tokens + config.sink_window} leave no room in the "
                f"context of {self.max_model_len}"
            )
        return config.sink_tokens, config.sink_window

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, config: EngineConfig | None = None, **load_kwargs: Any
    ) -> LLMEngine:
        """Load an HF-layout folder (weights, config, tokenizer, generation_config.json)."""
        from lmforge.model.hf import load_pretrained
        from lmforge.tokenizer import load_tokenizer

        folder = Path(folder)
        model = load_pretrained(folder, **load_kwargs)
        tokenizer = load_tokenizer(folder)
        eos: list[int] = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        generation_config = folder / "generation_config.json"
        if generation_config.is_file():
            value = json.loads(generation_config.read_text()).get("eos_token_id")
            extra = value if isinstance(value, list) else [value] if value is not None else []
            eos += [int(e) for e in extra if int(e) not in eos]
        return cls(model, tokenizer, config, eos_token_ids=eos)

    # -- adapters ----------------------------------------------------------------------------------------------
    def add_lora(self, name: str, weights: LoraWeights) -> None:
        """Serve a LoRA adapter (module name -> (A, B, scale)) under ``name``; requests choose it by name,
        and one batch mixes requests of different adapters and of the base model."""
        if self.seq2seq:
            raise ValueError("LoRA adapters are served for decoder-only models")
        if self.num_virtual:  # the shared virtual prefix was computed without any adapter
            raise ValueError("LoRA adapters cannot be served behind a soft prompt or prefix adapter")
        if self.loras is None:
            self.loras = LoraSet(self.model)
            self.runner.loras = self.loras
        self.loras.add(name, weights)

    def remove_lora(self, name: str) -> None:
        """Stop serving adapter ``name``; refused (ValueError) while unfinished requests use it."""
        if self.loras is None or name not in self.loras:
            raise KeyError(name)
        users = [g.request_id for g in (*self.scheduler.waiting, *self.scheduler.running) if g.lora == name]
        if users:
            raise ValueError(f"the adapter {name!r} is in use by {len(users)} unfinished request(s)")
        self.loras.remove(name)

    @property
    def lora_names(self) -> list[str]:
        return self.loras.names if self.loras is not None else []

    @torch.inference_mode()
    def set_virtual_prefix(self, keys: Seq[torch.Tensor], values: Seq[torch.Tensor]) -> None:
        """Start every request with a virtual prefix: per layer, the keys and values (n_kv_heads, V,
        head_dim) of V positions, as the cache holds them (prefix tuning's learned pairs). They are written
        once into pinned KV blocks that all requests share; a request's own tokens start at position V.
        Set once, before any request."""
        cfg = self.model.cfg
        if self.has_mamba or self.seq2seq:
            raise ValueError("virtual prefix: for decoder-only attention models")
        if self.loras is not None:
            raise ValueError("virtual prefix: not with LoRA adapters (the prefix would be the base model's)")
        if len(keys) != cfg.n_layers or len(values) != cfg.n_layers:
            raise ValueError(f"virtual prefix: one key and one value tensor per layer ({cfg.n_layers})")
        length = keys[0].shape[1]
        for k, v in zip(keys, values):
            if k.shape != (cfg.n_kv_heads, length, cfg.head_dim) or v.shape != k.shape:
                raise ValueError(
                    f"virtual prefix: keys/values must be ({cfg.n_kv_heads}, {length}, {cfg.head_dim}), "
                    f"got {tuple(k.shape)} / {tuple(v.shape)}"
                )
        if length >= self.max_model_len:
            raise ValueError(f"virtual prefix: {length} positions leave no room in the context")
        bs = self.block_manager.block_size
        blocks = self.block_manager.pin(length)
        slots = torch.tensor(
            [blocks[p // bs] * bs + p % bs for p in range(length)], device=self.cache.k.device
        )
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.cache.k[layer].index_copy_(0, slots, k.transpose(0, 1).to(self.cache.k))
            self.cache.v[layer].index_copy_(0, slots, v.transpose(0, 1).to(self.cache.v))
        self.num_virtual = length

    @torch.inference_mode()
    def set_soft_prompt(self, embeddings: torch.Tensor) -> None:
        """Start every request with a soft prompt (prompt tuning, P-tuning): V input embeddings (V, d_model)
        in front of each prompt. Their keys and values do not depend on what follows, so they are computed
        once here (one forward) and served as a virtual prefix."""
        from lmforge.model.cache import ContiguousKVCache

        cfg = self.model.cfg
        if embeddings.dim() != 2 or embeddings.shape[1] != cfg.d_model:
            raise ValueError(
                f"soft prompt: embeddings must be (V, {cfg.d_model}), got {tuple(embeddings.shape)}"
            )
        length = embeddings.shape[0]
        param = next(self.model.parameters())
        cache = ContiguousKVCache.for_model(cfg, 1, length, param.dtype, param.device)
        self.model(embeddings[None].to(param), cache=cache)
        self.set_virtual_prefix(list(cache.k[:, 0, :, :length]), list(cache.v[:, 0, :, :length]))

    # -- requests ----------------------------------------------------------------------------------------------
    def make_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        add_special_tokens: bool = True,
        lora: str | None = None,
    ) -> SequenceGroup:
        """Validate and tokenize a request (raises :class:`InvalidRequestError`, a ValueError whose message
        names the field, for anything the engine cannot serve). ``lora`` names a served adapter."""
        params = params or SamplingParams()
        if lora is not None and (self.loras is None or lora not in self.loras):
            raise InvalidRequestError(f"model: no adapter named {lora!r} is loaded")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: a text prompt needs a tokenizer; pass token ids")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            token_ids = [int(t) for t in prompt]
        vocab = self.model.cfg.vocab_size
        if not token_ids:
            raise InvalidRequestError("prompt: must contain at least one token")
        if self.num_virtual and params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs: not available behind a soft prompt or prefix adapter")
        if any(t < 0 or t >= vocab for t in token_ids):
            raise InvalidRequestError(f"prompt: token ids must be in [0, {vocab})")
        sink_refused = params.n > 1 or params.use_beam_search or params.prompt_logprobs is not None
        if self.sinks is not None and sink_refused:
            raise InvalidRequestError("n, beams and prompt_logprobs are not available with attention sinks")
        if self.has_mamba and (params.n > 1 or params.use_beam_search):
            raise InvalidRequestError("n, beams: one sequence per request on a model with Mamba layers")
        if self.seq2seq and (params.n > 1 or params.use_beam_search or params.prompt_logprobs is not None):
            raise InvalidRequestError(
                "n, beams, prompt_logprobs: one sampled sequence per request on an encoder-decoder model "
                "(beam search: lmforge.model.t5.generate)"
            )
        if self.seq2seq and lora is not None:
            raise InvalidRequestError("model: LoRA adapters are served for decoder-only models")
        context = self.max_model_len - self.num_virtual  # what a virtual prefix leaves to the request
        if self.sinks is None and len(token_ids) >= context:
            raise InvalidRequestError(
                f"prompt: {len(token_ids)} tokens leave no room to generate in the context of {context}"
            )
        if any(t < 0 or t >= vocab for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids: token ids must be in [0, {vocab})")
        if params.top_k > vocab or max(params.logprobs or 0, params.prompt_logprobs or 0) > vocab:
            # the whole vocabulary is all there is to keep or list
            params = dataclasses.replace(
                params,
                top_k=min(params.top_k, vocab),
                logprobs=None if params.logprobs is None else min(params.logprobs, vocab),
                prompt_logprobs=None
                if params.prompt_logprobs is None
                else min(params.prompt_logprobs, vocab),
            )
        bm = self.block_manager
        decoder_tokens = (
            1 if self.seq2seq else len(token_ids)
        )  # an encoder-decoder decodes from its start token
        longest = min(self.num_virtual + decoder_tokens + params.max_tokens, self.max_model_len)
        if self.sinks is not None:  # kept tokens plus one chunk, and a block at each end of the window
            longest = min(len(token_ids) + params.max_tokens, self.max_model_len + 2 * bm.block_size)
        if bm.blocks_for(longest) * max(params.beam_width, params.n) > bm.num_blocks - 1:
            raise InvalidRequestError(
                "prompt: prompt + max_tokens does not fit in the KV cache; lower max_tokens"
            )
        if request_id is None:
            request_id = f"req-{next(self._request_ids)}"
        tokenizer = self.tokenizer if params.detokenize else None
        if self.seq2seq:
            group = SequenceGroup(request_id, [self.model.cfg.decoder_start_token_id], params, tokenizer)
            group.prompt_token_ids = token_ids  # the source, as clients count it
            group.seqs[0].source_ids = token_ids
        else:
            group = SequenceGroup(request_id, token_ids, params, tokenizer, self.num_virtual)
        roots = []
        if lora is not None:
            assert self.loras is not None
            group.lora = lora
            group.seqs[0].lora_slot = self.loras.slots[lora]
            roots.append(("lora", lora, self.loras.slots[lora]))
        if self.prefix_lm:
            roots.append(("prefix-lm", tuple(token_ids)))
        if roots:
            group.seqs[0].hash_root = hash(tuple(roots))
        if params.use_beam_search:
            max_tokens = min(params.max_tokens, context - len(token_ids))
            eos = ([] if params.ignore_eos else self.eos_token_ids) + list(params.stop_token_ids)
            group.beam = BeamSearch(
                params.beam_width, max_tokens, eos, params.length_penalty, params.early_stopping
            )
        return group

    def add_request(
        self,
        request: str | SequenceGroup | None = None,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        add_special_tokens: bool = True,
        lora: str | None = None,
    ) -> SequenceGroup:
        """Queue a request (a prepared ``SequenceGroup``, or ``request_id, prompt, params``)."""
        if isinstance(request, SequenceGroup):
            group = request
        else:
            if prompt is None:
                raise ValueError("prompt: required")
            group = self.make_request(request, prompt, params, add_special_tokens, lora)
        if group.lora is not None and (
            self.loras is None or self.loras.slots.get(group.lora) != group.seqs[0].lora_slot
        ):  # the adapter was unloaded (or replaced) after the request was made
            raise InvalidRequestError(f"model: the adapter {group.lora!r} is no longer loaded")
        self.scheduler.add(group)
        self._prompt_tokens_total += len(group.prompt_token_ids)
        return group

    def abort(self, request_id: str) -> bool:
        group = self.scheduler.abort(request_id)
        if group is None:
            return False
        group.aborted = True
        self._aborted.append(group)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted) or bool(self._failed)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            prefix_cache_hit_rate=bm.stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self.scheduler.num_generated_tokens,
            requests_finished_total=self.scheduler.num_finished_requests,
            decode_mirror_bytes=self.runner.mirror.nbytes if self.runner.mirror is not None else 0,
        )

    # -- one iteration -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [final_output(g) for g in self._aborted]
        self._aborted = []
        plan = self.scheduler.schedule()
        self.cache.copy_blocks(self.block_manager.take_copies())
        if plan.scheduled:
            outputs += self._run(plan.scheduled)
        outputs += [final_output(group, "error", error) for group, error in self._failed]
        self._failed = []
        if self.states is not None or self.cross is not None:  # what stopped running gives its state back
            live = {s.seq_id for g in self.scheduler.running for s in g.seqs if not s.is_finished}
            for store in (self.states, self.cross):
                if store is not None:
                    store.retain(live)
        return outputs

    def _run(self, scheduled: list[ScheduledSeq]) -> list[RequestOutput]:
        """Forward, sample and report the scheduled chunks. Whatever one request breaks (its settings, its
        tokens, a bug they reach) fails that request alone: the batch is retried without it."""
        groups = {s.seq_id: g for g in self.scheduler.running for s in g.seqs}
        wants_prompt_logprobs = {
            i
            for i, item in enumerate(scheduled)
            if item.seq.params.prompt_logprobs is not None and item.seq.num_computed < item.seq.prompt_len
        }
        chunk_logits = self._execute(scheduled, wants_prompt_logprobs, groups)
        touched: dict[str, SequenceGroup] = {}
        by_group: dict[str, list[tuple[Sequence, ChunkLogits]]] = {}
        for i, (item, logits) in enumerate(zip(scheduled, chunk_logits)):
            group = groups[item.seq.seq_id]
            if logits is None or group.aborted:
                continue
            if i in wants_prompt_logprobs:
                self._guard(group, record_prompt_logprobs, group, item, logits)
            completes = item.completes  # (read before the chunk is counted as computed)
            item.seq.num_computed += item.num_tokens
            self.block_manager.register_computed(item.seq)
            if self.sinks is not None:
                self._evict_middle(item.seq)
            if completes and not group.aborted:
                by_group.setdefault(group.request_id, []).append((item.seq, logits))
                touched[group.request_id] = group
        self._sample(by_group, touched)
        outputs = []
        for group in touched.values():
            if not group.aborted:
                out = self._guard(group, self._make_output, group)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _evict_middle(self, seq: Sequence) -> None:
        """Attention sinks: free the blocks wholly between the sink tokens and the window."""
        sink, window = self.sinks  # type: ignore[misc]
        computed, bs = seq.num_computed, self.block_manager.block_size
        if computed > sink + window:
            self.block_manager.evict(seq, -(-sink // bs), (computed - window) // bs)

    def _execute(
        self, scheduled: list[ScheduledSeq], all_logits: set[int], groups: dict[int, SequenceGroup]
    ) -> list[ChunkLogits | None]:
        """The batched forward; if it raises, each request's chunks run alone and those that still raise fail
        their request (their entries are None)."""
        try:
            return list(self.runner.execute(scheduled, all_logits))
        except Exception as batch_error:
            logger.warning("a batched forward failed (%s); retrying request by request", batch_error)
        results: list[ChunkLogits | None] = [None] * len(scheduled)
        by_request: dict[str, list[int]] = {}
        for i, item in enumerate(scheduled):
            by_request.setdefault(groups[item.seq.seq_id].request_id, []).append(i)
        for indices in by_request.values():
            group = groups[scheduled[indices[0]].seq.seq_id]
            wanted = {j for j, i in enumerate(indices) if i in all_logits}
            logits = self._guard(group, self.runner.execute, [scheduled[i] for i in indices], wanted)
            if logits is not None:
                for i, chunk in zip(indices, logits):
                    results[i] = chunk
        return results

    def _guard(self, group: SequenceGroup, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` for one request; if it raises, the request is failed (and None returned)."""
        try:
            return fn(*args)
        except Exception as err:
            self._fail(group, err)
            return None

    def _fail(self, group: SequenceGroup, err: BaseException) -> None:
        """Take a request out of the engine after ``err`` broke its processing; its blocks are freed at once
        and its last output (``finish_reason`` "error", ``error`` set) comes with this step's outputs."""
        if group.aborted:
            return
        logger.error("request %s failed inside an engine step", group.request_id, exc_info=err)
        self.scheduler.fail(group)
        group.aborted = True
        self._failed.append((group, f"{type(err).__name__}: {err}"))

    def _sample(
        self, by_group: dict[str, list[tuple[Sequence, ChunkLogits]]], touched: dict[str, SequenceGroup]
    ) -> None:
        """Sample the next token of every completed chunk: one sampler call over a ``[rows, vocab]`` block
        gathered per forward (``stack_last``), then ``append_token`` per sequence."""
        batch: list[tuple[SequenceGroup, Sequence, ChunkLogits]] = []
        for request_id, entries in by_group.items():
            group = touched[request_id]
            if group.beam is not None:
                rows = [(seq, chunk.last) for seq, chunk in entries]
                self._guard(group, advance_beams, group, rows, self.scheduler)
                continue
            if group.expands_after_prefill:
                ((parent, logits),) = entries
                for index in range(1, group.params.n):
                    child = parent.fork(index)
                    self.block_manager.fork(parent, child)
                    group.seqs.append(child)
                    entries.append((child, logits))
            batch += [(group, seq, logits) for seq, logits in entries]
        if not batch:
            return
        if len(batch) > 1 and Sampler.plain_greedy([seq for _, seq, _ in batch]):
            # each row's token depends on its logits alone: take the rows in the forwards' order, so that the
            # sampler reads the forward's logits block as it is (no gather copy)
            batch.sort(key=lambda entry: (id(entry[2].block), entry[2].row))
        try:
            tokens, logprobs = self.sampler(stack_last([c for _, _, c in batch]), [s for _, s, _ in batch])
        except Exception as batch_error:
            logger.warning("batched sampling failed (%s); sampling request by request", batch_error)
            tokens, logprobs = self._sample_each(batch)
        for (group, seq, _), token, logprob in zip(batch, tokens, logprobs):
            if token is not None and not group.aborted:
                self._guard(group, self.scheduler.append_token, group, seq, token, logprob)

    def _sample_each(
        self, batch: list[tuple[SequenceGroup, Sequence, ChunkLogits]]
    ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """Sampling one request at a time: the requests whose rows raise are failed, the rest get tokens."""
        tokens: list[int | None] = [None] * len(batch)
        logprobs: list[TokenLogprob | None] = [None] * len(batch)
        rows_of: dict[str, list[int]] = {}
        for i, (group, _, _) in enumerate(batch):
            rows_of.setdefault(group.request_id, []).append(i)
        for rows in rows_of.values():
            group = batch[rows[0]][0]
            got = self._guard(
                group, self.sampler, stack_last([batch[i][2] for i in rows]), [batch[i][1] for i in rows]
            )
            if got is not None:
                for i, token, logprob in zip(rows, *got):
                    tokens[i], logprobs[i] = token, logprob
        return tokens, logprobs

    def _make_output(self, group: SequenceGroup) -> RequestOutput | None:
        return step_output(group, self.tokenizer)

    # -- offline use ---------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[str | list[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns their final outputs in prompt order. ``lora`` names the
        served adapter of all prompts, or of each."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if not len(prompts) == len(params) == len(loras):
            raise ValueError(
                f"generate: {len(prompts)} prompts, {len(params)} sampling params and {len(loras)} adapters"
            )
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(prompts), desc="generate", unit="req")

        def step() -> None:
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
                    if progress is not None:
                        progress.update(1)

        # Requests join as the waiting queue has room, so any number of prompts fits its bound (the
        # server's back-pressure limit is not a limit on offline batches).
        for prompt, p, name in zip(prompts, params, loras):
            while len(self.scheduler.waiting) >= self.scheduler.max_waiting:
                step()
            ids.append(self.add_request(None, prompt, p, lora=name).request_id)
        while self.has_unfinished():
            step()
        if progress is not None:
            progress.close()
        return [final[i] for i in ids]

"""Hugging Face interop: load GPT-2 / Llama / Mistral / Qwen2 / Mixtral / Mamba folders, save ours in their layout;
T5 (``T5ForConditionalGeneration``) folders load into and save from :class:`lmforge.model.t5.T5Model`.

A model folder holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). ``save_pretrained`` writes the Hugging Face layout of the family the config
maps onto, so transformers, vLLM and llama.cpp converters read it; a config that maps onto no family is saved in
our own layout (``config.json`` holding the ``lmforge`` ModelConfig, our parameter names), which
``load_pretrained`` reads back just as well. Every problem with a folder is one ``ModelLoadError`` naming the
file and key.

A quantized model (:mod:`lmforge.model.quant`, ``lmforge quantize``) is saved the same way, its packed weights
and scales under the quantized layer's name (``...q_proj.qweight``, ``...q_proj.scales``) and config.json
carrying a ``quantization_config`` block (``quant_method: lmforge``); ``load_pretrained`` builds the quantized
layers that block describes, so whatever loads a folder (generate, the engine, serve) runs it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmforge.hub import HubError, resolve_model_dir
from lmforge.model import t5
from lmforge.model.config import ModelConfig
from lmforge.model.mamba import config_from_hf_mamba, config_to_hf_mamba, mamba_family_problems, mamba_hf_key
from lmforge.model.quant import (
    QuantizationError,
    check_method,
    prepare_quantized,
    quantizable_linears,
    quantization_config,
    quantize_model,
    quantized_buffer_names,
    quantized_bytes,
)
from lmforge.model.rope_scaling import rope_type
from lmforge.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "mamba")
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "mamba": "MambaForCausalLM",
}
# sequence classification (reward models): the same body, no LM head, a ``score`` Linear(d_model, 1)
_SEQ_CLS_ARCHITECTURES = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
}
SCORE_KEY = "score.weight"
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
_GLU_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}
# rope_type values transformers implements for these families (ours adds "truncate", which it does not)
HF_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
# buffers some checkpoints carry that are recomputed here
_IGNORED_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


class ModelLoadError(ValueError):
    """A model folder that cannot be read or written: names the file and, where it applies, the key."""


# ----------------------------------------------------------------------------------------------- configs


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder: our ``lmforge`` config or a supported Hugging Face config.json."""
    try:
        path = resolve_model_dir(folder) / CONFIG_FILE
    except HubError as err:
        raise ModelLoadError(str(err)) from err
    hf = _read_json(path)
    try:
        if "lmforge" in hf:
            return ModelConfig(**hf["lmforge"])
        return config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise ModelLoadError(f"{path}: {err}") from None
        raise ModelLoadError(f"{path}: {type(err).__name__}: {err}") from err


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """theta and scaling from transformers 5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``.

    The training length of llama3/yarn/longrope is made explicit as transformers does: a top-level
    ``original_max_position_embeddings`` (Phi-3 style) wins, else the scaling's own, else max_position_embeddings.
    """
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in HF_ROPE_TYPES:
        raise ModelLoadError(f"rope scaling type {kind!r} is not supported ({', '.join(HF_ROPE_TYPES)})")
    if kind in ("llama3", "yarn", "longrope"):
        original = hf.get("original_max_position_embeddings") or scaling.get(
            "original_max_position_embeddings"
        )
        scaling["original_max_position_embeddings"] = original or hf.get("max_position_embeddings", 2048)
    return theta, {"rope_type": kind, **scaling}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json (as a dict) of a supported family."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(HF_FAMILIES)} (or an lmforge config)"
        )
    extra = {"hf_model_type": model_type}
    for key in ("bos_token_id", "eos_token_id"):
        if hf.get(key) is not None:
            extra[key] = json.dumps(hf[key])
    if model_type == "mamba":
        return config_from_hf_mamba(hf, extra)
    if model_type == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise ModelLoadError("GPT-2 attention scaling variants are not supported")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in _GPT2_ACTIVATIONS:
            raise ModelLoadError(f"GPT-2 activation_function {activation!r} is not supported")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf.get("n_positions", 1024),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp=_GPT2_ACTIVATIONS[activation],
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            extra=extra,
        )

    activation = hf.get("hidden_act", "silu")
    if activation not in _GLU_ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {activation!r} is not supported ({', '.join(_GLU_ACTIVATIONS)})")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ModelLoadError("Qwen2 per-layer sliding windows (use_sliding_window=true) are not supported")
    theta, scaling = _rope_from_hf(hf)
    window = hf.get("sliding_window") if model_type in ("mistral", "mixtral") else None
    attention_bias = hf.get("attention_bias", False)
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp=_GLU_ACTIVATIONS[activation],
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        attention="sliding" if window else "full",
        sliding_window=window or None,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        extra=extra,
    )
    if model_type == "mixtral":
        fields.update(
            n_experts=hf.get("num_local_experts", 8),
            moe_top_k=hf.get("num_experts_per_tok", 2),
            moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            moe_z_loss_coef=0.0,
        )
    return ModelConfig(**fields)


def _family_problems(cfg: ModelConfig, family: str) -> list[str]:
    """Why ``cfg`` cannot be written as ``family`` (empty: it can)."""
    if family == "mamba":
        return mamba_family_problems(cfg)
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(not cfg.has_mamba, "attention in every layer")
    need(cfg.structure == "causal", "structure=causal")
    need(
        cfg.norm_position == "pre" and cfg.final_norm and not cfg.embedding_norm,
        "pre-LN with a final norm only",
    )
    need(not cfg.parallel_residual and not cfg.qk_norm, "no parallel residual, no QK-norm")
    if family == "gpt2":
        need(cfg.norm == "layernorm" and cfg.norm_bias, "LayerNorm with bias")
        need(cfg.mlp in _GPT2_ACTIVATIONS.values(), "a plain gelu/gelu_tanh/relu MLP")
        need(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "biases everywhere")
        need(cfg.position == "learned", "learned positions")
        need(
            cfg.n_kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.d_model,
            "plain multi-head attention",
        )
        need(cfg.attention == "full" and not cfg.n_experts, "full attention, dense MLP")
        return problems
    need(cfg.norm == "rmsnorm" and cfg.mlp in _GLU_ACTIVATIONS.values(), "RMSNorm and a SwiGLU/GeGLU MLP")
    need(cfg.position == "rope" and cfg.rotary_pct == 1.0, "full-width RoPE")
    need(rope_type(cfg) in ("default", *HF_ROPE_TYPES), f"a RoPE scaling of {', '.join(HF_ROPE_TYPES)}")
    need(cfg.rerope_window is None, "no ReRoPE")
    need(cfg.knn_memory is None, "no kNN memory (lmforge.model.knn_memory)")
    if family == "llama":
        need(cfg.qkv_bias == cfg.out_bias, "the same bias on q/k/v and o")
        need(cfg.attention == "full" and not cfg.n_experts, "full attention, dense MLP")
    elif family == "qwen2":
        need(cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias, "q/k/v biases only")
        need(cfg.attention == "full" and not cfg.n_experts, "full attention, dense MLP")
    else:  # mistral, mixtral
        need(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "no biases")
        need(cfg.attention in ("full", "sliding"), "full or sliding-window attention")
        if family == "mistral":
            need(not cfg.n_experts, "a dense MLP")
        else:
            need(cfg.n_experts > 0 and cfg.moe_every == 1, "MoE in every layer")
            need(cfg.moe_normalize_top_k and cfg.moe_capacity_factor is None, "dropless, renormalised top-k")
    return problems


def hf_family(cfg: ModelConfig) -> str | None:
    """The Hugging Face family ``cfg`` maps onto (its recorded origin first), or None."""
    preferred = cfg.extra.get("hf_model_type")
    for family in ([preferred] if preferred in HF_FAMILIES else []) + list(HF_FAMILIES):
        if not _family_problems(cfg, family):
            return family
    return None


def config_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The config.json of ``cfg`` as a ``family`` model (``cfg`` must map onto it)."""
    hf: dict[str, Any] = {"architectures": [_ARCHITECTURES[family]], "model_type": family}
    for key in ("bos_token_id", "eos_token_id"):
        if key in cfg.extra:
            hf[key] = json.loads(cfg.extra[key])
    if family == "mamba":
        return hf | config_to_hf_mamba(cfg)
    if family == "gpt2":
        activation = {v: k for k, v in _GPT2_ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.mlp]
        return hf | dict(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=activation,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    hf |= dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act={v: k for k, v in _GLU_ACTIVATIONS.items()}[cfg.mlp],
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if family == "llama":
        hf |= dict(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if family in ("mistral", "mixtral"):
        hf["sliding_window"] = cfg.sliding_window if cfg.attention == "sliding" else None
    if family == "qwen2":
        hf |= dict(use_sliding_window=False, sliding_window=None)
    if family == "mixtral":
        hf |= dict(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.moe_top_k,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
        )
    return hf


# ----------------------------------------------------------------------------------------- parameter names


def _llama_key(name: str) -> str:
    """Our parameter name -> the Llama/Mistral/Qwen2/Mixtral checkpoint name."""
    if name.startswith(("embed_tokens.", "norm.")):
        return "model." + name
    name = re.sub(r"^blocks\.(\d+)\.", r"model.layers.\1.", name)
    name = name.replace(".attn_norm.", ".input_layernorm.").replace(
        ".mlp_norm.", ".post_attention_layernorm."
    )
    name = name.replace(".attn.", ".self_attn.").replace(".mlp.router.", ".block_sparse_moe.gate.")
    if ".mlp.experts." in name:
        name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        name = name.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2")
    return name


_GPT2_RENAMES = {  # ours -> GPT-2 (Conv1D weights are stored transposed: (in, out))
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}


_GPT2_TOP_LEVEL = {
    "embed_tokens.weight": "wte.weight",
    "pos_embed.weight": "wpe.weight",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}


def _gpt2_key(name: str) -> tuple[str, bool]:
    """Our parameter name -> (GPT-2 name without the ``transformer.`` prefix, stored transposed)."""
    if name in _GPT2_TOP_LEVEL:
        return _GPT2_TOP_LEVEL[name], False
    layer, module, kind = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", name).groups()
    conv1d = kind == "weight" and module.startswith(("attn.", "mlp."))
    return f"h.{layer}.{_GPT2_RENAMES[module]}.{kind}", conv1d


def hf_state_dict(model: Transformer, family: str) -> dict[str, Tensor]:
    """The model's tensors under the Hugging Face ``family``'s checkpoint names (GPT-2 Conv1D weights transposed)."""
    return _hf_state(model.cfg, _own_state(model), family)


def _hf_state(cfg: ModelConfig, state: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """Our state dict (consumed) in the checkpoint names and layout of ``family``."""
    if family == "mamba":
        return {mamba_hf_key(name): t for name, t in state.items()}
    if family != "gpt2":
        return {_llama_key(name): t for name, t in state.items()}
    out: dict[str, Tensor] = {}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state.pop("lm_head.weight")
    for i in range(cfg.n_layers):
        parts = [state.pop(f"blocks.{i}.attn.{p}_proj.weight") for p in "qkv"]
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(parts).t().contiguous()
        biases = [state.pop(f"blocks.{i}.attn.{p}_proj.bias") for p in "qkv"]
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(biases)
    for name, tensor in state.items():
        key, transposed = _gpt2_key(name)
        out["transformer." + key] = tensor.t().contiguous() if transposed else tensor
    return out


def _own_state(model: Transformer) -> dict[str, Tensor]:
    """Our state dict with a tied LM head stored once (safetensors refuses shared storage)."""
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ------------------------------------------------------------------------------------------------ weights


class _Checkpoint:
    """The tensors of a folder's single or sharded safetensors file(s), read lazily by key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / WEIGHTS_FILE).is_file():
            files = [folder / WEIGHTS_FILE]
        elif (folder / INDEX_FILE).is_file():
            index = _read_json(folder / INDEX_FILE)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{folder / INDEX_FILE}: no weight_map")
            files = [folder / name for name in sorted(set(weight_map.values()))]
        else:
            raise ModelLoadError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")
        self.location: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        for path in files:
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard listed in {INDEX_FILE} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err
            self.handles[path] = handle
            self.location.update(dict.fromkeys(handle.keys(), path))

    def has(self, key: str) -> bool:
        return key in self.location

    def get(self, key: str) -> Tensor:
        if key not in self.location:
            raise ModelLoadError(f"{self.folder}: tensor {key!r} not found in the checkpoint")
        path = self.location[key]
        try:
            return self.handles[path].get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path}: cannot read tensor {key!r} ({err})") from err


def _read_state(ckpt: _Checkpoint, model: Transformer, family: str | None) -> dict[str, tuple[Tensor, str]]:
    """Our parameter name -> (tensor, the checkpoint key it came from), for every entry of the state dict."""
    cfg = model.cfg
    out: dict[str, tuple[Tensor, str]] = {}
    prefix = "transformer." if family == "gpt2" and ckpt.has("transformer.wte.weight") else ""
    for name in model.state_dict():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if family is None:
            key, transposed = name, False
        elif family == "mamba":
            key, transposed = mamba_hf_key(name), False
        elif family != "gpt2":
            key, transposed = _llama_key(name), False
        elif name == "lm_head.weight":
            key, transposed = "lm_head.weight", False
        elif re.search(r"\.attn\.[qkv]_proj\.", name):
            layer, proj, kind = re.search(r"blocks\.(\d+)\.attn\.([qkv])_proj\.(\w+)", name).groups()
            key = f"{prefix}h.{layer}.attn.c_attn.{kind}"
            fused = ckpt.get(key)
            if fused.shape[-1] != 3 * cfg.d_model:
                raise ModelLoadError(f"{ckpt.location[key]}: tensor {key!r} has shape {tuple(fused.shape)}")
            part = fused.chunk(3, dim=-1)["qkv".index(proj)]
            out[name] = (part.t() if kind == "weight" else part, key)
            continue
        else:
            key, transposed = _gpt2_key(name)
            key = prefix + key
        tensor = ckpt.get(key)
        out[name] = (tensor.t() if transposed else tensor, key)
    if cfg.tie_embeddings and "lm_head.weight" in model.state_dict():
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def load_pretrained(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Transformer:
    """A Transformer with the weights of a model folder (ours or a supported Hugging Face family); a
    ``T5ForConditionalGeneration`` folder gives a :class:`lmforge.model.t5.T5Model`."""
    try:
        folder = resolve_model_dir(folder)
    except HubError as err:
        raise ModelLoadError(str(err)) from err
    config_path = Path(folder) / CONFIG_FILE
    if config_path.is_file() and _read_json(config_path).get("model_type") == "t5":
        return load_t5(folder, dtype, device)  # the encoder-decoder has its own model class
    model, _ = _load(Path(folder), dtype, device, score_head=False)
    return model


def load_reward_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Transformer, Tensor]:
    """A sequence-classification folder (:func:`save_reward_model`): the backbone, without an LM head (it
    returns final hidden states), and the ``score.weight`` of its scalar head, shape (1, d_model)."""
    try:
        folder = resolve_model_dir(folder)
    except HubError as err:
        raise ModelLoadError(str(err)) from err
    model, score = _load(Path(folder), dtype, device, score_head=True)
    assert score is not None
    return model, score


def _load(
    folder: Path, dtype: torch.dtype, device: torch.device | str, score_head: bool
) -> tuple[Transformer, Tensor | None]:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found")
    cfg = read_config(folder)
    config_json = _read_json(folder / CONFIG_FILE)
    ours = "lmforge" in config_json
    family = None if ours else cfg.extra["hf_model_type"]
    ckpt = _Checkpoint(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    if score_head:
        model.lm_head = None
    quantized: set[str] = set()
    if "quantization_config" in config_json:  # written by `lmforge quantize` (lmforge.model.quant)
        if family == "gpt2":
            raise ModelLoadError(
                f"{folder / CONFIG_FILE}: a quantized GPT-2 model must be in lmforge's layout (as `lmforge quantize` writes it)"
            )
        try:
            prepare_quantized(model, config_json["quantization_config"], dtype)
        except QuantizationError as err:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: {err}") from None
        quantized = quantized_buffer_names(model)
    expected = model.state_dict()
    state, used = {}, set()
    score = None
    if score_head:
        score = ckpt.get(SCORE_KEY)
        if tuple(score.shape) != (1, cfg.d_model):
            raise ModelLoadError(
                f"{ckpt.location[SCORE_KEY]}: tensor {SCORE_KEY!r} has shape {tuple(score.shape)}"
            )
        score = score.to(device=device, dtype=dtype)
        used.add(SCORE_KEY)
    for name, (tensor, key) in _read_state(ckpt, model, family).items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{ckpt.location[key]}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
        if name in quantized:  # packed weights and their scales keep their stored dtype
            if tensor.dtype != expected[name].dtype:
                raise ModelLoadError(
                    f"{ckpt.location[key]}: tensor {key!r} has dtype {tensor.dtype}, "
                    f"the quantization_config needs {expected[name].dtype}"
                )
            state[name] = tensor.to(device=device)
            used.add(key)
            continue
        # contiguous: GPT-2's Conv1D weights arrive transposed
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
        used.add(key)
    # a tensor the config has no place for (say, a layer more than n_layers) means config and weights disagree
    unused = sorted(k for k in ckpt.location if k not in used and not _IGNORED_KEYS.search(k))
    if unused:
        shown = ", ".join(repr(k) for k in unused[:3]) + (
            f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        )
        raise ModelLoadError(
            f"{ckpt.location[unused[0]]}: tensor(s) {shown} do not fit {folder / CONFIG_FILE}"
        )
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval(), score


def _write_weights(state: dict[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


def save_pretrained(
    model: Transformer,
    folder: str | Path,
    hf_format: bool | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> str | None:
    """Write ``model`` to ``folder``; returns the Hugging Face family written, or None for our own layout.

    hf_format: None -> the Hugging Face layout when the config maps onto a family, else ours;
    True -> the Hugging Face layout or a ModelLoadError saying why the config does not map; False -> ours.
    """
    if isinstance(model, t5.T5Model):  # the encoder-decoder: always transformers' T5ForConditionalGeneration
        return save_t5(model, folder, dtype, max_shard_bytes)
    cfg = model.cfg
    quantization = quantization_config(model)
    family = hf_family(cfg) if hf_format is not False else None
    if quantization is not None and family == "gpt2":
        if hf_format:
            raise ModelLoadError(
                "a quantized GPT-2 model is saved in lmforge's layout only (hf_format=False)"
            )
        family = None  # GPT-2 fuses q/k/v and transposes its weights: packed weights keep our names
    if hf_format and family is None:
        candidates = [f for f in HF_FAMILIES if (f == "mamba") == cfg.has_mamba]
        closest = min(candidates, key=lambda f: len(_family_problems(cfg, f)))
        needs = "; ".join(_family_problems(cfg, closest))
        raise ModelLoadError(
            f"this config maps onto no Hugging Face family (closest, {closest}, needs: {needs})"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    convert: Callable[[Tensor], Tensor] = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    keep = quantized_buffer_names(model)  # packed weights and scales are written as they are
    state = {name: t if name in keep else convert(t) for name, t in _own_state(model).items()}
    if family is None:
        config = {"model_type": "lmforge", "lmforge": dataclasses.asdict(cfg)}
    else:
        state = _hf_state(cfg, state, family)
        config = config_to_hf(cfg, family)
        torch_dtype = dtype or next(model.parameters()).dtype
        config["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    if quantization is not None:
        config["quantization_config"] = quantization
    _write_weights({name: t.cpu() for name, t in state.items()}, folder, max_shard_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return family


def save_reward_model(
    model: Transformer, score: Tensor, folder: str | Path, pad_token_id: int | None = None
) -> str | None:
    """Write a reward model: ``model``'s body (its LM head, if any, is left out) and the scalar head
    ``score`` (shape (1, d_model)) as ``score.weight``, in the ``*ForSequenceClassification`` layout of the
    config's Hugging Face family (``num_labels=1``), or in our own layout when it maps onto none. Returns the
    family written, or None.

    ``pad_token_id`` goes into config.json: transformers scores the last token that is not padding, found
    by that id, so it must differ from every id a scored sequence ends with (a pad distinct from EOS).
    """
    cfg = model.cfg
    if tuple(score.shape) != (1, cfg.d_model):
        raise ValueError(f"score: expected shape (1, {cfg.d_model}), got {tuple(score.shape)}")
    family = hf_family(cfg)
    family = family if family in _SEQ_CLS_ARCHITECTURES else None  # transformers has no Mamba classifier
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in _own_state(model).items() if not k.startswith("lm_head.")}
    labels = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    if family is None:
        config: dict[str, Any] = {"model_type": "lmforge", "lmforge": dataclasses.asdict(cfg), **labels}
    else:
        state = _hf_state(cfg, state, family)
        config = config_to_hf(cfg, family) | labels
        config["architectures"] = [_SEQ_CLS_ARCHITECTURES[family]]
        config["torch_dtype"] = str(score.dtype).removeprefix("torch.")
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    state[SCORE_KEY] = score.detach().contiguous()
    _write_weights({name: t.cpu() for name, t in state.items()}, folder, 5 * 1024**3)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return family


# ------------------------------------------------------------------------- T5 (encoder-decoder) folders


def load_t5(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> t5.T5Model:
    """A T5Model with the weights of a transformers ``T5ForConditionalGeneration`` folder (config.json and
    safetensors). The LM head is untied when the folder holds an ``lm_head.weight`` that differs from the
    embedding (t5-v1_1 checkpoints), as transformers decides."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    hf = _read_json(path)
    try:
        cfg = t5.config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelLoadError(f"{path}: {type(err).__name__}: {err}") from err
    ckpt = _Checkpoint(folder)
    shared_key = "shared.weight" if ckpt.has("shared.weight") else "encoder.embed_tokens.weight"
    if ckpt.has("lm_head.weight"):
        untied = not torch.equal(ckpt.get("lm_head.weight"), ckpt.get(shared_key))
        cfg = t5.T5Config(**{**dataclasses.asdict(cfg), "tie_embeddings": not untied})
    with torch.device("meta"):
        model = t5.T5Model(cfg)
    expected = model.state_dict()
    state, used = {}, set()
    for name in expected:
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        key = shared_key if name == "embed_tokens.weight" else t5.hf_key(name, cfg)
        tensor = ckpt.get(key)
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(
                f"{ckpt.location[key]}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
        used.add(key)
    # copies of the embedding, and a relative bias transformers never reads
    ignored = {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
        "shared.weight",
    }
    ignored.add("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
    unused = sorted(k for k in ckpt.location if k not in used and k not in ignored)
    if unused:
        raise ModelLoadError(f"{ckpt.location[unused[0]]}: tensor(s) {unused[:3]} do not fit {path}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.eval()


def save_t5(
    model: t5.T5Model,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> str:
    """Write ``model`` as a transformers ``T5ForConditionalGeneration`` folder; returns "t5"."""
    cfg = model.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    convert: Callable[[Tensor], Tensor] = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        state[t5.hf_key(name, cfg)] = convert(tensor.detach()).contiguous().cpu()
    _write_weights(state, folder, max_shard_bytes)
    config = t5.config_to_hf(cfg)
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {k: config[k] for k in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return "t5"


# files of a model folder that are not weights or config.json: copied unchanged into the quantized folder
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


def quantize_pretrained(
    model_dir: str | Path,
    out: str | Path,
    method: str,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Quantize a model folder (ours or a supported Hugging Face family) into ``out``: config.json with a
    ``quantization_config`` block, packed weights and scales in safetensors, the tokenizer files copied.
    Unquantized tensors (embeddings, LM head, norms, biases) are written in ``dtype``. Returns a summary
    (method, group size, layers quantized, bytes before and after)."""
    group_size = check_method(method, group_size)
    try:
        source = resolve_model_dir(model_dir)
    except HubError as err:
        raise ModelLoadError(str(err)) from err
    model = load_pretrained(source)
    before = quantized_bytes(model)
    layers = len(quantizable_linears(model))
    quantize_model(model, method, group_size)
    if dtype != torch.float32:
        keep = quantized_buffer_names(model)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(dtype)
            for name, buffer in model.named_buffers():
                if name not in keep and buffer.is_floating_point():
                    buffer.data = buffer.data.to(dtype)
    out = Path(out)
    save_pretrained(model, out)
    for name in _COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return {
        "method": method,
        "group_size": group_size,
        "layers": layers,
        "bytes_before": before,
        "bytes_after": quantized_bytes(model),
    }

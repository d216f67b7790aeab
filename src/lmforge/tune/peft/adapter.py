"""Put an adapter on a Transformer, save it and load it in peft's folder layout, merge it into the weights.

The adapter layers replace the targeted modules in place (:mod:`lmforge.tune.peft.lora`,
:mod:`lmforge.tune.peft.ia3`, on NF4 weights for QLoRA: :mod:`lmforge.tune.peft.nf4`); virtual tokens hook into
the forward (:mod:`lmforge.tune.peft.prompt`, :mod:`lmforge.tune.peft.prefix`). Either way the model stays a
Transformer that the trainer and its checkpoints use unchanged; every base parameter is frozen. Modules are
named, matched and saved by their Hugging Face checkpoint names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), which makes the folder interchangeable with
peft's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.model import Transformer
from lmforge.model.hf import _llama_key, hf_family
from lmforge.tune.peft.config import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    PROMPT_METHODS,
    AdapterConfigError,
    PeftConfig,
    to_adapter_config,
)
from lmforge.tune.peft.ia3 import IA3Linear
from lmforge.tune.peft.lora import LoraEmbedding, LoraLinear
from lmforge.tune.peft.nf4 import NF4Linear, quantize_linears
from lmforge.tune.peft.prefix import PrefixEncoder, attach_prefix
from lmforge.tune.peft.prompt import SoftPrompt, attach_prompt
from lmforge.tune.peft.tokens import TrainableTokensEmbedding, TrainableTokensLinear, wrap_token_layers

PEFT_PREFIX = "base_model.model."  # peft's prefix for the wrapped transformers model
AdapterLayer = LoraLinear | LoraEmbedding | IA3Linear


def checkpoint_name(model: Transformer, name: str) -> str:
    """Our module or parameter name as the base model's checkpoint (and hence peft) names it."""
    family = model.cfg.extra.get("hf_model_type") or hf_family(model.cfg)
    if family is None:  # saved in our own layout: our names are the checkpoint's
        return name
    if family == "gpt2":
        raise AdapterConfigError("adapters on GPT-2 models (fused q/k/v projection) are not supported")
    return _llama_key(name + ".")[:-1]


def _matches(cfg: PeftConfig, key: str) -> bool:
    """peft's rule: a regex matches the whole name; a list entry equals the name or its last components."""
    if cfg.target_modules == "all-linear":
        return True
    if isinstance(cfg.target_modules, str):
        return re.fullmatch(cfg.target_modules, key) is not None
    return key in cfg.target_modules or any(key.endswith("." + t) for t in cfg.target_modules)


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """The value of the first pattern matching the end of ``key`` (peft's rank_pattern/alpha_pattern rule)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _saved_modules(cfg: PeftConfig, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.modules_to_save)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _adapter_layer(cfg: PeftConfig, key: str, module: nn.Module) -> AdapterLayer:
    if cfg.method == "ia3":
        if not isinstance(module, nn.Linear):
            raise AdapterConfigError(
                f"target_modules: IA3 applies to linear layers; {key} is {type(module).__name__}"
            )
        ff = cfg.feedforward_modules
        feedforward = (
            re.fullmatch(ff, key) is not None
            if isinstance(ff, str)
            else any(key == f or key.endswith("." + f) for f in ff)
        )
        return IA3Linear(module, feedforward)
    r = int(_pattern_value(cfg.rank_pattern, key, cfg.r))
    alpha = _pattern_value(cfg.alpha_pattern, key, cfg.lora_alpha)
    if isinstance(module, nn.Embedding):
        if cfg.use_dora:
            raise AdapterConfigError(f"use_dora: DoRA on embeddings ({key}) is not supported")
        return LoraEmbedding(module, r, alpha, cfg.use_rslora)
    return LoraLinear(module, r, alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora)


def apply_peft(model: Transformer, cfg: PeftConfig) -> Transformer:
    """Freeze ``model`` and wrap the modules ``cfg`` targets in adapter layers (in place); returns it.

    ``modules_to_save`` stay as they are and train in full. A head tied to the embedding is untied when either
    is adapted, as peft's adapted model computes it (the head reads the base embedding)."""
    if not cfg.method:
        raise AdapterConfigError("peft.method: no method chosen")
    model.requires_grad_(False)
    if cfg.method in PROMPT_METHODS:
        return _apply_soft_prompt(model, cfg, with_encoder=True)
    if cfg.quantize == "nf4":
        quantize_linears(model, getattr(torch, cfg.compute_dtype))
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding, NF4Linear))
    }
    keys = {name: checkpoint_name(model, name) for name in candidates}
    targets = [
        name
        for name, module in candidates.items()
        if _matches(cfg, keys[name])
        and not _saved_modules(cfg, keys[name])
        and not (
            cfg.target_modules == "all-linear" and (name == "lm_head" or isinstance(module, nn.Embedding))
        )
    ]
    if not targets:
        leaves = sorted({key.rsplit(".", 1)[-1] for key in keys.values()})
        raise AdapterConfigError(
            f"target_modules: {cfg.target_modules!r} matches no module; the model has {', '.join(leaves)} "
            f"(full names like {keys[next(n for n in candidates if '.' in n)]})"
        )
    saved = [
        name
        for name, module in model.named_modules()
        if name and _saved_modules(cfg, checkpoint_name(model, name))
    ]
    if cfg.modules_to_save and not saved:
        raise AdapterConfigError(f"modules_to_save: {cfg.modules_to_save!r} matches no module")
    if "lm_head" in saved or "embed_tokens" in targets:
        _untie_head(model)  # the head keeps the base embedding while the embedding or head is adapted
    for name in targets:
        _set_module(model, name, _adapter_layer(cfg, keys[name], candidates[name]))
    if cfg.trainable_token_indices:
        _check_token_indices(model, cfg.trainable_token_indices)
        tied = model.cfg.tie_embeddings and "lm_head" not in saved and "embed_tokens" not in targets
        wrap_token_layers(model, cfg.trainable_token_indices, tied)
    for name in saved:
        for param in model.get_submodule(name).parameters(recurse=False):
            param.requires_grad_(True)
    model.peft_config = cfg
    return model


def _check_token_indices(model: Transformer, indices: dict[str, list[int]]) -> None:
    for module, ids in indices.items():
        layer = getattr(model, module, None)
        if not isinstance(layer, (nn.Embedding, nn.Linear)):
            raise AdapterConfigError(f"trainable_token_indices: {module} is adapted otherwise or absent")
        rows = layer.weight.shape[0]
        if ids[-1] >= rows:
            raise AdapterConfigError(
                f"trainable_token_indices.{module}: token id {ids[-1]} is beyond the vocabulary ({rows} rows)"
            )


def _apply_soft_prompt(model: Transformer, cfg: PeftConfig, with_encoder: bool) -> Transformer:
    """Prompt tuning, P-tuning, prefix tuning; a loaded prompt or prefix needs no encoder (``with_encoder=False``)."""
    weight = next(model.parameters())
    model.peft_config = cfg
    if cfg.method == "prefix_tuning":
        mcfg = model.cfg
        kv_dim = mcfg.n_kv_heads * mcfg.head_dim
        projection = cfg.prefix_projection and with_encoder
        encoder = PrefixEncoder(
            cfg.num_virtual_tokens, mcfg.n_layers, kv_dim, projection, cfg.encoder_hidden_size
        )
        attach_prefix(model, encoder.to(device=weight.device, dtype=weight.dtype))
        return model
    encoder = cfg.encoder_reparameterization_type if cfg.method == "p_tuning" and with_encoder else None
    prompt = SoftPrompt(
        cfg.num_virtual_tokens,
        model.cfg.d_model,
        encoder,
        cfg.encoder_hidden_size,
        cfg.encoder_num_layers,
        cfg.encoder_dropout,
    )
    if cfg.method == "prompt_tuning" and cfg.prompt_tuning_init == "TEXT" and with_encoder:
        from lmforge.tokenizer import load_tokenizer

        if not cfg.tokenizer_name_or_path:
            raise AdapterConfigError("peft.tokenizer_name_or_path: required with prompt_tuning_init=TEXT")
        token_ids = load_tokenizer(cfg.tokenizer_name_or_path).encode(cfg.prompt_tuning_init_text)
        if not token_ids:
            raise AdapterConfigError("peft.prompt_tuning_init_text: the text encodes to no tokens")
        prompt.init_from_text(model.embed_tokens, token_ids)
    attach_prompt(model, prompt.to(device=weight.device, dtype=weight.dtype))
    return model


def _untie_head(model: Transformer) -> None:
    if model.cfg.tie_embeddings and model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.cfg = dataclasses.replace(model.cfg, tie_embeddings=False)


def adapter_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The trainable tensors (adapter and modules_to_save) under peft's checkpoint names; for soft prompts
    peft's ``prompt_embeddings``, the prompt itself (a P-tuning encoder's output)."""
    if model.peft_config.method == "prefix_tuning":
        return {"prompt_embeddings": model.prefix_encoder().detach().contiguous()}
    if model.peft_config.method in PROMPT_METHODS:
        return {"prompt_embeddings": model.prompt_encoder().detach().contiguous()}
    return {
        PEFT_PREFIX + checkpoint_name(model, name): param.detach().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def save_adapter(model: Transformer, folder: str | Path, base_model: str | None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (fp32 or the params' dtype)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: t.cpu() for k, t in adapter_state_dict(model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = model.cfg
    # the width and head count of the virtual tokens: the keys'/values' for a prefix (as peft records them)
    if model.peft_config.method == "prefix_tuning":
        token_dim, heads = cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads
    else:
        token_dim, heads = cfg.d_model, cfg.n_heads
    config = to_adapter_config(model.peft_config, base_model, token_dim, cfg.n_layers, heads)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def read_adapter_tensors(folder: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """The weights file of an adapter folder and its tensors (errors name the file)."""
    path = Path(folder) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterConfigError(f"{path}: file not found")
    try:
        return path, load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AdapterConfigError(f"{path}: not a readable safetensors file ({err})") from err


def load_adapter(model: Transformer, folder: str | Path, cfg: PeftConfig) -> Transformer:
    """Put the adapter of ``folder`` (described by ``cfg``, see ``read_adapter_config``) on ``model``."""
    path, tensors = read_adapter_tensors(folder)
    if cfg.method in PROMPT_METHODS:
        model.requires_grad_(False)
        _apply_soft_prompt(model, cfg, with_encoder=False)
        encoder = model.prefix_encoder if cfg.method == "prefix_tuning" else model.prompt_encoder
        params = {"prompt_embeddings": encoder.embedding.weight}
        ours = {"prompt_embeddings": "prompt_embeddings"}
    else:
        apply_peft(model, cfg)
        params = dict(model.named_parameters(remove_duplicate=False))
        ours = {PEFT_PREFIX + checkpoint_name(model, name): name for name in params}
    for key, tensor in tensors.items():
        if key not in ours:
            raise AdapterConfigError(f"{path}: tensor {key!r} has no place in the model")
        param = params[ours[key]]
        if tensor.shape != param.shape:
            raise AdapterConfigError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the base model needs "
                f"{tuple(param.shape)} (an adapter for a different base model?)"
            )
        with torch.no_grad():
            param.copy_(tensor)
    distinct = dict(model.named_parameters())  # a tied head's shared rows are saved once, under the embedding
    missing = sorted(
        k for k, name in ours.items() if name in distinct and params[name].requires_grad and k not in tensors
    )
    if missing:
        raise AdapterConfigError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    return model


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, (LoraLinear, LoraEmbedding, IA3Linear))]


def merge_adapter(model: Transformer) -> Transformer:
    """Fold every adapter into its base weights and remove the adapter layers: a plain Transformer again."""
    if model.peft_config.method in PROMPT_METHODS:
        raise AdapterConfigError(
            f"{model.peft_config.method}: a soft prompt adds virtual tokens, it has no weights to merge into"
        )
    for name, module in list(model.named_modules()):
        if isinstance(
            module, (LoraLinear, LoraEmbedding, IA3Linear, TrainableTokensEmbedding, TrainableTokensLinear)
        ):
            module.merge()
            _set_module(model, name, module.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):  # QLoRA: the layers without an adapter are dequantized too
            _set_module(model, name, module.dequantized())
    model.requires_grad_(True)
    del model.peft_config
    return model

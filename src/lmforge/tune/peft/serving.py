"""Read adapter folders (peft's layout) as the plain tensors the inference engine serves.

LoRA adapters are served side by side (``lora_weights``); a soft prompt or prefix adapter is served as the
engine's virtual prefix (``virtual_prefix``).

``lora_weights(model_cfg, folder)`` checks the adapter against the base model the config describes (built
on the meta device: only names and shapes matter, and the served model itself may already carry adapter
wrappers) and returns, per module of the model, ``(A, B, scale)`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA, per-module ``rank_pattern``
and ``alpha_pattern`` honoured): what ``LLMEngine.add_lora`` takes. Only plain LoRA on the blocks' linear
layers is served this way; DoRA, IA3, soft prompts and adapters on embeddings or the head are refused with
the reason (``lmforge peft merge`` folds them into a model folder that serves as a base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.model import ModelConfig, Transformer
from lmforge.tune.peft.adapter import PEFT_PREFIX, _pattern_value, checkpoint_name, read_adapter_tensors
from lmforge.tune.peft.config import (
    PROMPT_METHODS,
    AdapterConfigError,
    read_adapter_config,
)
from lmforge.tune.peft.lora import lora_scaling
from lmforge.tune.peft.prefix import prefix_keys_values


def lora_weights(model_cfg: ModelConfig, folder: str | Path) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The adapter of ``folder`` as ``{module name: (A, B, scale)}`` for the linear layers of the model
    ``model_cfg`` describes."""
    folder = Path(folder)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    cfg, _ = read_adapter_config(folder)
    if cfg.method != "lora" or cfg.use_dora:
        kind = "DoRA" if cfg.method == "lora" else cfg.method
        raise AdapterConfigError(
            f"{folder}: a {kind} adapter cannot be served next to others (plain LoRA only); merge it with "
            "`lmforge peft merge` and serve the merged model"
        )
    if cfg.modules_to_save:
        raise AdapterConfigError(
            f"{folder}: modules_to_save={cfg.modules_to_save!r} replaces whole modules; merge this adapter instead"
        )
    path, tensors = read_adapter_tensors(folder)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_key = {PEFT_PREFIX + checkpoint_name(model, name): name for name in linears}
    weights: dict[str, tuple[Tensor, Tensor, float]] = {}
    for key in tensors:
        stem, _, leaf = key.removesuffix(".weight").rpartition(".")
        if leaf not in ("lora_A", "lora_B") or stem not in by_key:
            raise AdapterConfigError(f"{path}: tensor {key!r} has no place in the model")
        if leaf == "lora_B":
            continue
        b_key = f"{stem}.lora_B.weight"
        if b_key not in tensors:
            raise AdapterConfigError(f"{path}: tensor {b_key!r} is missing")
        a, b = tensors[key], tensors[b_key]
        layer = model.get_submodule(by_key[stem])
        if (
            a.dim() != 2
            or b.dim() != 2
            or (a.shape[1], b.shape)
            != (
                layer.in_features,
                (layer.out_features, a.shape[0]),
            )
        ):
            raise AdapterConfigError(
                f"{path}: {stem} has A {tuple(a.shape)} and B {tuple(b.shape)}, the base model's layer is "
                f"{layer.in_features} -> {layer.out_features} (an adapter for a different base model?)"
            )
        module_key = stem.removeprefix(PEFT_PREFIX)
        alpha = _pattern_value(cfg.alpha_pattern, module_key, cfg.lora_alpha)
        weights[by_key[stem]] = (a, b, lora_scaling(a.shape[0], alpha, cfg.use_rslora))
    if not weights:
        raise AdapterConfigError(f"{path}: no LoRA tensors")
    return weights


def virtual_prefix(model_cfg: ModelConfig, folder: str | Path) -> tuple[str, Any]:
    """A prompt-tuning / P-tuning / prefix-tuning folder as what the engine serves: ``("embeddings", E)``
    with E (V, d_model) for ``LLMEngine.set_soft_prompt``, or ``("kv", (keys, values))`` per layer for
    ``LLMEngine.set_virtual_prefix``."""
    folder = Path(folder)
    cfg, _ = read_adapter_config(folder)
    if cfg.method not in PROMPT_METHODS:
        raise AdapterConfigError(f"{folder}: a {cfg.method} adapter is not a soft prompt or prefix")
    path, tensors = read_adapter_tensors(folder)
    prompt = tensors.get("prompt_embeddings")
    if prompt is None or prompt.dim() != 2:
        raise AdapterConfigError(f"{path}: no (virtual tokens, width) tensor 'prompt_embeddings'")
    if cfg.method == "prefix_tuning":
        try:
            return "kv", prefix_keys_values(prompt, model_cfg)
        except ValueError as err:
            raise AdapterConfigError(f"{path}: {err} (an adapter for a different base model?)") from None
    if prompt.shape[1] != model_cfg.d_model:
        raise AdapterConfigError(
            f"{path}: prompt_embeddings has width {prompt.shape[1]}, the model's is {model_cfg.d_model}"
        )
    return "embeddings", prompt

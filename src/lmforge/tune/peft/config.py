"""The ``peft:`` block of a fine-tuning recipe and the peft library's ``adapter_config.json``.

Key names and meanings are peft's (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ...), so an
adapter folder written here loads with ``peft.PeftModel.from_pretrained`` and one written by peft loads here.
``target_modules`` is a list of module names (a module matches when its name is the entry or ends with
``.entry``), a regular expression matched against the whole module name, or ``"all-linear"``; module names are
those of the base model's Hugging Face checkpoint (``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPES = {
    "lora": "LORA",
    "ia3": "IA3",
    "prompt_tuning": "PROMPT_TUNING",
    "p_tuning": "P_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
}
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # virtual tokens: no target modules
# peft's defaults for Llama / Mistral / Qwen2 models
DEFAULT_TARGETS = {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"]}
DEFAULT_FEEDFORWARD = ["down_proj"]
# options peft has and we do not implement: an adapter that sets one is refused rather than misread
_UNSUPPORTED = {
    "bias": "none",
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "lora_bias": False,
    "target_parameters": None,
    "layer_replication": None,
    "use_qalora": False,
}


class AdapterConfigError(ValueError):
    """An adapter configuration that cannot be used: names the file (or recipe key) and the key."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; ``method`` empty means full fine-tuning."""

    method: str = ""  # "lora", "ia3", "prompt_tuning", "p_tuning" or "prefix_tuning"
    r: int = 8  # LoRA rank
    lora_alpha: float = 8.0  # LoRA scaling numerator: alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    use_rslora: bool = False
    use_dora: bool = False  # weight-decomposed LoRA: a learned magnitude per output feature
    target_modules: Any = None  # names, a regex or "all-linear"; None: the method's default
    feedforward_modules: Any = None  # IA3: targets whose input (not output) is scaled; None: down_proj
    modules_to_save: list[str] = field(default_factory=list)  # trained in full and saved with the adapter
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name pattern -> lora_alpha
    num_virtual_tokens: int = 8  # soft prompts: the prompt's length
    prompt_tuning_init: str = "RANDOM"  # or "TEXT": the embeddings of prompt_tuning_init_text
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # the tokenizer folder for prompt_tuning_init_text
    encoder_reparameterization_type: str = "MLP"  # P-tuning's prompt encoder: "MLP" or "LSTM"
    encoder_hidden_size: int | None = None  # P-tuning / prefix projection MLP width; None: the token width
    encoder_num_layers: int = 2  # LSTM layers
    encoder_dropout: float = 0.0  # between LSTM layers
    prefix_projection: bool = False  # prefix tuning: the prefix is an MLP's output, not learned directly
    # LoRA: embedding / LM-head rows that train and are saved with the adapter (new tokens after a vocabulary
    # resize): a list of token ids (the embedding, and a head tied to it) or {"embed_tokens"|"lm_head": ids}
    trainable_token_indices: Any = None
    quantize: str = ""  # "nf4": QLoRA, the frozen linear layers of the blocks stored as NF4 (LoRA only)
    compute_dtype: str = "float32"  # QLoRA: the dtype NF4 weights are dequantized to ("float32", "bfloat16")

    def __post_init__(self) -> None:
        if self.method and self.method not in PEFT_TYPES:
            raise ValueError(f"peft.method: {self.method!r} is not one of {', '.join(map(repr, PEFT_TYPES))}")
        if self.r <= 0:
            raise ValueError(f"peft.r: the rank must be a positive integer, got {self.r}")
        for name, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ValueError(f"peft.rank_pattern: rank {rank} for {name!r} must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"peft.lora_dropout: {self.lora_dropout} is not in [0, 1)")
        if self.num_virtual_tokens <= 0:
            raise ValueError(
                f"peft.num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens}"
            )
        if self.prompt_tuning_init not in ("RANDOM", "TEXT"):
            raise ValueError(
                f"peft.prompt_tuning_init: {self.prompt_tuning_init!r} is not 'RANDOM' or 'TEXT'"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("peft.prompt_tuning_init_text: required with prompt_tuning_init=TEXT")
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                f"peft.encoder_reparameterization_type: {self.encoder_reparameterization_type!r} is not 'MLP' or 'LSTM'"
            )
        if self.quantize not in ("", "nf4"):
            raise ValueError(f"peft.quantize: {self.quantize!r} is not '' or 'nf4'")
        if self.quantize and self.method != "lora":
            raise ValueError(
                f"peft.quantize: NF4 base weights (QLoRA) go with method=lora, not {self.method!r}"
            )
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"peft.compute_dtype: {self.compute_dtype!r} is not 'float32' or 'bfloat16'")
        if self.method == "ia3" and (self.use_dora or self.use_rslora):
            raise ValueError("peft.use_dora / peft.use_rslora: LoRA options, not IA3 ones")
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if not (value is None or isinstance(value, str) or _is_str_list(value)):
                raise ValueError(f"peft.{key}: a list of module names or one regex, got {value!r}")
        if self.target_modules is None and self.method in DEFAULT_TARGETS:
            self.target_modules = list(DEFAULT_TARGETS[self.method])
        if self.method == "ia3" and self.feedforward_modules is None:
            self.feedforward_modules = list(DEFAULT_FEEDFORWARD)
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        if self.trainable_token_indices and self.method != "lora":
            raise ValueError(f"peft.trainable_token_indices: goes with method=lora, not {self.method!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern), dict(self.alpha_pattern)


def _token_indices(value: Any) -> dict[str, list[int]] | None:
    """``trainable_token_indices`` as {"embed_tokens" | "lm_head": sorted distinct ids}; a list means the
    embedding (peft's rule)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = {"embed_tokens": value}
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"peft.trainable_token_indices: a list of token ids or {{module: ids}}, got {value!r}"
        )
    out: dict[str, list[int]] = {}
    for key, ids in value.items():
        module = str(key).rsplit(".", 1)[-1]
        if module not in ("embed_tokens", "lm_head"):
            raise ValueError(
                f"peft.trainable_token_indices: {key!r} is not the embedding (embed_tokens) or the head (lm_head)"
            )
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise ValueError(
                f"peft.trainable_token_indices.{key}: a non-empty list of token ids >= 0, got {ids!r}"
            )
        out[module] = sorted(set(ids))
    return out


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _prompt_config(
    cfg: PeftConfig, base_model: str | None, token_dim: int, num_layers: int, num_heads: int
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if cfg.method == "prompt_tuning":
        return config | {
            "prompt_tuning_init": cfg.prompt_tuning_init,
            "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
            "tokenizer_kwargs": None,
        }
    if cfg.method == "prefix_tuning":
        return config | {
            "prefix_projection": cfg.prefix_projection,
            "encoder_hidden_size": cfg.encoder_hidden_size or token_dim,
        }
    return config | {
        "encoder_reparameterization_type": cfg.encoder_reparameterization_type,
        "encoder_hidden_size": cfg.encoder_hidden_size or token_dim,
        "encoder_num_layers": cfg.encoder_num_layers,
        "encoder_dropout": cfg.encoder_dropout,
    }


def to_adapter_config(
    cfg: PeftConfig, base_model: str | None, token_dim: int, num_layers: int, num_heads: int
) -> dict[str, Any]:
    """The ``adapter_config.json`` peft writes for ``cfg`` (its key names; options we lack at their defaults);
    the model's width, depth and head count are recorded for soft prompts, as peft does."""
    common: dict[str, Any] = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": cfg.target_modules,
        "modules_to_save": cfg.modules_to_save or None,
        "inference_mode": True,
        "revision": None,
    }
    if cfg.method in PROMPT_METHODS:
        return _prompt_config(cfg, base_model, token_dim, num_layers, num_heads)
    if cfg.method == "ia3":
        return common | {
            "feedforward_modules": cfg.feedforward_modules,
            "fan_in_fan_out": False,
            "exclude_modules": None,
            "init_ia3_weights": True,
        }
    return (
        common
        | {k: v for k, v in _UNSUPPORTED.items() if k != "use_qalora"}
        | {
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora,
            "rank_pattern": cfg.rank_pattern,
            "alpha_pattern": cfg.alpha_pattern,
            "init_lora_weights": True,
            "trainable_token_indices": cfg.trainable_token_indices,
        }
    )


def read_adapter_config(folder: str | Path) -> tuple[PeftConfig, str | None]:
    """The PeftConfig of an adapter folder and its ``base_model_name_or_path``."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterConfigError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{path}: expected a JSON object")
    methods = {v: k for k, v in PEFT_TYPES.items()}
    peft_type = raw.get("peft_type")
    if peft_type not in methods:
        raise AdapterConfigError(
            f"{path}: peft_type {peft_type!r} is not supported (supported: {', '.join(methods)})"
        )
    for key, default in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if value not in (default, [], {}) and not (key == "bias" and value is None):
            raise AdapterConfigError(f"{path}: {key}={value!r} is not supported (only {default!r})")
    method = methods[peft_type]
    keys = {
        "lora": [
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "trainable_token_indices",
        ],
        "ia3": ["feedforward_modules"],
        "prompt_tuning": ["prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"],
        "p_tuning": [
            "encoder_reparameterization_type",
            "encoder_hidden_size",
            "encoder_num_layers",
            "encoder_dropout",
        ],
        "prefix_tuning": ["prefix_projection", "encoder_hidden_size"],
    }[method]
    if method in PROMPT_METHODS:
        keys.append("num_virtual_tokens")
        if raw.get("num_transformer_submodules", 1) != 1:
            raise AdapterConfigError(f"{path}: num_transformer_submodules must be 1 (a decoder-only model)")
    else:
        keys += ["target_modules", "modules_to_save"]
    fields = {k: raw[k] for k in keys if raw.get(k) is not None}
    try:
        cfg = PeftConfig(method=method, **fields)
    except (TypeError, ValueError) as err:
        raise AdapterConfigError(f"{path}: {str(err).removeprefix('peft.')}") from None
    return cfg, raw.get("base_model_name_or_path")

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
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3"}  # our method name -> peft's peft_type
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
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
    "use_qalora": False,
}


class AdapterConfigError(ValueError):
    """An adapter configuration that cannot be used: names the file (or recipe key) and the key."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; ``method`` empty means full fine-tuning."""

    method: str = ""  # "lora" or "ia3"
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
        if self.method == "ia3" and (self.use_dora or self.use_rslora):
            raise ValueError("peft.use_dora / peft.use_rslora: LoRA options, not IA3 ones")
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if not (value is None or isinstance(value, str) or _is_str_list(value)):
                raise ValueError(f"peft.{key}: a list of module names or one regex, got {value!r}")
        if self.target_modules is None and self.method:
            self.target_modules = list(DEFAULT_TARGETS[self.method])
        if self.method == "ia3" and self.feedforward_modules is None:
            self.feedforward_modules = list(DEFAULT_FEEDFORWARD)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern), dict(self.alpha_pattern)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def to_adapter_config(cfg: PeftConfig, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` peft writes for ``cfg`` (its key names; options we lack at their defaults)."""
    common: dict[str, Any] = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": cfg.target_modules,
        "modules_to_save": cfg.modules_to_save or None,
        "inference_mode": True,
        "revision": None,
    }
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
    keys = ["target_modules", "modules_to_save"]
    keys += (
        ["feedforward_modules"]
        if method == "ia3"
        else [
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
        ]
    )
    fields = {k: raw[k] for k in keys if raw.get(k) is not None}
    try:
        cfg = PeftConfig(method=method, **fields)
    except (TypeError, ValueError) as err:
        raise AdapterConfigError(f"{path}: {str(err).removeprefix('peft.')}") from None
    return cfg, raw.get("base_model_name_or_path")

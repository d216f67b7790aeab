"""Parameter-efficient fine-tuning in the peft library's adapter format: LoRA (rsLoRA, DoRA, patterns, embeddings,
modules_to_save), QLoRA (LoRA on NF4 weights), IA3, prompt tuning, P-tuning and prefix tuning."""

from lmforge.tune.peft.adapter import (
    adapter_layers,
    adapter_state_dict,
    apply_peft,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from lmforge.tune.peft.config import AdapterConfigError, PeftConfig, read_adapter_config, to_adapter_config
from lmforge.tune.peft.merge import merge_adapter_folder

__all__ = [
    "AdapterConfigError",
    "PeftConfig",
    "adapter_layers",
    "adapter_state_dict",
    "apply_peft",
    "load_adapter",
    "merge_adapter",
    "merge_adapter_folder",
    "read_adapter_config",
    "save_adapter",
    "to_adapter_config",
]

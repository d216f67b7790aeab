"""The model layer: ``ModelConfig`` selects every component of one ``Transformer``; HF import/export in ``hf``."""

from lmforge.model.cache import ContiguousKVCache, KVCache, KVView
from lmforge.model.config import ModelConfig
from lmforge.model.hf import ModelLoadError, load_pretrained, read_config, save_pretrained
from lmforge.model.presets import get_preset, list_presets
from lmforge.model.transformer import Block, ModelOutput, Transformer

__all__ = [
    "Block",
    "ContiguousKVCache",
    "KVCache",
    "KVView",
    "ModelConfig",
    "ModelLoadError",
    "ModelOutput",
    "Transformer",
    "get_preset",
    "list_presets",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]

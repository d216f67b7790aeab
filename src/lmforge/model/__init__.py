"""The model layer: ``ModelConfig`` selects every component of one ``Transformer``; HF import/export in ``hf``."""

from lmforge.model.cache import ContiguousKVCache, KVCache, KVView
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Block, ModelOutput, Transformer

__all__ = ["Block", "ContiguousKVCache", "KVCache", "KVView", "ModelConfig", "ModelOutput", "Transformer"]

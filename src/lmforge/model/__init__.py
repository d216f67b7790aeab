"""The model layer: ``ModelConfig`` selects every component of one ``Transformer``; HF import/export in ``hf``."""

from lmforge.lazy import lazy_exports

_EXPORTS = {
    "Block": "lmforge.model.transformer",
    "ContiguousKVCache": "lmforge.model.cache",
    "KVCache": "lmforge.model.cache",
    "KVView": "lmforge.model.cache",
    "MambaBlock": "lmforge.model.mamba",
    "RecurrentCache": "lmforge.model.mamba",
    "generate_greedy": "lmforge.model.mamba",
    "ModelConfig": "lmforge.model.config",
    "ModelLoadError": "lmforge.model.hf",
    "ModelOutput": "lmforge.model.transformer",
    "Transformer": "lmforge.model.transformer",
    "get_preset": "lmforge.model.presets",
    "list_presets": "lmforge.model.presets",
    "load_pretrained": "lmforge.model.hf",
    "read_config": "lmforge.model.hf",
    "save_pretrained": "lmforge.model.hf",
    "T5Config": "lmforge.model.t5",
    "T5Model": "lmforge.model.t5",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

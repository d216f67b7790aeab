"""Inference: sampling and beam search, paged KV cache, prefix-caching block manager, continuous batching."""

from lmforge.lazy import lazy_exports

_EXPORTS = {
    "CompletionOutput": "lmforge.infer.outputs",
    "EngineConfig": "lmforge.infer.engine",
    "EngineStats": "lmforge.infer.engine",
    "InvalidRequestError": "lmforge.infer.sampling_params",
    "LLMEngine": "lmforge.infer.engine",
    "QueueFullError": "lmforge.infer.engine",
    "RequestOutput": "lmforge.infer.outputs",
    "SamplingParams": "lmforge.infer.sampling_params",
    "TokenLogprob": "lmforge.infer.outputs",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

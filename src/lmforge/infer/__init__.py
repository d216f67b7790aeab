"""Inference: sampling and beam search, paged KV cache, prefix-caching block manager, continuous batching."""

from lmforge.infer.engine import EngineConfig, EngineStats, LLMEngine, QueueFullError
from lmforge.infer.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lmforge.infer.sampling import SamplingParams

__all__ = [
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]

"""Attention sinks in the paged engine: outputs equal a model-level StreamingLLM cache, past the context
length, with the KV blocks in use bounded."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.sampling_params import InvalidRequestError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.sink_cache import SinkKVCache
from tests.infer.helpers import random_prompts

SINK, WINDOW, BLOCK = 4, 20, 8


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    return Transformer(cfg).eval()


def streaming_reference(model: Transformer, prompt: list[int], steps: int, chunk: int) -> list[int]:
    """Greedy decoding through the model-level sink cache, the prompt fed ``chunk`` tokens at a time."""
    cache = SinkKVCache(model.cfg.n_layers, SINK, WINDOW)
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(prompt), chunk):
            logits = model(torch.tensor([prompt[start : start + chunk]]), cache=cache).logits
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache).logits
    return out


def engine(model: Transformer) -> LLMEngine:
    config = EngineConfig(num_blocks=40, block_size=BLOCK, sink_tokens=SINK, sink_window=WINDOW)
    return LLMEngine(model, None, config)


@pytest.mark.parametrize("prompt_len", [10, 100])  # inside the window / longer than the context, chunked
def test_a_stream_runs_past_the_context_in_bounded_memory(model, prompt_len):
    eng = engine(model)
    prompt = random_prompts([prompt_len], seed=prompt_len)[0]
    steps = 120  # 48 is the model's context
    eng.add_request("r", prompt, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    peak, final = 0, None
    while eng.has_unfinished():
        for out in eng.step():
            final = out
        peak = max(peak, eng.stats().kv_blocks_used)
    chunk = 48 - SINK - WINDOW  # the most a step computes for one sequence behind sinks
    assert final.outputs[0].token_ids == streaming_reference(model, prompt, steps, chunk)
    assert final.outputs[0].finish_reason == "length"
    bound = -(-SINK // BLOCK) + -(-(WINDOW + chunk) // BLOCK) + 1
    assert peak <= bound and eng.stats().kv_blocks_used == 0


def test_sink_requests_and_settings_that_cannot_work_are_refused(model):
    eng = engine(model)
    with pytest.raises(InvalidRequestError, match="attention sinks"):
        eng.make_request(None, [1, 2, 3], SamplingParams(n=2))
    with pytest.raises(ValueError, match="leave no room"):
        LLMEngine(model, None, EngineConfig(num_blocks=40, sink_tokens=8, sink_window=40))
    with pytest.raises(ValueError, match="sink_window > 0"):
        EngineConfig(sink_tokens=4)
    learned = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=2, position="learned"))
    with pytest.raises(ValueError, match="RoPE"):
        LLMEngine(learned, None, EngineConfig(num_blocks=40, sink_window=16))

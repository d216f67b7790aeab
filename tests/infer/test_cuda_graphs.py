"""The CUDA-graph decode path (cuda_graphs.py). Capture needs a GPU (benchmarks/gpu/check.sh exercises it);
here the same padded static forward runs eagerly on the CPU and must decode exactly as the plain path."""

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.cuda_graphs import BATCH_BUCKETS, DecodeGraphs, supports_graphs
from lmforge.model import ModelConfig, Transformer

from .helpers import random_prompts, reference_greedy


def _static_engine(model: Transformer, **config) -> tuple[LLMEngine, DecodeGraphs]:
    engine = LLMEngine(model, None, EngineConfig(num_blocks=4096, block_size=4, **config), eos_token_ids=[])
    graphs = DecodeGraphs(model, engine.cache, capture=False)
    engine.runner.graphs = graphs
    return engine, graphs


def test_padded_static_decode_matches_reference_greedy(tiny_model):
    # 5 requests decode in a bucket of 8 (3 padding rows); contexts pass 128, so the bin buffers grow
    prompts = random_prompts([3, 60, 5, 41, 90])
    engine, graphs = _static_engine(tiny_model)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(tiny_model, prompt, 50)
    assert graphs.runs >= 30  # the decodes went through the static path


def test_static_logits_equal_the_plain_path(tiny_model):
    prompts = random_prompts([7, 19, 33])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=3)
    plain = LLMEngine(tiny_model, None, EngineConfig(num_blocks=4096, block_size=4), eos_token_ids=[])
    static, graphs = _static_engine(tiny_model)
    for a, b in zip(plain.generate(prompts, params), static.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    assert graphs.runs > 0


def test_buckets_fit_the_bin_rows():
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    assert graphs.bucket(3, 64) == 4 and graphs.bucket(17, 64) == 24 and graphs.bucket(64, 64) == 64
    assert graphs.bucket(9, 8) is None  # the bin buffer has no rows for padding to 16: run eagerly
    assert list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)


def test_models_whose_forward_syncs_with_the_host_are_not_captured(tiny_model):
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    assert supports_graphs(tiny_model) is None
    assert "MoE" in supports_graphs(Transformer(ModelConfig(**base, n_experts=4)))
    dynamic = ModelConfig(**base, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert "length-dependent" in supports_graphs(Transformer(dynamic))
    assert "learned" in supports_graphs(Transformer(ModelConfig(**base, position="learned")))


def test_the_engine_captures_only_on_cuda(tiny_model):
    engine = LLMEngine(tiny_model, None, EngineConfig(num_blocks=64, block_size=4))
    assert engine.runner.graphs is None  # a CPU model: nothing to capture
    assert torch.device("cpu") == next(tiny_model.parameters()).device

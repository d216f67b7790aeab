"""Mamba and hybrid models served by the engine: per-sequence recurrent state in pool slots, continuous
batching, chunked prefill; outputs equal the model's own full forward."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.sampling_params import InvalidRequestError
from lmforge.model import ModelConfig, Transformer
from tests.infer.helpers import random_prompts, reference_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, detokenize=False)


def model_of(layer_types: list[str]) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=len(layer_types),
        n_heads=4,
        max_seq_len=128,
        layer_types=layer_types,
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("layer_types", [["mamba", "mamba"], ["mamba", "attention", "mamba"]])
@pytest.mark.parametrize("budget", [1024, 16])  # whole prompts / prompts split over several steps
def test_the_engine_decodes_as_the_full_forward(layer_types, budget):
    model = model_of(layer_types)
    config = EngineConfig(num_blocks=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=budget)
    engine = LLMEngine(model, None, config)
    prompts = random_prompts([3, 17, 9, 30, 5, 22], seed=5)  # more requests than slots: they queue
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(model, p, 10) for p in prompts]
    assert sorted(engine.states.free) == [0, 1, 2, 3] and not engine.states.slot_of  # every slot back
    assert engine.stats().kv_blocks_used == 0


def test_state_memory_does_not_grow_with_the_sequence():
    engine = LLMEngine(model_of(["mamba"]), None, EngineConfig(max_num_seqs=2, num_blocks=64, block_size=8))
    before = engine.states.nbytes
    engine.generate(random_prompts([100]), SamplingParams(max_tokens=20, temperature=0.0))
    assert engine.states.nbytes == before
    with pytest.raises(InvalidRequestError, match="Mamba"):
        engine.make_request(None, [1, 2], SamplingParams(n=2))

"""Several LoRA adapters served at once: each request's output is that of the base model with its adapter
merged into the weights, whatever else shares the batch."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.sampling_params import InvalidRequestError
from lmforge.model import ModelConfig, Transformer
from tests.infer.helpers import random_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, logprobs=1)
TARGETS = ("attn.q_proj", "attn.v_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    return Transformer(cfg).eval()


def random_lora(model: Transformer, seed: int, rank: int = 4, scale: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(model.cfg.n_layers):
        for target in TARGETS:
            layer = model.get_submodule(f"blocks.{i}.{target}")
            a = torch.randn(rank, layer.in_features, generator=g) * 0.3
            b = torch.randn(layer.out_features, rank, generator=g) * 0.3
            weights[f"blocks.{i}.{target}"] = (a, b, scale)
    return weights


def merged(model: Transformer, weights: dict) -> Transformer:
    """The reference: the adapter folded into a copy of the weights (W + s B A)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b, scale) in weights.items():
            out.get_submodule(name).weight += scale * (b @ a)
    return out


def engine(model: Transformer, **adapters: dict) -> LLMEngine:
    eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(num_blocks=64, block_size=8))
    for name, weights in adapters.items():
        eng.add_lora(name, weights)
    return eng


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_an_adapter_serves_the_merged_model(base):
    lora = random_lora(base, 1)
    prompts = random_prompts([5, 17, 30])
    with_adapter = engine(base, a=lora).generate(prompts, GREEDY, lora="a")
    reference = engine(merged(base, lora)).generate(prompts, GREEDY)
    assert tokens(with_adapter) == tokens(reference)
    assert tokens(with_adapter) != tokens(engine(base).generate(prompts, GREEDY))  # the adapter matters
    for got, want in zip(with_adapter, reference):
        got_lp = [lp.logprob for lp in got.outputs[0].logprobs]
        want_lp = [lp.logprob for lp in want.outputs[0].logprobs]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_a_mixed_batch_gives_each_request_its_own_output(base):
    adapters = {"a": random_lora(base, 1), "b": random_lora(base, 2)}
    prompts = random_prompts([6, 12, 25, 9, 18, 4], seed=3)
    names = ["a", None, "b", "b", "a", None]
    together = engine(base, **adapters).generate(prompts, GREEDY, lora=names)
    for prompt, name, out in zip(prompts, names, together):
        alone = engine(base, **adapters).generate([prompt], GREEDY, lora=name)
        assert out.outputs[0].token_ids == alone[0].outputs[0].token_ids, name


def test_prefix_cache_entries_belong_to_their_adapter(base):
    eng = engine(base, a=random_lora(base, 1))
    prompt = random_prompts([40], seed=5)[0]
    first = eng.generate([prompt], GREEDY, lora="a")
    hits = eng.stats().prefix_cache_hits
    base_out = eng.generate([prompt], GREEDY)  # same tokens, other weights: nothing to reuse
    assert eng.stats().prefix_cache_hits == hits
    assert tokens(base_out) == tokens(engine(base).generate([prompt], GREEDY))
    again = eng.generate([prompt], GREEDY, lora="a")
    assert eng.stats().prefix_cache_hits > hits and tokens(again) == tokens(first)


def test_bad_adapters_and_requests_are_refused_clearly(base):
    eng = engine(base)
    with pytest.raises(InvalidRequestError, match="no adapter named 'x'"):
        eng.add_request(None, [1, 2, 3], GREEDY, lora="x")
    wrong = {"blocks.0.attn.q_proj": (torch.zeros(4, 32), torch.zeros(64, 4), 1.0)}
    with pytest.raises(ValueError, match=r"needs A \(r, 64\)"):
        eng.add_lora("w", wrong)
    with pytest.raises(ValueError, match="not a linear layer of a Transformer block"):
        eng.add_lora("h", {"lm_head": (torch.zeros(4, 64), torch.zeros(97, 4), 1.0)})
    assert eng.lora_names == []
    eng.add_lora("a", random_lora(base, 1))
    with pytest.raises(ValueError, match="already loaded"):
        eng.add_lora("a", random_lora(base, 2))
    group = eng.add_request(None, [1, 2, 3], GREEDY, lora="a")
    with pytest.raises(ValueError, match="in use by 1"):
        eng.remove_lora("a")
    eng.abort(group.request_id)
    eng.step()
    made = eng.make_request(None, [1, 2, 3], GREEDY, lora="a")
    eng.remove_lora("a")
    with pytest.raises(InvalidRequestError, match="no longer loaded"):
        eng.add_request(made)
    assert eng.lora_names == []

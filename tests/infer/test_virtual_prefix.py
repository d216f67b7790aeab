"""Soft prompts and prefix tuning served by the engine: outputs equal the adapted model's full forward."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.sampling_params import InvalidRequestError
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.commands import serve_virtual_prefix
from lmforge.tune.peft import PeftConfig, apply_peft, save_adapter
from lmforge.tune.peft.serving import virtual_prefix
from tests.infer.helpers import random_prompts, reference_greedy

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return Transformer(cfg).eval()


def adapted(base: Transformer, method: str, virtual: int, seed: int = 1) -> Transformer:
    model = apply_peft(copy.deepcopy(base), PeftConfig(method=method, num_virtual_tokens=virtual))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def serve(base: Transformer, model: Transformer, tmp_path, block_size: int = 8) -> LLMEngine:
    folder = save_adapter(model, tmp_path / "adapter", None)
    engine = LLMEngine(copy.deepcopy(base), None, EngineConfig(num_blocks=64, block_size=block_size))
    serve_virtual_prefix(engine, folder)  # what `lmforge serve --prompt-adapter` does
    return engine


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("virtual", [3, 8])  # ends inside a block / fills one
def test_the_engine_serves_the_adapted_model(base, tmp_path, method, virtual):
    model = adapted(base, method, virtual)
    engine = serve(base, model, tmp_path)
    prompts = random_prompts([5, 13, 21], seed=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = engine.generate(prompts, params)
    expected = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.prompt_token_ids for o in outs] == prompts  # the virtual positions are not the prompt's
    plain = [reference_greedy(base, p, MAX_TOKENS) for p in prompts]
    assert expected != plain  # the adapter matters
    # the pinned prefix blocks stay; everything the requests took is back
    assert engine.stats().kv_blocks_used == len(engine.block_manager.pinned)


def test_prompts_after_an_aligned_prefix_share_cached_blocks(base, tmp_path):
    engine = serve(base, adapted(base, "prefix_tuning", 8), tmp_path)
    prompt = random_prompts([30], seed=9)[0]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = engine.generate([prompt], params)[0]
    again = engine.generate([prompt], params)[0]
    assert again.num_cached_tokens >= 16 and first.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_requests_that_cannot_run_behind_a_prefix_are_refused(base, tmp_path):
    engine = serve(base, adapted(base, "prompt_tuning", 8), tmp_path)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        engine.make_request(None, [1, 2], SamplingParams(prompt_logprobs=1))
    with pytest.raises(InvalidRequestError, match="context of 120"):
        engine.make_request(None, list(range(1, 97)) + [1] * 30, SamplingParams())
    with pytest.raises(ValueError, match="set once"):
        engine.set_soft_prompt(torch.zeros(2, 64))


def test_a_lora_folder_is_not_a_prefix(base, tmp_path):
    lora = apply_peft(copy.deepcopy(base), PeftConfig(method="lora"))
    folder = save_adapter(lora, tmp_path / "lora", None)
    with pytest.raises(ValueError, match="not a soft prompt or prefix"):
        virtual_prefix(base.cfg, folder)


def test_a_virtual_prefix_and_lora_adapters_do_not_mix(base, tmp_path):
    engine = serve(base, adapted(base, "prefix_tuning", 3), tmp_path)
    weights = {"blocks.0.attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2), 1.0)}
    with pytest.raises(ValueError, match="soft prompt or prefix"):
        engine.add_lora("a", weights)
    plain = LLMEngine(copy.deepcopy(base), None, EngineConfig(num_blocks=64, block_size=8))
    plain.add_lora("a", weights)
    with pytest.raises(ValueError, match="not with LoRA"):
        plain.set_soft_prompt(torch.zeros(2, 64))

"""The engine's decode-speed options: fused projections, the dtype option (bf16), the greedy fast path."""

import copy

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.engine import cpu_has_native_bf16, resolve_dtype
from lmforge.infer.sampler import Sampler
from lmforge.infer.sequence import Sequence
from lmforge.model import ModelConfig, Transformer
from lmforge.model.fusion import packing_available

from .helpers import random_prompts, reference_greedy
from .test_lora import merged, random_lora

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False)


def _engine(model: Transformer, **options) -> LLMEngine:
    return LLMEngine(copy.deepcopy(model), None, EngineConfig(num_blocks=128, block_size=4, **options))


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("pack", [False, True])
def test_fused_engine_decodes_as_the_unfused_one_and_the_reference(tiny_model, pack):
    prompts = random_prompts([3, 17, 9, 30])
    fused = _engine(tiny_model, pack_weights=pack)
    assert fused.model.blocks["0"].attn._fused_qkv is not None
    unfused = _engine(tiny_model, fuse_projections=False)
    assert unfused.model.blocks["0"].attn._fused_qkv is None
    got = _tokens(fused.generate(prompts, GREEDY))
    assert got == _tokens(unfused.generate(prompts, GREEDY))
    assert got == [reference_greedy(tiny_model, p, 12) for p in prompts]


@pytest.mark.parametrize("pack", [False, True])
def test_served_lora_on_a_fused_model_matches_the_merged_model(tiny_model, pack):
    # the adapter wraps q_proj / v_proj / down_proj: those layers leave the fused path, gate/up stay fused
    lora = random_lora(tiny_model, 1)
    prompts = random_prompts([5, 14])
    engine = _engine(tiny_model, pack_weights=pack)
    engine.add_lora("a", lora)
    attn, mlp = engine.model.blocks["0"].attn, engine.model.blocks["0"].mlp
    assert not attn._fused_qkv.valid([attn.q_proj, attn.k_proj, attn.v_proj])
    with torch.inference_mode():
        assert mlp._fused_gate_up.valid([mlp.gate_proj, mlp.up_proj])
    reference = _engine(merged(tiny_model, lora), fuse_projections=False)
    assert _tokens(engine.generate(prompts, GREEDY, lora="a")) == _tokens(reference.generate(prompts, GREEDY))


def test_bf16_engine_keeps_fp32_logits_and_mostly_agrees_with_fp32():
    torch.manual_seed(0)
    # init_std 0.1: logits far enough apart that bf16 rounding rarely decides a greedy choice
    cfg = ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, init_std=0.1
    )
    model = Transformer(cfg).eval()
    prompts = random_prompts([4, 9, 16, 23, 31, 7], seed=5)
    bf16 = _engine(model, dtype="bfloat16")
    assert bf16.cache.k.dtype == torch.bfloat16 and bf16.model.lm_head.weight.dtype == torch.float32
    got = _tokens(bf16.generate(prompts, GREEDY))
    want = _tokens(_engine(model).generate(prompts, GREEDY))
    # agreement: the tokens before each sequence's first divergence (a flip changes everything after it)
    agreed = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(g)) for g, w in zip(got, want))
    assert agreed / sum(map(len, want)) >= 0.75
    assert got != [[0] * 12] * len(prompts)  # (it decodes something)


def test_dtype_option_resolution():
    flags = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n"
    assert cpu_has_native_bf16(flags) and not cpu_has_native_bf16("flags\t: fpu avx2\n")
    assert cpu_has_native_bf16("flags : amx_bf16 amx_tile\n")
    model = torch.nn.Linear(2, 2)
    assert resolve_dtype("model", model) == torch.float32
    assert resolve_dtype("bfloat16", model) == torch.bfloat16
    assert resolve_dtype("auto", model) == torch.float32  # auto changes the weights' copies only
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float16x")


def test_greedy_fast_path_equals_the_general_path():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: both paths take the first maximum
    greedy = [Sequence([1, 2], SamplingParams(temperature=0.0, max_tokens=4)) for _ in range(6)]
    sampler = Sampler()
    fast, lps = sampler(logits.clone(), greedy)
    assert sampler.fast_path_steps == 1 and lps == [None] * 6
    # the general path: the same rows next to a sampled one (greedy rows still argmax, after processors)
    mixed = [*greedy, Sequence([1], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4))]
    general, _ = Sampler(seed=0)(torch.cat([logits, logits[:1]]), mixed)
    assert fast == general[:6] == logits.argmax(-1).tolist()
    assert fast[2] == 7


def test_weight_only_bf16_engine_keeps_an_fp32_cache(tiny_model):
    engine = _engine(tiny_model, pack_weights=True, pack_dtype="bfloat16")
    assert engine.cache.k.dtype == torch.float32
    assert engine.model.blocks["0"].attn.q_proj.weight.dtype == torch.float32
    out = _tokens(engine.generate(random_prompts([6, 13]), GREEDY))
    assert [len(t) for t in out] == [12, 12]
    with pytest.raises(ValueError, match="pack_dtype"):
        EngineConfig(pack_dtype="float16")


def test_auto_dtype_packs_bf16_weights_only_where_the_cpu_has_bf16(tiny_model, monkeypatch):
    import lmforge.infer.engine as engine_module

    for native in (True, False):
        monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda native=native: native)
        engine = _engine(tiny_model, dtype="auto")
        fused = engine.model.blocks["0"].attn._fused_qkv
        assert engine.cache.k.dtype == torch.float32
        if native and packing_available():
            assert fused.packed is not None and fused.pack_dtype == torch.bfloat16
        else:
            assert fused.packed is None

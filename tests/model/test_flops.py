import json

import pytest

from lmforge.cli import main
from lmforge.model.config import ModelConfig
from lmforge.model.flops import (
    ParamCount,
    activation_bytes_per_layer,
    count_parameters,
    flops_per_token,
    memory_plan,
)


def test_model_states_match_the_zero_paper():
    # Rajbhandari et al. (2020), Figure 1: a 7.5B-parameter model on 64 GPUs.
    params = ParamCount(total=7_500_000_000, embedding=0, active=7_500_000_000)
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=1)
    expected_gb = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected_gb.items():
        plan = memory_plan(cfg, micro_batch=1, context=1, dp=64, zero_stage=stage, params=params)
        states = plan.weights + plan.gradients + plan.optimizer
        assert states / 1e9 == pytest.approx(gb, abs=0.05), stage


def test_activations_match_korthikanti_formula():
    # Korthikanti et al. (2022): s*b*h*(34 + 5*a*s/h) bytes per layer for a GPT block with dropout,
    # 16-bit activations and materialised attention scores.
    cfg = ModelConfig(
        vocab_size=100,
        d_model=256,
        n_layers=2,
        n_heads=8,
        mlp="gelu",
        norm="layernorm",
        dropout=0.1,
        position="learned",
    )
    s, b, h, a = 128, 4, 256, 8
    got = activation_bytes_per_layer(cfg, tokens=s * b, context=s, flash=False)
    assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h))


def test_flops_per_token_formula_on_a_hand_case():
    cfg = ModelConfig(
        vocab_size=1000, d_model=64, n_layers=2, n_heads=4, mlp="gelu", position="rope", norm="rmsnorm"
    )
    params = count_parameters(cfg)
    non_embedding = params.total - params.embedding
    context = 128
    expected_forward = 2 * (non_embedding + 1000 * 64) + 2 * 2 * 2 * (context / 2) * 4 * 16
    flops = flops_per_token(cfg, context, params)
    assert flops["forward"] == pytest.approx(expected_forward)
    assert flops["train"] == pytest.approx(3 * expected_forward)


def test_parameter_count_equals_the_built_model():
    import torch

    from lmforge.model.transformer import Transformer

    for cfg in (
        ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True),
        ModelConfig(
            vocab_size=97, d_model=32, n_layers=2, n_heads=4, position="learned", max_seq_len=64, mlp="gelu"
        ),
        ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_experts=4, moe_top_k=2, d_ff=48),
    ):
        model = Transformer(cfg)
        counted = count_parameters(cfg)
        assert counted.total == sum(p.numel() for p in model.parameters())
        if cfg.n_experts:
            expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
            assert counted.active == counted.total - expert // 2
        del model
        torch.manual_seed(0)


@pytest.mark.parametrize(
    ("preset", "published"),
    [
        ("gpt2", 124_439_808),
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("mixtral-8x7b", 46_702_792_704),
    ],
)
def test_preset_parameter_counts_match_published_models(preset, published):
    from lmforge.model.presets import get_preset

    assert count_parameters(get_preset(preset)).total == published


def test_mixtral_active_parameters():
    from lmforge.model.presets import get_preset

    active = count_parameters(get_preset("mixtral-8x7b")).active
    assert active == pytest.approx(12.9e9, rel=0.01)


def test_info_command_reports_json(capsys):
    assert main(["info", "gpt2", "--json", "--dp", "8", "--zero", "3", "--seq-len", "1024"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == 124_439_808
    assert report["flops_per_token"]["context"] == 1024
    mem = report["memory_per_gpu_gib"]
    assert mem["weights"] == pytest.approx(2 * 124_439_808 / 8 / 1024**3, abs=1e-3)


def test_info_command_accepts_overrides_and_rejects_bad_ones(capsys):
    assert main(["info", "gpt2", "n_layers=2", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["parameters"]["total"]
    assert small < 124_439_808
    assert main(["info", "gpt2", "n_layerz=2"]) == 2
    assert "n_layerz" in capsys.readouterr().err

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.t5.modeling_t5 import T5Attention

from lmforge.model.config import ModelConfig
from lmforge.model.positions import (
    RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    relative_position_bucket,
    rope_cos_sin,
    rope_inv_freq,
    sinusoidal_embedding,
)


def test_sinusoidal_matches_vaswani_formula():
    positions = torch.tensor([[0, 1, 5, 37]])
    got = sinusoidal_embedding(positions, 10)
    for p_index, p in enumerate(positions[0].tolist()):
        for i in range(5):
            angle = p / 10000 ** (2 * i / 10)
            assert got[0, p_index, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert got[0, p_index, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def _rotate(x, position, cfg):
    cos, sin = rope_cos_sin(torch.tensor([[position]]), rope_inv_freq(cfg))
    return apply_rope(x[None, None, None], cos, sin)[0, 0, 0]


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5])
def test_rope_dot_product_depends_only_on_relative_position(rotary_pct):
    cfg = ModelConfig(d_model=64, n_heads=4, rotary_pct=rotary_pct)
    q, k = torch.randn(16), torch.randn(16)
    for m, n in [(5, 2), (13, 10), (103, 100)]:  # all m - n == 3
        torch.testing.assert_close(
            _rotate(q, m, cfg) @ _rotate(k, n, cfg),
            _rotate(q, 3, cfg) @ _rotate(k, 0, cfg),
            atol=1e-4,
            rtol=0,
        )
    assert not torch.allclose(
        _rotate(q, 4, cfg) @ _rotate(k, 0, cfg), _rotate(q, 3, cfg) @ _rotate(k, 0, cfg)
    )


def test_rope_is_a_rotation_and_partial_rotary_keeps_the_tail():
    cfg = ModelConfig(d_model=64, n_heads=4, rotary_pct=0.25)
    assert cfg.rotary_dim == 4
    x = torch.randn(16)
    y = _rotate(x, 7, cfg)
    torch.testing.assert_close(y.norm(), x.norm())
    torch.testing.assert_close(y[4:], x[4:])
    torch.testing.assert_close(_rotate(x, 0, cfg), x)


def test_rope_inv_freq_matches_transformers_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_parameters={"rope_theta": 500000.0, **scaling}
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig(d_model=4096, n_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    torch.testing.assert_close(rope_inv_freq(cfg), want.float())
    plain = rope_inv_freq(ModelConfig(d_model=4096, n_heads=32, rope_theta=500000.0))
    assert torch.equal(rope_inv_freq(cfg)[:10], plain[:10])  # high frequencies untouched
    torch.testing.assert_close(rope_inv_freq(cfg)[-5:], plain[-5:] / 8)  # low ones divided by factor


def test_alibi_slopes_for_eight_heads_are_the_published_values():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))


@pytest.mark.parametrize("n_heads", [1, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_bloom(n_heads):
    mask = torch.ones(1, 4)
    bloom = build_alibi_tensor(mask, n_heads, torch.float32)  # slope * key position
    torch.testing.assert_close(alibi_slopes(n_heads), bloom[:, 0, 1])


def test_alibi_bias_penalises_distance_linearly():
    slopes = alibi_slopes(2)
    bias = alibi_bias(slopes, torch.tensor([[3]]), torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(bias[0, :, 0], -slopes[:, None] * torch.tensor([3.0, 2, 1, 0]))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20)])
def test_relative_buckets_match_t5(bidirectional, buckets, max_distance):
    relative = torch.arange(-300, 300)[None, :]
    want = T5Attention._relative_position_bucket(relative, bidirectional, buckets, max_distance)
    assert torch.equal(relative_position_bucket(relative, bidirectional, buckets, max_distance), want)


def test_relative_bias_looks_up_one_scalar_per_bucket_and_head():
    cfg = ModelConfig(
        d_model=16, n_heads=2, position="relative", relative_buckets=8, relative_max_distance=16
    )
    module = RelativePositionBias(cfg)
    q_pos, k_pos = torch.tensor([[5, 6]]), torch.tensor([[0, 4, 5, 6]])
    bias = module(q_pos, k_pos)
    assert bias.shape == (1, 2, 2, 4)
    buckets = relative_position_bucket(k_pos[:, None, :] - q_pos[:, :, None], False, 8, 16)
    torch.testing.assert_close(bias[0, 1], module.embedding.weight[buckets[0], 1])

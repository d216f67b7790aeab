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
    sinusoidal_embedding,
)
from lmforge.model.rope_scaling import rope_frequencies


def test_sinusoidal_matches_vaswani_formula():
    positions = torch.tensor([[0, 1, 5, 37]])
    got = sinusoidal_embedding(positions, 10)
    for p_index, p in enumerate(positions[0].tolist()):
        for i in range(5):
            angle = p / 10000 ** (2 * i / 10)
            assert got[0, p_index, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert got[0, p_index, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def _rotate(x, position, cfg):
    cos, sin = rope_cos_sin(torch.tensor([[position]]), *rope_frequencies(cfg))
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


HALF = 32  # rotated pairs of a 64-dim head
SCALINGS = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1},
    "yarn-mscale": {
        "factor": 8.0,
        "original_max_position_embeddings": 1024,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
    "yarn-attention-factor-untruncated": {
        "factor": 4.0,
        "original_max_position_embeddings": 2048,
        "attention_factor": 1.3,
        "truncate": False,
    },
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "longrope": {
        "short_factor": [1.0 + i / HALF for i in range(HALF)],
        "long_factor": [1.0 + 8 * i / HALF for i in range(HALF)],
        "original_max_position_embeddings": 1024,
    },
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [None, 1000, 3000, 9000])
def test_rope_frequencies_match_transformers(name, seq_len):
    """inv_freq and the attention factor equal transformers' ROPE_INIT_FUNCTIONS, within and past the
    training length (the length-dependent types change there, the others must not)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = name.split("-")[0]
    scaling = {"rope_type": kind, **SCALINGS[name]}
    hf = LlamaConfig(
        hidden_size=1024,
        num_attention_heads=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_theta": 50000.0, **scaling},
    )
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq_len)
    cfg = ModelConfig(
        d_model=1024, n_heads=16, max_seq_len=4096, rope_theta=50000.0, rope_scaling=dict(scaling)
    )
    got, factor = rope_frequencies(cfg, seq_len)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(float(want_factor), rel=1e-7)
    plain, _ = rope_frequencies(ModelConfig(d_model=1024, n_heads=16, rope_theta=50000.0))
    assert not torch.equal(got, plain) or (kind == "dynamic" and (seq_len or 0) <= 4096)


def test_llama3_keeps_high_frequencies_and_divides_low_ones():
    scaling = {"rope_type": "llama3", **SCALINGS["llama3"]}
    got, _ = rope_frequencies(
        ModelConfig(d_model=1024, n_heads=16, rope_theta=500000.0, rope_scaling=scaling)
    )
    plain, _ = rope_frequencies(ModelConfig(d_model=1024, n_heads=16, rope_theta=500000.0))
    assert torch.equal(got[:5], plain[:5])
    torch.testing.assert_close(got[-5:], plain[-5:] / 8)


def test_base_truncation_clamps_wavelengths_beyond_the_training_length():
    scaling = {"rope_type": "truncate", "original_max_position_embeddings": 512, "rho": 1e-4}
    cfg = ModelConfig(d_model=1024, n_heads=16, rope_theta=10000.0, rope_scaling=scaling)
    got, factor = rope_frequencies(cfg)
    plain, _ = rope_frequencies(ModelConfig(d_model=1024, n_heads=16, rope_theta=10000.0))
    long = 2 * math.pi / plain > 512
    assert 0 < int(long.sum()) < HALF and factor == 1.0
    assert torch.equal(got[~long], plain[~long])
    assert torch.equal(got[long], torch.full_like(got[long], 1e-4))


def test_base_modification_is_rope_theta():
    """Raising the base (e.g. NTK-aware base * s^(d/(d-2))) slows every pair but the first."""
    small, _ = rope_frequencies(ModelConfig(d_model=1024, n_heads=16, rope_theta=10000.0))
    big, _ = rope_frequencies(ModelConfig(d_model=1024, n_heads=16, rope_theta=10000.0 * 4 ** (64 / 62)))
    assert big[0] == small[0] and bool((big[1:] < small[1:]).all())


def test_attention_factor_scales_the_rotated_dot_product_by_its_square():
    cfg = ModelConfig(d_model=64, n_heads=4)
    inv_freq, _ = rope_frequencies(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    plain = (
        apply_rope(q, *rope_cos_sin(torch.tensor([[9]]), inv_freq)).flatten()
        @ apply_rope(k, *rope_cos_sin(torch.tensor([[2]]), inv_freq)).flatten()
    )
    scaled = (
        apply_rope(q, *rope_cos_sin(torch.tensor([[9]]), inv_freq, 1.5)).flatten()
        @ apply_rope(k, *rope_cos_sin(torch.tensor([[2]]), inv_freq, 1.5)).flatten()
    )
    torch.testing.assert_close(scaled, plain * 2.25)


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

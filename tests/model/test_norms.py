import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.norms import RMSNorm, build_norm


def test_rmsnorm_matches_its_formula():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    want = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_rmsnorm_computes_in_fp32_for_half_inputs():
    norm = RMSNorm(8)
    x = (torch.randn(4, 8) * 100).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), norm(x.float()), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_its_formula(bias):
    norm = build_norm(ModelConfig(d_model=16, n_heads=2, norm="layernorm", norm_bias=bias, norm_eps=1e-5))
    assert (norm.bias is not None) == bias
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if bias:
            norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 7, 16) * 3 + 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), want)


def test_deepnorm_constants_follow_the_deepnet_paper():
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=24, norm="deepnorm", norm_position="post")
    assert cfg.deepnorm_alpha == pytest.approx((2 * 24) ** 0.25)  # decoder-only: alpha = (2N)^(1/4)
    assert cfg.deepnorm_beta == pytest.approx((8 * 24) ** -0.25)  # beta = (8N)^(-1/4)
    plain = ModelConfig(d_model=16, n_heads=2, n_layers=24)
    assert (plain.deepnorm_alpha, plain.deepnorm_beta) == (1.0, 1.0)
    with pytest.raises(ValueError, match="deepnorm"):
        ModelConfig(d_model=16, n_heads=2, norm="deepnorm", norm_position="pre")

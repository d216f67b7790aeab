import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.mlp import MLP

ACTS = {
    "relu": torch.relu,
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
    "silu": lambda x: x * torch.sigmoid(x),
}


@pytest.mark.parametrize("kind", sorted(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_plain_mlp(kind, bias):
    mlp = MLP(ModelConfig(d_model=8, n_heads=2, d_ff=24, mlp=kind, mlp_bias=bias))
    assert mlp.gate_proj is None and (mlp.up_proj.bias is not None) == bias
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), mlp.down_proj(ACTS[kind](mlp.up_proj(x))))


@pytest.mark.parametrize(("kind", "act"), [("swiglu", ACTS["silu"]), ("geglu", ACTS["gelu"])])
def test_gated_mlp(kind, act):
    mlp = MLP(ModelConfig(d_model=8, n_heads=2, d_ff=24, mlp=kind))
    x = torch.randn(3, 8)
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    want = (act(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), want)


def test_glu_default_width_is_two_thirds_of_4d_rounded():
    cfg = ModelConfig(d_model=4096, n_heads=32, mlp="swiglu", ff_multiple_of=256)
    assert cfg.d_ff == 11008  # Llama 2 7B
    assert ModelConfig(d_model=64, n_heads=4, mlp="gelu").d_ff == 256

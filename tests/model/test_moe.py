import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lmforge.model.config import ModelConfig
from lmforge.model.moe import (
    MoE,
    expert_capacity,
    load_balancing_loss,
    route,
    router_z_loss,
    within_capacity,
)


def test_top_k_routing_on_a_hand_case():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, -1.0]])
    weights, experts, probs = route(logits, top_k=2, normalize=True)
    assert experts.tolist() == [[0, 1], [2, 1]]
    e = math.e
    torch.testing.assert_close(weights[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    raw, _, _ = route(logits, top_k=2, normalize=False)
    torch.testing.assert_close(raw[1, 0], probs[1, 2])


def test_load_balancing_loss_on_a_hand_case():
    # two tokens, both routed to expert 0: f = (1, 0), P = (0.7, 0.3) -> E * sum f*P = 2 * 0.7
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    experts = torch.tensor([[0], [0]])
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.4)
    # perfectly balanced uniform routing gives the minimum, 1 per routed slot
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_matches_transformers_mixtral(top_k):
    logits = torch.randn(20, 6)
    _, experts, probs = route(logits, top_k, normalize=True)
    want = load_balancing_loss_func((logits,), num_experts=6, top_k=top_k)
    torch.testing.assert_close(load_balancing_loss(probs, experts), want)


def test_router_z_loss_on_a_hand_case():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want)


def test_capacity_keeps_first_choices_first_then_token_order():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    keep = within_capacity(experts, n_experts=3, capacity=2)
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]
    assert expert_capacity(n_tokens=4, top_k=2, n_experts=3, capacity_factor=1.0) == 3
    assert expert_capacity(n_tokens=8, top_k=1, n_experts=4, capacity_factor=1.25) == 3


def _naive_moe(moe: MoE, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Token by token: sum of the weighted outputs of its kept top-k experts."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, experts, _ = route(tokens @ moe.router.weight.T, moe.top_k, moe.normalize)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for slot in range(moe.top_k):
            if keep is None or keep[t, slot]:
                out[t] += weights[t, slot] * moe.experts[int(experts[t, slot])](tokens[t])
    return out.view_as(x)


def _moe(**kw) -> MoE:
    cfg = ModelConfig(d_model=16, n_heads=2, d_ff=24, n_experts=4, moe_top_k=2, **kw)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.router.weight, std=1.0)  # decisive routing, so capacity actually binds
    return moe


def test_dropless_moe_equals_the_token_by_token_definition():
    moe = _moe(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.25)
    x = torch.randn(2, 5, 16)
    out, aux = moe(x)
    torch.testing.assert_close(out, _naive_moe(moe, x, None))
    logits = x.reshape(-1, 16) @ moe.router.weight.T
    _, experts, probs = route(logits, 2, True)
    want_aux = 0.5 * load_balancing_loss(probs, experts) + 0.25 * router_z_loss(logits)
    torch.testing.assert_close(aux, want_aux)


def test_capacity_factor_drops_overflowing_tokens():
    moe = _moe(moe_capacity_factor=0.5)
    x = torch.randn(1, 12, 16)
    out, _ = moe(x)
    _, experts, _ = route(x.reshape(-1, 16) @ moe.router.weight.T, 2, True)
    keep = within_capacity(experts, 4, expert_capacity(12, 2, 4, 0.5))
    assert not keep.all()  # something was dropped
    torch.testing.assert_close(out, _naive_moe(moe, x, keep))
    dropped_entirely = ~keep.any(dim=1)
    if dropped_entirely.any():
        assert out.reshape(-1, 16)[dropped_entirely].abs().max() == 0  # passes through the residual only


def test_router_starts_small():
    cfg = ModelConfig(d_model=256, n_heads=4, n_experts=8, n_layers=2, router_init_std=0.002)
    from lmforge.model import Transformer

    router = Transformer(cfg).blocks["0"].mlp.router.weight
    assert router.std().item() == pytest.approx(0.002, rel=0.1)

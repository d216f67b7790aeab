"""Weight decay on matrices only; AdamW and Adafactor built with the recipe's hyper-parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train.config import OptimConfig
from lmforge.train.optim import build_optimizer, parameter_groups


def tiny(**overrides) -> Transformer:
    cfg = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, norm="layernorm", mlp_bias=True)
    return Transformer(ModelConfig(**{**cfg, **overrides}))


def names_by_group(model: Transformer, **kwargs) -> tuple[set[str], set[str]]:
    decay, no_decay = parameter_groups(model, 0.1, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_decay_applies_to_matrices_only() -> None:
    model = tiny()
    decay, no_decay = names_by_group(model)
    assert decay == {n for n, p in model.named_parameters() if p.ndim == 2 and n != "embed_tokens.weight"}
    assert "lm_head.weight" in decay and "blocks.0.attn.q_proj.weight" in decay
    assert "embed_tokens.weight" in no_decay
    assert {"blocks.0.attn_norm.weight", "blocks.0.attn_norm.bias", "blocks.0.mlp.up_proj.bias"} <= no_decay
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_tied_head_follows_the_embedding_and_embeddings_can_opt_in() -> None:
    tied = tiny(tie_embeddings=True)
    decay, no_decay = names_by_group(tied)
    assert "embed_tokens.weight" in no_decay and "lm_head.weight" not in decay  # one tensor, counted once
    decay, _ = names_by_group(tiny(position="learned"), decay_embeddings=True)
    assert {"embed_tokens.weight", "pos_embed.weight"} <= decay


def test_adamw_defaults_and_decoupled_decay() -> None:
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and group["fused"]  # plain tensors on CPU
    # zero gradients: AdamW moves a decayed matrix only by lr * wd * w, and leaves a norm untouched
    w = model.blocks["0"].attn.q_proj.weight
    norm = model.blocks["0"].attn_norm.weight
    before_w, before_norm = w.detach().clone(), norm.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(w.detach(), before_w * (1 - 3e-4 * 0.1))
    torch.testing.assert_close(norm.detach(), before_norm)


def adafactor_reference(
    x: np.ndarray, grads: list[np.ndarray], lr: float, weight_decay: float, d: float = 1.0, eps2: float = 1e-3
) -> np.ndarray:
    """Adafactor as published (Shazeer & Stern 2018, Alg. 4 for matrices, Alg. 5 for vectors), in float64:
    relative step alpha_t = max(eps2, RMS(x_{t-1})) * rho_t with rho_t = min(lr, 1/sqrt(t)); beta2_t = 1 - t^-0.8;
    factored second moments R (row sums) and C (column sums), V = R C / sum(R); update clipping at RMS d;
    weight decay decoupled (x *= 1 - lr * wd), as torch documents it."""
    x = x.astype(np.float64).copy()
    row = col = var = None
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        beta2 = 1.0 - t**-0.8
        alpha = max(eps2, float(np.sqrt(np.mean(x**2)))) * min(lr, 1.0 / np.sqrt(t))
        x *= 1.0 - lr * weight_decay
        if x.ndim == 2:
            row = (1 - beta2) * (g**2).sum(1) if row is None else beta2 * row + (1 - beta2) * (g**2).sum(1)
            col = (1 - beta2) * (g**2).sum(0) if col is None else beta2 * col + (1 - beta2) * (g**2).sum(0)
            v = np.outer(row, col) / row.sum()
        else:
            var = (1 - beta2) * g**2 if var is None else beta2 * var + (1 - beta2) * g**2
            v = var
        u = g / np.sqrt(v)
        x -= alpha * u / max(1.0, float(np.sqrt(np.mean(u**2))) / d)
    return x


@pytest.mark.parametrize("fused", [None, False])
def test_adafactor_follows_the_published_update(fused: bool | None) -> None:
    torch.manual_seed(0)
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.1, fused=fused))
    assert isinstance(optimizer, torch.optim.Adafactor)
    params = dict(model.named_parameters())
    watched = {"blocks.0.attn.q_proj.weight": 0.1, "blocks.0.attn_norm.weight": 0.0}  # decayed matrix, vector
    start = {name: params[name].detach().numpy().copy() for name in watched}
    grads: dict[str, list[np.ndarray]] = {name: [] for name in watched}
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(4):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
        loss.backward()
        for name in watched:
            grads[name].append(params[name].grad.detach().numpy().copy())
        optimizer.step()
        optimizer.zero_grad()
    for name, weight_decay in watched.items():
        want = adafactor_reference(start[name], grads[name], lr=1e-2, weight_decay=weight_decay)
        assert not np.allclose(want, start[name])  # the parameter moved
        np.testing.assert_allclose(params[name].detach().numpy(), want, rtol=2e-5, atol=1e-6)


def test_bad_optimizer_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError):
        OptimConfig(betas=[0.9])

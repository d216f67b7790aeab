"""Weight decay on matrices only; AdamW and Adafactor built with the recipe's hyper-parameters."""

from __future__ import annotations

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


def test_adafactor_trains_a_step() -> None:
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2))
    assert isinstance(optimizer, torch.optim.Adafactor)
    ids = torch.randint(0, 32, (2, 8))
    losses = []
    for _ in range(3):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_optimizer_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError):
        OptimConfig(betas=[0.9])

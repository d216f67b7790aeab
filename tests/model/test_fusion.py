"""Fused q/k/v and gate/up projections (lmforge.model.fusion): same logits, same parameters, safe fallbacks."""

import copy

import pytest
import torch
from torch import nn

from lmforge.model import ModelConfig, Transformer
from lmforge.model.fusion import packing_available
from lmforge.model.quant import quantize_model


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **overrides
    )
    return Transformer(cfg).eval()


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "mlp_bias": True}, {"mlp": "gelu"}])
def test_fused_logits_equal_unfused_and_parameters_are_unchanged(overrides):
    model = _model(**overrides)
    reference = _logits(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = model.fuse_for_inference()
    assert fused == 2 * (1 + model.cfg.gated)  # q/k/v per layer, and gate/up per gated MLP
    torch.testing.assert_close(_logits(model, IDS), reference, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    attn = model.blocks["0"].attn
    # the parameters are views into one tensor (no copy of the weights is kept)
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4


def test_the_fused_path_runs_one_matmul_instead_of_the_projections():
    model = _model()
    model.fuse_for_inference()
    calls = []
    for block in model.blocks.values():
        for layer in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj):
            layer.register_forward_hook(lambda *_: calls.append(1))
    _logits(model, IDS)
    assert calls == []
    with torch.enable_grad():  # training: the separate layers, so gradients reach their parameters
        model(IDS).logits.sum().backward()
    assert len(calls) == 8 and model.blocks["0"].attn.q_proj.weight.grad is not None


def test_in_place_weight_changes_reach_the_fused_path():
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.fuse_for_inference()
    model.load_state_dict(other.state_dict())  # in place, as the rollout engine pushes weights
    torch.testing.assert_close(_logits(model, IDS), _logits(other, IDS), atol=1e-5, rtol=1e-5)


def test_rebound_or_replaced_layers_fall_back_to_the_separate_projections():
    model = _model()
    model.fuse_for_inference()
    model.double()  # rebinds every parameter: the fused tensors are stale and must not be used
    reference = _model().double()
    torch.testing.assert_close(_logits(model, IDS.clone()), _logits(reference, IDS), atol=1e-10, rtol=1e-10)
    model = _model()
    model.fuse_for_inference()
    model.blocks["1"].attn.k_proj = nn.Linear(64, 32)  # a replaced layer (as a served adapter's wrapper)
    model.blocks["1"].attn.k_proj.weight.data.zero_()
    assert not torch.allclose(_logits(model, IDS), _logits(_model(), IDS))


def test_quantized_layers_are_not_fused_and_unfuse_restores_separate_storage():
    model = quantize_model(_model(), "int8")
    assert model.fuse_for_inference() == 0
    model = _model()
    deep = copy.deepcopy(model)
    model.fuse_for_inference()
    model.unfuse()
    attn = model.blocks["0"].attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(_logits(model, IDS), _logits(deep, IDS), atol=0, rtol=0)


def test_to_inference_dtype_keeps_head_and_embeddings_fp32():
    model = _model(tie_embeddings=True)
    model.to_inference_dtype(torch.bfloat16)
    assert model.blocks["0"].attn.q_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32 and model.embed_tokens.weight is model.lm_head.weight
    logits = _logits(model, IDS)
    assert logits.dtype == torch.float32
    reference = _logits(_model(tie_embeddings=True), IDS)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN weight prepacking")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_same_logits_and_go_stale_on_in_place_changes(dtype):
    model = _model(tie_embeddings=True)
    model.to_inference_dtype(dtype)
    reference = _logits(model, IDS)
    model.fuse_for_inference(pack=True)
    assert model._fused_head is not None and model.embed_tokens.weight is model.lm_head.weight  # still tied
    assert model.blocks["0"].mlp._fused_down.packed is not None
    copied = copy.deepcopy(model)  # (oneDNN's packed tensors cannot be copied: the copy runs unpacked)
    torch.testing.assert_close(_logits(copied, IDS), reference, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(_logits(model, IDS), reference, atol=tol, rtol=tol)
    with torch.no_grad():  # an in-place update (a pushed policy, an optimizer step): the packed copy is stale
        for p in model.parameters():
            p.mul_(1.5)
    fresh = _model(tie_embeddings=True)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    fresh.to_inference_dtype(dtype)
    torch.testing.assert_close(_logits(model, IDS), _logits(fresh, IDS), atol=tol, rtol=tol)


@pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN weight prepacking")
def test_weight_only_bf16_packing_keeps_fp32_activations():
    model = _model()
    reference = _logits(model, IDS)
    model.fuse_for_inference(pack=True, pack_dtype=torch.bfloat16)
    fused = model.blocks["0"].attn._fused_qkv
    assert model.blocks["0"].attn.q_proj.weight.dtype == torch.float32  # the parameters stay fp32
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        q = fused(x)[0]
        assert q.dtype == torch.float32
        # what a bf16 matmul of bf16-rounded operands gives, accumulated in fp32
        want = (x.bfloat16().float() @ fused.weight.bfloat16().float().T)[..., :64]
        torch.testing.assert_close(q, want, atol=1e-2, rtol=1e-2)
        assert not torch.equal(q, x @ fused.weight[:64].T)  # (it really is the bf16 path)
    logits = _logits(model, IDS)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=5e-2, rtol=5e-2)



@pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN weight prepacking")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_same_logits_and_go_stale_on_in_place_changes(dtype):
    model = _model(tie_embeddings=True)
    model.to_inference_dtype(dtype)
    reference = _logits(model, IDS)
    model.fuse_for_inference(pack=True)
    assert model._fused_head is not None and model.embed_tokens.weight is model.lm_head.weight  # still tied
    assert model.blocks["0"].mlp._fused_down.packed is not None
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

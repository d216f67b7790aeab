"""LM-Infinite's Λ-shaped mask and StreamingLLM attention sinks (keys cached before RoPE)."""

import pytest
import torch

from lmforge.model import ContiguousKVCache, ModelConfig, Transformer
from lmforge.model.attention import attention_mask
from lmforge.model.sink_cache import SinkKVCache

# init_std large enough that attention is far from uniform, so positions show in the logits
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.2)


def test_lambda_mask_equals_an_explicit_mask():
    cfg = ModelConfig(d_model=32, n_heads=4, attention="lambda", sliding_window=3, global_tokens=2)
    pos = torch.arange(9)[None]
    got = attention_mask(cfg, pos, pos)[0, 0]
    want = torch.tensor([[j <= i and (i - j < 3 or j < 2) for j in range(9)] for i in range(9)])
    assert torch.equal(got, want)
    assert got[8].nonzero().flatten().tolist() == [0, 1, 6, 7, 8]


def test_lambda_attention_cached_equals_full_and_combines_with_rerope():
    """LM-Infinite in full: the Λ mask plus distances capped at the window (ReRoPE with w = window)."""
    torch.manual_seed(0)
    for extra in ({}, {"rerope_window": 4}):
        model = Transformer(
            ModelConfig(**TINY, attention="lambda", sliding_window=4, global_tokens=2, **extra)
        )
        ids = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            want = model.eval()(ids).logits
            cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=12)
            pieces = [model(ids[:, :5], cache=cache).logits]
            pieces += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 12)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), want, atol=1e-5, rtol=1e-5)


def _stream(model, cache, ids, prefill):
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache=cache).logits]
        for i in range(prefill, ids.shape[1]):
            out.append(model(ids[:, i : i + 1], cache=cache).logits)
    return torch.cat(out, dim=1)


def test_sink_cache_keeps_exactly_sink_plus_window_tokens():
    model = Transformer(ModelConfig(**TINY)).eval()
    cache = SinkKVCache(model.cfg.n_layers, sink=2, window=3)
    ids = torch.randint(0, 64, (1, 20))
    kept = []
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        kept.append(cache.length())
        for i in range(4, 20):
            model(ids[:, i : i + 1], cache=cache)
            kept.append(cache.length())
            assert all(k.shape[2] == cache.length() for k in cache.keys)
    assert kept == [4] + [5] * 16
    # what stays is the first 2 tokens' keys and the last 3 ones (layer 0 keys depend on the token alone)
    fresh = SinkKVCache(model.cfg.n_layers, sink=2, window=100)
    with torch.no_grad():
        model(ids, cache=fresh)
    keep = [0, 1, 17, 18, 19]
    torch.testing.assert_close(cache.keys[0], fresh.keys[0][:, :, keep])


def test_sink_decoding_equals_a_forward_over_the_kept_tokens_at_reassigned_positions():
    """One layer: its keys/values depend on the token alone, so after eviction the next token's logits are
    those of a plain forward over [kept tokens, new token] at positions 0 .. n."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "n_layers": 1})).eval()
    cache = SinkKVCache(1, sink=2, window=4)
    ids = torch.randint(0, 64, (2, 15))
    streamed = _stream(model, cache, ids, prefill=3)
    kept = [0, 1, 10, 11, 12, 13]  # before the last token: sinks and the 4 most recent
    with torch.no_grad():
        want = model(torch.cat((ids[:, kept], ids[:, 14:]), dim=1)).logits[:, -1]
    torch.testing.assert_close(streamed[:, -1], want, atol=1e-5, rtol=1e-5)
    # and it is not what the full stream gives (the evicted tokens did matter)
    with torch.no_grad():
        assert (model(ids).logits[:, -1] - want).abs().max() > 1e-3


def test_without_eviction_unrotated_keys_change_nothing():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    got = _stream(model, SinkKVCache(model.cfg.n_layers, sink=1, window=64), ids, prefill=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_with_unrotated_keys_decodes_exactly_like_the_full_forward():
    """transformers' cached dynamic-NTK decoding keeps each key's rotation of the step that computed it; keys
    cached before RoPE are re-rotated at the current frequencies, so q·k stays relative. One layer, whose keys
    depend on the token alone (deeper keys come from hidden states of earlier steps), then equals the full
    forward exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        **{**TINY, "max_seq_len": 8, "n_layers": 1}, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
    )
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        want = model(ids).logits[:, -1]
    exact = _stream(model, SinkKVCache(cfg.n_layers, sink=0, window=64), ids, prefill=4)[:, -1]
    rotated_once = _stream(model, ContiguousKVCache.for_model(cfg, batch=2, max_len=20), ids, prefill=4)[
        :, -1
    ]
    torch.testing.assert_close(exact, want, atol=1e-5, rtol=1e-5)
    assert (rotated_once - want).abs().max() > 1e-4


def test_sink_cache_refuses_positions_that_do_not_continue_it():
    model = Transformer(ModelConfig(**TINY)).eval()
    cache = SinkKVCache(model.cfg.n_layers, sink=1, window=4)
    with pytest.raises(ValueError, match="continue the kept tokens"):
        model(torch.randint(0, 64, (1, 3)), position_ids=torch.tensor([[5, 6, 7]]), cache=cache)

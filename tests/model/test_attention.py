import torch

from lmforge.model.attention import Attention, AttentionContext, attention_mask
from lmforge.model.config import ModelConfig

CFG = dict(d_model=32, n_heads=4)


def _mask(cfg, n, **kw):
    pos = torch.arange(n)[None]
    return attention_mask(cfg, pos, pos, **kw)[0, 0].int()


def test_causal_mask():
    assert torch.equal(_mask(ModelConfig(**CFG), 4), torch.tril(torch.ones(4, 4, dtype=torch.int)))


def test_prefix_mask_is_bidirectional_over_the_prefix_and_causal_after():
    cfg = ModelConfig(**CFG, structure="prefix")
    want = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    got = attention_mask(cfg, torch.arange(5)[None], torch.arange(5)[None], prefix_lengths=torch.tensor([3]))
    assert got.shape == (1, 1, 5, 5)
    assert torch.equal(got[0, 0].int(), want)


def test_sliding_window_mask():
    cfg = ModelConfig(**CFG, attention="sliding", sliding_window=2)
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(_mask(cfg, 4), want)


def test_fixed_sparse_mask_is_local_plus_strided():
    cfg = ModelConfig(**CFG, attention="sparse", sparse_block=3)
    got = _mask(cfg, 8)
    # query 7 sees the local block {5, 6, 7} and the strided positions 7-3=4 and 7-6=1
    assert got[7].nonzero().flatten().tolist() == [1, 4, 5, 6, 7]
    assert got[4].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert torch.equal(got, torch.tril(got))


def test_segments_and_empty_slots():
    cfg = ModelConfig(**CFG)
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    got = attention_mask(cfg, pos, pos, q_segments=seg, k_segments=seg)[0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(got, want)
    # keys at position -1 (empty cache slots) are never visible
    got = attention_mask(cfg, torch.tensor([[2]]), torch.tensor([[0, -1, 1, 2, -1]]))[0, 0, 0].int()
    assert got.tolist() == [1, 0, 1, 1, 0]


def test_a_padding_query_that_sees_nothing_gets_a_finite_row():
    cfg = ModelConfig(**CFG)
    got = attention_mask(cfg, torch.tensor([[-1]]), torch.tensor([[0, 1]]))
    assert got.all()


def _repeat_kv_heads(gqa: Attention, cfg: ModelConfig) -> Attention:
    mha = Attention(ModelConfig(**{**cfg.__dict__, "n_kv_heads": cfg.n_heads}), layer=0)
    group = cfg.n_heads // cfg.n_kv_heads
    hd = cfg.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(cfg.n_kv_heads, hd, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(-1, cfg.d_model))
    return mha


def test_gqa_and_mqa_equal_mha_with_repeated_kv_heads():
    for n_kv in (2, 1):
        cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=n_kv)
        gqa = Attention(cfg, layer=0)
        mha = _repeat_kv_heads(gqa, cfg)
        assert gqa.k_proj.weight.shape == (n_kv * 8, 32)
        x = torch.randn(2, 6, 32)
        ctx = AttentionContext(cfg, torch.arange(6).expand(2, 6), causal_kernel=True)
        torch.testing.assert_close(gqa(x, ctx), mha(x, ctx))
        # and the explicit-mask path agrees with the causal kernel
        explicit = AttentionContext(cfg, torch.arange(6).expand(2, 6))
        torch.testing.assert_close(gqa(x, explicit), gqa(x, ctx))


def test_attention_matches_a_naive_softmax_with_alibi():
    cfg = ModelConfig(d_model=16, n_heads=2, position="alibi")
    attn = Attention(cfg, layer=0)
    x = torch.randn(1, 5, 16)
    ctx = AttentionContext(cfg, torch.arange(5)[None])
    q = attn.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    slopes = torch.tensor([2.0**-4, 2.0**-8])  # 2 heads: 2^(-8/2 * h)
    distance = (torch.arange(5)[:, None] - torch.arange(5)[None]).float()
    scores = q @ k.transpose(-1, -2) / 8**0.5 - slopes[:, None, None] * distance
    scores = scores.masked_fill(distance < 0, float("-inf"))
    want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(attn(x, ctx), want)


def test_qk_norm_normalises_each_head():
    cfg = ModelConfig(d_model=32, n_heads=4, qk_norm=True)
    attn = Attention(cfg, layer=0)
    assert attn.q_norm.weight.shape == (8,)
    big = torch.randn(1, 3, 32)
    ctx = AttentionContext(cfg, torch.arange(3)[None], causal_kernel=True)
    # scaling q_proj and k_proj changes nothing once queries and keys are RMS-normalised per head
    out = attn(big, ctx)
    with torch.no_grad():
        attn.q_proj.weight.mul_(10)
        attn.k_proj.weight.mul_(10)
    torch.testing.assert_close(attn(big, ctx), out, atol=1e-5, rtol=1e-4)

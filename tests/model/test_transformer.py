import pytest
import torch

from lmforge.model import ContiguousKVCache, ModelConfig, Transformer

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64)

VARIANTS = {
    "llama-gqa": dict(n_kv_heads=2),
    "mqa-qknorm": dict(n_kv_heads=1, qk_norm=True),
    "rope-partial-llama3": dict(
        rotary_pct=0.5,
        rope_theta=500.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "learned-gpt2": dict(position="learned", norm="layernorm", mlp="gelu_tanh", qkv_bias=True, mlp_bias=True),
    "sinusoidal-relu": dict(position="sinusoidal", mlp="relu", embedding_norm=True),
    "alibi": dict(position="alibi", n_heads=8, d_model=48, mlp="geglu"),
    "alibi-6-heads": dict(position="alibi", n_heads=6, d_model=48),
    "relative": dict(position="relative", relative_buckets=8, relative_max_distance=16),
    "no-positions": dict(position="none"),
    "sliding": dict(attention="sliding", sliding_window=3, n_kv_heads=2),
    "sparse": dict(attention="sparse", sparse_block=3),
    "moe": dict(n_experts=4, moe_top_k=2),
    "parallel-sandwich": dict(parallel_residual=True, norm_position="sandwich"),
    "post-ln-parallel": dict(norm_position="post", norm="layernorm", parallel_residual=True),
    "deepnorm": dict(norm="deepnorm", norm_position="post"),
    "no-final-norm-tied": dict(final_norm=False, tie_embeddings=True),
}


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**BASE, **overrides})).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_incremental_decoding_matches_full_forward(name):
    model = build(**VARIANTS[name])
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=16)
        # prefill, single tokens, then a chunk (chunked prefill)
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 6), (6, 7), (7, 12)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "alibi", "relative", "learned-gpt2", "sliding"])
def test_ragged_batch_in_cache_matches_each_sequence_alone(name):
    model = build(**VARIANTS[name])
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        want_a, want_b = model(a).logits, model(b).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=16)
        # prefill 7 and 4 tokens, right-padded; padding has position -1 and must not land in the cache
        prompt = torch.zeros(2, 7, dtype=torch.long)
        prompt[0], prompt[1, :4] = a[0, :7], b[0, :4]
        positions = torch.tensor([list(range(7)), [0, 1, 2, 3, -1, -1, -1]])
        first = model(prompt, position_ids=positions, cache=cache).logits
        assert cache.lengths().tolist() == [7, 4]
        steps = [model(torch.stack([a[:, 7 + i], b[:, 4 + i]]), cache=cache).logits for i in range(2)]
    torch.testing.assert_close(first[0], want_a[0, :7], atol=1e-5, rtol=0)
    torch.testing.assert_close(first[1, :4], want_b[0, :4], atol=1e-5, rtol=0)
    for i, step in enumerate(steps):
        torch.testing.assert_close(step[0, 0], want_a[0, 7 + i], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[1, 0], want_b[0, 4 + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "alibi", "relative", "learned-gpt2", "sinusoidal-relu", "moe"])
def test_packed_segments_equal_separate_sequences(name):
    model = build(**VARIANTS[name])
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 4, 3)]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    segments = torch.cat([torch.full((d.shape[1],), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions, segment_ids=segments).logits
        want = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prefix_decoder_is_bidirectional_inside_the_prefix_only():
    model = build(structure="prefix")
    ids = torch.randint(0, 97, (1, 8))
    prefix = torch.tensor([4])
    changed_in_prefix, changed_after = ids.clone(), ids.clone()
    changed_in_prefix[0, 3] = (ids[0, 3] + 1) % 97
    changed_after[0, 6] = (ids[0, 6] + 1) % 97
    with torch.no_grad():
        base = model(ids, prefix_lengths=prefix).logits
        in_prefix = model(changed_in_prefix, prefix_lengths=prefix).logits
        after = model(changed_after, prefix_lengths=prefix).logits
        causal = model(ids).logits
    assert not torch.allclose(base[0, 0], in_prefix[0, 0])  # position 0 sees position 3
    torch.testing.assert_close(base[0, :6], after[0, :6])  # nobody before 6 sees 6
    assert not torch.allclose(base[0, 0], causal[0, 0])


@pytest.mark.parametrize("position", ["rope", "alibi", "relative"])
def test_prefix_decoder_with_cache_matches_full_forward(position):
    model = build(structure="prefix", position=position)
    ids = torch.randint(0, 97, (2, 10))
    prefix = torch.tensor([4, 6])
    with torch.no_grad():
        full = model(ids, prefix_lengths=prefix).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=16)
        first = model(ids[:, :6], prefix_lengths=prefix, cache=cache).logits
        rest = [model(ids[:, i : i + 1], prefix_lengths=prefix, cache=cache).logits for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)


def test_prefix_lengths_rejected_for_a_causal_model():
    with pytest.raises(ValueError, match="structure=causal"):
        build()(torch.zeros(1, 3, dtype=torch.long), prefix_lengths=torch.tensor([2]))


def test_module_names_follow_the_contract():
    model = build(n_experts=4, moe_every=2, norm_position="sandwich", qk_norm=True, position="learned")
    names = set(dict(model.named_modules()))
    for name in [
        "embed_tokens",
        "pos_embed",
        "blocks.0.attn_norm",
        "blocks.0.attn.q_proj",
        "blocks.0.attn.k_proj",
        "blocks.0.attn.v_proj",
        "blocks.0.attn.o_proj",
        "blocks.0.attn.q_norm",
        "blocks.0.attn.k_norm",
        "blocks.0.mlp_norm",
        "blocks.0.mlp.gate_proj",
        "blocks.0.mlp.up_proj",
        "blocks.0.mlp.down_proj",
        "blocks.0.attn_post_norm",
        "blocks.0.mlp_post_norm",
        "blocks.1.mlp.router",
        "blocks.1.mlp.experts.3.down_proj",
        "norm",
        "lm_head",
    ]:
        assert name in names, name
    assert list(model.blocks.keys()) == ["0", "1"]


def test_every_nth_layer_is_moe():
    model = build(n_layers=4, n_experts=4, moe_every=2)
    kinds = [type(block.mlp).__name__ for block in model.blocks.values()]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    out = model(torch.randint(0, 97, (2, 6)))
    assert out.aux_loss.item() > 0
    assert build()(torch.randint(0, 97, (2, 6))).aux_loss.item() == 0


def test_pipeline_stage_without_embeddings_head_or_some_blocks():
    model = build(n_layers=2)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
        hidden = model.embed_tokens(ids)
        del model.blocks["1"]
        model.embed_tokens, model.norm, model.lm_head = None, None, None
        # stage 1 (block 0) on hidden states, returns hidden states
        mid = model(hidden).logits
    # without a final norm and head, a stage hands on un-normalised hidden states, not vocabulary logits
    assert mid.shape == hidden.shape and not torch.allclose(mid, hidden)
    stage2 = build(n_layers=2)
    del stage2.blocks["0"]
    stage2.embed_tokens = None
    with torch.no_grad():
        got = stage2(mid).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied, untied = build(tie_embeddings=True), build()
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 97 * 32


def test_scaled_residual_init_shrinks_output_projections():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, "n_layers": 8, "d_model": 256, "n_heads": 4, "d_ff": 512}))
    std_q = model.blocks["0"].attn.q_proj.weight.std().item()
    std_o = model.blocks["0"].attn.o_proj.weight.std().item()
    std_down = model.blocks["0"].mlp.down_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert std_down == pytest.approx(0.02 / 4, rel=0.05)


def test_deepnorm_scales_residual_and_init():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "norm": "deepnorm", "norm_position": "post", "n_layers": 6, "d_model": 256})
    model = Transformer(cfg)
    block = model.blocks["0"]
    assert block.alpha == pytest.approx(12**0.25)
    beta = 48**-0.25
    v = block.attn.v_proj.weight  # xavier normal: std = gain * sqrt(2 / (fan_in + fan_out))
    q = block.attn.q_proj.weight
    assert v.std().item() == pytest.approx(beta * (2 / (256 + 256)) ** 0.5, rel=0.05)
    assert q.std().item() == pytest.approx((2 / (256 + 256)) ** 0.5, rel=0.05)
    # one block by hand: x_{l+1} = LN(alpha * x_l + f(x_l)) for each sub-layer
    x = torch.randn(1, 5, 256)
    from lmforge.model.attention import AttentionContext

    ctx = AttentionContext(cfg, torch.arange(5)[None], causal_kernel=True)
    with torch.no_grad():
        h = block.attn_norm(block.alpha * x + block.attn(x, ctx))
        want = block.mlp_norm(block.alpha * h + block.mlp(h))
        got, _ = block(x, ctx)
    torch.testing.assert_close(got, want)


def test_backward_reaches_every_parameter():
    model = build(n_experts=4, moe_top_k=1, position="relative").train()
    out = model(torch.randint(0, 97, (2, 8)))
    (out.logits.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_bfloat16_model_decodes_close_to_its_full_forward():
    model = build(n_kv_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        full = model(ids).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=1, max_len=8, dtype=torch.bfloat16)
        steps = torch.cat(
            [model(ids[:, :4], cache=cache).logits]
            + [model(ids[:, i : i + 1], cache=cache).logits for i in range(4, 8)],
            1,
        )
    assert full.dtype == steps.dtype == torch.bfloat16
    torch.testing.assert_close(steps.float(), full.float(), atol=5e-2, rtol=0)


def test_a_cache_without_lengths_needs_explicit_positions():
    class BareCache:
        def __init__(self, inner):
            self.inner = inner

        def update(self, layer, keys, values, positions):
            return self.inner.update(layer, keys, values, positions)

    model = build()
    cache = BareCache(ContiguousKVCache.for_model(model.cfg, batch=1, max_len=8))
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, cache=cache)
    with torch.no_grad():
        got = model(ids, position_ids=torch.arange(4)[None], cache=cache).logits
    torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=0)


def _block_by_hand(block, x, ctx, position):
    attn, mlp = block.attn, block.mlp
    if position == "parallel-pre":
        return x + attn(block.attn_norm(x), ctx) + mlp(block.mlp_norm(x))
    if position == "sandwich":
        h = x + block.attn_post_norm(attn(block.attn_norm(x), ctx))
        return h + block.mlp_post_norm(mlp(block.mlp_norm(h)))
    h = block.attn_norm(x + attn(x, ctx))  # post-LN
    return block.mlp_norm(h + mlp(h))


@pytest.mark.parametrize(
    ("position", "overrides"),
    [
        ("parallel-pre", dict(parallel_residual=True)),
        ("sandwich", dict(norm_position="sandwich")),
        ("post", dict(norm_position="post", norm="layernorm")),
    ],
)
def test_block_wiring_matches_its_definition(position, overrides):
    from lmforge.model.attention import AttentionContext

    model = build(**overrides)
    block = model.blocks["0"]
    x = torch.randn(2, 5, 32)
    ctx = AttentionContext(model.cfg, torch.arange(5).expand(2, 5), causal_kernel=True)
    with torch.no_grad():
        got, aux = block(x, ctx)
        torch.testing.assert_close(got, _block_by_hand(block, x, ctx, position))
    assert aux is None


def test_embedding_norm_normalises_what_the_first_block_sees():
    model = build(embedding_norm=True, norm="layernorm", position="learned")
    seen = {}

    def keep_input(module, args):
        seen["x"] = args[0]

    model.blocks["0"].register_forward_pre_hook(keep_input)
    ids = torch.randint(0, 97, (1, 6))
    model(ids)
    raw = model.embed_tokens(ids) + model.pos_embed(torch.arange(6))[None]
    want = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(seen["x"], want)


def test_learned_positions_refuse_positions_past_the_table():
    model = build(position="learned", max_seq_len=8)
    with pytest.raises(ValueError, match="beyond the learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_logits_rows_give_those_rows_of_the_full_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)).eval()
    ids = torch.randint(0, 50, (3, 7))
    full = model(ids).logits
    rows = torch.tensor([6, 7, 20, 13])  # flattened batch * seq positions, in any order
    picked = model(ids, logits_rows=rows).logits
    assert picked.shape == (4, 50)
    torch.testing.assert_close(picked, full.reshape(-1, 50)[rows], rtol=1e-5, atol=1e-5)
